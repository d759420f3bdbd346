"""Training one adapter in the presence of other frozen experts (TrainConfig.frozen_adapters,
``ipa-fast train --frozen-adapter DIR[:WEIGHT]``): pi = softmax(base + alpha * adapter +
sum_j w_j * frozen_j), in rollouts, the scored policy, its KL reference and evaluation.

Tiny random models only; the references are float64 forwards of each model on each unpadded row.
"""
import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch

from ipa_fast.decoding.tailored import TailoredLM, save_adapter
from ipa_fast.training import TrainConfig, Trainer, train
from tests.test_training import PROMPTS, SFT_ROWS, config, even_tokens, models
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

FROZEN_PREFIX = [5, 7]  # ordinary token ids the frozen expert sees before every prompt


def frozen_dir(root: Path, tok, *, alpha: float, seed: int = 11) -> Path:
    """A third tiny model saved as an ipa_fast adapter (its ipa_adapter.json: alpha, a prefix)."""
    model = make_tiny_model("gpt2", len(tok), seed, n_layer=1, eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        model.get_output_embeddings().weight.div_(8)  # as models(): flat enough to explore
    d = root / f"frozen-{seed}-{alpha}"
    save_adapter(d, model, tok, alpha=alpha, adapter_prefix=FROZEN_PREFIX, vocab_size=len(tok))
    return d


def untimed(path) -> list[dict]:
    recs = [json.loads(ln) for ln in open(Path(path) / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in recs]


@pytest.mark.parametrize("algo, kw", [("quark", dict(sft_steps=1)), ("ppo", dict(kl_target=1.0))])
def test_a_frozen_expert_of_weight_zero_changes_nothing(tmp_path, algo, kw):
    """Weight 0 (here the saved alpha of a directory given without :WEIGHT) ignores the expert:
    the run's numbers and trained adapter equal a run without it, bit for bit."""
    runs = {}
    for name in ("alone", "with-frozen"):
        base, adapter, tok = models()
        frozen = [str(frozen_dir(tmp_path, tok, alpha=0.0))] if name != "alone" else []
        cfg = config(tmp_path / name, algo=algo, steps=3, lr=1e-2, eval_every=2, frozen_adapters=frozen, **kw)
        summary = train(cfg, reward=even_tokens, train_prompts=SFT_ROWS, eval_prompts=SFT_ROWS[:4], base=base,
                        adapter=adapter, tokenizer=tok)
        runs[name] = (untimed(cfg.out), dict(adapter.named_parameters()), summary)
    (m0, p0, _), (m1, p1, s1) = runs["alone"], runs["with-frozen"]
    assert m0 == m1
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    assert [r["weight"] for r in s1["frozen_experts"]] == [0.0]


@pytest.fixture
def weighted(tmp_path):
    """A Trainer (reference "base", alpha 0.5) with one frozen expert of weight 0.7 (given as
    DIR:0.7 over the directory's saved alpha 0.3), and a rollout of it."""
    base, adapter, tok = models()
    d = frozen_dir(tmp_path, tok, alpha=0.3)
    rows = [{"prompt": p} for p in PROMPTS]
    cfg = config(tmp_path, algo="quark", alpha=0.5, reference="base", frozen_adapters=[f"{d}:0.7"])
    tr = Trainer(cfg, base, adapter, tok, even_tokens, rows, rows[:4])
    return tr, d, tr.rollout(rows, seed=3)


def reference_stats(tr, frozen_model, w, prompt_ids, responses):
    """float64 ``(log pi(token), KL(pi || softmax(base + w * frozen)))`` per response token, one
    unpadded forward per row and model: pi = softmax(base + alpha * adapter + w * frozen)."""
    V, alpha = tr.V, tr.cfg.alpha
    lps, kls = [], []
    for p, r in zip(prompt_ids, responses):
        def logits(model, prefix):
            ids = torch.tensor([list(prefix) + list(p) + list(r)])
            with torch.no_grad():
                z = model(ids).logits[0, :, :V].double()
            start = len(prefix) + len(p) - 1
            return z[start:start + len(r)]
        zb, za, zf = logits(tr.base, []), logits(tr.adapter, tr.inference_prefix), logits(frozen_model, FROZEN_PREFIX)
        logp = torch.log_softmax(zb + alpha * za + w * zf, -1)
        logq = torch.log_softmax(zb + w * zf, -1)
        lps.append(logp.gather(1, torch.tensor(r).view(-1, 1)).view(-1))
        kls.append((logp.exp() * (logp - logq)).sum(-1))
    return torch.cat(lps), torch.cat(kls)


def test_trainer_log_probs_are_the_product_with_the_frozen_expert(weighted):
    tr, d, gen = weighted
    (expert,) = tr.policy.frozen
    assert expert.weight == 0.7 and expert.prefix == FROZEN_PREFIX and tr.inference_prefix == tr.control_ids[:1]
    want_lp, want_kl = reference_stats(tr, expert.model, 0.7, gen.prompt_token_ids, gen.token_ids)
    prefixes = [tr.inference_prefix] * len(gen.token_ids)
    st = tr.token_stats(gen.prompt_token_ids, prefixes, gen.token_ids)
    m = st["mask"].bool()
    torch.testing.assert_close(st["logprob"][m].double(), want_lp, atol=2e-5, rtol=0)
    # the KL reference ("base") keeps the frozen expert: KL to base + w * frozen, not to the base
    torch.testing.assert_close(st["kl"][m].double(), want_kl, atol=2e-5, rtol=0)
    # rollouts sample that same product (the sampler's log-probs, KV-cached decoding)
    sampled = torch.tensor([lp for row in gen.logprobs for lp in row], dtype=torch.float64)
    torch.testing.assert_close(sampled, want_lp, atol=1e-4, rtol=0)


def test_only_the_adapter_trains_with_frozen_experts(weighted):
    tr, d, _ = weighted
    (expert,) = tr.policy.frozen
    before = copy.deepcopy(expert.model.state_dict())
    adapter_before = copy.deepcopy(tr.adapter.state_dict())
    rec = tr.train_step()
    assert rec["type"] == "train" and rec["quark/kl"] > 0
    assert all(torch.equal(v, before[k]) for k, v in expert.model.state_dict().items())
    assert not any(p.requires_grad for p in expert.model.parameters())
    assert any(not torch.equal(v, adapter_before[k]) for k, v in tr.adapter.state_dict().items())


def test_saved_adapter_records_its_frozen_experts_and_composes_back(tmp_path):
    """ipa_adapter.json names each frozen expert with its weight, prefix and weights' sha256;
    composing the saved adapter with them (TailoredLM.from_pretrained, the recorded weights)
    scores exactly as the trainer did."""
    base, adapter, tok = models()
    d = frozen_dir(tmp_path, tok, alpha=0.3)
    cfg = config(tmp_path, algo="ppo", alpha=0.5, steps=1, lr=1e-2, frozen_adapters=[f"{d}:0.7"])
    summary = train(cfg, reward=even_tokens, train_prompts=PROMPTS, eval_prompts=PROMPTS[:4], base=base,
                    adapter=adapter, tokenizer=tok)
    meta = json.loads((Path(summary["adapter"]) / "ipa_adapter.json").read_text())
    digest = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    assert meta["frozen_experts"] == [{"name": str(d), "weight": 0.7, "adapter_prefix": FROZEN_PREFIX,
                                       "sha256": {"model.safetensors": digest}}]
    assert meta["alpha"] == 0.5
    rec = meta["frozen_experts"][0]
    lm = TailoredLM.from_pretrained(base, [summary["adapter"], rec["name"]], tokenizer=tok, alpha=[None, rec["weight"]])
    assert lm.weights == [0.5, 0.7] and lm.prefixes[1] == FROZEN_PREFIX
    rows = [{"prompt": p} for p in PROMPTS[:4]]
    tr = Trainer(TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "again")}), base, lm.experts[0], tok,
                 even_tokens, rows, rows)
    gen = tr.rollout(rows, seed=1)
    st = tr.token_stats(gen.prompt_token_ids, [[]] * len(rows), gen.token_ids)
    with torch.no_grad():
        sc = lm.score([r["prompt"] for r in rows], gen.token_ids)
    torch.testing.assert_close(st["logprob"][st["mask"].bool()], torch.cat(sc.logprobs), atol=1e-5, rtol=0)


def test_resume_refuses_a_changed_frozen_expert(tmp_path):
    base, adapter, tok = models()
    d = frozen_dir(tmp_path, tok, alpha=0.5)
    kw = dict(reward=even_tokens, train_prompts=PROMPTS, eval_prompts=PROMPTS[:4], tokenizer=tok)
    cfg = config(tmp_path, algo="ppo", steps=1, frozen_adapters=[str(d)])
    train(cfg, base=base, adapter=adapter, **kw)
    other = make_tiny_model("gpt2", len(tok), 99, n_layer=1, eos_token_id=tok.eos_token_id)
    save_adapter(d, other, tok, alpha=0.5, adapter_prefix=FROZEN_PREFIX, vocab_size=len(tok))
    base, adapter, _ = models()
    with pytest.raises(ValueError, match="frozen_experts sha256"):
        train(TrainConfig(**{**cfg.__dict__, "steps": 2}), base=base, adapter=adapter, resume=True, **kw)


def test_frozen_adapter_flag(tmp_path, capsys):
    from ipa_fast.cli.main import build_parser, main
    from ipa_fast.training.cli import config_from_args

    _, _, tok = models()
    d = frozen_dir(tmp_path, tok, alpha=0.5)
    args = build_parser().parse_args(["train", "--task", "lexical", "--frozen-adapter", f"{d}:0.25",
                                      "--frozen-adapter", str(d)])
    assert config_from_args(args).frozen_adapters == [f"{d}:0.25", str(d)]
    assert config_from_args(build_parser().parse_args(["train", "--task", "lexical"])).frozen_adapters == []
    capsys.readouterr()
    for value, msg in ((f"{d}:0", "finite nonzero"), (f"{d}:nan", "finite nonzero"),
                       (str(tmp_path / "missing"), "not found")):
        assert main(["train", "--task", "lexical", "--frozen-adapter", value]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "--frozen-adapter" in err and "\n" not in err, err


@pytest.mark.parametrize("value, msg", [
    ("/no/such/adapter", "frozen_adapters\\[0\\]: .*not found"),
    ("x:0", "frozen_adapters\\[0\\]: .*finite nonzero"),
])
def test_bad_frozen_adapters_config(tmp_path, value, msg):
    with pytest.raises(ValueError, match=msg):
        config(tmp_path, frozen_adapters=[value]).validate()
    with pytest.raises(ValueError, match="list of"):
        config(tmp_path, frozen_adapters="dir").validate()
