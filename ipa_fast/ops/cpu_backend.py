"""Backend ``cpu``: the fused C++ kernel (``csrc/cpu/sampler.cpp``) through pybind11.

Allocates the outputs and hands data pointers and row strides to the kernel (a ``[:, :V]``
slice of a wider tensor is read in place, never copied); the kernel reads fp32 / fp16 /
bf16 logits directly and runs OpenMP with ``torch.get_num_threads()`` threads.
"""
from __future__ import annotations

import torch

from ipa_fast import _C

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` read in place when its columns are adjacent (any row stride), else a copy."""
    return x if x.shape[1] == 1 or x.stride(1) == 1 else x.contiguous()


def _run(experts, weights, unit_first: bool, temperature, top_k, top_p, min_p, seed, offset):
    base = experts[0]
    if base.device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got {base.device}")
    B, V = base.shape
    if V >= 2**31:
        raise ValueError(f"backend 'cpu' indexes the vocabulary with int32, got V = {V}")
    experts = [_rows(x) for x in experts]
    weights = weights.contiguous()
    params = [t.contiguous() for t in (temperature, top_k, top_p, min_p, seed, offset)]
    tokens = torch.empty(B, dtype=torch.int64)
    logprobs = torch.empty(B, dtype=torch.float32)
    filtered = torch.empty(B, dtype=torch.float32)
    valid = torch.empty(B, dtype=torch.bool)
    _C._sample_experts(
        [x.data_ptr() for x in experts], [_DTYPE_CODES[x.dtype] for x in experts], [x.stride(0) for x in experts],
        weights.data_ptr(), weights.shape[1] if weights.dim() == 2 else 1, int(unit_first),
        B, V, *(t.data_ptr() for t in params),
        tokens.data_ptr(), logprobs.data_ptr(), filtered.data_ptr(), valid.data_ptr(),
        torch.get_num_threads())
    return tokens, logprobs, filtered, valid


def sample(base, adapter, *, alpha, temperature, top_k, top_p, min_p, seed, offset):
    """Same contract as :func:`ipa_fast.ops.reference.sample`: every parameter already a contiguous
    ``[B]`` CPU tensor of the kernel dtype (float32 alpha / temperature / top_p / min_p, int64
    top_k / seed / offset), as :func:`ipa_fast.ops.sampling.prepare` makes them; the kernel reads raw
    pointers and trusts them. Call it through :func:`ipa_fast.sample` or
    :func:`ipa_fast.ops.dispatch.resolve`, which check (docs/DESIGN.md §2.8). The K = 2 case of
    :func:`sample_experts`: alpha is passed as expert 1's weight column, expert 0's weight is 1."""
    experts = [base] if adapter is None else [base, adapter]
    return _run(experts, alpha, True, temperature, top_k, top_p, min_p, seed, offset)


def sample_experts(experts, weights, *, temperature, top_k, top_p, min_p, seed, offset):
    """Same contract as :func:`ipa_fast.ops.reference.sample_experts` (``unit_first`` False):
    ``weights`` a ``[B, K]`` float32 CPU tensor, the others as for :func:`sample`. Each expert is
    read in place through its data pointer, dtype and row stride (no stacking, no copy of a
    row-strided slice)."""
    return _run(experts, weights, False, temperature, top_k, top_p, min_p, seed, offset)


def read_pass(base: torch.Tensor, adapter: torch.Tensor | None = None) -> float:
    """One plain read over both inputs (the memory floor the sampler is measured against)."""
    base = base.contiguous()
    adapter = None if adapter is None else adapter.contiguous()
    return _C.read_pass(base.data_ptr(), _DTYPE_CODES[base.dtype],
                        0 if adapter is None else adapter.data_ptr(),
                        0 if adapter is None else _DTYPE_CODES[adapter.dtype],
                        base.shape[0], base.shape[1], torch.get_num_threads())
