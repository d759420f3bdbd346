"""The shared-head path of TailoredLM.generate (ipa_fast.decoding.heads): when the base and every
expert end in one output head, the loop mixes their last hidden states and applies the head once
per step. Tokens and log-probs are checked against the reference loop of tests/test_decoding_experts
(no cache, each model's full logits mixed by ipa_fast.ops.reference.mix_experts, the reference
sampler), for single adapters, residual adapters, K experts with negative and per-row weights,
hard masks and the repetition penalty; the heads are counted to show which path ran.
"""
import copy

import pytest
import torch

from ipa_fast.decoding import heads
from ipa_fast.decoding.residual import ResidualAdapter
from ipa_fast.decoding.tailored import TailoredLM
from tests.test_decoding_experts import assert_matches, reference_decode
from tests.tiny_models import make_tiny_model, make_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["the cat sat", "a dog ran home", "on the mat"]


def share_head(model, base):
    """``model`` with ``base``'s output head tensor as its own."""
    model.get_output_embeddings().weight = base.get_output_embeddings().weight
    return model


def perturbed(model, seed):
    """A copy of ``model`` with every parameter but the output head moved (a 'trained' copy)."""
    out = copy.deepcopy(model)
    head = out.get_output_embeddings().weight
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            if p is not head:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    share_head(out, model)
    return out


@pytest.fixture(scope="module")
def family():
    """(tok, base, {name: expert}): tiny models over one tokenizer sharing the base's head."""
    tok = make_tiny_tokenizer()
    V = len(tok)
    base = make_tiny_model("llama", V, 0, n_layer=2)
    adapter = share_head(make_tiny_model("llama", V, 1, n_layer=1), base)
    initial = share_head(make_tiny_model("llama", V, 2, n_layer=1), base)
    return tok, base, {"adapter": adapter, "gpt2": share_head(make_tiny_model("gpt2", V, 3, n_layer=1), base),
                       "trained": perturbed(initial, 4), "initial": initial}


class HeadCalls:
    """Counts calls of the output heads of ``models`` (the shared-head path calls none of them)."""

    def __init__(self, *models):
        self.n = 0
        self.handles = [m.get_output_embeddings().register_forward_hook(self._hook) for m in models]

    def _hook(self, *_):
        self.n += 1

    def close(self):
        for h in self.handles:
            h.remove()


CASES = {  # name: (experts, weights, generate kwargs)
    "ipa": (["adapter"], [0.7], dict(temperature=2.0, top_p=0.9, seed=5)),
    "gpt2-expert": (["gpt2"], [1.0], dict(temperature=3.0, top_k=20, seed=[1, 2, 3])),
    "residual": ([("trained", "initial")], [0.8], dict(temperature=2.5, top_p=0.95, seed=9)),
    "three": (["adapter", "gpt2", ("trained", "initial")], [0.5, -0.4, 1.2],
              dict(temperature=3.0, min_p=0.05, seed=7)),
    # two residual adapters of one initial network: it runs once, at weight -(0.8 + 0.5)
    "two-residuals": ([("trained", "initial"), ("adapter", "initial")], [0.8, 0.5],
                      dict(temperature=2.5, top_p=0.95, seed=4)),
    "masks": (["adapter"], [0.6], dict(temperature=3.0, min_new_tokens=4, bad_words_ids=[[10], [40, 41]],
                                       repetition_penalty=1.3, seed=3)),
}


def build(family, names):
    tok, base, pool = family
    models, ref_models = [], []
    for n in names:
        if isinstance(n, tuple):  # a residual adapter: trained - initial
            models.append(ResidualAdapter(pool[n[0]], pool[n[1]]))
            ref_models += [pool[n[0]], pool[n[1]]]
        else:
            models.append(pool[n]), ref_models.append(pool[n])
    return tok, base, models, ref_models


def ref_weights(names, weights):
    out = []
    for n, w in zip(names, weights):
        out += [w, -w] if isinstance(n, tuple) else [w]
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_shared_head_path_matches_reference_loop(family, name):
    names, weights, gen = CASES[name]
    tok, base, models, ref_models = build(family, names)
    lm = TailoredLM(base, experts=models, weights=weights, tokenizer=tok)
    assert lm._shared_head() is base.get_output_embeddings().weight
    calls = HeadCalls(base, *ref_models)
    try:
        eos = tok.eos_token_id if "min_new_tokens" in gen else None
        out = lm.generate(PROMPTS, 10, eos_token_id=[] if eos is None else eos, **gen)
    finally:
        calls.close()
    assert calls.n == 0  # no model applied its own head: the mix went through the shared one
    assert out.adapter_logprobs is None
    gen = dict(gen)
    seed = gen.pop("seed")
    seeds = seed if isinstance(seed, list) else [seed + r for r in range(len(PROMPTS))]
    ref_ids, ref_lps = reference_decode(base, ref_models, ref_weights(names, weights), tok, PROMPTS, 10,
                                        seed=seeds, eos_token_id=eos, **gen)
    assert_matches(out, ref_ids, ref_lps)
    assert len({tuple(r) for r in out.token_ids}) == 3  # not degenerate


def test_per_row_weights_and_experts_alone(family):
    tok, base, models, ref_models = build(family, ["adapter", ("trained", "initial")])
    lm = TailoredLM(base, experts=models, tokenizer=tok)
    w = [[0.2, 1.0], [1.0, -0.5], [0.0, 2.0]]
    out = lm.generate(PROMPTS, 8, eos_token_id=[], weights=torch.tensor(w), temperature=3.0, seed=11)
    ref = reference_decode(base, ref_models, [[a, b, -b] for a, b in w], tok, PROMPTS, 8, seed=[11, 12, 13],
                           temperature=3.0)
    assert_matches(out, *ref)
    out = lm.generate(PROMPTS, 8, eos_token_id=[], base_weight=0, weights=[1.0, 0.5], temperature=3.0, seed=2)
    ref = reference_decode(base, ref_models, [1.0, 0.5, -0.5], tok, PROMPTS, 8, seed=[2, 3, 4], base_weight=0,
                           temperature=3.0)
    assert_matches(out, *ref)


def test_adapter_logprobs_take_the_per_model_path(family):
    tok, base, models, _ = build(family, ["adapter"])
    lm = TailoredLM(base, models[0], tok, alpha=0.7)
    calls = HeadCalls(base, models[0])
    try:
        full = lm.generate(PROMPTS, 6, eos_token_id=[], temperature=2.0, seed=1, output_adapter_logprobs=True)
    finally:
        calls.close()
    assert calls.n > 0 and [len(a) for a in full.adapter_logprobs] == [6, 6, 6]
    fused = lm.generate(PROMPTS, 6, eos_token_id=[], temperature=2.0, seed=1)
    assert fused.token_ids == full.token_ids
    for a, b in zip(fused.logprobs, full.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)


def test_heads_that_differ_are_refused(family):
    tok, base, pool = family
    V = len(tok)
    own = make_tiny_model("llama", V, 5, n_layer=1)  # its own head
    assert heads.shared_head(base, [own]) is None
    equal = make_tiny_model("llama", V, 6, n_layer=1)
    with torch.no_grad():  # another tensor holding the same values
        equal.get_output_embeddings().weight.copy_(base.get_output_embeddings().weight)
    assert heads.shared_head(base, [equal]) is base.get_output_embeddings().weight
    assert heads.shared_head(base, [ResidualAdapter(pool["trained"], own)]) is None
    # a transform after the head (here a doubling of the logits) fails the probe
    scaled = share_head(make_tiny_model("llama", V, 7, n_layer=1), base)
    handle = scaled.register_forward_hook(lambda m, a, out: out.__setitem__("logits", 2 * out.logits) or out)
    try:
        assert heads.shared_head(base, [scaled]) is None
        lm = TailoredLM(base, scaled, tok, alpha=0.5)
        out = lm.generate(PROMPTS, 6, eos_token_id=[], temperature=2.0, seed=4)
        assert_matches(out, *reference_decode(base, [scaled], [0.5], tok, PROMPTS, 6, seed=[4, 5, 6],
                                              temperature=2.0))
    finally:
        handle.remove()
    assert heads.shared_head(base, [object()]) is None  # a cached-LM object: no head to share


def test_a_head_changed_in_place_is_seen(family):
    tok, base, _ = family
    V = len(tok)
    adapter = make_tiny_model("llama", V, 8, n_layer=1)
    with torch.no_grad():
        adapter.get_output_embeddings().weight.copy_(base.get_output_embeddings().weight)
    lm = TailoredLM(base, adapter, tok, alpha=1.0)
    assert lm._shared_head() is not None
    with torch.no_grad():
        adapter.get_output_embeddings().weight.mul_(1.5)  # moves its version counter
    assert lm._shared_head() is None
    out = lm.generate(PROMPTS, 6, eos_token_id=[], temperature=2.0, seed=8)
    assert_matches(out, *reference_decode(base, [adapter], [1.0], tok, PROMPTS, 6, seed=[8, 9, 10],
                                          temperature=2.0))


@pytest.mark.parametrize("names", [["adapter"], [("trained", "initial")],
                                   [("trained", "initial"), ("adapter", "initial")]],
                         ids=["adapter", "residual", "two-residuals"])
def test_compiled_step_takes_the_shared_head_path(family, names):
    from tests.test_decoding_compiled import Counting, assert_same

    torch._dynamo.reset()
    try:
        tok, base, models, ref_models = build(family, names)
        weights = [0.8, 0.5][:len(names)]
        lm = TailoredLM(base, experts=models, weights=weights, tokenizer=tok)
        backend = Counting()
        assert lm._shared_head() is not None  # (its probe calls the heads once)
        calls = HeadCalls(base, *ref_models)
        try:
            kw = dict(eos_token_id=[], temperature=2.0, top_p=0.9, seed=6)
            eager = lm.generate(PROMPTS, 8, **kw)
            compiled = lm.generate(PROMPTS, 8, compile=backend, **kw)
        finally:
            calls.close()
        assert calls.n == 0 and backend.graphs == 1
        assert_same(eager, compiled)
        assert_matches(compiled, *reference_decode(base, ref_models, ref_weights(names, weights), tok, PROMPTS, 8,
                                                   seed=[6, 7, 8], temperature=2.0, top_p=0.9))
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("shared", [True, False], ids=["shared-head", "own-heads"])
def test_experts_weighted_zero_are_not_run(family, shared):
    tok, base, pool = family
    adapter = pool["adapter"] if shared else make_tiny_model("llama", len(tok), 9, n_layer=1)
    other = pool["gpt2"]
    calls = []
    handles = [m.base_model.register_forward_pre_hook(lambda mod, a, name=name: calls.append(name))
               for name, m in (("adapter", adapter), ("other", other))]
    try:
        lm = TailoredLM(base, experts=[adapter, other], weights=[0.0, 0.0], tokenizer=tok)
        out = lm.generate(PROMPTS, 6, eos_token_id=[], temperature=2.0, seed=3)
        assert calls == []  # alpha = 0: the base alone, the experts never run
        assert_matches(out, *reference_decode(base, [], [[]] * 3, tok, PROMPTS, 6, seed=[3, 4, 5], temperature=2.0))
        out = lm.generate(PROMPTS, 6, eos_token_id=[], temperature=2.0, seed=3, weights=[0.0, 0.7])
        assert set(calls) == {"other"}  # only the weighted expert runs
        assert_matches(out, *reference_decode(base, [other], [0.7], tok, PROMPTS, 6, seed=[3, 4, 5],
                                              temperature=2.0))
        calls.clear()  # a weight that is 0 in one row only: the expert runs
        lm.generate(PROMPTS, 6, eos_token_id=[], temperature=2.0, seed=3, weights=[[0.0, 0.5, 0.0], 0.0])
        assert set(calls) == {"adapter"}
        calls.clear()  # the adapter's own log-probs asked for: it runs at weight 0
        out = lm.generate(PROMPTS, 6, eos_token_id=[], temperature=2.0, seed=3, output_adapter_logprobs=True)
        assert set(calls) == {"adapter"} and [len(a) for a in out.adapter_logprobs] == [6, 6, 6]
    finally:
        for h in handles:
            h.remove()
