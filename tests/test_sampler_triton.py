"""What is particular to the Triton kernels, under the Triton CPU interpreter: the threshold
paths (monkeypatched capacities), tailored_log_softmax / experts_log_softmax forward and backward,
and an sm_90 compile check. The sampler cases every backend shares run on the interpreter as the
``triton-interpret`` backend of tests/test_sampler_semantics.py and tests/test_sampler_limits.py.

TRITON_INTERPRET=1 must be set before triton is first imported (triton.language's own jit
functions are decorated at import); ``sampler_cases.backend_status`` sets it when it still can.
If another module imported triton earlier, test_interpreter_suite_in_subprocess reruns this file
and the suite's ``triton-interpret`` cases in a subprocess with the variable set, and the
in-process copies skip. tests/test_gpu.py runs the Triton kernels at full size on a GPU.
"""
import importlib
import os
import sys

import pytest
import torch

if torch.cuda.is_available():   # the interpreter switch is process-wide: leave a GPU to tests/test_gpu.py
    pytest.skip("a CUDA device is present: tests/test_gpu.py runs these checks on it", allow_module_level=True)

from sampler_cases import _enable_triton_interpreter, backend_status  # noqa: E402

STATUS = backend_status("triton-interpret")
IN_PROCESS = STATUS == "ok"
triton = pytest.importorskip("triton")

import ipa_fast  # noqa: E402
from ipa_fast.ops import reference  # noqa: E402

if IN_PROCESS:
    _enable_triton_interpreter()
st = importlib.import_module("ipa_fast.kernels.sampler_triton")
lst = importlib.import_module("ipa_fast.kernels.log_softmax_triton")
SUITE = ["tests/test_sampler_semantics.py", "tests/test_sampler_limits.py"]


@pytest.fixture(autouse=True)
def _interpreter_in_this_process(request):
    if not IN_PROCESS and request.node.name != "test_interpreter_suite_in_subprocess":
        pytest.skip(STATUS)


def test_interpreter_suite_in_subprocess(request):
    """This file and the suite's ``triton-interpret`` cases, under the outer run's ``-m``."""
    if IN_PROCESS:
        pytest.skip("the interpreter runs in this process")
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings",
           os.path.relpath(__file__, root), *SUITE, "-k", "triton-interpret or test_sampler_triton"]
    if request.config.getoption("markexpr"):
        cmd += ["-m", request.config.getoption("markexpr")]
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    print(res.stdout[-3000:])
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert " passed" in res.stdout.splitlines()[-1], res.stdout[-2000:]


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


# ---------------------------------------------------------------- K experts

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
