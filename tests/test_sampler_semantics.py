"""docs/DESIGN.md §2 semantics of ``ipa_fast.sample``, for every backend in ``sampler_cases.BACKENDS``.

Oracles: transformers' own warpers (kept sets), float64 softmax (probabilities, log-probs),
chi-square tests on >= 10^5 draws (significance 1e-4 per test: a correct sampler fails one of
them with probability 1e-4).
"""
from __future__ import annotations

import math

import pytest
import torch

import ipa_fast
from ipa_fast.ops import reference
from sampler_cases import (
    DTYPES, backend_params, boundary_near_tie, chi_square_pvalue, filtered_probs, hf_kept_mask, log_softmax64,
    mixed, random_logits, random_params,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ALPHA_CHI2 = 1e-4


# ---------------------------------------------------------------- kept sets vs transformers

@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("vocab", [40, 200])
def test_kept_sets_match_hf_warpers(backend, vocab):
    """Per-row top-k / top-p / min-p: every drawn token is in HF's kept set and the kept mass
    (exp(logprobs - filtered_logprobs)) equals HF's, except rows with a boundary near-tie."""
    B = 1500
    base = random_logits(B, vocab, seed=vocab, scale=2.0)
    adapter = random_logits(B, vocab, seed=vocab + 7, scale=1.0, masked=0.05)
    prm = random_params(B, vocab, seed=vocab)
    out = ipa_fast.sample(base, adapter, seed=11, backend=backend, **prm)
    z = mixed(base, adapter, prm["alpha"], prm["temperature"])
    keep = hf_kept_mask(z, prm["top_k"], prm["top_p"], prm["min_p"])
    near = boundary_near_tie(z, prm["top_k"], prm["top_p"], prm["min_p"])
    assert near.float().mean().item() < 1e-3, f"{int(near.sum())} near-tie rows of {B}"
    ok = ~near
    assert keep[torch.arange(B), out.tokens][ok].all()
    w = torch.exp(z.double() - z.double().max(dim=1, keepdim=True).values)
    hf_mass = (w * keep).sum(1) / w.sum(1)
    our_mass = torch.exp(out.logprobs.double() - out.filtered_logprobs.double())
    torch.testing.assert_close(our_mass[ok], hf_mass[ok], rtol=2e-5, atol=0)
    if backend == "reference":  # the oracle's mask itself, token for token
        ours = reference.kept_mask(z, prm["top_k"], prm["top_p"], prm["min_p"]) & (z > float("-inf"))
        assert (ours[ok] == keep[ok]).all()


def test_top_k_keeps_ties_and_top_p_decides_ties_by_value():
    z = torch.tensor([[3.0, 1.0, 3.0, 2.0, 2.0, 0.0]])
    keep = reference.kept_mask(z, torch.tensor([3]), torch.tensor([1.0]), torch.tensor([0.0]))
    assert keep.tolist() == [[True, False, True, True, True, False]]  # the 3rd value ties with the 4th
    # top-p: the two tokens at 2.0 are kept or dropped together
    w = torch.exp(z - 3.0)[0]
    mass_above_2 = float((w[0] + w[2]) / w.sum())
    for p, expect in [(mass_above_2 - 1e-3, False), (mass_above_2 + 1e-3, True)]:
        keep = reference.kept_mask(z, torch.tensor([0]), torch.tensor([p]), torch.tensor([0.0]))
        assert keep[0, 3].item() == keep[0, 4].item() == expect


# ---------------------------------------------------------------- the draw is exact

CHI2_CASES = [
    dict(),
    dict(top_k=4, top_p=0.8),
    dict(top_p=0.5, temperature=0.7),
    dict(min_p=0.15, alpha=0.5, temperature=1.3),
    dict(top_k=1, temperature=2.0),  # argmax-like, one token
]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", range(len(CHI2_CASES)))
def test_draws_follow_filtered_distribution(backend, case):
    kw = dict(alpha=1.0, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    kw.update(CHI2_CASES[case])
    V, N = 12, 100_000
    base = random_logits(1, V, seed=100 + case, scale=1.2)
    adapter = random_logits(1, V, seed=200 + case, scale=0.8)
    out = ipa_fast.sample(base.expand(N, V), adapter.expand(N, V), seed=1234 + case, backend=backend, **kw)
    z = mixed(base, adapter, kw["alpha"], kw["temperature"])
    keep = hf_kept_mask(z, kw["top_k"], kw["top_p"], kw["min_p"])[0]
    probs = filtered_probs(z[0], keep)
    counts = torch.bincount(out.tokens, minlength=V)
    if int(keep.sum()) == 1:
        assert counts[keep].item() == N
    else:
        assert chi_square_pvalue(counts, probs) > ALPHA_CHI2


@pytest.mark.parametrize("backend", backend_params())
def test_logprobs_match_log_softmax(backend):
    B, V = 300, 150
    base = random_logits(B, V, seed=3, scale=2.0, masked=0.1)
    adapter = random_logits(B, V, seed=4)
    prm = random_params(B, V, seed=3)
    out = ipa_fast.sample(base, adapter, seed=5, backend=backend, **prm)
    z = mixed(base, adapter, prm["alpha"], prm["temperature"])
    rows = torch.arange(B)
    expect = log_softmax64(z)[rows, out.tokens]
    torch.testing.assert_close(out.logprobs.double(), expect, rtol=0, atol=2e-5)
    keep = hf_kept_mask(z, prm["top_k"], prm["top_p"], prm["min_p"])
    ok = ~boundary_near_tie(z, prm["top_k"], prm["top_p"], prm["min_p"])
    filt = log_softmax64(z.masked_fill(~keep, float("-inf")))[rows, out.tokens]
    torch.testing.assert_close(out.filtered_logprobs.double()[ok], filt[ok], rtol=0, atol=2e-5)
    assert out.valid.all()


# ---------------------------------------------------------------- greedy

@pytest.mark.parametrize("backend", backend_params())
def test_greedy_at_zero_temperature(backend):
    base = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, 1.0, 5.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    adapter = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    out = ipa_fast.sample(base, adapter, alpha=0.5, temperature=0.0, top_k=1, top_p=0.3, seed=0, backend=backend)
    assert out.tokens.tolist() == [1, 0, 0]  # ties -> lowest index (row 1: 5 beats -1 + 4.5)
    z = base + 0.5 * adapter
    torch.testing.assert_close(out.logprobs.double(), log_softmax64(z)[torch.arange(3), out.tokens], atol=1e-6, rtol=0)
    assert (out.filtered_logprobs == 0).all()


@pytest.mark.parametrize("backend", backend_params())
def test_per_row_zero_temperature_only_makes_that_row_greedy(backend):
    B, V = 64, 50
    base = random_logits(B, V, seed=8, scale=0.3)  # flat: sampled rows rarely hit the argmax
    t = torch.where(torch.arange(B) % 2 == 0, 0.0, 1.0)
    out = ipa_fast.sample(base, temperature=t, seed=9, backend=backend)
    even = torch.arange(0, B, 2)
    assert (out.tokens[even] == base[even].argmax(1)).all()
    assert (out.tokens[1::2] != base[1::2].argmax(1)).any()
    assert (out.filtered_logprobs[even] == 0).all() and (out.filtered_logprobs[1::2] < 0).all()


# ---------------------------------------------------------------- dtypes, seeds, golden

@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_is_float32_arithmetic_on_the_stored_values(backend, dtype):
    B, V = 40, 333
    base = random_logits(B, V, seed=21, dtype=dtype, masked=0.02)
    adapter = random_logits(B, V, seed=22, dtype=dtype)
    prm = random_params(B, V, seed=21)
    a = ipa_fast.sample(base, adapter, seed=3, backend=backend, **prm)
    b = ipa_fast.sample(base.float(), adapter.float(), seed=3, backend=backend, **prm)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=0)
    if dtype != torch.float32:  # mixed input dtypes are read directly too
        c = ipa_fast.sample(base, adapter.float(), seed=3, backend=backend, **prm)
        assert torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize("backend", backend_params())
def test_seed_conventions(backend):
    B, V = 16, 64
    base = random_logits(B, V, seed=1, scale=0.5)
    a = ipa_fast.sample(base, seed=77, backend=backend)
    b = ipa_fast.sample(base, seed=torch.arange(B) + 77, backend=backend)
    assert torch.equal(a.tokens, b.tokens)  # a scalar seed means seed + row
    c = ipa_fast.sample(base, seed=77, offset=1, backend=backend)
    assert not torch.equal(a.tokens, c.tokens)  # the offset moves the stream
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    d = ipa_fast.sample(base, generator=g1, backend=backend)
    e = ipa_fast.sample(base, generator=g2, backend=backend)
    assert torch.equal(d.tokens, e.tokens)


def golden_inputs():
    rows, V = 4, 1000
    i = torch.arange(V, dtype=torch.float64)
    base = torch.stack([torch.sin(i * 0.37 + r) * 4 + torch.cos(i * 0.011 * (r + 1)) for r in range(rows)]).float()
    adapter = torch.stack([torch.cos(i * 0.23 - r) * 2 for r in range(rows)]).float()
    return base, adapter


GOLDEN = [  # RNG stream version 1: (kwargs, tokens)
    (dict(seed=0), [442, 852, 421, 861]),
    (dict(seed=2**40 + 3, offset=17, top_p=0.9), [140, 884, 694, 862]),
    (dict(seed=123, offset=5, top_k=20, top_p=0.8, temperature=0.7, alpha=0.5), [463, 1, 203, 420]),
    (dict(seed=9, min_p=0.2, temperature=1.5), [683, 936, 934, 11]),
]


@pytest.mark.parametrize("backend", backend_params())
def test_golden_tokens(backend):
    assert ipa_fast.RNG_STREAM_VERSION == 1
    base, adapter = golden_inputs()
    for kw, tokens in GOLDEN:
        out = ipa_fast.sample(base, adapter, backend=backend, **kw)
        assert out.tokens.tolist() == tokens, kw


# ---------------------------------------------------------------- bad input

def _bad_cases():
    x = torch.zeros(2, 5)
    return [
        (dict(logits=torch.zeros(5)), ValueError, "logits"),
        (dict(logits=torch.zeros(2, 3, 5)), ValueError, "logits"),
        (dict(logits=torch.zeros(2, 5, dtype=torch.int64)), TypeError, "logits"),
        (dict(logits=torch.zeros(2, 5, dtype=torch.float64)), TypeError, "logits"),
        (dict(logits=[[0.0, 1.0]]), TypeError, "logits"),
        (dict(logits=torch.zeros(0, 5)), ValueError, "logits"),
        (dict(logits=x, adapter_logits=torch.zeros(2, 4)), ValueError, "adapter_logits"),
        (dict(logits=x, adapter_logits=torch.zeros(2, 5, device="meta")), ValueError, "adapter_logits"),
        (dict(logits=x, top_p=0.0), ValueError, "top_p"),
        (dict(logits=x, top_p=1.5), ValueError, "top_p"),
        (dict(logits=x, top_p=float("nan")), ValueError, "top_p"),
        (dict(logits=x, top_k=-1), ValueError, "top_k"),
        (dict(logits=x, top_k=1.5), TypeError, "top_k"),
        (dict(logits=x, top_k=torch.tensor([1.0, 2.0])), TypeError, "top_k"),
        (dict(logits=x, top_k=torch.tensor([1, 2, 3])), ValueError, "top_k"),
        (dict(logits=x, min_p=-0.1), ValueError, "min_p"),
        (dict(logits=x, min_p=1.01), ValueError, "min_p"),
        (dict(logits=x, temperature=-1.0), ValueError, "temperature"),
        (dict(logits=x, temperature="hot"), TypeError, "temperature"),
        (dict(logits=x, alpha=float("inf")), ValueError, "alpha"),
        (dict(logits=x, seed=1, generator=torch.Generator()), TypeError, "generator"),
        (dict(logits=x, seed=1.5), TypeError, "seed"),
        (dict(logits=x, offset=0.5), TypeError, "offset"),
        (dict(logits=torch.tensor([[0.0, float("nan")], [0.0, 1.0]])), ValueError, "logits"),
        (dict(logits=torch.tensor([[0.0, 1.0], [float("-inf"), float("-inf")]])), ValueError, "logits"),
        (dict(logits=torch.tensor([[0.0, float("inf")]])), ValueError, "logits"),
        (dict(logits=x, backend="nope"), ValueError, "backend"),
    ]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_raises_naming_the_argument(backend, case):
    kwargs, exc, name = _bad_cases()[case]
    kwargs = dict(kwargs)
    logits = kwargs.pop("logits")
    kwargs.setdefault("backend", backend)
    with pytest.raises(exc, match=name):
        ipa_fast.sample(logits, **kwargs)


@pytest.mark.parametrize("backend", backend_params())
def test_validate_false_flags_invalid_rows(backend):
    ninf, nan = float("-inf"), float("nan")
    base = torch.tensor([[0.0, 1.0, 2.0], [nan, 1.0, 0.0], [ninf, ninf, ninf], [1.0, 0.0, 0.5], [0.0, 1.0, 0.0]])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0])  # row 3: a bad parameter
    adapter = torch.tensor([[0.0] * 3, [0.0] * 3, [0.0] * 3, [0.0] * 3, [float("inf"), 0.0, 0.0]])  # row 4: +inf
    out = ipa_fast.sample(base, adapter, top_p=top_p, seed=1, validate=False, backend=backend)
    assert out.valid.tolist() == [True, False, False, False, False]
    assert out.tokens[1:].tolist() == [0, 0, 0, 0]
    assert out.logprobs[1:].isnan().all() and out.filtered_logprobs[1:].isnan().all()
    assert 0 <= out.tokens[0] < 3 and not out.logprobs[0].isnan()


@pytest.mark.parametrize("backend", backend_params())
def test_minus_inf_logits_and_zero_alpha(backend):
    base = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf")]] * 200)
    adapter = torch.tensor([[float("-inf"), 0.0, 0.0, 0.0]] * 200)
    out = ipa_fast.sample(base, adapter, alpha=0.0, seed=3, backend=backend)  # alpha 0: no 0 * -inf NaN
    assert out.valid.all() and set(out.tokens.tolist()) == {0, 2}
    out = ipa_fast.sample(base, adapter, alpha=1.0, seed=3, backend=backend)  # token 0 masked by the adapter
    assert set(out.tokens.tolist()) == {2}
    assert torch.allclose(out.logprobs, torch.zeros(200), atol=1e-6)


@pytest.mark.parametrize("backend", backend_params())
def test_single_token_vocabulary(backend):
    out = ipa_fast.sample(torch.tensor([[3.0], [-1.0]]), top_k=1, top_p=0.5, min_p=1.0, seed=0, backend=backend)
    assert out.tokens.tolist() == [0, 0] and out.valid.all()
    assert out.logprobs.abs().max() == 0 and out.filtered_logprobs.abs().max() == 0


def test_reference_tiny_temperature_overflow_is_invalid():
    out = ipa_fast.sample(torch.tensor([[1e30, 0.0]]), temperature=1e-20, seed=0, validate=False, backend="reference")
    assert not out.valid.item() and out.tokens.item() == 0
    assert math.isnan(out.logprobs.item())
