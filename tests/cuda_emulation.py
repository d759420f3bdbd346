"""The CUDA kernel's source built for CPU threads (``-DIPA_FAST_CPU_EMULATION``, see
csrc/cuda/cpu_emulation.h): no GPU and no CUDA toolkit needed; cached under build/ by a hash of
the sources. Shared by the GPU-logic tests and the K-expert tests."""
import hashlib
import importlib.util
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def emulated_cuda_module():
    """ipa_fast's CUDA binding built from csrc/cuda/sampler.cu as C++ with -DIPA_FAST_CPU_EMULATION,
    cached under build/ by a hash of the sources."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler for the CUDA-kernel emulation")
    import pybind11
    sources = [ROOT / "csrc/cuda/sampler.cu", ROOT / "csrc/bindings_cuda.cpp"]
    headers = sorted((ROOT / "csrc").rglob("*.h")) + sorted((ROOT / "csrc").rglob("*.cuh"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources + headers)).hexdigest()[:16]
    out_dir = ROOT / "build" / "cuda-emulation" / digest
    so = out_dir / ("_C_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    if not so.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        cmd = [cxx, "-std=c++20", "-O1", "-ffp-contract=off", "-DIPA_FAST_CPU_EMULATION", f"-I{ROOT / 'csrc'}",
               f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", "-shared", "-fPIC",
               "-x", "c++", str(sources[0]), "-x", "c++", str(sources[1]), "-o", str(so) + ".tmp", "-lpthread"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-4000:]
        Path(str(so) + ".tmp").rename(so)
    spec = importlib.util.spec_from_file_location("_C_cuda", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cuda_backend_glue(mod):
    """ipa_fast/ops/cuda_backend.py loaded against the emulated module (its dtype codes, row-stride
    rule and expert folding; its entries themselves need CUDA tensors and a stream)."""
    import sys
    saved = sys.modules.get("ipa_fast._C_cuda")
    sys.modules["ipa_fast._C_cuda"] = mod
    try:
        spec = importlib.util.spec_from_file_location("_ipa_fast_cuda_backend_emulated",
                                                      ROOT / "ipa_fast/ops/cuda_backend.py")
        glue = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(glue)
    finally:
        if saved is None:
            del sys.modules["ipa_fast._C_cuda"]
        else:
            sys.modules["ipa_fast._C_cuda"] = saved
    return glue


class EmulatedCudaBackend:
    """A sampler backend module (``sample`` / ``sample_experts``, docs/DESIGN.md §2.8) that launches
    the emulated CUDA kernels on CPU tensors, as ipa_fast/ops/cuda_backend.py launches the real ones
    (stream 0, workspace from torch). ``sampler_cases`` registers it as the backend
    ``"cuda-emulated"`` so ``ipa_fast.sample`` checks the arguments and dispatches to it. The
    emulation reads float32 only: float16 / bfloat16 inputs are widened first (exact), so the
    kernels' half-precision loads are checked on a GPU only (tests/test_gpu.py)."""

    def __init__(self, mod):
        self.mod = mod
        self.glue = _cuda_backend_glue(mod)

    def _launch(self, entry, B, V, dtype, inputs, params):
        import torch
        outs = (torch.empty(B, dtype=torch.int64), torch.empty(B), torch.empty(B), torch.empty(B, dtype=torch.bool))
        n_f32, n_i32 = self.mod.workspace_size(B, V)
        ws_f32, ws_i32 = torch.empty(n_f32), torch.empty(n_i32, dtype=torch.int32)
        params = [t.contiguous() for t in params]
        entry(self.glue._DTYPE[dtype], B, V, *inputs, *(t.data_ptr() for t in params),
              *(t.data_ptr() for t in outs), 0, ws_f32.data_ptr(), ws_i32.data_ptr())
        return outs

    def sample(self, base, adapter, *, alpha, temperature, top_k, top_p, min_p, seed, offset):
        base, adapter = base.float(), None if adapter is None else adapter.float()
        base, adapter = self.glue._rows(base), None if adapter is None else self.glue._rows(adapter)
        B, V = base.shape
        inputs = (base.data_ptr(), base.stride(0), 0 if adapter is None else adapter.data_ptr(),
                  0 if adapter is None else adapter.stride(0))
        return self._launch(self.mod._sample, B, V, base.dtype, inputs,
                            (alpha, temperature, top_k, top_p, min_p, seed, offset))

    def sample_experts(self, experts, weights, *, temperature, top_k, top_p, min_p, seed, offset):
        experts, weights = self.glue.fold_leading(list(experts), weights, self.mod.kMaxExperts)
        experts = [self.glue._rows(x.float()) for x in experts]
        weights = weights.float().contiguous()
        B, V = experts[0].shape
        inputs = ([x.data_ptr() for x in experts], [x.stride(0) for x in experts], weights.data_ptr(),
                  weights.shape[1])
        outs = self._launch(self.mod._sample_experts, B, V, experts[0].dtype, inputs,
                            (temperature, top_k, top_p, min_p, seed, offset))
        del weights
        return outs
