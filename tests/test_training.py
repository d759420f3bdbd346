"""RL training: consistency of the tailored policy, frozen base, gradient accumulation,
exact resume after SIGKILL, atomic checkpoints, learning on an easy reward, clear errors.

Tiny random models only (tests/tiny_models.py); rollouts use the reference sampler so these
tests exercise the training loop, not a native backend.
"""
import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ipa_fast.training import TrainConfig, Trainer, train
from ipa_fast.training import checkpoint as ckpt
from ipa_fast.training import ppo as P
from ipa_fast.training.quark import DataPool
from ipa_fast.training.rewards import RewardError
from tests.tiny_models import make_tiny_pair

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["the cat", "a dog", "we play", "birds sing", "she writes", "he cooks", "people walk", "hello"]


# one thread (tests/conftest.py): the resume test's subprocesses run with OMP_NUM_THREADS=1,
# so in-process runs keep the same float order.
pytestmark = pytest.mark.usefixtures("one_thread")


def models():
    """A tiny pair with a flatter output head than tiny_models' default, so sampling explores."""
    base, adapter, tok = make_tiny_pair(seed=0)
    with torch.no_grad():
        base.get_output_embeddings().weight.div_(8)
        adapter.get_output_embeddings().weight.div_(8)
    return base, adapter, tok


def even_tokens(prompts, completions, completion_ids):
    """Easily learnable: the fraction of generated token ids that are even."""
    return [float(np.mean([i % 2 == 0 for i in ids])) for ids in completion_ids]


def config(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), steps=2, batch_size=8, minibatch_size=4, max_new_tokens=6,
                eval_every=0, eval_size=4, eval_max_new_tokens=6, progress=False, backend="reference",
                checkpoint_every=1)
    base.update(kw)
    return TrainConfig(**base)


def trainer(tmp_path, algo="ppo", **kw):
    base, adapter, tok = models()
    rows = [{"prompt": p} for p in PROMPTS]
    return Trainer(config(tmp_path, algo=algo, **kw), base, adapter, tok, even_tokens, rows, rows[:4])


@pytest.mark.parametrize("algo", ["ppo", "quark"])
def test_ratio_one_and_kl_zero_before_first_update(tmp_path, algo):
    tr = trainer(tmp_path, algo)
    rows = [{"prompt": p} for p in PROMPTS]
    gen = tr.rollout(rows, seed=3)
    prefixes = [tr.inference_prefix] * len(rows)
    with torch.no_grad():
        old = tr.token_stats(gen.prompt_token_ids, prefixes, gen.token_ids, values=algo == "ppo")
    new = tr.token_stats(gen.prompt_token_ids, prefixes, gen.token_ids, values=algo == "ppo")
    m = old["mask"].bool()
    ratio = torch.exp(new["logprob"] - old["logprob"])[m]
    assert torch.equal(ratio, torch.ones_like(ratio))          # same function, same inputs: exactly 1
    assert torch.equal(new["kl"][m], torch.zeros_like(ratio))  # reference = frozen initial adapter
    # the sampler's log-probs (KV-cached decoding) agree with teacher-forced scoring
    sampled = torch.tensor([lp for row in gen.logprobs for lp in row])
    torch.testing.assert_close(old["logprob"][m], sampled, atol=1e-4, rtol=0)
    if algo == "ppo":  # and the PPO step itself sees ratio 1 on its first minibatch
        data = tr.ppo_prepare(gen.prompt_token_ids, gen.token_ids, even_tokens(None, None, gen.token_ids))
        stats = tr.ppo_backward(data, list(range(4)))
        assert stats["ratio"] == pytest.approx(1.0, abs=1e-5) and stats["clipfrac"] == 0


def test_base_bit_identical_and_only_adapter_trained(tmp_path):
    base, adapter, tok = models()
    before_base = copy.deepcopy(base.state_dict())
    before_adapter = {k: v.clone() for k, v in adapter.state_dict().items()}
    summary = train(config(tmp_path, algo="ppo", lr=1e-2), reward=even_tokens, train_prompts=PROMPTS,
                    eval_prompts=PROMPTS[:4], base=base, adapter=adapter, tokenizer=tok)
    assert summary["steps"] == 2
    for k, v in base.state_dict().items():
        assert torch.equal(v, before_base[k]), k
    assert all(not p.requires_grad for p in base.parameters())
    assert any(not torch.equal(v, before_adapter[k]) for k, v in adapter.state_dict().items())


@pytest.mark.parametrize("algo", ["ppo", "quark"])
def test_gradient_accumulation_invariance(tmp_path, algo):
    """One minibatch of 8 as 1 x 8 or as 8 micro-batches of 1 gives the same gradient."""
    grads = []
    for accum in (1, 8):
        tr = trainer(tmp_path / str(accum), algo, minibatch_size=8, grad_accum=accum)
        rows = [{"prompt": p} for p in PROMPTS]
        gen = tr.rollout(rows, seed=5)
        scores = even_tokens(None, None, gen.token_ids)
        if algo == "ppo":
            tr.ppo_backward(tr.ppo_prepare(gen.prompt_token_ids, gen.token_ids, scores), list(range(8)))
        else:
            tr.pool.add(gen.prompt_token_ids, gen.token_ids, scores)
            tr.quark_backward(list(range(8)))
        params = [p for g in tr.optimizer.param_groups for p in g["params"]]
        grads.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("algo, steps, kw", [
    ("ppo", 8, dict(lr=1e-2)),
    ("quark", 16, dict(lr=3e-2, quark_updates=8, minibatch_size=16, batch_size=16, n_quantiles=2, max_new_tokens=8)),
])
def test_reward_goes_up_on_an_easy_reward(tmp_path, algo, steps, kw):
    base, adapter, tok = models()
    cfg = config(tmp_path, algo=algo, steps=steps, kl_coef=0.0, checkpoint_every=100, **kw)
    summary = train(cfg, reward=even_tokens, train_prompts=PROMPTS * 2, eval_prompts=PROMPTS,
                    base=base, adapter=adapter, tokenizer=tok)
    log = [json.loads(ln) for ln in open(cfg.out + "/metrics.jsonl")]
    train_rewards = [r["reward"] for r in log if r["type"] == "train"]
    first, last = np.mean(train_rewards[:3]), np.mean(train_rewards[-3:])
    assert last > first + 0.1, (first, last, train_rewards)
    assert summary["final_eval"]["reward"] > summary["initial_eval"]["reward"]
    assert (Path(cfg.out) / "reward_curve.png").stat().st_size > 0
    assert {"rollout", "reward", "update"} <= set(summary["seconds_per_step"])


# ---------------------------------------------------------------------------------------
# checkpoints and resume

@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    base, adapter, tok = models()
    for name, m in (("base", base), ("adapter", adapter)):
        m.save_pretrained(d / name)
        tok.save_pretrained(d / name)
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "tag": i}) + "\n" for i, p in enumerate(PROMPTS)))
    (d / "killer_reward.py").write_text(textwrap.dedent("""
        import os, signal
        from pathlib import Path
        def reward(prompts, completions, completion_ids, tag):
            kill_at = int(os.environ.get("KILL_AT_CALL", "0"))
            counter = Path(os.environ["CALLS_FILE"])
            n = int(counter.read_text()) + 1 if counter.exists() else 1
            counter.write_text(str(n))
            if n == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return [sum(i % 2 == 0 for i in ids) / len(ids) for ids in completion_ids]
    """))
    return d


def _train_cmd(d, out, algo, steps, *extra):
    return [sys.executable, str(ROOT / "training" / "train.py"), "--reward", f"{d}/killer_reward.py:reward",
            "--prompts", f"{d}/prompts.jsonl", "--eval-prompts", f"{d}/prompts.jsonl", "--base", f"{d}/base",
            "--adapter", f"{d}/adapter", "--algo", algo, "--steps", str(steps), "--out", str(out),
            "--batch-size", "4", "--minibatch-size", "2", "--max-new-tokens", "4", "--eval-size", "2",
            "--eval-max-new-tokens", "4", "--eval-every", "2", "--checkpoint-every", "1", "--lr", "1e-2",
            "--quark-updates", "2", "--backend", "reference", "--no-progress", *extra]


def _run(cmd, tmp_path, kill_at=0):
    env = dict(os.environ, OMP_NUM_THREADS="1", KILL_AT_CALL=str(kill_at), CALLS_FILE=str(tmp_path / f"calls-{len(os.listdir(tmp_path))}"))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _metrics(out):
    recs = [json.loads(ln) for ln in open(Path(out) / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in recs]


def _adapter_params(out):
    from safetensors.torch import load_file
    return load_file(str(Path(out) / "adapter" / "model.safetensors"))




def _straight_run(d, out, algo, steps):
    """The reference run, in-process (cheaper than a third subprocess), same flags as _train_cmd."""
    from ipa_fast.cli.main import build_parser
    from ipa_fast.training.cli import run

    argv = _train_cmd(d, out, algo, steps)[2:]
    return run(build_parser().parse_args(["train", *argv]))


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path, model_dirs, monkeypatch):
    """Quark (its pool is the most state to lose): 4 steps straight == killed inside step 3
    by SIGKILL, then --resume to 4 — same metrics, same adapter, bit for bit."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    monkeypatch.setenv("CALLS_FILE", str(tmp_path / "calls-straight"))
    s = _straight_run(model_dirs, straight, "quark", 4)
    # reward calls: initial eval (1), steps 1, 2 (2, 3), eval at 2 (4), step 3 (5): killed inside step 3
    r = _run(_train_cmd(model_dirs, killed, "quark", 4), tmp_path, kill_at=5)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    assert ckpt.load_latest(killed / "checkpoints")[0]["step"] == 2
    r = _run(_train_cmd(model_dirs, killed, "quark", 4, "--resume", "--json", str(tmp_path / "k.json")), tmp_path)
    assert r.returncode == 0, r.stderr
    assert _metrics(straight) == _metrics(killed)
    a, b = _adapter_params(straight), _adapter_params(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    k = json.loads((tmp_path / "k.json").read_text())
    assert s["steps"] == k["steps"] == 4 and "reward" in k["initial_eval"]
    assert s["final_eval"]["reward"] == k["final_eval"]["reward"]
    assert Path(k["checkpoint"]).name == "step_000004"
    # the saved adapter restores the tailored policy: alpha, the best control token, V
    from ipa_fast.decoding.tailored import TailoredLM
    lm = TailoredLM.from_pretrained(model_dirs / "base", killed / "adapter")
    state = ckpt.load_latest(killed / "checkpoints")[0]
    assert lm.adapter_prefix == state["control_ids"][:1] and lm.adapter_prefix[0] >= lm.V
    assert lm.V == len(make_tiny_pair()[2]) and lm.alpha == 1.0
    out = lm.generate(PROMPTS[:2], 4, seed=0, backend="reference")
    assert all(0 <= i < lm.V for row in out.token_ids for i in row)


def test_ppo_resume_is_exact(tmp_path):
    """PPO (value head, optimiser, KL controller): 4 steps == 2 steps, then resume to 4."""
    kw = dict(reward=even_tokens, train_prompts=PROMPTS, eval_prompts=PROMPTS[:4])
    results = []
    for name, plan in (("straight", [4]), ("resumed", [2, 4])):
        cfg = config(tmp_path / name, algo="ppo", lr=1e-2, eval_every=2, kl_target=1.0)
        for i, steps in enumerate(plan):
            base, adapter, tok = models()
            out = train(TrainConfig(**{**cfg.__dict__, "steps": steps}), base=base, adapter=adapter,
                        tokenizer=tok, resume=i > 0, **kw)
        results.append((out, _metrics(cfg.out), dict(adapter.named_parameters())))
    (s, ms, ps), (r, mr, pr) = results
    untimed = lambda rec: {k: v for k, v in rec.items() if not k.startswith("time/")}  # noqa: E731
    assert ms == mr and untimed(s["final_eval"]) == untimed(r["final_eval"])
    assert all(torch.equal(ps[k], pr[k]) for k in ps)
    state = ckpt.load_latest(Path(tmp_path / "resumed" / "run" / "checkpoints"))[0]
    assert state["value_head"] is not None and state["kl_controller"]["value"] != 0.05


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    root = tmp_path / "ck"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from ipa_fast.training import checkpoint as ckpt
        ckpt.save({str(root)!r}, 1, {{"step": 1, "w": torch.ones(3)}})
        def dying_write(path, data):
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        ckpt._write_file = dying_write
        ckpt.save({str(root)!r}, 2, {{"step": 2, "w": torch.zeros(3)}})
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert any(p.name.startswith(".tmp-") for p in root.iterdir())  # the interrupted write
    state, path = ckpt.load_latest(root)
    assert state["step"] == 1 and path.name == "step_000001" and torch.equal(state["w"], torch.ones(3))
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())  # cleaned up


def test_checkpoint_keeps_last_k_and_survives_a_bad_latest(tmp_path):
    root = tmp_path / "ck"
    for s in range(1, 6):
        ckpt.save(root, s, {"step": s}, keep=2)
    assert [p.name for p in ckpt.checkpoint_dirs(root)] == ["step_000004", "step_000005"]
    (root / "latest").write_text("step_999999\n")  # dangling pointer: fall back to the newest
    assert ckpt.load_latest(root)[0]["step"] == 5
    (root / "step_000005" / "tensors.safetensors").write_bytes(b"damaged")
    assert ckpt.load_latest(root)[0]["step"] == 4


# ---------------------------------------------------------------------------------------
# errors

@pytest.mark.parametrize("bad", [
    lambda p, c: 1 / 0,
    lambda p, c: [float("nan")] * len(c),
    lambda p, c: [0.5],
])
def test_reward_failure_saves_checkpoint_then_stops(tmp_path, bad):
    calls = {"n": 0}

    def reward(prompts, completions):
        calls["n"] += 1
        return [0.5] * len(completions) if calls["n"] <= 2 else bad(prompts, completions)

    base, adapter, tok = models()
    cfg = config(tmp_path, algo="quark", steps=3)
    with pytest.raises(RewardError, match=r"at step 2; checkpoint of step 1 saved"):
        train(cfg, reward=reward, train_prompts=PROMPTS, eval_prompts=PROMPTS[:4], base=base,
              adapter=adapter, tokenizer=tok)
    assert ckpt.load_latest(Path(cfg.out) / "checkpoints")[0]["step"] == 1


# ---------------------------------------------------------------------------------------
# supervised warm start

SFT_ROWS = [{"prompt": p, "reference": r} for p, r in zip(PROMPTS, [
    " sat on the mat", " barked at night", " all day long", " in the morning", " a long letter",
    " a fine dinner", " to the market", " there and back"])]


def _tailored_nll(tr, rows) -> float:
    """Mean NLL of the rows' warm-start targets under TailoredLM.score (the decoding path)."""
    targets = tr.sft_targets(rows)
    with torch.no_grad():
        sc = tr.lm.score([r["prompt"] for r in rows], targets, adapter_prefix=tr.inference_prefix)
    return -float(torch.cat(sc.logprobs).sum()) / sum(len(t) for t in targets)


@pytest.mark.parametrize("algo", ["ppo", "quark"])
def test_sft_warm_start_fits_targets_then_becomes_the_kl_reference(tmp_path, algo):
    base, adapter, tok = models()
    cfg = config(tmp_path, algo=algo, steps=13, sft_steps=12, sft_lr=3e-2, lr=1e-4, batch_size=8,
                 minibatch_size=8, checkpoint_every=100)
    tr = Trainer(cfg, base, adapter, tok, even_tokens, SFT_ROWS, SFT_ROWS[:4])
    base_before = copy.deepcopy(base.state_dict())
    nll0 = _tailored_nll(tr, SFT_ROWS)
    first = tr.train_step()
    # the logged loss of the first step is the tailored NLL as the decoding path scores it
    # (batch_size == number of rows, so the step saw every row once)
    assert first["type"] == "sft"
    assert first["sft/nll"] == pytest.approx(nll0, rel=1e-4)
    for _ in range(11):
        assert tr.train_step()["type"] == "sft"
    nll1 = _tailored_nll(tr, SFT_ROWS)
    assert nll1 < 0.5 * nll0, (nll0, nll1)
    # the first RL step takes the warm-started adapter as its KL reference
    warm = copy.deepcopy(tr.adapter.state_dict())
    rec = tr.train_step()
    assert rec["type"] == "train" and rec["lr"] == pytest.approx(1e-4)
    ref = tr.ref_adapter.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in warm.items())
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in base_before.items())


def _adapter_nll(tr, rows) -> float:
    """Mean NLL of the rows' warm-start targets under the adapter alone, one unpadded forward
    per row (prefix + prompt + target), log-softmax over the shared vocabulary."""
    total, n = 0.0, 0
    for r, t in zip(rows, tr.sft_targets(rows)):
        p = tr.tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([list(tr.inference_prefix) + p + t])
        with torch.no_grad():
            logp = torch.log_softmax(tr.adapter(ids).logits[0, :, :tr.V].float(), -1)
        start = ids.shape[1] - len(t) - 1
        total -= float(sum(logp[start + k, tok] for k, tok in enumerate(t)))
        n += len(t)
    return total / n


@pytest.mark.parametrize("algo", ["ppo", "quark"])
def test_sft_of_the_adapter_alone(tmp_path, algo):
    base, adapter, tok = models()
    cfg = config(tmp_path, algo=algo, steps=13, sft_steps=12, sft_lr=3e-2, lr=1e-4, batch_size=4,
                 sft_batch_size=8, minibatch_size=4, checkpoint_every=100, sft_target="adapter")
    tr = Trainer(cfg, base, adapter, tok, even_tokens, SFT_ROWS, SFT_ROWS[:4])
    base_before = copy.deepcopy(base.state_dict())
    # warm-start steps draw sft_batch_size rows, RL steps batch_size
    assert len(tr._prompt_batch(1)) == 8 and len(tr._prompt_batch(13)) == 4
    nll0 = _adapter_nll(tr, SFT_ROWS)
    first = tr.train_step()
    assert first["type"] == "sft"
    assert first["sft/nll"] == pytest.approx(nll0, rel=1e-4)  # all 8 rows, the adapter's own NLL
    for _ in range(11):
        tr.train_step()
    assert _adapter_nll(tr, SFT_ROWS) < 0.5 * nll0
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in base_before.items())
    assert tr.train_step()["type"] == "train"


def test_min_new_tokens_masks_eos_in_rollouts_only(tmp_path):
    base, adapter, tok = models()
    eos = tok.eos_token_id

    def eos_first(module, args, out):  # make EOS by far the most likely next token of pi
        out.logits[..., eos] += 100.0
        return out

    adapter.register_forward_hook(eos_first)
    rows = [{"prompt": p} for p in PROMPTS]
    tr = Trainer(config(tmp_path, min_new_tokens=4, max_new_tokens=6, eval_max_new_tokens=6), base, adapter, tok,
                 even_tokens, rows, rows[:4])
    free = tr.rollout(rows, 0, min_new_tokens=0)
    assert all(len(t) == 1 and t[0] == eos for t in free.token_ids)  # the policy stops at once
    masked = tr.rollout(rows, 0)
    assert all(len(t) >= 4 for t in masked.token_ids)
    assert all(eos not in t[:4] for t in masked.token_ids)
    tr.evaluate()  # evaluation keeps the protocol: no mask, so it stops at once
    assert all(s["completion"] == "" for s in tr.last_samples)
    # the scored policy carries the same mask: where rollouts cannot draw EOS, pi has no EOS
    # mass, so a drawn token is likely under it; unmasked (TailoredLM.score) it is not
    resp = [t[:4] for t in masked.token_ids]
    st = tr.token_stats(masked.prompt_token_ids, [[]] * len(resp), resp)
    with torch.no_grad():
        sc = tr.lm.score(PROMPTS, resp)
    for i in range(len(resp)):
        assert (st["logprob"][i, :4] > -30).all() and (sc.logprobs[i] < -60).all()


def test_repeated_bigram_fraction():
    from ipa_fast.training.trainer import repeated_bigram_fraction as f

    assert f([]) == 0.0 and f([5]) == 0.0 and f([1, 2, 3, 4]) == 0.0
    assert f([1, 2, 1, 2, 1, 2]) == pytest.approx(3 / 5)  # (1,2),(2,1) new; 3 repeats of 5
    assert f([7] * 11) == pytest.approx(9 / 10)


@pytest.mark.parametrize("algo", ["ppo", "quark"])
def test_repeat_coef_shapes_the_training_scores_only(tmp_path, algo, monkeypatch):
    coef = 0.5
    base, adapter, tok = models()

    def loop_on_some_rows(module, args, out):  # rows 0-3 of a rollout loop on token 4
        out.logits[: out.logits.shape[0] // 2, :, 4] += 100.0
        return out

    adapter.register_forward_hook(loop_on_some_rows)
    rows = [{"prompt": p} for p in PROMPTS]
    tr = Trainer(config(tmp_path, algo=algo, repeat_coef=coef, steps=1), base, adapter, tok, even_tokens,
                 rows, rows[:4])
    seen = {}
    update_name = "ppo_update" if algo == "ppo" else "quark_update"
    real = getattr(tr, update_name)

    def spy(step, prompt_ids, responses, scores):
        seen["responses"], seen["scores"] = responses, list(scores)
        return real(step, prompt_ids, responses, scores)

    monkeypatch.setattr(tr, update_name, spy)
    rec = tr.train_step()
    plain = even_tokens(None, None, seen["responses"])
    expect = []
    for ids, r in zip(seen["responses"], plain):  # recount the repeats independently
        bigrams = [(int(a), int(b)) for a, b in zip(ids, ids[1:])]
        repeats = sum(bigrams[i] in bigrams[:i] for i in range(len(bigrams)))
        expect.append(r - coef * repeats / max(1, len(ids) - 1))
    assert seen["scores"] == pytest.approx(expect)
    assert any(e < r for e, r in zip(expect, plain))  # some sample did repeat itself
    assert rec["reward"] == pytest.approx(np.mean(plain))  # the log keeps the plain reward
    assert rec["score_shaped"] == pytest.approx(np.mean(expect))
    assert "distinct_2" in tr.evaluate()


def test_sft_needs_the_target_field(tmp_path):
    base, adapter, tok = models()
    rows = [{"prompt": p} for p in PROMPTS]
    tr = Trainer(config(tmp_path, steps=2, sft_steps=1, sft_field="answer"), base, adapter, tok,
                 even_tokens, rows, rows[:4])
    with pytest.raises(ValueError, match="'answer'"):
        tr.train_step()


@pytest.mark.parametrize("kw, msg", [
    (dict(algo="dpo"), "algo"),
    (dict(minibatch_size=4, grad_accum=3), "multiple of grad_accum"),
    (dict(algo="ppo", batch_size=2, minibatch_size=4), "minibatch_size"),
    (dict(reference="other"), "reference"),
    (dict(steps=-1), "steps"),
    (dict(lr=0.0), "lr"),
    (dict(temperature=0.0), "temperature"),
    (dict(steps=2, sft_steps=3), "sft_steps"),
    (dict(min_new_tokens=40), "min_new_tokens"),
    (dict(sft_lr=0.0), "sft_lr"),
    (dict(sft_batch_size=0), "sft_batch_size"),
    (dict(sft_target="base"), "sft_target"),
    (dict(repeat_coef=-1.0), "repeat_coef"),
])
def test_bad_config(tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg):
        config(tmp_path, **kw).validate()


def test_cli_errors_are_one_line(tmp_path, model_dirs, capsys):
    from ipa_fast.cli.main import main

    common = ["--out", str(tmp_path / "o"), "--base", f"{model_dirs}/base", "--adapter", f"{model_dirs}/adapter"]
    cases = [
        (["train", *common], "--task"),
        (["train", "--reward", "os:getcwd", *common], "--prompts"),
        (["train", "--reward", "no_such_mod_xyz:f", "--prompts", f"{model_dirs}/prompts.jsonl", *common], "cannot import"),
        (["train", "--reward", "os:getcwd", "--prompts", str(tmp_path / "missing.jsonl"), *common], "not found"),
        (["train", "--task", "lexical", "--minibatch-size", "3", "--grad-accum", "2", *common], "multiple"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err, err
    assert main(["train", "--algo", "dpo"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_fresh_run_refuses_to_overwrite_checkpoints(tmp_path):
    base, adapter, tok = models()
    cfg = config(tmp_path, algo="ppo", steps=1)
    kw = dict(reward=even_tokens, train_prompts=PROMPTS, eval_prompts=PROMPTS[:4], tokenizer=tok)
    train(cfg, base=base, adapter=adapter, **kw)
    base, adapter, _ = models()
    with pytest.raises(ValueError, match="--resume"):
        train(cfg, base=base, adapter=adapter, **kw)


# ---------------------------------------------------------------------------------------
# pieces

def test_gae_matches_discounted_sums():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float32)
    adv, ret = P.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    for b in range(3):
        n = int(mask[b].sum())
        for t in range(n):
            assert ret[b, t].item() == pytest.approx(rewards[b, t:n].sum().item(), abs=1e-5)
    assert (adv[mask == 0] == 0).all()


def test_adaptive_kl_controller():
    c = P.AdaptiveKLController(0.1, target=1.0, horizon=100)
    c.update(10.0, 10)   # KL far above target: error clipped to +0.2
    assert c.value == pytest.approx(0.1 * 1.02)
    c.update(0.0, 10)
    assert c.value == pytest.approx(0.1 * 1.02 * 0.98)
    d = P.AdaptiveKLController(1.0, 1.0, 1.0)
    d.load_state_dict(c.state_dict())
    assert d.value == c.value


def test_pool_quantiles_best_first():
    pool = DataPool(3)
    pool.add([[1]] * 6, [[2]] * 6, [0.1, 0.9, 0.5, 0.3, 0.7, 0.2])
    assert pool.quantiles == [2, 0, 1, 1, 0, 2]
    pool.add([[1]] * 3, [[2]] * 3, [1.0, 0.0, 0.6])
    assert len(pool) == 9 and pool.quantiles[6] == 0 and pool.quantiles[7] == 2
