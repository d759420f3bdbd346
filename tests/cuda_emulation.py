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
