#!/usr/bin/env bash
# The GPU check of the sampler (issue 3), run from the repository root on a machine with a GPU:
#   1. report the toolchain (and what is missing) — the machine is offline: nothing is downloaded;
#   2. build ipa_fast with the CUDA extension (editable, offline); if that fails, build only
#      ipa_fast._C_cuda with nvcc directly and import the tree from source;
#   3. run tests/test_gpu.py (triton + cuda vs the reference, chi-square, graphs, invalid rows);
#   4. benchmark (benchmarks/bench_gpu.py) into $OUT/RESULTS.md and $OUT/bench_gpu.json.
# Usage: OUT=/some/dir bash benchmarks/gpu_check.sh [all|test|bench] [--quick]
#   all (default) = build + tests + benchmark (about 6-9 minutes on an H100, most of it Triton JIT);
#   test = build + tests, bench = build (a no-op when already built) + benchmark: two calls on one
#   warm machine when a single call would not fit its time limit. OUT defaults to benchmarks/results/gpu.
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: the device's, e.g. 9.0).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python3}
STAGE=all
QUICK=
for arg in "$@"; do
  case "$arg" in
    all|test|bench) STAGE=$arg ;;
    --quick) QUICK=--quick ;;
    *) echo "usage: gpu_check.sh [all|test|bench] [--quick]"; exit 2 ;;
  esac
done
mkdir -p "$OUT"
LOG="$OUT/gpu_check-$STAGE.log"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "toolchain"
nvidia-smi -L || echo "MISSING: nvidia-smi (no driver?)"
command -v nvcc >/dev/null && nvcc --version | tail -1 || echo "MISSING: nvcc (the cuda backend cannot be built)"
"$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for mod in ("torch", "triton", "pybind11", "cmake", "ninja", "setuptools", "wheel", "scipy", "transformers", "pytest"):
    try:
        m = importlib.import_module(mod)
        print(f"  {mod:12s} {getattr(m, '__version__', 'ok')}")
    except Exception as exc:
        print(f"  MISSING: {mod} ({type(exc).__name__}: {exc})")
import torch
print("  torch.cuda", torch.version.cuda, "available:", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "9.0")
fi
export TORCH_CUDA_ARCH_LIST
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"

step "build (IPA_FAST_CUDA=1, editable, offline)"
importable() { (cd /tmp && "$PY" -c "import ipa_fast._C_cuda, ipa_fast.kernels.sampler_triton") 2>/dev/null; }
if importable; then
  echo "already built and installed: ipa_fast._C_cuda imports"
elif [ -e ipa_fast/kernels ] && PYTHONPATH="$PWD" importable; then
  export PYTHONPATH="$PWD"
  echo "already built in the source tree (an earlier fallback build)"
elif IPA_FAST_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1; then
  echo "editable install: ok"
else
  tail -25 "$OUT/build.log"
  echo "editable install FAILED (full log: build.log); building ipa_fast._C_cuda with nvcc directly"
  arch=${TORCH_CUDA_ARCH_LIST%%;*}; arch=${arch//./}; arch=${arch%+PTX}
  suffix=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
  includes=$("$PY" -m pybind11 --includes) || echo "MISSING: pybind11 (carry its wheel: see .library device README)"
  nvcc -std=c++17 -O3 --fmad=false -shared -Xcompiler -fPIC -Icsrc $includes \
    -gencode "arch=compute_${arch},code=sm_${arch}" csrc/bindings_cuda.cpp csrc/cuda/*.cu \
    -o "ipa_fast/_C_cuda${suffix}" -lcudart || { echo "nvcc build FAILED"; status=1; }
  # from source: ipa_fast.kernels is the top-level kernels/ (setup.py's package_dir)
  [ -e ipa_fast/kernels ] || ln -s ../kernels ipa_fast/kernels
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import ipa_fast; print('backends:', ipa_fast.backends())" || status=1

if [ "$STAGE" != bench ]; then
  step "tests/test_gpu.py"
  timeout 330 "$PY" -m pytest -q -rs tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" | tail -40 || status=1
fi

if [ "$STAGE" != test ]; then
  step "benchmark"
  bench_args=(--out "$OUT")
  [ -n "$QUICK" ] && bench_args+=(--quick)
  timeout 420 "$PY" benchmarks/bench_gpu.py "${bench_args[@]}" || { echo "benchmark FAILED or timed out"; status=1; }
fi

step "done (status $status); results in $OUT"
exit $status
