"""The sampler suite: docs/DESIGN.md §2 semantics of ``ipa_fast.sample`` / ``sample_experts`` on
every backend of ``sampler_cases.BACKENDS`` (reference, cpu, the Triton interpreter, the CUDA
kernel emulated on CPU, and triton / cuda on a GPU), each case through ``Backend.sample``.

Oracles: transformers' own warpers (kept sets), float64 softmax (probabilities, log-probs), the
reference (token-for-token: the RNG stream is one, docs/DESIGN.md §3.3), and chi-square tests
(significance ``ALPHA_CHI2`` = 1e-4 per test: a correct sampler fails one with probability 1e-4;
every input and seed is fixed, so a passing test cannot flake). Emulated backends cost ~0.1 s a
row: their batches are small (``Backend.rows``), their chi-square tests (one case per K) draw
``Backend.draws`` = 120 rows and also check those draws equal the reference's token for token,
which carries the reference's 10^5-draw result over to them.
"""
from __future__ import annotations

import math

import pytest
import torch

from hypothesis import HealthCheck, given, settings

import ipa_fast
from ipa_fast.ops import reference
from sampler_cases import (
    DTYPES, backend_params, boundary_near_tie, cases, chi_square_pvalue, filtered_probs, hf_kept_mask, log_softmax64,
    mixed, random_logits, random_params,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ALPHA_CHI2 = 1e-4


def assert_agrees(got, ref, min_rate=0.999, atol=2e-5, exact=False):
    """``got`` (a backend's SampleOutput) against the reference's for the same inputs and seeds."""
    assert torch.equal(got.valid, ref.valid), "valid flags differ"
    same = got.tokens == ref.tokens
    rate = same.double().mean().item()
    if exact:
        assert torch.equal(got.tokens, ref.tokens), (got.tokens.tolist(), ref.tokens.tolist())
    assert rate >= min_rate, f"token agreement {rate:.5f}: {got.tokens.tolist()[:16]} vs {ref.tokens.tolist()[:16]}"
    ok = same & ref.valid
    torch.testing.assert_close(got.logprobs[ok], ref.logprobs[ok], rtol=0, atol=atol)
    torch.testing.assert_close(got.filtered_logprobs[ok], ref.filtered_logprobs[ok], rtol=0, atol=atol)
    assert got.tokens[~ref.valid].eq(0).all() and got.logprobs[~ref.valid].isnan().all()


def both(backend, *args, experts=False, **kw):
    """(this backend's output, the reference's) for one call."""
    fn = "sample_experts" if experts else "sample"
    ref = getattr(ipa_fast, fn)(*args, backend="reference", **kw)
    return getattr(backend, fn)(*args, **kw), ref


# ---------------------------------------------------------------- kept sets vs transformers

@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("vocab", [40, 200])
def test_kept_sets_match_hf_warpers(backend, vocab):
    """Per-row top-k / top-p / min-p: every drawn token is in HF's kept set and the kept mass
    (exp(logprobs - filtered_logprobs)) equals HF's, except rows with a boundary near-tie."""
    B = backend.rows(1500, 4)
    base = random_logits(B, vocab, seed=vocab, scale=2.0)
    adapter = random_logits(B, vocab, seed=vocab + 7, scale=1.0, masked=0.05)
    prm = random_params(B, vocab, seed=vocab)
    out = backend.sample(base, adapter, seed=11, **prm)
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


@pytest.mark.parametrize("backend", backend_params(cheap=True))
def test_kept_sets_with_ties_and_filtered_mass(backend):
    """Every draw lies in the reference kept set (a tie inside it), and filtered_logprobs carry the
    kept mass."""
    B, V = 4, 40
    row = torch.linspace(4.0, -4.0, V)
    row[[3, 4]] = row[2].item()
    base = row.expand(B, V).contiguous()
    for kw in (dict(top_k=5), dict(top_p=0.6), dict(min_p=0.2), dict(top_k=10, top_p=0.8, min_p=0.05)):
        got, ref = both(backend, base, seed=torch.arange(B) * 7919 + 11, **kw)
        assert_agrees(got, ref)
        keep = hf_kept_mask(base, kw.get("top_k", 0), kw.get("top_p", 1.0), kw.get("min_p", 0.0))
        assert keep[torch.arange(B), got.tokens].all()
        w = torch.exp(base.double() - 4.0) * keep
        expect = (base[torch.arange(B), got.tokens].double() - 4.0 - torch.log(w.sum(1))).float()
        torch.testing.assert_close(got.filtered_logprobs, expect, atol=2e-5, rtol=0)


# ---------------------------------------------------------------- the draw is exact: K experts

CHI2_CASES = [  # (weights, filters, on emulated backends too): K = 1, 2, 3, a negative weight in each K
    ([-1.3], dict(top_k=6, top_p=0.9), True),
    ([0.8], dict(min_p=0.05, temperature=0.7), False),
    ([1.0, 1.0], dict(), False),          # K = 2: weight 1 on the first expert, alpha on the second
    ([1.0, -0.6], dict(top_p=0.9, temperature=0.7), True),
    ([1.0, 0.5], dict(min_p=0.15, temperature=1.3), False),
    ([1.0, 0.6, -0.4], dict(top_k=5, temperature=0.8), True),
    ([0.7, -0.5, 1.2], dict(top_p=0.95, min_p=0.02), False),
]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", range(len(CHI2_CASES)),
                         ids=[f"K{len(c[0])}-{i}" for i, c in enumerate(CHI2_CASES)])
def test_k_experts_draw_softmax_of_weighted_sum(backend, case):
    """N draws of one row mixing K experts: the token counts match softmax((sum_k w_k z_k) / T)
    after the filters (float64 weighted sum, transformers' warpers), chi-square p > 1e-4. Emulated
    backends (~0.1 s a draw) run one case per K, with ``Backend.draws`` draws."""
    weights, filters, everywhere = CHI2_CASES[case]
    if backend.emulated and not everywhere:
        pytest.skip("emulated backends run one case per K (their draws equal the reference's)")
    kw = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    kw.update(filters)
    V, N = 10, backend.draws
    experts = [random_logits(1, V, seed=300 + 10 * case + k, scale=1.2) for k in range(len(weights))]
    rows = [x.expand(N, V) for x in experts]
    if len(weights) == 2:   # K = 2 through the two-expert entry (bit for bit sample_experts': test_two_experts_equal_sample)
        call = lambda fn, **more: fn(rows[0], rows[1], alpha=weights[1], seed=1234 + case, **kw, **more)  # noqa: E731
        out, ref_fn = call(backend.sample), ipa_fast.sample
    else:
        call = lambda fn, **more: fn(rows, weights, seed=1234 + case, **kw, **more)  # noqa: E731
        out, ref_fn = call(backend.sample_experts), ipa_fast.sample_experts
    z = sum(w * x.double() for w, x in zip(weights, experts)) / kw["temperature"]
    keep = hf_kept_mask(z.float(), kw["top_k"], kw["top_p"], kw["min_p"])[0]
    assert int(keep.sum()) >= 3, "a case with a real choice"
    probs = filtered_probs(z[0].float(), keep)
    counts = torch.bincount(out.tokens, minlength=V)
    assert out.valid.all()
    assert chi_square_pvalue(counts, probs) > ALPHA_CHI2
    if backend.emulated:   # few draws here: they are the reference's draws, whose 1e5-draw test passes
        assert torch.equal(out.tokens, call(ref_fn, backend="reference").tokens)


@pytest.mark.parametrize("backend", backend_params(cheap=True))
def test_one_kept_token_is_always_drawn(backend):
    base, adapter = random_logits(1, 12, seed=104, scale=1.2), random_logits(1, 12, seed=204, scale=0.8)
    n = backend.rows(200, 8)
    out = backend.sample(base.expand(n, 12), adapter.expand(n, 12), top_k=1, temperature=2.0, seed=5)
    assert (out.tokens == (base + adapter).argmax()).all() and (out.filtered_logprobs == 0).all()


@pytest.mark.parametrize("backend", backend_params())
def test_logprobs_match_log_softmax(backend):
    B, V = backend.rows(300, 4), 150
    base = random_logits(B, V, seed=3, scale=2.0, masked=0.1)
    adapter = random_logits(B, V, seed=4)
    prm = random_params(B, V, seed=3)
    out = backend.sample(base, adapter, seed=5, **prm)
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

@pytest.mark.parametrize("backend", backend_params(cheap=True))
def test_greedy_at_zero_temperature(backend):
    base = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, 1.0, 5.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    adapter = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    out = backend.sample(base, adapter, alpha=0.5, temperature=0.0, top_k=1, top_p=0.3, seed=0)
    assert out.tokens.tolist() == [1, 0, 0]  # ties -> lowest index (row 1: 5 beats -1 + 4.5)
    z = base + 0.5 * adapter
    torch.testing.assert_close(out.logprobs.double(), log_softmax64(z)[torch.arange(3), out.tokens], atol=1e-6, rtol=0)
    assert (out.filtered_logprobs == 0).all()
    # ties across chunks of the vocabulary: still the lowest index
    base = torch.zeros(3, 140)
    base[0, [5, 9, 130]] = 2.0
    base[1, [129, 131]] = 1.0
    base[2, 139] = 3.0
    out = backend.sample(base, temperature=0.0, seed=1)
    assert out.tokens.tolist() == [5, 129, 139] and (out.filtered_logprobs == 0).all() and out.valid.all()
    torch.testing.assert_close(out.logprobs, torch.log_softmax(base, 1)[torch.arange(3), out.tokens])


@pytest.mark.parametrize("backend", backend_params())
def test_per_row_zero_temperature_only_makes_that_row_greedy(backend):
    B, V = backend.rows(64, 8), 50
    base = random_logits(B, V, seed=8, scale=0.3)  # flat: sampled rows rarely hit the argmax
    t = torch.where(torch.arange(B) % 2 == 0, 0.0, 1.0)
    out = backend.sample(base, temperature=t, seed=9)
    even = torch.arange(0, B, 2)
    assert (out.tokens[even] == base[even].argmax(1)).all()
    assert (out.tokens[1::2] != base[1::2].argmax(1)).any()
    assert (out.filtered_logprobs[even] == 0).all() and (out.filtered_logprobs[1::2] < 0).all()


# ---------------------------------------------------------------- token for token with the reference

def path_params(B, V, seed):
    """Per-row parameters cycling through every path: no filter, each filter, combinations, greedy."""
    gen = torch.Generator().manual_seed(seed)
    ks = [0, 1, 5, 50, 0, 0, 20, 0, V, 3, 0, 40]
    ps = [1.0, 1.0, 1.0, 0.9, 0.7, 1.0, 0.95, 0.5, 1.0, 1.0, 0.99, 0.8]
    mps = [0.0, 0.0, 0.0, 0.0, 0.0, 0.05, 0.01, 0.1, 0.0, 0.3, 0.0, 0.02]
    ts = [1.0, 0.7, 1.3, 1.0, 1.0, 1.0, 0.8, 2.0, 1.0, 0.0, 1.0, 1.0]
    pick = lambda lst, dtype: torch.tensor([lst[i % len(lst)] for i in range(B)], dtype=dtype)  # noqa: E731
    return dict(top_k=pick(ks, torch.int64), top_p=pick(ps, torch.float32), min_p=pick(mps, torch.float32),
                temperature=pick(ts, torch.float32), alpha=torch.rand(B, generator=gen) * 1.5,
                seed=torch.randint(0, 2**62, (B,), generator=gen), offset=torch.arange(B))


DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
               (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}")
def test_agrees_with_reference_on_every_path(backend, dtypes):
    """The twelve paths of ``path_params`` (four rows at a time on emulated backends), masked
    tokens, 300 tokens a row (several chunks, the last partial), each input dtype and a mixed pair."""
    V = 300
    B = 12
    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(B, V, generator=gen) * 3)
    base[::7, ::11] = float("-inf")
    base, adapter = base.to(dtypes[0]), torch.randn(B, V, generator=gen).to(dtypes[1])
    p = path_params(B, V, seed=1)
    step = backend.rows(B, 4)
    for r in range(0, B, step):
        sl = slice(r, r + step)
        got, ref = both(backend, base[sl], adapter[sl], **{k: v[sl] for k, v in p.items()})
        assert_agrees(got, ref, min_rate=1.0 if backend.emulated else 11 / 12)


@pytest.mark.parametrize("backend", backend_params())
def test_ties_integer_and_huge_logits(backend):
    """Massive ties everywhere (integer logits), and |z| > 2**20 (the kernels' exact row path)."""
    B, V = backend.rows(64, 4), backend.rows(1000, 200)
    g = torch.Generator().manual_seed(0)
    base = torch.randint(-3, 4, (B, V), generator=g).float()
    cases = [dict(top_k=5), dict(top_k=1), dict(top_p=0.3), dict(min_p=0.3), dict(temperature=0.0),
             dict(top_k=400, top_p=0.95)]
    if backend.kernel != "triton":  # a ratio of exactly min_p: a near-tie (docs/DESIGN.md §2.5), which the
        cases.append(dict(min_p=math.exp(-1.0)))  # Triton kernels' float32 exp rounds the other way
    for kw in cases:
        assert_agrees(*both(backend, base, seed=1, **kw), min_rate=1.0)
    huge = torch.randn(4, 130, generator=g) * 4 + 3.0e6
    assert_agrees(*both(backend, huge, seed=torch.arange(4) + 5, top_k=torch.tensor([0, 5, 0, 9]),
                        top_p=torch.tensor([1.0, 1.0, 0.8, 0.9])), min_rate=1.0)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("V", [1, 2, 127, 129, 257])
def test_small_odd_shapes(backend, V):
    gen = torch.Generator().manual_seed(V)
    base, adapter = torch.randn(4, V, generator=gen), torch.randn(4, V, generator=gen)
    assert_agrees(*both(backend, base, adapter, alpha=0.5, seed=torch.arange(4) * 7919 + 11, offset=torch.arange(4),
                        top_k=torch.tensor([0, 1, 2, 0]), top_p=torch.tensor([1.0, 0.9, 1.0, 0.5]),
                        min_p=torch.tensor([0.0, 0.0, 0.1, 0.0])), min_rate=1.0)


@pytest.mark.parametrize("backend", backend_params())
def test_property_equals_reference(backend):
    """Random shapes, dtypes, masks and parameters (invalid rows included): the reference's tokens
    and flags exactly, its log-probs to 3e-5 (60 examples; 12 on emulated backends)."""
    @settings(max_examples=backend.rows(60, 12), deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(cases())
    def check(case):
        B, V, dtype, scale, masked, with_adapter, data_seed, kw = case
        base = random_logits(B, V, seed=data_seed, scale=scale, dtype=dtype, masked=masked)
        adapter = random_logits(B, V, seed=data_seed + 1, scale=scale, dtype=dtype) if with_adapter else None
        got, ref = both(backend, base, adapter, validate=False, **kw)
        assert ((got.tokens >= 0) & (got.tokens < V)).all()
        assert_agrees(got, ref, min_rate=1.0, atol=3e-5)  # a mismatch would need u within rounding of a CDF step
    check()


# ---------------------------------------------------------------- K experts: fast paths == reference

def experts_for(K, B, V, *, seed=0, dtypes=None, masked=0.0):
    dtypes = dtypes or [torch.float32] * K
    return [random_logits(B, V, seed=seed + 31 * k, scale=2.0, dtype=dtypes[k], masked=masked if k else 0.0)
            for k in range(K)]


def row_weights(B, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(B, K, generator=g) * 1.5
    w[:, 0] = 1.0
    w[torch.rand(B, K, generator=g) < 0.1] = 0.0   # some experts ignored in some rows
    return w


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_experts_match_reference(backend, K):
    """K experts of mixed dtypes, per-row weights (some 0), every filter: the reference's draws
    (negative weights: test_k_experts_draw_softmax_of_weighted_sum)."""
    B, V = backend.rows(64, 4), backend.rows(3000, 300)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32][:K]
    experts = experts_for(K, B, V, seed=K, dtypes=dtypes, masked=0.05)
    w = row_weights(B, K, seed=K)
    p = random_params(B, V, seed=K)
    p.pop("alpha")
    got, ref = both(backend, experts, w, experts=True, seed=11, offset=3, **p)
    assert got.valid.all() and ref.valid.all()
    assert_agrees(got, ref, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params())
def test_strided_rows_read_in_place(backend):
    B, V = backend.rows(8, 4), backend.rows(1000, 300)
    wide = [random_logits(B, V + 37, seed=k) for k in range(3)]
    sliced = [x[:, :V] for x in wide]
    assert not sliced[0].is_contiguous()
    kw = dict(weights=[1.0, 0.5, -0.25], temperature=0.9, top_p=0.9, seed=4)
    got = backend.sample_experts(sliced, **kw)
    ref = ipa_fast.sample_experts([x.contiguous() for x in sliced], backend="reference", **kw)
    assert torch.equal(got.tokens, ref.tokens)
    # the two-expert entry reads strided rows too
    a = backend.sample(sliced[0], sliced[1], alpha=0.5, seed=4)
    b = backend.sample(sliced[0].contiguous(), sliced[1].contiguous(), alpha=0.5, seed=4)
    assert torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("backend", backend_params())
def test_two_experts_equal_sample(backend):
    """``sample(base, adapter, alpha)`` is ``sample_experts([base, adapter], [1, alpha])`` bit for
    bit, and ``sample(base)`` is ``sample_experts([base], [1])``."""
    B, V = backend.rows(48, 4), backend.rows(2000, 300)
    base, adapter = experts_for(2, B, V, seed=7)
    p = random_params(B, V, seed=7)
    alpha = p.pop("alpha")
    old = backend.sample(base, adapter, alpha=alpha, seed=5, offset=9, **p)
    w = torch.stack([torch.ones(B), alpha], dim=1)
    new = backend.sample_experts([base, adapter], w, seed=5, offset=9, **p)
    assert torch.equal(old.tokens, new.tokens)
    assert torch.equal(old.logprobs, new.logprobs)
    assert torch.equal(old.filtered_logprobs, new.filtered_logprobs)
    one = backend.sample(base, seed=5, **p)
    assert torch.equal(one.tokens, backend.sample_experts([base], [1.0], seed=5, **p).tokens)


@pytest.mark.parametrize("backend", backend_params())
def test_experts_inf_rules(backend):
    V = 50
    e0, e1, e2 = experts_for(3, 4, V, seed=9)
    e1 = e1.clone()
    e1[:, 10] = float("-inf")
    e1[0] = float("nan")
    w = torch.tensor([[1.0, 0.0, 0.5],     # weight 0: expert 1 ignored, even its NaN row
                      [1.0, 0.5, 0.5],     # positive weight: token 10 masked
                      [1.0, -0.5, 0.5],    # negative weight * -inf = +inf: the row is invalid
                      [0.0, 0.0, 0.0]])    # every weight 0: z = 0, uniform
    full = backend.sample_experts([e0, e1, e2], w, seed=4, validate=False)
    assert full.valid.tolist() == [True, True, False, True]
    ref = ipa_fast.sample_experts([e0, e1, e2], w, seed=4, validate=False, backend="reference")
    assert torch.equal(full.tokens, ref.tokens)
    assert full.tokens[2].item() == 0 and torch.isnan(full.logprobs[2])
    # row 1 never draws token 10; row 3 is uniform
    n = backend.rows(2000, 16)
    many = backend.sample_experts([e0[1:2].expand(n, V), e1[1:2].expand(n, V), e2[1:2].expand(n, V)],
                                  [1.0, 0.5, 0.5], seed=1)
    assert not (many.tokens == 10).any()
    torch.testing.assert_close(full.logprobs[3], torch.tensor(-torch.log(torch.tensor(float(V))).item()))
    with pytest.raises(ValueError, match="invalid"):
        backend.sample_experts([e0, e1, e2], w, seed=4)
    z = reference.mix_experts([e0, e1, e2], w)
    assert torch.equal(z[0], e0[0] + 0.5 * e2[0])


@pytest.mark.parametrize("bad, match, exc", [
    (dict(experts=[torch.zeros(2, 5), torch.zeros(2, 6)]), r"experts\[1\] shape", ValueError),
    (dict(experts=[torch.zeros(2, 5), torch.zeros(3, 5)]), r"experts\[1\] shape", ValueError),
    (dict(experts=[]), "experts must hold at least one", ValueError),
    (dict(experts=torch.zeros(2, 2, 5)), "experts must be a list", TypeError),
    (dict(weights=[1.0, 2.0]), "weights must have K = 3", ValueError),
    (dict(weights=torch.ones(4)), "weights must be K = 3", ValueError),
    (dict(weights=torch.ones(3, 3)), "weights must be K = 3", ValueError),
    (dict(weights=[1.0, float("nan"), 0.5]), "weights must be finite", ValueError),
    (dict(weights=torch.tensor([[1.0, 0.5, float("nan")], [1.0, 0.5, 0.5]])), "weights must be finite", ValueError),
    (dict(weights=[1.0, float("inf"), 0.5]), "weights must be finite", ValueError),
    (dict(weights=torch.tensor([1.0, 1e300, 0.5], dtype=torch.float64)), "weights must be finite", ValueError),
    (dict(weights="1,2,3"), "weights must be a list", TypeError),
])
@pytest.mark.parametrize("backend", backend_params(cheap=True))
def test_experts_bad_inputs_name_the_parameter(bad, match, exc, backend):
    args = dict(experts=[torch.zeros(2, 5)] * 3, weights=[1.0, 0.5, 0.5])
    args.update(bad)
    with pytest.raises(exc, match=match):
        backend.sample_experts(args["experts"], args["weights"], seed=0)


@pytest.mark.parametrize("backend", backend_params(cheap=True))
def test_nan_weight_without_validation_is_an_invalid_row(backend):
    x = [torch.zeros(2, 5)] * 2
    w = torch.tensor([[1.0, float("nan")], [1.0, 0.5]])
    out = backend.sample_experts(x, w, seed=0, validate=False)
    assert out.valid.tolist() == [False, True]


# ---------------------------------------------------------------- dtypes, seeds, batches, golden

@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_is_float32_arithmetic_on_the_stored_values(backend, dtype):
    B, V = backend.rows(40), 333
    base = random_logits(B, V, seed=21, dtype=dtype, masked=0.02)
    adapter = random_logits(B, V, seed=22, dtype=dtype)
    prm = random_params(B, V, seed=21)
    a = backend.sample(base, adapter, seed=3, **prm)
    b = backend.sample(base.float(), adapter.float(), seed=3, **prm)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=0)
    if dtype != torch.float32:  # mixed input dtypes are read directly too
        c = backend.sample(base, adapter.float(), seed=3, **prm)
        assert torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize("backend", backend_params())
def test_seed_conventions(backend):
    B, V = backend.rows(16), 64
    base = random_logits(B, V, seed=1, scale=0.5)
    a = backend.sample(base, seed=77)
    b = backend.sample(base, seed=torch.arange(B) + 77)
    assert torch.equal(a.tokens, b.tokens)  # a scalar seed means seed + row
    c = backend.sample(base, seed=77, offset=1)
    assert not torch.equal(a.tokens, c.tokens)  # the offset moves the stream
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    d = backend.sample(base, generator=g1)
    e = backend.sample(base, generator=g2)
    assert torch.equal(d.tokens, e.tokens)


@pytest.mark.parametrize("backend", backend_params())
def test_batch_invariance(backend):
    """A row's token and log-probs do not depend on the other rows of the batch."""
    B, V = backend.rows(10, 4), 300
    gen = torch.Generator().manual_seed(4)
    base, adapter = torch.randn(B, V, generator=gen) * 2, torch.randn(B, V, generator=gen)
    p = path_params(B, V, seed=4)
    full = backend.sample(base, adapter, **p)
    rows = [1, 4, 7] if B == 10 else [1, 3]
    part = backend.sample(base[rows], adapter[rows], **{k: v[rows] for k, v in p.items()})
    for a, b in zip((full.tokens, full.logprobs, full.filtered_logprobs, full.valid),
                    (part.tokens, part.logprobs, part.filtered_logprobs, part.valid)):
        assert torch.equal(a[rows].nan_to_num(), b.nan_to_num())


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


@pytest.mark.parametrize("backend", backend_params(cheap=True))
def test_golden_tokens(backend):
    assert ipa_fast.RNG_STREAM_VERSION == 1
    base, adapter = golden_inputs()
    for kw, tokens in GOLDEN:
        out = backend.sample(base, adapter, **kw)
        assert out.tokens.tolist() == tokens, kw


# ---------------------------------------------------------------- bad input, invalid rows

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


@pytest.mark.parametrize("backend", backend_params(cheap=True))
@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_raises_naming_the_argument(backend, case):
    kwargs, exc, name = _bad_cases()[case]
    kwargs = dict(kwargs)
    logits = kwargs.pop("logits")
    with pytest.raises(exc, match=name):
        backend.sample(logits, **kwargs)


@pytest.mark.parametrize("backend", backend_params(cheap=True))
def test_validate_false_flags_invalid_rows(backend):
    ninf, nan = float("-inf"), float("nan")
    base = torch.tensor([[0.0, 1.0, 2.0], [nan, 1.0, 0.0], [ninf, ninf, ninf], [1.0, 0.0, 0.5], [0.0, 1.0, 0.0]])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0])  # row 3: a bad parameter
    adapter = torch.tensor([[0.0] * 3, [0.0] * 3, [0.0] * 3, [0.0] * 3, [float("inf"), 0.0, 0.0]])  # row 4: +inf
    out = backend.sample(base, adapter, top_p=top_p, seed=1, validate=False)
    assert out.valid.tolist() == [True, False, False, False, False]
    assert out.tokens[1:].tolist() == [0, 0, 0, 0]
    assert out.logprobs[1:].isnan().all() and out.filtered_logprobs[1:].isnan().all()
    assert 0 <= out.tokens[0] < 3 and not out.logprobs[0].isnan()


@pytest.mark.parametrize("backend", backend_params(cheap=True))
def test_invalid_rows_are_flagged_or_raised(backend):
    """NaN, all -inf, +inf, a negative top_k and top_p > 1 (tensors): flagged with validate=False
    (the reference's flags and draws), raised naming the row or the parameter with validate=True;
    alpha == 0 ignores an adapter full of -inf (no 0 * -inf NaN)."""
    B, V = 6, 50
    base = torch.randn(B, V, generator=torch.Generator().manual_seed(0))
    base[0, 3] = float("nan")
    base[1] = float("-inf")
    base[2, 7] = float("inf")
    kw = dict(top_k=torch.tensor([0, 0, 0, -1, 0, 3]), top_p=torch.tensor([1.0, 1.0, 1.0, 1.0, 1.5, 0.9]), seed=1)
    got, ref = both(backend, base, validate=False, **kw)
    assert got.valid.tolist() == [False, False, False, False, False, True]
    assert_agrees(got, ref, min_rate=1.0)
    out = backend.sample(base[5:], torch.full((1, V), float("-inf")), alpha=0.0, seed=1)
    assert out.valid.item()
    with pytest.raises(ValueError, match="row 0 is invalid"):
        backend.sample(base[:1], seed=1)
    with pytest.raises(ValueError, match="top_p"):
        backend.sample(base, top_p=0.0, seed=1)
    out = backend.sample(base, seed=1, validate=False)
    assert out.valid.tolist() == [False, False, False, True, True, True]


@pytest.mark.parametrize("backend", backend_params())
def test_minus_inf_logits_and_zero_alpha(backend):
    n = backend.rows(200, 16)
    base = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf")]] * n)
    adapter = torch.tensor([[float("-inf"), 0.0, 0.0, 0.0]] * n)
    out = backend.sample(base, adapter, alpha=0.0, seed=3)  # alpha 0: no 0 * -inf NaN
    assert out.valid.all() and set(out.tokens.tolist()) == {0, 2}
    out = backend.sample(base, adapter, alpha=1.0, seed=3)  # token 0 masked by the adapter
    assert set(out.tokens.tolist()) == {2}
    assert torch.allclose(out.logprobs, torch.zeros(n), atol=1e-6)


@pytest.mark.parametrize("backend", backend_params(cheap=True))
def test_single_token_vocabulary(backend):
    out = backend.sample(torch.tensor([[3.0], [-1.0]]), top_k=1, top_p=0.5, min_p=1.0, seed=0)
    assert out.tokens.tolist() == [0, 0] and out.valid.all()
    assert out.logprobs.abs().max() == 0 and out.filtered_logprobs.abs().max() == 0


def test_reference_tiny_temperature_overflow_is_invalid():
    out = ipa_fast.sample(torch.tensor([[1e30, 0.0]]), temperature=1e-20, seed=0, validate=False, backend="reference")
    assert not out.valid.item() and out.tokens.item() == 0
    assert math.isnan(out.logprobs.item())
