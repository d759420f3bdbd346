"""K experts in tailored decoding: ``TailoredLM(base, experts=[...], weights=[...])`` and its
presets (IPA, composition, DExperts, proxy-tuning), checked against a reference loop.

The reference loop (:func:`reference_decode`) is independent of ``TailoredLM``: one row at a
time, a full no-cache forward of every model at every step, the mix by hand with
:func:`ipa_fast.reference.mix_experts`, masks and repetition penalty by hand, and the reference
sampler with the decoding RNG convention (row r's seed; offset = the unpadded position of the
token being drawn). Cached decoding and the full forward sum in different orders (float32), so
a draw may differ where u lands within rounding of a CDF boundary; with these seeds it does not.
Log-probs agree within 1e-4 absolute.
"""
import pytest
import torch

import ipa_fast
from ipa_fast import reference
from ipa_fast.decoding import TailoredLM
from tiny_models import make_tiny_model, make_tiny_pair, make_tiny_tokenizer

PROMPTS = ["the cat", "a dog runs in the park with", "Hello"]

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# The reference loop

def _last_logits(model, ids, V):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[:, -1, :V]


def reference_decode(base, experts, weights, tok, prompts, n, *, seed, prefixes=None, base_weight=1.0,
                     base_top_k=None, min_new_tokens=0, bad_words_ids=(), repetition_penalty=1.0,
                     eos_token_id=None, **knobs):
    """``(token_ids, logprobs)`` per prompt: z = base_weight * base + sum_k w_k * expert_k, mixed
    by :func:`ipa_fast.reference.mix_experts`; ``weights`` [K] or one list per row."""
    V = len(tok)
    prefixes = prefixes or [[] for _ in experts]
    eos = [] if eos_token_id is None else [eos_token_id]
    ids_out, lps_out = [], []
    for r, prompt in enumerate(prompts):
        row_w = weights[r] if isinstance(weights[0], (list, tuple)) else weights
        row_knobs = {k: (v[r] if isinstance(v, (list, tuple)) else v) for k, v in knobs.items()}
        ids = tok(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        P = len(ids)
        toks, lps = [], []
        for t in range(n):
            zs, w = [], []
            if base_weight != 0:
                zb = _last_logits(base, ids, V)
                if base_top_k:  # the sparse base: its top-k log-probs, -inf elsewhere
                    lp = torch.log_softmax(zb, -1)
                    vals, top = lp.topk(base_top_k, -1)
                    zb = torch.full_like(lp, float("-inf")).scatter_(1, top, vals)
                zs.append(zb), w.append(base_weight)
            for model, pre, wk in zip(experts, prefixes, row_w):
                zs.append(_last_logits(model, pre + ids, V)), w.append(wk)
            z = reference.mix_experts(zs, torch.tensor([w], dtype=torch.float32))
            if repetition_penalty != 1.0:
                seen = torch.zeros(V, dtype=torch.bool)
                seen[ids] = True
                z = torch.where(seen, torch.where(z > 0, z / repetition_penalty, z * repetition_penalty), z)
            for word in bad_words_ids:
                if ids[len(ids) - len(word) + 1:] == word[:-1] or len(word) == 1:
                    z[0, word[-1]] = float("-inf")
            if t < min_new_tokens:
                z[0, eos] = float("-inf")
            s = ipa_fast.sample(z, None, seed=seed[r], offset=P + t, backend="reference", **row_knobs)
            tok_t = int(s.tokens)
            toks.append(tok_t), lps.append(float(s.logprobs))
            ids.append(tok_t)
            if tok_t in eos:
                break
        ids_out.append(toks), lps_out.append(lps)
    return ids_out, lps_out


def assert_matches(out, ref_ids, ref_lps):
    assert out.token_ids == ref_ids
    for got, want in zip(out.logprobs, ref_lps):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def trio():
    """(base, [adapter, expert 2, expert 3], tok): three tiny experts over the pair's tokenizer."""
    base, adapter, tok = make_tiny_pair(seed=0)
    V = len(tok)
    return base, [adapter, make_tiny_model("llama", V, 21, n_layer=1), make_tiny_model("gpt2", V, 22, n_layer=1)], tok


# ---------------------------------------------------------------------------------------------
# The classic constructor: today's tokens, recorded before experts became the unit

CLASSIC = {  # name: (constructor kwargs, generate kwargs); the tiny models are peaked: T >= 2 mixes
    "top_p": (dict(alpha=0.7), dict(temperature=3.0, top_p=0.9, seed=5)),
    "per_row": (dict(alpha=1.0), dict(alpha=[0.3, 1.0, 2.0], temperature=4.0, top_k=20, min_p=0.05,
                                      seed=[1, 2, 3])),
    "masks": (dict(alpha=0.5), dict(min_new_tokens=4, bad_words_ids=[[10], [40, 41]], temperature=3.0,
                                    top_p=0.95, seed=7)),
    "penalty": (dict(alpha=0.5), dict(repetition_penalty=1.3, temperature=2.0, top_p=0.95, seed=2)),
    "base_weight_0": (dict(alpha=1.0), dict(base_weight=0.0, top_p=0.9, seed=3)),
    "base_weight_half": (dict(alpha=1.5), dict(base_weight=0.5, seed=4, temperature=[0.0, 3.0, 2.0])),
    "sparse_base": (dict(alpha=0.7, base_top_k=5), dict(temperature=3.0, seed=6)),
}
RECORDED = {  # generated by the two-expert code path before K experts (commit 3a86b77), default backend
    "base_weight_0": [[73, 280, 187, 271, 277, 11, 45, 153, 100, 100], [279, 68, 50, 287, 16, 279, 279, 32, 106, 279],
                      [160, 160, 318, 243, 81, 81, 12, 3, 54, 220]],
    "base_weight_half": [[278, 278, 278, 278, 278, 278, 278, 278, 278, 278], [135, 95, 287, 136, 268, 56, 300, 307, 307, 93],
                         [222, 186, 157, 192, 31, 247, 237, 237, 60, 67]],
    "masks": [[121, 94, 109, 254, 86, 3, 167, 240, 258, 100], [28, 223, 13, 301, 61, 65, 213, 138, 77, 211],
              [277, 59, 262, 317, 74, 54, 74, 97, 199, 66]],
    "penalty": [[58, 48, 302, 4, 86, 190, 200, 218, 122, 84], [21, 67, 302, 318, 10, 50, 194, 30, 162, 172],
                [226, 88, 181, 60, 267, 31, 190, 213, 141, 310]],
    "per_row": [[255, 77, 46, 107, 107, 288, 64, 64, 169, 106], [32, 99, 209, 76, 76, 117, 117, 195, 188, 304],
                [289, 289, 289, 289, 79, 79, 97, 97, 97, 97]],
    "sparse_base": [[278, 278, 278, 278, 278, 61, 121, 121, 208, 52], [72, 35, 72, 72, 72, 72, 72, 72, 72, 72],
                    [135, 132, 132, 132, 233, 233, 233, 233, 233, 233]],
    "top_p": [[214, 218, 176, 318, 209, 71, 96, 22, 8, 135], [16, 314, 62, 210, 100, 287, 6, 87, 90, 219],
              [82, 95, 249, 91, 4, 173, 237, 250, 110, 0]],
}


def classic_run(pair, name, n=10):
    base, adapter, tok = pair
    ctor, gen = CLASSIC[name]
    lm = TailoredLM(base, adapter, tok, **ctor)
    eos = gen.pop("eos_token_id", tok.eos_token_id if "min_new_tokens" in gen else [])
    return lm, lm.generate(PROMPTS, n, eos_token_id=eos, **gen)


@pytest.mark.parametrize("name", sorted(CLASSIC))
def test_classic_constructor_matches_reference_loop(pair, name):
    base, adapter, tok = pair
    ctor, gen = dict(CLASSIC[name][0]), dict(CLASSIC[name][1])
    lm, out = classic_run(pair, name)
    seed = gen.pop("seed")
    seeds = seed if isinstance(seed, list) else [seed + r for r in range(len(PROMPTS))]
    alpha = gen.pop("alpha", ctor["alpha"])
    weights = [[a] for a in alpha] if isinstance(alpha, list) else [alpha]
    ref_ids, ref_lps = reference_decode(
        base, [adapter], weights, tok, PROMPTS, 10, seed=seeds, base_top_k=ctor.get("base_top_k"),
        eos_token_id=tok.eos_token_id if "min_new_tokens" in gen else None, **gen)
    assert_matches(out, ref_ids, ref_lps)
    assert out.token_ids == RECORDED[name]  # the tokens the classic constructor gave before K experts
