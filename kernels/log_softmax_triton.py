"""Triton ``tailored_log_softmax``: ``log_softmax((base + alpha*adapter) / T)`` with autograd, and
its K-expert form ``log_softmax((sum_k w_k * l_k) / T)`` (:func:`experts_log_softmax`).

Same semantics as :func:`ipa_fast.ops.log_softmax.tailored_log_softmax` (rows with ``alpha == 0`` ignore the
adapter; ``T > 0``): forward one program per row (online max / sum-exp over fixed blocks, then
one write pass), saving only the row's log-sum-exp; backward recomputes ``softmax`` from the
saved output: ``dz = g - softmax(z) * sum(g)``, ``d adapter = dz * alpha / T``,
``d base = dz / T``. Arguments are normalised ``[B]`` float32 ``alpha`` / ``temperature``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sampler_triton import _mixed_z  # the one definition of the mixed logits z

BLOCK = 1024


@triton.jit
def _forward_kernel(X, ST, W, WS, temp_ptr, out_ptr, lse_ptr, V,
                    K: tl.constexpr, FIRST: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    t = tl.load(temp_ptr + r)
    m = tl.full((), float("-inf"), tl.float32)
    d = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        z = _mixed_z(X, ST, W, WS, r, offs, offs < V, t, K, FIRST)
        bm = tl.max(z, axis=0)
        m_new = tl.maximum(m, bm)
        # a -inf running max (masked prefix) contributes nothing; never form -inf - -inf
        scale = tl.where(m_new > float("-inf"), tl.exp(m - m_new), 0.0)
        bsum = tl.sum(tl.where(z > float("-inf"), tl.exp(z - m_new), 0.0), axis=0)
        d = d * scale + bsum
        m = m_new
    lse = m + tl.log(d)
    tl.store(lse_ptr + r, lse)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < V
        z = _mixed_z(X, ST, W, WS, r, offs, mask, t, K, FIRST)
        tl.store(out_ptr + r * V + offs, z - lse, mask=mask)


@triton.jit
def _backward_kernel(grad_ptr, out_ptr, alpha_ptr, temp_ptr, gbase_ptr, gadapter_ptr, V,
                     HAS_ADAPTER: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    alpha = tl.load(alpha_ptr + r)
    t = tl.load(temp_ptr + r)
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(grad_ptr + r * V + offs, mask=offs < V, other=0.0)
    gsum = tl.sum(acc, axis=0)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < V
        g = tl.load(grad_ptr + r * V + offs, mask=mask, other=0.0)
        y = tl.load(out_ptr + r * V + offs, mask=mask, other=float("-inf"))
        dz = g - tl.exp(y) * gsum
        tl.store(gbase_ptr + r * V + offs, dz / t, mask=mask)
        if HAS_ADAPTER:
            tl.store(gadapter_ptr + r * V + offs, tl.where(alpha == 0.0, 0.0, dz * alpha / t), mask=mask)


class TailoredLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base, adapter, alpha, temperature):
        B, V = base.shape
        experts = (base.contiguous(),) if adapter is None else (base.contiguous(), adapter.contiguous())
        out = torch.empty(B, V, dtype=torch.float32, device=base.device)
        lse = torch.empty(B, dtype=torch.float32, device=base.device)
        _forward_kernel[(B,)](experts, tuple(V for _ in experts), alpha, 1, temperature, out, lse, V,
                              K=len(experts), FIRST=1, BLOCK=BLOCK, num_warps=8, enable_fp_fusion=False)
        ctx.save_for_backward(out, alpha, temperature)
        ctx.has_adapter = adapter is not None
        ctx.dtypes = (base.dtype, adapter.dtype if adapter is not None else None)
        return out

    @staticmethod
    def backward(ctx, grad):
        out, alpha, temperature = ctx.saved_tensors
        B, V = out.shape
        grad = grad.contiguous().float()
        gbase = torch.empty(B, V, dtype=torch.float32, device=out.device)
        gadapter = torch.empty(B, V, dtype=torch.float32, device=out.device) if ctx.has_adapter else gbase
        _backward_kernel[(B,)](grad, out, alpha, temperature, gbase, gadapter, V,
                               HAS_ADAPTER=ctx.has_adapter, BLOCK=BLOCK, num_warps=8)
        base_dtype, adapter_dtype = ctx.dtypes
        return (gbase.to(base_dtype), gadapter.to(adapter_dtype) if ctx.has_adapter else None, None, None)


class ExpertsLogSoftmax(torch.autograd.Function):
    """Forward: one kernel over the K experts (read in place: pointer tuple and row strides).
    Backward: dz from the saved output, then ``d l_k = dz * w_k / T`` (0 where w_k == 0)."""

    @staticmethod
    def forward(ctx, weights, temperature, *experts):
        B, V = experts[0].shape
        X = tuple(x if x.stride(1) == 1 else x.contiguous() for x in experts)
        out = torch.empty(B, V, dtype=torch.float32, device=experts[0].device)
        lse = torch.empty(B, dtype=torch.float32, device=experts[0].device)
        _forward_kernel[(B,)](X, tuple(int(x.stride(0)) for x in X), weights, weights.shape[1], temperature, out,
                              lse, V, K=len(X), FIRST=0, BLOCK=BLOCK, num_warps=8, enable_fp_fusion=False)
        ctx.save_for_backward(out, weights, temperature)
        ctx.dtypes = [x.dtype for x in experts]
        return out

    @staticmethod
    def backward(ctx, grad):
        out, weights, temperature = ctx.saved_tensors
        B, V = out.shape
        grad = grad.contiguous().float()
        dz = torch.empty(B, V, dtype=torch.float32, device=out.device)
        ones = torch.ones(B, dtype=torch.float32, device=out.device)
        _backward_kernel[(B,)](grad, out, ones, temperature, dz, dz, V, HAS_ADAPTER=False, BLOCK=BLOCK, num_warps=8)
        scale = torch.where(weights == 0, torch.zeros((), device=out.device), weights)   # dz above is g / T
        grads = [(dz * scale[:, k:k + 1]).to(dt) if ctx.needs_input_grad[2 + k] else None
                 for k, dt in enumerate(ctx.dtypes)]
        return (None, None, *grads)


def tailored_log_softmax(base, adapter, alpha, temperature):
    """float32 ``[B, V]``; ``alpha`` / ``temperature`` are ``[B]`` float32 tensors (``T > 0``)."""
    return TailoredLogSoftmax.apply(base, adapter, alpha.float().contiguous(), temperature.float().contiguous())


def experts_log_softmax(experts, weights, temperature):
    """float32 ``[B, V]``; ``weights`` [B, K] and ``temperature`` [B] float32 tensors (``T > 0``)."""
    return ExpertsLogSoftmax.apply(weights.float().contiguous(), temperature.float().contiguous(), *experts)
