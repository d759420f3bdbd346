"""The Triton sampler and tailored_log_softmax under the Triton CPU interpreter, against the reference.

TRITON_INTERPRET=1 must be set before triton is first imported (triton.language's own jit
functions are decorated at import). If this module is collected first it sets it here; if another
module imported triton earlier, the suite reruns itself in a subprocess with the variable set
(test_interpreter_suite_in_subprocess) and the in-process copies skip. The interpreter runs one
Python program per grid cell, so the shapes are small; tests/test_gpu.py runs the same checks at
full size on a GPU.
"""
import importlib
import os
import sys
import threading

import pytest
import torch

if torch.cuda.is_available():   # the interpreter switch is process-wide: leave a GPU to tests/test_gpu.py
    pytest.skip("a CUDA device is present: tests/test_gpu.py runs these checks on it", allow_module_level=True)

IN_PROCESS = "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"
if IN_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from triton.runtime import interpreter as _interp  # noqa: E402

import ipa_fast  # noqa: E402
from ipa_fast.ops import dispatch
from ipa_fast.ops import reference  # noqa: E402


def _speed_up_interpreter():
    """The interpreter re-patches triton.language on every device-function call (~ms each); patching
    a module's globals once per launch is equivalent and makes these tests several times faster."""
    if getattr(_interp, "_ipa_fast_patched", False):
        return
    state = threading.local()
    orig_patch, orig_call = _interp._patch_lang, _interp.GridExecutor.__call__

    def patch_lang(fn):
        done = getattr(state, "done", None)
        if done is not None and id(fn.__globals__) in done:
            return _interp._LangPatchScope()
        scope = orig_patch(fn)
        if done is not None:
            done.add(id(fn.__globals__))
        return scope

    def call(self, *args, **kwargs):
        state.done = set()
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            state.done = None

    _interp._patch_lang = patch_lang
    _interp.GridExecutor.__call__ = call
    _interp._ipa_fast_patched = True


if IN_PROCESS:
    _speed_up_interpreter()
    for _name in ("ipa_fast.kernels.sampler_triton", "ipa_fast.kernels.log_softmax_triton"):
        if _name in sys.modules:   # imported (compiled flavour) before the variable was set
            importlib.reload(sys.modules[_name])
    dispatch._load.cache_clear()
st = importlib.import_module("ipa_fast.kernels.sampler_triton")
lst = importlib.import_module("ipa_fast.kernels.log_softmax_triton")


@pytest.fixture(autouse=True)
def _interpreter_in_this_process(request):
    if not IN_PROCESS and request.node.name != "test_interpreter_suite_in_subprocess":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set: "
                    "test_interpreter_suite_in_subprocess runs this check")


def test_interpreter_suite_in_subprocess():
    if IN_PROCESS:
        pytest.skip("the suite runs in this process")
    import subprocess
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings",
                          __file__], env=env, capture_output=True, text=True, timeout=1800)
    print(res.stdout[-3000:])
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]


def params(B, **kw):
    p = dict(alpha=torch.full((B,), 0.5), temperature=torch.ones(B), top_k=torch.zeros(B, dtype=torch.int64),
             top_p=torch.ones(B), min_p=torch.zeros(B), seed=torch.arange(B, dtype=torch.int64) * 7919 + 11,
             offset=torch.arange(B, dtype=torch.int64))
    for k, v in kw.items():
        p[k] = v if isinstance(v, torch.Tensor) else torch.full((B,), v, dtype=p[k].dtype)
    return p


def mixed_params(B, V, gen):
    """Per-row parameters cycling through every path: no filter, each filter, combinations, greedy."""
    ks = [0, 1, 5, 50, 0, 0, 20, 0, V, 3, 0, 40]
    ps = [1.0, 1.0, 1.0, 0.9, 0.7, 1.0, 0.95, 0.5, 1.0, 1.0, 0.99, 0.8]
    mps = [0.0, 0.0, 0.0, 0.0, 0.0, 0.05, 0.01, 0.1, 0.0, 0.3, 0.0, 0.02]
    ts = [1.0, 0.7, 1.3, 1.0, 1.0, 1.0, 0.8, 2.0, 1.0, 0.0, 1.0, 1.0]
    pick = lambda lst, dtype: torch.tensor([lst[i % len(lst)] for i in range(B)], dtype=dtype)  # noqa: E731
    return params(B, top_k=pick(ks, torch.int64), top_p=pick(ps, torch.float32), min_p=pick(mps, torch.float32),
                  temperature=pick(ts, torch.float32),
                  alpha=torch.rand(B, generator=gen) * 1.5, seed=torch.randint(0, 2**62, (B,), generator=gen))


def assert_matches_reference(base, adapter, p, min_agree=0.999):
    got = st.sample(base, adapter, **p)
    ref = reference.sample(base, adapter, **p)
    assert torch.equal(got[3], ref[3]), "valid flags differ"
    agree = (got[0] == ref[0]).float().mean().item()
    assert agree >= min_agree, f"token agreement {agree:.4f} < {min_agree}: {got[0].tolist()} vs {ref[0].tolist()}"
    same = got[0] == ref[0]
    # logprobs: float32 lse vs the reference's float64; 2e-5 absolute covers it at these V
    torch.testing.assert_close(got[1][same], ref[1][same], atol=2e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(got[2][same], ref[2][same], atol=2e-5, rtol=1e-5, equal_nan=True)
    return got


def test_agreement_with_reference_all_paths():
    gen = torch.Generator().manual_seed(0)
    B, V = 36, 300     # chunk 128: three chunks per row, the last one partial
    base = torch.randn(B, V, generator=gen) * 3
    adapter = torch.randn(B, V, generator=gen)
    base[::7, ::11] = float("-inf")                 # masked tokens
    assert_matches_reference(base, adapter, mixed_params(B, V, gen))


@pytest.mark.parametrize("cap, pair", [(4, 128), (4, 2), (None, 2)], ids=["row-pairwise", "row-search", "cand-search"])
def test_threshold_paths(monkeypatch, cap, pair):
    """Kept sets beyond the candidate capacity search the raw row (slow, exact); more tokens than
    PAIR take the pivot search instead of the one-pass pairwise thresholds."""
    if cap is not None:
        monkeypatch.setattr(st, "CAP", cap)
    monkeypatch.setattr(st, "PAIR", pair)
    monkeypatch.setattr(st, "PCH", min(pair, st.PCH))
    gen = torch.Generator().manual_seed(1)
    B, V = 12, 120 if pair == 128 else 200
    base = torch.randn(B, V, generator=gen) * 2
    assert_matches_reference(base, None, mixed_params(B, V, gen))


def test_huge_logits_take_the_exact_row_path():
    gen = torch.Generator().manual_seed(2)
    B, V = 4, 130
    base = torch.randn(B, V, generator=gen) * 4 + 3.0e6     # |max z| > 2**20: histogram bins not exact
    assert_matches_reference(base, None, params(B, top_k=torch.tensor([0, 5, 0, 9]),
                                                 top_p=torch.tensor([1.0, 1.0, 0.8, 0.9])))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_read_directly(dtype):
    gen = torch.Generator().manual_seed(3)
    B, V = 12, 260
    base = (torch.randn(B, V, generator=gen) * 3).to(dtype)
    adapter = torch.randn(B, V, generator=gen).to(dtype)
    assert_matches_reference(base, adapter, mixed_params(B, V, gen))


def test_mixed_input_dtypes():
    gen = torch.Generator().manual_seed(6)
    B, V = 4, 200
    base = (torch.randn(B, V, generator=gen) * 3).to(torch.bfloat16)
    adapter = torch.randn(B, V, generator=gen)                     # float32 beside a bfloat16 base
    assert_matches_reference(base, adapter, mixed_params(B, V, gen))


def test_kept_sets_and_filtered_mass():
    """Every draw lies in the reference kept set, and filtered_logprobs carry the kept mass."""
    B, V = 8, 40
    row = torch.linspace(4.0, -4.0, V)
    row[[3, 4]] = row[2].item()                # a tie inside the kept set
    base = row.expand(B, V).contiguous()
    for kw in (dict(top_k=5), dict(top_p=0.6), dict(min_p=0.2), dict(top_k=10, top_p=0.8, min_p=0.05)):
        p = params(B, alpha=0.0, **kw)
        keep = reference.kept_mask(base, p["top_k"], p["top_p"], p["min_p"])
        got = assert_matches_reference(base, None, p)
        assert keep[torch.arange(B), got[0]].all()
        w = torch.exp(base.double() - 4.0) * keep
        expect = (base[torch.arange(B), got[0]].double() - 4.0 - torch.log(w.sum(1))).float()
        torch.testing.assert_close(got[2], expect, atol=2e-5, rtol=0)


@pytest.mark.parametrize("filtered", [False, True])
def test_draw_distribution_chi_square(filtered):
    """Draws from one row, one per seed, against the filtered, renormalised pi: chi-square at
    significance 1e-3 (fixed seeds, so the outcome is deterministic). The interpreter costs a program
    per draw, hence few draws here; tests/test_gpu.py draws 2e5 per row on a GPU."""
    scipy_stats = pytest.importorskip("scipy.stats")
    B = 160 if not filtered else 80
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    V = row.numel()
    base = row.expand(B, V).contiguous()
    kw = dict(top_k=4, top_p=0.95) if filtered else {}
    p = params(B, alpha=0.0, seed=torch.arange(B, dtype=torch.int64) + 12345, offset=0, **kw)
    tokens = st.sample(base, None, **p)[0]
    keep = reference.kept_mask(base[:1], p["top_k"][:1], p["top_p"][:1], p["min_p"][:1])[0]
    probs = torch.softmax(torch.where(keep, row, torch.tensor(float("-inf"))).double(), 0)
    k = keep.nonzero().flatten()
    assert set(tokens.tolist()) <= set(k.tolist())
    observed = torch.bincount(tokens, minlength=V)[k].double()
    expected = probs[k] * B
    res = scipy_stats.chisquare(observed.numpy(), expected.numpy())
    assert res.pvalue > 1e-3, (observed.tolist(), expected.tolist(), res)


def test_batch_invariance():
    gen = torch.Generator().manual_seed(4)
    B, V = 10, 300
    base = torch.randn(B, V, generator=gen) * 2
    adapter = torch.randn(B, V, generator=gen)
    p = mixed_params(B, V, gen)
    full = st.sample(base, adapter, **p)
    rows = [1, 4, 7]
    part = st.sample(base[rows].contiguous(), adapter[rows].contiguous(), **{k: v[rows] for k, v in p.items()})
    for a, b in zip(full, part):
        assert torch.equal(a[rows].nan_to_num(), b.nan_to_num())


def test_invalid_rows_are_flagged_not_crashed():
    B, V = 6, 50
    base = torch.randn(B, V)
    base[0, 3] = float("nan")
    base[1] = float("-inf")
    base[2, 7] = float("inf")
    p = params(B, top_k=torch.tensor([0, 0, 0, -1, 0, 3]), top_p=torch.tensor([1.0, 1.0, 1.0, 1.0, 1.5, 0.9]))
    tokens, lp, flp, valid = st.sample(base, None, **p)
    assert valid.tolist() == [False, False, False, False, False, True]
    assert tokens[:5].tolist() == [0] * 5 and torch.isnan(lp[:5]).all() and torch.isnan(flp[:5]).all()
    assert_matches_reference(base, None, p)
    # alpha == 0 ignores an adapter full of -inf (no 0 * -inf NaN)
    adapter = torch.full((B, V), float("-inf"))
    out = st.sample(base[5:], adapter[5:], **params(1, alpha=0.0))
    assert out[3].item()
    with pytest.raises(ValueError, match="row 0 is invalid"):
        ipa_fast.sample(base[:1], backend="triton", seed=1)
    with pytest.raises(ValueError, match="top_p"):
        ipa_fast.sample(base, backend="triton", top_p=0.0, seed=1)
    out = ipa_fast.sample(base, backend="triton", seed=1, validate=False)
    assert out.valid.tolist() == [False, False, False, True, True, True]


def test_greedy_lowest_index_on_ties():
    B, V = 3, 140
    base = torch.zeros(B, V)
    base[0, [5, 9, 130]] = 2.0
    base[1, [129, 131]] = 1.0
    base[2, 139] = 3.0
    tokens, lp, flp, valid = st.sample(base, None, **params(B, temperature=0.0))
    assert tokens.tolist() == [5, 129, 139]
    assert (flp == 0).all() and valid.all()
    torch.testing.assert_close(lp, torch.log_softmax(base, 1)[torch.arange(B), tokens])


@pytest.mark.parametrize("V", [1, 2, 127, 129, 257])
def test_small_odd_shapes(V):
    gen = torch.Generator().manual_seed(V)
    B = 4
    base = torch.randn(B, V, generator=gen)
    adapter = torch.randn(B, V, generator=gen)
    assert_matches_reference(base, adapter, params(B, top_k=torch.tensor([0, 1, 2, 0]),
                                                   top_p=torch.tensor([1.0, 0.9, 1.0, 0.5]),
                                                   min_p=torch.tensor([0.0, 0.0, 0.1, 0.0])))


def test_tailored_log_softmax_forward_backward():
    gen = torch.Generator().manual_seed(5)
    B, V = 3, 1500      # two loop blocks per row
    base = torch.randn(B, V, generator=gen) * 2
    adapter = torch.randn(B, V, generator=gen, requires_grad=True)
    base.requires_grad_(True)
    alpha = torch.tensor([0.5, 0.0, 1.5])
    temperature = torch.tensor([1.0, 0.7, 2.0])
    got = lst.tailored_log_softmax(base, adapter, alpha, temperature)
    want = ipa_fast.tailored_log_softmax(base, adapter, alpha=alpha, temperature=temperature)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g = torch.randn(B, V, generator=gen)
    gb, ga = torch.autograd.grad(got, (base, adapter), g)
    wb, wa = torch.autograd.grad(want, (base, adapter), g)
    torch.testing.assert_close(gb, wb, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ga, wa, atol=1e-5, rtol=1e-4)
    # no adapter
    out = lst.tailored_log_softmax(base.detach(), None, alpha, temperature)
    torch.testing.assert_close(out, torch.log_softmax(base.detach() / temperature[:, None], 1), atol=1e-5, rtol=1e-5)


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter checks logic, not lowering: build every kernel to a cubin for sm_90 (ptxas)."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "ipa_fast.kernels.compile_check", "--arch", "90", "--quiet"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert res.stdout.count(" ok") == 10, res.stdout   # incl. the three-expert stats and gather kernels


# ---------------------------------------------------------------- K experts (ipa_fast.sample_experts)

def test_experts_match_reference_and_two_expert_entry():
    B, V = 6, 700
    g = torch.Generator().manual_seed(3)
    experts = [torch.randn(B, V + 9, generator=g)[:, :V] * 2,            # strided rows, read in place
               (torch.randn(B, V, generator=g) * 2).half(), torch.randn(B, V, generator=g) * 2]
    kw = dict(temperature=0.8, top_k=torch.tensor([0, 5, 0, 40, 0, 0]),
              top_p=torch.tensor([1.0, 1.0, 0.9, 0.5, 1.0, 0.7]), seed=3)
    for K in (1, 2, 3):
        w = torch.rand(B, K, generator=g) - 0.3
        w[1, K - 1] = 0.0
        ref = ipa_fast.sample_experts(experts[:K], w, backend="reference", **kw)
        got = ipa_fast.sample_experts(experts[:K], w, backend="triton", **kw)
        assert torch.equal(got.tokens, ref.tokens), K
        torch.testing.assert_close(got.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)
    old = ipa_fast.sample(experts[0], experts[1], alpha=0.7, seed=5, backend="triton")
    new = ipa_fast.sample_experts(experts[:2], [1.0, 0.7], seed=5, backend="triton")
    assert torch.equal(old.tokens, new.tokens) and torch.equal(old.logprobs, new.logprobs)


@pytest.mark.slow
def test_experts_chi_square():
    from sampler_cases import chi_square_pvalue, filtered_probs, hf_kept_mask, random_logits

    V, N = 6, 3000
    experts = [random_logits(1, V, seed=300 + k, scale=1.0) for k in range(3)]
    weights = [1.0, 0.6, -0.4]
    out = ipa_fast.sample_experts([x.expand(N, V) for x in experts], weights, seed=77, backend="triton")
    z = sum(w * x.double() for w, x in zip(weights, experts))
    probs = filtered_probs(z[0].float(), hf_kept_mask(z.float(), 0, 1.0, 0.0)[0])
    assert chi_square_pvalue(torch.bincount(out.tokens, minlength=V), probs) > 1e-4


def test_experts_log_softmax_triton():
    B, V = 3, 300
    g = torch.Generator().manual_seed(4)
    x = [torch.randn(B, V, generator=g).requires_grad_() for _ in range(3)]
    w = torch.tensor([[1.0, 0.5, -0.5], [1.0, 0.0, 0.2], [0.3, 1.0, 1.0]])
    t = torch.full((B,), 0.7)
    out = lst.experts_log_softmax(x, w, t)
    ref = ipa_fast.experts_log_softmax(x, w, 0.7)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    gg = torch.randn(B, V, generator=g)
    for a, b in zip(torch.autograd.grad((out * gg).sum(), x), torch.autograd.grad((ref * gg).sum(), x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
