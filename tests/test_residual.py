"""Residual adapters (TrainConfig.residual, ``ipa-fast train --residual``): the policy is
base + alpha * (adapter - initial adapter). The untrained product is the base itself, every adapter
parameter gets gradient at the first step (unlike zero_init_output, where only the zeroed gain does),
and a saved residual adapter loads back as a ResidualAdapter that decodes like the explicit
two-expert composition [trained, initial] with weights [alpha, -alpha].

Tiny random models only; references are the base's own float64 log-softmax and the explicit
K-expert TailoredLM.
"""
import copy
import json

import pytest
import torch

from ipa_fast.decoding.hf import TailoredLogitsProcessor
from ipa_fast.decoding.residual import ResidualAdapter
from ipa_fast.decoding.tailored import TailoredLM, save_adapter
from ipa_fast.training import TrainConfig, Trainer, train
from ipa_fast.training.policy import zero_output
from tests.test_training import PROMPTS, config, even_tokens, models

pytestmark = pytest.mark.usefixtures("one_thread")

ALPHA = 0.7


def saved_initial(tmp_path, adapter, tok):
    d = tmp_path / "initial"
    save_adapter(d, adapter, tok, alpha=ALPHA, vocab_size=len(tok))
    return d


def residual_trainer(tmp_path, **kw):
    base, adapter, tok = models()
    d = saved_initial(tmp_path, adapter, tok)
    rows = [{"prompt": p} for p in PROMPTS]
    cfg = config(tmp_path, algo="ppo", alpha=ALPHA, residual=True, adapter=str(d), **kw)
    return Trainer(cfg, base, adapter, tok, even_tokens, rows, rows[:4]), base, tok


def base_logprobs(base, lm, prompts, responses):
    out = []
    for p, r in zip(lm.encode(prompts), responses):
        with torch.no_grad():
            lp = torch.log_softmax(base(input_ids=torch.tensor([p + r])).logits[0].double(), -1)
        out.append([float(lp[len(p) - 1 + i, t]) for i, t in enumerate(r)])
    return out


def test_the_untrained_residual_product_is_the_base(tmp_path):
    tr, base, tok = residual_trainer(tmp_path)
    roll = tr.rollout([{"prompt": p} for p in PROMPTS[:4]], seed=1)
    prompt_ids = tr.lm.encode(PROMPTS[:4])
    with torch.no_grad():
        st = tr.policy.token_stats(prompt_ids, [[] for _ in prompt_ids], roll.token_ids)
    want = base_logprobs(base, tr.lm, PROMPTS[:4], roll.token_ids)
    for i, r in enumerate(roll.token_ids):
        assert st["logprob"][i, :len(r)].tolist() == pytest.approx(want[i], abs=1e-5)


def first_step_grads(policy, prompt_ids, responses):
    st = policy.token_stats(prompt_ids, [[] for _ in prompt_ids], responses, kl=False)
    (-(st["logprob"] * st["mask"]).sum()).backward()
    return {n: p.grad for n, p in policy.adapter.named_parameters() if p.requires_grad}


def test_every_parameter_gets_gradient_at_the_first_step_unlike_a_zeroed_output(tmp_path):
    tr, _, _ = residual_trainer(tmp_path)
    prompt_ids = tr.lm.encode(PROMPTS[:4])
    responses = [[5, 9, 12], [7, 7], [3, 4, 5, 6], [8]]
    grads = first_step_grads(tr.policy, prompt_ids, responses)
    body = {n: g for n, g in grads.items() if ".h.0." in n or "layers.0." in n}
    assert body and all(g is not None and torch.count_nonzero(g) > 0 for g in body.values())
    # the motivating fact: with zero_init_output, the first step's gradient below the zeroed norm is 0
    zt = Trainer(config(tmp_path / "z", algo="ppo", alpha=ALPHA, zero_init_output=True), *models(), even_tokens,
                 [{"prompt": p} for p in PROMPTS], [{"prompt": p} for p in PROMPTS[:4]])
    zgrads = first_step_grads(zt.policy, prompt_ids, responses)
    zbody = [g for n, g in zgrads.items() if ".h.0." in n or "layers.0." in n]
    assert zbody and all(g is None or torch.count_nonzero(g) == 0 for g in zbody)


def trained_run(tmp_path):
    base, adapter, tok = models()
    d = saved_initial(tmp_path, adapter, tok)
    cfg = config(tmp_path, algo="ppo", alpha=ALPHA, residual=True, adapter=str(d), steps=2, lr=1e-2)
    summary = train(cfg, reward=even_tokens, train_prompts=[{"prompt": p} for p in PROMPTS],
                    eval_prompts=[{"prompt": p} for p in PROMPTS[:4]], base=base, adapter=adapter, tokenizer=tok)
    return base, tok, d, cfg, summary


def test_a_saved_residual_adapter_loads_back_and_decodes_as_the_two_expert_composition(tmp_path):
    base, tok, d, cfg, summary = trained_run(tmp_path)
    out = tmp_path / "run" / "adapter"
    meta = json.loads((out / "ipa_adapter.json").read_text())
    assert meta["residual_of"]["name"] == str(d.resolve()) and meta["residual_of"]["sha256"]
    assert meta["frozen_experts"] == []  # the initial copy is the residual's, not a composed expert
    lm = TailoredLM.from_pretrained(base, str(out))
    assert isinstance(lm.adapter, ResidualAdapter) and lm.alpha == ALPHA
    trained = copy.deepcopy(lm.adapter.trained)
    initial = TailoredLM.from_pretrained(base, str(d)).adapter
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), initial.parameters()))
    explicit = TailoredLM(base, tokenizer=tok, experts=[trained, initial], weights=[ALPHA, -ALPHA])
    kw = dict(max_new_tokens=6, seed=5, top_p=0.9, backend="reference")
    got = lm.generate(PROMPTS[:4], **kw)
    want = explicit.generate(PROMPTS[:4], **kw)
    assert got.token_ids == want.token_ids
    # alpha scales the residual as a whole: at alpha 0 the composition is the base alone
    alone = TailoredLM(base, trained, tok, alpha=0.0).generate(PROMPTS[:4], **kw)
    assert lm.generate(PROMPTS[:4], alpha=0.0, **kw).token_ids == alone.token_ids
    # the HF processor loads it the same way
    proc = TailoredLogitsProcessor.from_pretrained(str(out))
    assert isinstance(proc.adapter, ResidualAdapter) and proc.alpha == ALPHA


def test_composed_residual_adapters_share_one_initial_copy_and_decode_as_the_explicit_product(tmp_path):
    """Two residual adapters of the same initial weights load that network once (one frozen module,
    each residual keeping its own cache) and decode as base + a1 (t1 - init) + a2 (t2 - init)."""
    import shutil
    base, tok, d, cfg, summary = trained_run(tmp_path)
    out = tmp_path / "run" / "adapter"
    other = tmp_path / "other"
    shutil.copytree(out, other)
    lm = TailoredLM.from_pretrained(base, [str(out), str(other)], alpha=[ALPHA, 0.3])
    a, b = lm.experts
    assert isinstance(a, ResidualAdapter) and isinstance(b, ResidualAdapter)
    assert a.initial is b.initial and a.trained is not b.trained
    t1, t2, init = (copy.deepcopy(m) for m in (a.trained, b.trained, a.initial))
    explicit = TailoredLM(base, tokenizer=tok, experts=[t1, init, t2, init],
                          weights=[ALPHA, -ALPHA, 0.3, -0.3])
    kw = dict(max_new_tokens=6, seed=3, top_p=0.9, backend="reference")
    calls = []
    hook = a.initial.register_forward_hook(lambda *args: calls.append(1))
    got = lm.generate(PROMPTS[:4], **kw)
    hook.remove()
    want = explicit.generate(PROMPTS[:4], **kw)
    assert got.token_ids == want.token_ids
    for g, w in zip(got.logprobs, want.logprobs):
        assert g == pytest.approx(w, abs=1e-5)
    # the shared initial network runs once per step (prefill + 5 steps), at weight -(a1 + a2): the
    # same mix as base + a1 t1 + a2 t2 - (a1 + a2) init, computed in that order
    assert len(calls) == kw["max_new_tokens"]
    merged = TailoredLM(base, tokenizer=tok, experts=[t1, t2, init], weights=[ALPHA, 0.3, -(ALPHA + 0.3)])
    again = merged.generate(PROMPTS[:4], **kw)
    assert got.token_ids == again.token_ids and got.logprobs == again.logprobs
    # asked for the adapter's own log-probs, the first residual is kept whole (its initial runs per adapter)
    calls.clear()
    hook = a.initial.register_forward_hook(lambda *args: calls.append(1))
    lm.generate(PROMPTS[:4], output_adapter_logprobs=True, **kw)
    hook.remove()
    assert len(calls) == 2 * kw["max_new_tokens"]


def test_changed_or_missing_initial_weights_are_refused_in_one_line(tmp_path):
    base, tok, d, cfg, summary = trained_run(tmp_path)
    out = tmp_path / "run" / "adapter"
    model = TailoredLM.from_pretrained(base, str(d)).adapter
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_adapter(d, model, tok, alpha=ALPHA, vocab_size=len(tok))
    with pytest.raises(ValueError, match="not the ones it was trained from") as e:
        TailoredLM.from_pretrained(base, str(out))
    assert "\n" not in str(e.value)
    for f in d.glob("*.safetensors"):
        f.unlink()
    import shutil
    shutil.rmtree(d)
    with pytest.raises(ValueError, match="which is not here"):
        TailoredLM.from_pretrained(base, str(out))


@pytest.mark.parametrize("kw, match", [(dict(zero_init_output=True), "choose one"),
                                       (dict(algo="quark"), "needs algo 'ppo'")])
def test_incompatible_settings_are_refused(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{**dict(out=str(tmp_path), residual=True), **kw}).validate()


def test_the_embedded_initialisation_is_recorded_by_name_and_found_through_the_cache(tmp_path, monkeypatch):
    """residual_of names the embedded adapter initialisation "adapter-init" (no machine's cache path)
    and loading finds it wherever the cache is; any other directory is recorded by its path."""
    from ipa_fast import embedded
    from ipa_fast.decoding.residual import initial_directory, residual_record

    _, adapter, tok = models()
    cache_a = saved_initial(tmp_path / "a", adapter, tok)
    monkeypatch.setattr(embedded, "adapter_init_path", lambda: cache_a)
    rec = residual_record(cache_a)
    assert rec["name"] == "adapter-init" and rec["embedded"] is True and str(tmp_path) not in json.dumps(rec)
    cache_b = tmp_path / "b"
    import shutil
    shutil.copytree(cache_a, cache_b)  # the same weights in another machine's cache
    monkeypatch.setattr(embedded, "adapter_init_path", lambda: cache_b)
    assert initial_directory({"residual_of": rec}, "adapter") == cache_b
    other = residual_record(cache_a)  # no longer the embedded one: a plain directory, by path
    assert other["embedded"] is False and other["name"] == str(cache_a.resolve())


def test_an_adapter_directory_without_its_shared_tensors_is_refused_in_one_line(tmp_path):
    """A shipped adapter's own directory leaves out the embedding it shares with the base
    (``shared_with_base``); loaded as is, transformers would initialise that tensor at random."""
    from safetensors.torch import load_file, save_file
    base, adapter, tok = models()
    d = saved_initial(tmp_path, adapter, tok)
    TailoredLM.from_pretrained(base, str(d))  # complete: loads
    (weights,) = d.glob("*.safetensors")
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    meta = json.loads((d / "ipa_adapter.json").read_text())
    meta["shared_with_base"] = {name: "0" * 64}
    (d / "ipa_adapter.json").write_text(json.dumps(meta))
    TailoredLM.from_pretrained(base, str(d))  # still complete: the named tensor is there
    save_file({k: v for k, v in tensors.items() if k != name}, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="holds only its own layers") as e:
        TailoredLM.from_pretrained(base, str(d))
    assert name in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="holds only its own layers"):
        TailoredLogitsProcessor.from_pretrained(str(d))
