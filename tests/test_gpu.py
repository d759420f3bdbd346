"""The GPU backends (triton, cuda) on a real GPU, against the reference on the CPU.

The GPU tests are skipped, with the reason, where no CUDA device is present (`pytest -rs` prints
it); on the GPU machine `benchmarks/gpu_check.sh` runs this file after building the CUDA extension.
Without a GPU the CUDA kernel's source still runs here: compiled as C++ against
csrc/cuda/cpu_emulation.h (a block = CPU threads with real barriers and shuffles), at the end.
"""
from pathlib import Path

import pytest
import torch

import ipa_fast
from ipa_fast.ops import reference

ROOT = Path(__file__).resolve().parents[1]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="no CUDA device: the GPU tests run via benchmarks/gpu_check.sh")

GPU_BACKENDS = ["triton", "cuda"]


def backend(name):
    status = ipa_fast.backends().get(name, "unknown")
    if status != "ok":
        pytest.skip(f"backend {name}: {status}")
    return name


def mixed_params(B, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(B, 6, generator=g)
    top_k = torch.where(r[:, 0] < 0.5, torch.zeros(B), 1 + (r[:, 1] * min(V, 100)).floor()).long()
    top_p = torch.where(r[:, 2] < 0.3, torch.ones(B), 0.05 + 0.95 * r[:, 3]).float()
    min_p = torch.where(r[:, 4] < 0.6, torch.zeros(B), 0.3 * r[:, 5]).float()
    temperature = torch.where(torch.rand(B, generator=g) < 0.05, torch.zeros(B),
                              0.5 + torch.rand(B, generator=g)).float()
    alpha = (torch.rand(B, generator=g) * 1.5).float()
    return dict(alpha=alpha, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                seed=torch.randint(-2**62, 2**62, (B,), generator=g), offset=torch.randint(0, 2**40, (B,), generator=g))


def to(p, device):
    return {k: v.to(device) for k, v in p.items()}


def run(name, base, adapter, p):
    from ipa_fast.ops import dispatch
    impl = dispatch.resolve(name, base)
    return impl(base, adapter, **to(p, base.device))


def compare(name, base, adapter, p, min_agree=0.999):
    got = [t.cpu() for t in run(name, base, adapter, p)]
    ref = reference.sample(base.cpu(), None if adapter is None else adapter.cpu(), **p)
    assert torch.equal(got[3], ref[3])
    same = got[0] == ref[0]
    agree = same.float().mean().item()
    assert agree >= min_agree, f"{name}: token agreement {agree:.5f}"
    torch.testing.assert_close(got[1][same], ref[1][same], atol=1e-4, rtol=1e-4, equal_nan=True)
    torch.testing.assert_close(got[2][same], ref[2][same], atol=1e-4, rtol=1e-4, equal_nan=True)
    return got


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("V", [50257, 128256])
def test_agreement_with_reference(name, V):
    backend(name)
    B = 1024 if V == 50257 else 256
    g = torch.Generator().manual_seed(V)
    base = (torch.randn(B, V, generator=g) * 3).cuda()
    adapter = torch.randn(B, V, generator=g).cuda()
    compare(name, base, adapter, mixed_params(B, V, seed=V))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(name, dtype):
    backend(name)
    B, V = 256, 50257          # the agreement test's V: the same Triton specialisations
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(B, V, generator=g) * 3).to(dtype).cuda()
    adapter = torch.randn(B, V, generator=g).to(dtype).cuda()
    compare(name, base, adapter, mixed_params(B, V, seed=1))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_mixed_input_dtypes(name):
    backend(name)
    B, V = 64, 50257
    g = torch.Generator().manual_seed(10)
    base = (torch.randn(B, V, generator=g) * 3).to(torch.bfloat16).cuda()
    adapter = torch.randn(B, V, generator=g).cuda()
    compare(name, base, adapter, mixed_params(B, V, seed=10))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_flat_rows_take_the_exact_row_path(name):
    """Kept sets far larger than the candidate buffers (top_p close to 1 on flat logits)."""
    backend(name)
    B, V = 16, 128256
    base = (torch.randn(B, V, generator=torch.Generator().manual_seed(2)) * 0.3).cuda()
    p = mixed_params(B, V, seed=2)
    p["top_k"].zero_()
    p["top_p"].fill_(0.97)
    p["temperature"].fill_(1.0)
    compare(name, base, None, p)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("V", [1, 3, 129, 4097, 65537])
def test_odd_shapes(name, V):
    backend(name)
    B = 5
    g = torch.Generator().manual_seed(V)
    base = torch.randn(B, V, generator=g).cuda()
    compare(name, base, None, mixed_params(B, V, seed=V))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_draw_distribution_chi_square(name):
    """2e5 draws of one row (top_k=50, top_p=0.9) against the filtered pi: chi-square, alpha = 1e-3."""
    scipy_stats = pytest.importorskip("scipy.stats")
    backend(name)
    N, V = 200_000, 1000
    row = torch.randn(V, generator=torch.Generator().manual_seed(3)) * 2
    base = row.cuda().expand(N, V).contiguous()
    p = dict(alpha=torch.zeros(N), temperature=torch.ones(N), top_k=torch.full((N,), 50), top_p=torch.full((N,), 0.9),
             min_p=torch.zeros(N), seed=torch.arange(N) * 1000003 + 17, offset=torch.zeros(N, dtype=torch.int64))
    tokens = run(name, base, None, p)[0].cpu()
    keep = reference.kept_mask(row[None], p["top_k"][:1], p["top_p"][:1], p["min_p"][:1])[0]
    probs = torch.softmax(torch.where(keep, row, torch.tensor(float("-inf"))).double(), 0)
    assert keep[tokens].all()
    k = keep.nonzero().flatten()
    res = scipy_stats.chisquare(torch.bincount(tokens, minlength=V)[k].double().numpy(), (probs[k] * N).numpy())
    assert res.pvalue > 1e-3, res


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_batch_invariance(name):
    backend(name)
    B, V = 64, 50257
    g = torch.Generator().manual_seed(4)
    base = (torch.randn(B, V, generator=g) * 3).cuda()
    adapter = torch.randn(B, V, generator=g).cuda()
    p = mixed_params(B, V, seed=4)
    full = run(name, base, adapter, p)
    rows = [0, 5, 63]
    part = run(name, base[rows].contiguous(), adapter[rows].contiguous(), {k: v[rows] for k, v in p.items()})
    for a, b in zip(full, part):
        assert torch.equal(a[rows].nan_to_num(), b.nan_to_num())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_invalid_rows(name):
    backend(name)
    B, V = 6, 1000
    base = torch.randn(B, V)
    base[0, 3] = float("nan")
    base[1] = float("-inf")
    base[2, 7] = float("inf")
    p = mixed_params(B, V, seed=5)
    p["top_k"][3] = -1
    p["top_p"][4] = 1.5
    tokens, lp, flp, valid = [t.cpu() for t in run(name, base.cuda(), None, p)]
    assert valid.tolist() == [False] * 5 + [True]
    assert tokens[:5].tolist() == [0] * 5 and torch.isnan(lp[:5]).all()
    with pytest.raises(ValueError, match="invalid"):
        ipa_fast.sample(base[:1].cuda(), backend=name, seed=1)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_cuda_graph_capture(name):
    """sample(validate=False, seed=tensor, offset=tensor) captures; replays follow updated seeds."""
    backend(name)
    B, V = 8, 50257
    g = torch.Generator().manual_seed(6)
    base = (torch.randn(B, V, generator=g) * 3).cuda()
    adapter = torch.randn(B, V, generator=g).cuda()
    seed = torch.arange(B, dtype=torch.int64, device="cuda")
    offset = torch.zeros(B, dtype=torch.int64, device="cuda")
    kw = dict(alpha=0.7, temperature=0.9, top_k=50, top_p=0.9, validate=False, backend=name)
    ipa_fast.sample(base, adapter, seed=seed, offset=offset, **kw)   # compile / warm up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ipa_fast.sample(base, adapter, seed=seed, offset=offset, **kw)
    for step in range(3):
        seed.copy_(torch.arange(B, device="cuda") * 31 + step)
        offset.fill_(step)
        graph.replay()
        eager = ipa_fast.sample(base, adapter, seed=seed, offset=offset, **kw)
        assert torch.equal(out.tokens, eager.tokens)
        assert torch.equal(out.logprobs, eager.logprobs)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_tailored_log_softmax(dtype):
    backend("triton")
    from ipa_fast.kernels import log_softmax_triton
    B, V = 8, 50257
    g = torch.Generator().manual_seed(7)
    base = (torch.randn(B, V, generator=g) * 3).to(dtype).cuda().requires_grad_(True)
    adapter = torch.randn(B, V, generator=g).to(dtype).cuda().requires_grad_(True)
    alpha = torch.rand(B, generator=g).cuda()
    temperature = (0.5 + torch.rand(B, generator=g)).cuda()
    got = log_softmax_triton.tailored_log_softmax(base, adapter, alpha, temperature)
    want = torch.log_softmax((base.float() + alpha[:, None] * adapter.float()) / temperature[:, None], -1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    grad = torch.randn(B, V, device="cuda")
    gb, ga = torch.autograd.grad(got, (base, adapter), grad)
    wb, wa = torch.autograd.grad(want, (base, adapter), grad)
    tol = dict(atol=1e-4, rtol=1e-3) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gb.float(), wb.float(), **tol)
    torch.testing.assert_close(ga.float(), wa.float(), **tol)


# --- the CUDA kernel's source on CPU threads (no GPU, no CUDA toolkit needed) -------------------

def _emulated_module():
    from cuda_emulation import emulated_cuda_module

    return emulated_cuda_module()


@pytest.fixture(scope="module")
def emulated():
    return _emulated_module()


def emulate(mod, base, p):
    B, V = base.shape
    base = base.contiguous()
    p = {k: v.contiguous() for k, v in p.items()}
    out = (torch.empty(B, dtype=torch.int64), torch.empty(B), torch.empty(B), torch.empty(B, dtype=torch.bool))
    n_f32, n_i32 = mod.workspace_size(B, V)
    ws_f32, ws_i32 = torch.empty(n_f32), torch.empty(n_i32, dtype=torch.int32)
    mod._sample(0, B, V, base.data_ptr(), base.stride(0), 0, 0, p["alpha"].data_ptr(), p["temperature"].data_ptr(),
                p["top_k"].data_ptr(), p["top_p"].data_ptr(), p["min_p"].data_ptr(), p["seed"].data_ptr(),
                p["offset"].data_ptr(), *(t.data_ptr() for t in out), 0, ws_f32.data_ptr(), ws_i32.data_ptr())
    return out


def emulated_matches_reference(mod, base, p):
    got = emulate(mod, base, p)
    ref = reference.sample(base, None, **p)
    assert torch.equal(got[3], ref[3])
    assert torch.equal(got[0], ref[0]), (got[0].tolist(), ref[0].tolist())
    torch.testing.assert_close(got[1], ref[1], atol=2e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(got[2], ref[2], atol=2e-5, rtol=1e-5, equal_nan=True)
    return got


def test_cuda_kernel_emulated_all_paths(emulated):
    B, V = 16, 2500
    g = torch.Generator().manual_seed(8)
    base = torch.randn(B, V, generator=g) * 3
    base[::5, ::7] = float("-inf")
    p = mixed_params(B, V, seed=8)
    emulated_matches_reference(emulated, base, p)


def test_cuda_kernel_emulated_edge_rows(emulated):
    """Invalid rows, greedy ties, a large kept set, huge logits (raw-row search), tiny vocabularies."""
    V = 5000
    base = torch.randn(8, V, generator=torch.Generator().manual_seed(9)) * 0.2
    base[0, 3] = float("nan")
    base[1] = float("-inf")
    base[2, :] = 0.0
    base[2, [17, 4000]] = 1.0                      # greedy tie: lowest index
    base[4] = base[4] * 20 + 3.0e6                 # |max| > 2^20: exact raw-row path
    p = mixed_params(8, V, seed=9)
    p["temperature"][2] = 0.0
    p["temperature"][3] = 1.0
    p["top_k"][3], p["top_p"][3], p["min_p"][3] = 0, 0.99, 0.0    # ~4900 kept tokens
    p["top_k"][4], p["top_p"][4] = 7, 0.9
    p["top_k"][5] = -1                             # invalid parameter
    got = emulated_matches_reference(emulated, base, p)
    assert got[0][2].item() == 17 and not got[3][:2].any() and not got[3][5]
    for V in (1, 2, 65):
        small = torch.randn(3, V, generator=torch.Generator().manual_seed(V))
        emulated_matches_reference(emulated, small, mixed_params(3, V, seed=V))


def test_cuda_kernel_emulated_candidate_overflow(emulated):
    """More than kCap = 16384 candidates: the exact search over the raw row."""
    V = 17000
    base = torch.randn(1, V, generator=torch.Generator().manual_seed(11)) * 0.1
    p = mixed_params(1, V, seed=11)
    p["top_k"][0], p["top_p"][0], p["min_p"][0], p["temperature"][0] = 0, 0.999, 0.0, 1.0
    emulated_matches_reference(emulated, base, p)
