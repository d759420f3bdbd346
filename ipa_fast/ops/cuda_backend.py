"""CUDA backend of :func:`ipa_fast.sample` (``ipa_fast._C_cuda``, built from ``csrc/cuda``).

Five small kernels (per-chunk statistics, per-chunk histograms, a per-row plan, per-chunk
candidate gather, per-row thresholds and draw; see csrc/cuda/sampler.cu) are enqueued on the
caller's current stream with pointers passed as integers. The outputs and one scratch workspace
(about 128 KiB a row) are allocated here with torch, so under CUDA-graph capture they come from
the graph's pool; nothing syncs.
Build it with ``IPA_FAST_CUDA=1 pip install --no-build-isolation -e .`` (architectures from
``TORCH_CUDA_ARCH_LIST``, default "8.0;9.0"); see docs/DESIGN.md §7.
"""
from __future__ import annotations

import torch

from ipa_fast import _C_cuda  # ImportError here is the reason ipa_fast.backends() shows for "cuda"

_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` read in place when its columns are adjacent (any row stride), else a copy."""
    return x if x.shape[1] == 1 or x.stride(1) == 1 else x.contiguous()


def sample(base, adapter, *, alpha, temperature, top_k, top_p, min_p, seed, offset):
    """Same contract as :func:`ipa_fast.ops.reference.sample`, on CUDA tensors, enqueued on the current
    stream without synchronising. Parameters must already be contiguous ``[B]`` tensors of the
    kernel dtype on the logits' device (:func:`ipa_fast.ops.sampling.prepare`); call it through
    :func:`ipa_fast.sample` or :func:`ipa_fast.ops.dispatch.resolve`, which check."""
    if base.device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got {base.device}")
    if adapter is not None and adapter.dtype != base.dtype:
        # one kernel dtype for both inputs: widen both (exact) rather than round either
        base, adapter = base.float(), adapter.float()
    # rows read in place through their row strides; only a tensor whose columns are not adjacent is copied
    base, adapter = _rows(base), None if adapter is None else _rows(adapter)
    B, V = base.shape
    dev = base.device
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    logprobs = torch.empty(B, dtype=torch.float32, device=dev)
    filtered = torch.empty(B, dtype=torch.float32, device=dev)
    valid = torch.empty(B, dtype=torch.bool, device=dev)
    params = [t.contiguous() for t in (alpha, temperature, top_k, top_p, min_p, seed, offset)]
    n_f32, n_i32 = _C_cuda.workspace_size(B, V)
    ws_f32 = torch.empty(n_f32, dtype=torch.float32, device=dev)   # graph capture: from the graph's pool
    ws_i32 = torch.empty(n_i32, dtype=torch.int32, device=dev)
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        _C_cuda._sample(_DTYPE[base.dtype], B, V, base.data_ptr(), base.stride(0),
                        0 if adapter is None else adapter.data_ptr(), 0 if adapter is None else adapter.stride(0),
                        *(t.data_ptr() for t in params), tokens.data_ptr(), logprobs.data_ptr(), filtered.data_ptr(),
                        valid.data_ptr(), stream, ws_f32.data_ptr(), ws_i32.data_ptr())
    return tokens, logprobs, filtered, valid


def fold_leading(experts, weights, max_experts: int):
    """At most ``max_experts`` experts with the same mix: the leading ``K - max_experts + 1``
    are summed into one float32 expert of weight 1 by :func:`ipa_fast.ops.reference.mix_experts`
    (the left-to-right sum makes this exact: 1 * x == x, and the fold is the same prefix)."""
    K = len(experts)
    if K <= max_experts:
        return experts, weights
    from ipa_fast.ops.reference import mix_experts
    j = K - max_experts + 1
    head = mix_experts(experts[:j], weights[:, :j])
    ones = torch.ones(weights.shape[0], 1, dtype=torch.float32, device=weights.device)
    return [head, *experts[j:]], torch.cat([ones, weights[:, j:]], dim=1)


def sample_experts(experts, weights, *, temperature, top_k, top_p, min_p, seed, offset):
    """K-expert entry (:func:`ipa_fast.ops.reference.sample_experts`): up to ``_C_cuda.kMaxExperts``
    experts are read in place (a pointer and a row stride each, passed by value to the kernels);
    more are folded first (:func:`fold_leading`). Mixed dtypes are widened to float32."""
    if experts[0].device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got {experts[0].device}")
    experts, weights = fold_leading(list(experts), weights, _C_cuda.kMaxExperts)
    if len({x.dtype for x in experts}) > 1:
        experts = [x.float() for x in experts]
    experts = [_rows(x) for x in experts]
    weights = weights.float().contiguous()
    B, V = experts[0].shape
    dev = experts[0].device
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    logprobs = torch.empty(B, dtype=torch.float32, device=dev)
    filtered = torch.empty(B, dtype=torch.float32, device=dev)
    valid = torch.empty(B, dtype=torch.bool, device=dev)
    params = [t.contiguous() for t in (temperature, top_k, top_p, min_p, seed, offset)]
    n_f32, n_i32 = _C_cuda.workspace_size(B, V)
    ws_f32 = torch.empty(n_f32, dtype=torch.float32, device=dev)
    ws_i32 = torch.empty(n_i32, dtype=torch.int32, device=dev)
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        _C_cuda._sample_experts(_DTYPE[experts[0].dtype], B, V, [x.data_ptr() for x in experts],
                                [x.stride(0) for x in experts], weights.data_ptr(), weights.shape[1],
                                *(t.data_ptr() for t in params), tokens.data_ptr(), logprobs.data_ptr(),
                                filtered.data_ptr(), valid.data_ptr(), stream, ws_f32.data_ptr(), ws_i32.data_ptr())
    return tokens, logprobs, filtered, valid
