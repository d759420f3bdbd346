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
chunks, keeps only per-row statistics (H and KL) and recomputes each chunk's log-probabilities
in backward, so besides its inputs the only ``[N, V]`` tensor it
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

import numbers

import torch

from .reference import OP_RANGES
from .sampling import check_logits, param_tensor, raise_pending

# Rows per chunk: about 256K float32 elements (1 MB) per temporary and thread, so a chunk's few
# temporaries stay in cache while the passes over them run (the plain formula streams
# several [N, V] tensors through DRAM instead), and tiny next to the [N, V] inputs.
_CHUNK_ELEMENTS = 1 << 18


def _rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products ``[C]``."""
    return torch.linalg.vecdot(x, y, dim=1)


def _has_neg_inf(x: torch.Tensor) -> bool:
    return bool(torch.isneginf(x.min()))


class _Mix:
    """Per-call constants of ``z = (logits + a * other) / t``, hoisted out of the chunk loop."""

    def __init__(self, a: torch.Tensor, t: torch.Tensor):
        self.a, self.t = a, t
        self.zero_alpha = bool((a == 0).any())
        self.unit_t = bool((t == 1).all())

    def __call__(self, s: int, e: int, logits: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
        """float32 ``[e - s, V]`` mixed logits of rows s:e (a fresh tensor)."""
        z = logits[s:e].to(torch.float32, copy=True)
        a = self.a[s:e]
        if other is not None:
            if self.zero_alpha:  # rows with alpha == 0 ignore the adapter (no 0 * -inf)
                z.add_(torch.where(a == 0, torch.zeros((), device=z.device), other[s:e].float() * a))
            else:
                z.addcmul_(other[s:e], a)
        return z if self.unit_t else z.div_(self.t[s:e])


class _TailoredTokenStats(torch.autograd.Function):
    """Forward keeps H and KL per row; backward recomputes each chunk's log pi and log pi_ref."""

    @staticmethod
    def forward(ctx, base, adapter, ref, targets, a, t, chunk):
        N = base.shape[0]
        mix = _Mix(a, t)
        out = torch.empty(3, N, dtype=torch.float32, device=base.device)
        logprob, entropy, kl = out
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            logp = torch.log_softmax(mix(s, e, base, adapter), dim=1)
            p = logp.exp()
            logprob[s:e] = logp.gather(1, targets[s:e].unsqueeze(1)).squeeze(1)
            masked = _has_neg_inf(logp)  # masked tokens: their 0 * log 0 terms must count as 0
            dead = (p == 0) if masked else None
            entropy[s:e] = -_rowdot(p, logp.masked_fill(dead, 0.0) if masked else logp)
            diff = torch.log_softmax(mix(s, e, base, ref), dim=1).neg_().add_(logp)  # log pi - log pi_ref
            kl[s:e] = _rowdot(p, diff.masked_fill_(dead, 0.0) if masked else diff)
        ctx.save_for_backward(base, adapter, ref, targets, a, t, entropy, kl)
        ctx.chunk = chunk
        ctx.set_materialize_grads(False)
        return logprob, entropy, kl

    @staticmethod
    def backward(ctx, g_lp, g_h, g_kl):
        base, adapter, ref, targets, a, t, entropy, kl = ctx.saved_tensors
        grad = torch.zeros_like(adapter)
        if g_lp is None and g_h is None and g_kl is None:
            return None, grad, None, None, None, None, None
        N = base.shape[0]
        mix = _Mix(a, t)
        zeros = torch.zeros(N, dtype=torch.float32, device=base.device)
        g_lp = zeros if g_lp is None else g_lp
        g_h = zeros if g_h is None else g_h
        use_kl = g_kl is not None
        g_kl = zeros if g_kl is None else g_kl
        # dL/dz = -p * inner + g_lp * onehot(target), with
        # inner = g_lp + g_h (log pi + H) - g_kl (log pi - log pi_ref - KL)
        #       = c0 + (g_h - g_kl) log pi + g_kl log pi_ref,   c0 = g_lp + g_h H + g_kl KL
        c0 = (g_lp + g_h * entropy + g_kl * kl).unsqueeze(1)
        c1 = (g_h - g_kl).unsqueeze(1)
        scale = torch.where(a == 0, torch.zeros((), device=a.device), a / t)
        for s in range(0, N, ctx.chunk):
            e = min(N, s + ctx.chunk)
            logp = torch.log_softmax(mix(s, e, base, adapter), dim=1)
            p = logp.exp()
            masked = _has_neg_inf(logp)
            inner = logp.mul_(c1[s:e])  # log pi is not needed after this
            if use_kl:
                inner.add_(torch.log_softmax(mix(s, e, base, ref), dim=1).mul_(g_kl[s:e].unsqueeze(1)))
            inner.add_(c0[s:e])
            if masked:
                inner.masked_fill_(p == 0, 0.0)
            gz = inner.mul_(p).neg_()
            gz.scatter_add_(1, targets[s:e].unsqueeze(1), g_lp[s:e].unsqueeze(1))
            grad[s:e] = gz.mul_(scale[s:e])
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
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if targets.dtype == torch.uint64:
        raise TypeError("targets must be a signed integer tensor (int64 or narrower), got torch.uint64")
    targets = targets.to(device=base.device, dtype=torch.int64)
    # one host sync for the targets' and the parameters' range checks together
    pending = [("targets", targets, (targets >= 0) & (targets < V), f"in [0, {V}) (the vocabulary)")]
    a = param_tensor("alpha", alpha, N, base.device, validate=True, pending=pending, ranges=OP_RANGES)
    t = param_tensor("temperature", temperature, N, base.device, validate=True, pending=pending, ranges=OP_RANGES)
    raise_pending(pending)
    return targets, a.unsqueeze(1), t.unsqueeze(1)


def tailored_token_stats(base: torch.Tensor, adapter: torch.Tensor, targets: torch.Tensor, *,
                         alpha=1.0, temperature=1.0, ref_adapter: torch.Tensor | None = None,
                         chunk_rows: int | None = None):
    """Per-token log-prob, entropy and KL of the tailored policy: ``(logprob, entropy, kl)``,
    each float32 ``[N]``, for the RL training loss.

    With ``z = (base + alpha * adapter) / T`` per row (rows with ``alpha == 0`` ignore the
    adapter), ``pi = softmax(z)`` over the full vocabulary, and ``pi_ref`` built the same way
    from ``ref_adapter`` in place of ``adapter`` (or from the base alone when ``ref_adapter`` is
    None)::

        logprob[i] = log pi(targets[i])
        entropy[i] = -sum_v pi_v log pi_v
        kl[i]      = sum_v pi_v (log pi_v - log pi_ref_v)     # KL(pi || pi_ref)

    ``base``, ``adapter``, ``ref_adapter``: ``[N, V]`` float32 / float16 / bfloat16 logits on one
    device; arithmetic is float32; ``-inf`` logits are legal (their ``0 * log 0`` terms count as
    0). ``targets``: ``[N]`` integer token ids in ``[0, V)``. ``alpha``: a number or ``[N]``
    tensor, finite (``|alpha| <= 3.4028235e38``). ``temperature``: a number or ``[N]`` tensor in
    ``[1.1754944e-38, 3.4028235e38]`` (no greedy limit). Out-of-range values raise ``ValueError``
    naming the argument. Differentiable w.r.t. ``adapter`` only (the base and the reference are
    frozen); backward recomputes per chunk of rows, so besides its inputs the op allocates no
    ``[N, V]`` float tensor but ``adapter``'s gradient. ``chunk_rows``: an int >= 1 overriding the
    rows processed at a time (default: 256K elements on one torch thread, 1M per thread with
    more). See docs/DESIGN.md §4.
    """
    targets, a, t = _prepare(base, adapter, targets, alpha, temperature, ref_adapter)
    if chunk_rows is None:
        # With several threads every op of a chunk is a fork/join: give each thread a bigger
        # share (1M elements) so the joins stay rare, on a busy machine too.
        threads = max(1, torch.get_num_threads())
        elements = _CHUNK_ELEMENTS if threads == 1 else 4 * _CHUNK_ELEMENTS * min(threads, 16)
        chunk_rows = max(1, elements // base.shape[1])
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, numbers.Integral):
        raise TypeError(f"chunk_rows must be an int, got {type(chunk_rows).__name__}")
    if chunk_rows < 1:
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
