"""CUDA backend of :func:`ipa_fast.sample` (``ipa_fast._C_cuda``, built from ``csrc/cuda``).

The kernel is enqueued on the caller's current stream with pointers passed as integers; the
outputs are the only allocations, so the call is CUDA-graph capturable and never syncs.
Build it with ``IPA_FAST_CUDA=1 pip install --no-build-isolation -e .`` (architectures from
``TORCH_CUDA_ARCH_LIST``, default "8.0;9.0"); see SPEC §7.
"""
from __future__ import annotations

import torch

from . import _C_cuda  # ImportError here is the reason ipa_fast.backends() shows for "cuda"

_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def sample(base, adapter, *, alpha, temperature, top_k, top_p, min_p, seed, offset):
    if base.device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got {base.device}")
    if adapter is not None and adapter.dtype != base.dtype:
        # one kernel dtype for both inputs: widen both (exact) rather than round either
        base, adapter = base.float(), adapter.float()
    B, V = base.shape
    dev = base.device
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    logprobs = torch.empty(B, dtype=torch.float32, device=dev)
    filtered = torch.empty(B, dtype=torch.float32, device=dev)
    valid = torch.empty(B, dtype=torch.bool, device=dev)
    # keep every input alive (and contiguous) until the launch is enqueued
    base, adapter = base.contiguous(), None if adapter is None else adapter.contiguous()
    params = [t.contiguous() for t in (alpha, temperature, top_k, top_p, min_p, seed, offset)]
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        _C_cuda.sample(_DTYPE[base.dtype], B, V, base.data_ptr(), 0 if adapter is None else adapter.data_ptr(),
                       *(t.data_ptr() for t in params), tokens.data_ptr(), logprobs.data_ptr(), filtered.data_ptr(),
                       valid.data_ptr(), stream)
    return tokens, logprobs, filtered, valid
