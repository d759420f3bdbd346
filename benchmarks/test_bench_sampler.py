"""pytest-benchmark timings of the sampler (not part of ``make test``; run
``.venv/bin/python -m pytest benchmarks/test_bench_sampler.py``). The full table with ratios is
``ipa-fast bench sampler``; this file gives pytest-benchmark's statistics for the headline case."""
from __future__ import annotations

import pytest
import torch

import ipa_fast
from ipa_fast.ops.bench_sampler import hf_chain

if ipa_fast.backends()["cpu"] != "ok":
    pytest.skip("the cpu backend is not built", allow_module_level=True)

from ipa_fast.ops import cpu_backend  # noqa: E402

CASES = [(1, 50257), (32, 50257), (8, 128256)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"B{c[0]}-V{c[1]}")
def logits(request):
    B, V = request.param
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, V, generator=g) * 3, torch.randn(B, V, generator=g) * 3


@pytest.mark.parametrize("top_k", [0, 50])
def test_cpu(benchmark, logits, top_k):
    base, adapter = logits
    benchmark(ipa_fast.sample, base, adapter, top_k=top_k, top_p=0.9, seed=0, backend="cpu")


@pytest.mark.parametrize("top_k", [0, 50])
def test_hf_chain(benchmark, logits, top_k):
    base, adapter = logits
    benchmark.pedantic(hf_chain, args=(base, adapter, 1.0, top_k, 0.9), rounds=5, warmup_rounds=1)


def test_read_floor(benchmark, logits):
    base, adapter = logits
    benchmark(cpu_backend.read_pass, base, adapter)
