"""The RL training-loss op: per-token log-prob, entropy and KL of the tailored policy.

    logprob, entropy, kl = tailored_token_stats(base, adapter, targets, alpha=1.0,
                                                temperature=1.0, ref_adapter=None)

For each of the N rows (one per response token), with ``z = (base + alpha * adapter) / T``,
``pi = softmax(z)`` over the full vocabulary and ``pi_ref`` built the same way from
``ref_adapter`` (or from the base alone when ``ref_adapter is None``):

    logprob[i] = log pi(targets[i])
    entropy[i] = H(pi) = -sum_v pi_v log pi_v
    kl[i]      = KL(pi || pi_ref) = sum_v pi_v (log pi_v - log pi_ref_v)

Why a custom autograd.Function: the plain formula (``log_softmax`` + ``softmax`` + products,
differentiated by autograd) keeps several float32 ``[N, V]`` tensors alive for backward;
with N = 4096 response tokens and V = 50257 each one is 823 MB. This op walks the rows in
chunks, keeps only per-row statistics (logsumexp of pi and pi_ref, H, KL) and recomputes each
chunk's probabilities in backward, so besides its inputs the only ``[N, V]`` tensor it
allocates is the gradient of ``adapter`` itself (in ``adapter``'s dtype).

Gradients flow to ``adapter`` only (the base and the reference are frozen by design). With
``g = dL/dz`` per row and ``d = log pi - log pi_ref``:

    d logprob / dz = onehot(target) - pi
    d entropy / dz = -pi * (log pi + H)
    d kl      / dz =  pi * (d - KL)
    dL / d adapter = g * alpha / T

Arithmetic is float32 whatever the input dtype. ``-inf`` logits are legal (masked tokens;
their ``0 * log 0`` terms count as 0). Rows with ``alpha == 0`` ignore the adapter.
"""
from __future__ import annotations

import torch

from .sampling import check_logits, per_row

# Rows per chunk: about 2M float32 elements (8 MB) per temporary, so a chunk's few
# temporaries stay small next to the [N, V] inputs whatever V is.
_CHUNK_ELEMENTS = 1 << 21


def _mixed(logits: torch.Tensor, adapter: torch.Tensor | None, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """float32 ``(logits + a * adapter) / t`` for one chunk; rows with a == 0 skip the adapter."""
    z = logits.to(torch.float32, copy=True)
    if adapter is not None:
        contrib = adapter.to(torch.float32) * a
        if bool((a == 0).any()):
            contrib = torch.where(a == 0, torch.zeros((), device=z.device), contrib)
        z.add_(contrib)
    return z.div_(t)


def _chunk_stats(base, adapter, ref, targets, a, t, need_ref: bool):
    """Forward statistics of one chunk: logprob, H, KL, lse, lse_ref (all [C] float32)."""
    z = _mixed(base, adapter, a, t)
    lse = torch.logsumexp(z, dim=1)
    logp = z.sub_(lse.unsqueeze(1))                      # z is reused as log pi
    p = logp.exp()
    live = p > 0
    entropy = -torch.where(live, p * logp, 0.0).sum(1)
    logprob = logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    if need_ref:
        zr = _mixed(base, ref, a, t)
        lse_r = torch.logsumexp(zr, dim=1)
        diff = logp - zr.sub_(lse_r.unsqueeze(1))        # log pi - log pi_ref
        kl = torch.where(live, p * diff, 0.0).sum(1)
    else:
        lse_r = torch.zeros_like(lse)
        kl = torch.zeros_like(lse)
    return logprob, entropy, kl, lse, lse_r


class _TailoredTokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base, adapter, ref, targets, a, t, chunk):
        N = base.shape[0]
        out = torch.empty(5, N, dtype=torch.float32, device=base.device)
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            stats = _chunk_stats(base[s:e], adapter[s:e], None if ref is None else ref[s:e],
                                 targets[s:e], a[s:e], t[s:e], need_ref=True)
            for k, v in enumerate(stats):
                out[k, s:e] = v
        logprob, entropy, kl, lse, lse_r = out
        ctx.save_for_backward(base, adapter, ref, targets, a, t, entropy, kl, lse, lse_r)
        ctx.chunk = chunk
        ctx.set_materialize_grads(False)
        return logprob, entropy, kl

    @staticmethod
    def backward(ctx, g_lp, g_h, g_kl):
        base, adapter, ref, targets, a, t, entropy, kl, lse, lse_r = ctx.saved_tensors
        grad = torch.zeros_like(adapter)
        if g_lp is None and g_h is None and g_kl is None:
            return None, grad, None, None, None, None, None
        N = base.shape[0]
        for s in range(0, N, ctx.chunk):
            e = min(N, s + ctx.chunk)
            a_c, t_c = a[s:e], t[s:e]
            logp = _mixed(base[s:e], adapter[s:e], a_c, t_c).sub_(lse[s:e].unsqueeze(1))
            p = logp.exp()
            # inner = g_lp + g_h * (log pi + H) - g_kl * (log pi - log pi_ref - KL);
            # then dL/dz = -p * inner + g_lp * onehot(target).
            inner = torch.zeros_like(logp)
            if g_lp is not None:
                inner.add_(g_lp[s:e].unsqueeze(1))
            if g_h is not None:
                inner.add_((logp + entropy[s:e].unsqueeze(1)).mul_(g_h[s:e].unsqueeze(1)))
            if g_kl is not None:
                logr = _mixed(base[s:e], None if ref is None else ref[s:e], a_c, t_c).sub_(lse_r[s:e].unsqueeze(1))
                inner.sub_((logp - logr).sub_(kl[s:e].unsqueeze(1)).mul_(g_kl[s:e].unsqueeze(1)))
            gz = torch.where(p > 0, p * inner, 0.0).neg_()
            if g_lp is not None:
                gz.scatter_add_(1, targets[s:e].unsqueeze(1), g_lp[s:e].unsqueeze(1))
            scale = torch.where(a_c == 0, torch.zeros((), device=gz.device), a_c / t_c)
            grad[s:e] = gz.mul_(scale)
        return None, grad, None, None, None, None, None


def _prepare(base, adapter, targets, alpha, temperature, ref_adapter):
    check_logits("base", base)
    check_logits("adapter", adapter, like=base)
    if ref_adapter is not None:
        check_logits("ref_adapter", ref_adapter, like=base)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    N, V = base.shape
    if targets.shape != (N,):
        raise ValueError(f"targets must be [N] = [{N}], got shape {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    targets = targets.to(device=base.device, dtype=torch.int64)
    if bool(((targets < 0) | (targets >= V)).any()):
        raise ValueError(f"targets must be in [0, {V}), got {targets[(targets < 0) | (targets >= V)][0].item()}")
    a = per_row("alpha", alpha, N, base.device, torch.float32, integer=False).unsqueeze(1)
    t = per_row("temperature", temperature, N, base.device, torch.float32, integer=False)
    if not bool((t > 0).all()):
        raise ValueError(f"temperature must be > 0 for tailored_token_stats, got {t.min().item()}")
    return targets, a, t.unsqueeze(1)


def tailored_token_stats(base: torch.Tensor, adapter: torch.Tensor, targets: torch.Tensor, *,
                         alpha=1.0, temperature=1.0, ref_adapter: torch.Tensor | None = None,
                         chunk_rows: int | None = None):
    """``(logprob, entropy, kl)``, each float32 ``[N]``; see the module docstring.

    ``base``, ``adapter``, ``ref_adapter``: ``[N, V]`` float32 / float16 / bfloat16 logits.
    ``targets``: ``[N]`` token ids. ``alpha``, ``temperature``: scalars or ``[N]`` tensors
    (``temperature > 0``). Differentiable w.r.t. ``adapter`` only. ``chunk_rows`` overrides
    the number of rows processed at a time (default: about 2M elements per chunk).
    """
    targets, a, t = _prepare(base, adapter, targets, alpha, temperature, ref_adapter)
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_ELEMENTS // base.shape[1])
    if int(chunk_rows) < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    ref = None if ref_adapter is None else ref_adapter.detach()
    return _TailoredTokenStats.apply(base.detach(), adapter, ref, targets, a, t, int(chunk_rows))


def tailored_token_stats_reference(base: torch.Tensor, adapter: torch.Tensor, targets: torch.Tensor, *,
                                   alpha=1.0, temperature=1.0, ref_adapter: torch.Tensor | None = None):
    """The plain PyTorch formula (autograd through full ``[N, V]`` tensors): the oracle for
    tests and the baseline for ``ipa-fast bench train``."""
    targets, a, t = _prepare(base, adapter, targets, alpha, temperature, ref_adapter)

    def mix(other):
        z = base.detach().float()
        if other is not None:
            z = z + torch.where(a == 0, torch.zeros((), device=z.device), a * other.float())
        return z / t

    logp = torch.log_softmax(mix(adapter), dim=-1)
    logr = torch.log_softmax(mix(None if ref_adapter is None else ref_adapter.detach()), dim=-1)
    p = logp.exp()
    logprob = logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    live = p > 0  # masked tokens: 0 * log 0 = 0 (a where on the factor keeps gradients finite)
    entropy = -(p * torch.where(live, logp, 0.0)).sum(-1)
    kl = (p * torch.where(live, logp - logr, 0.0)).sum(-1)
    return logprob, entropy, kl
