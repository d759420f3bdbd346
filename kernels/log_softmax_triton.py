"""Triton ``tailored_log_softmax``: ``log_softmax((base + alpha*adapter) / T)`` with autograd.

Same semantics as :func:`ipa_fast.ops.tailored_log_softmax` (rows with ``alpha == 0`` ignore the
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
def _forward_kernel(base_ptr, adapter_ptr, alpha_ptr, temp_ptr, out_ptr, lse_ptr, V,
                    HAS_ADAPTER: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    alpha = tl.load(alpha_ptr + r)
    t = tl.load(temp_ptr + r)
    m = tl.full((), float("-inf"), tl.float32)
    d = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        z = _mixed_z(base_ptr, adapter_ptr, r * V, offs, offs < V, alpha, t, HAS_ADAPTER)
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
        z = _mixed_z(base_ptr, adapter_ptr, r * V, offs, mask, alpha, t, HAS_ADAPTER)
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
        base_c = base.contiguous()
        adapter_c = adapter.contiguous() if adapter is not None else base_c
        out = torch.empty(B, V, dtype=torch.float32, device=base.device)
        lse = torch.empty(B, dtype=torch.float32, device=base.device)
        _forward_kernel[(B,)](base_c, adapter_c, alpha, temperature, out, lse, V,
                              HAS_ADAPTER=adapter is not None, BLOCK=BLOCK, num_warps=8, enable_fp_fusion=False)
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


def tailored_log_softmax(base, adapter, alpha, temperature):
    """float32 ``[B, V]``; ``alpha`` / ``temperature`` are ``[B]`` float32 tensors (``T > 0``)."""
    return TailoredLogSoftmax.apply(base, adapter, alpha.float().contiguous(), temperature.float().contiguous())
