"""The RL training-loss op: per-token log-prob, entropy and KL of the tailored policy.

    logprob, entropy, kl = tailored_token_stats(base, adapter, targets, alpha=1.0,
                                                temperature=1.0, ref_adapter=None)

For each of the N rows (one per response token), with ``z = (base + alpha * adapter) / T``,
``pi = softmax(z)`` over the full vocabulary and ``pi_ref`` built the same way from
``ref_adapter`` (or from the base alone when ``ref_adapter is None``):

    logprob[i] = log pi(targets[i])
    entropy[i] = H(pi) = -sum_v pi_v log pi_v
    kl[i]      = KL(pi || pi_ref) = sum_v pi_v (log pi_v - log pi_ref_v)

Why a registered op with its own backward (``torch.ops.ipa_fast.experts_token_stats``): the plain
formula (``log_softmax`` + ``softmax`` + products, differentiated by autograd) keeps several
float32 ``[N, V]`` tensors alive for backward;
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

from ipa_fast.ops.reference import OP_RANGES, full_weights, mix_experts
from ipa_fast.ops.sampling import check_experts, check_logits, check_pending, param_tensor, weights_tensor

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
    """Per-call constants of ``z = (sum_k w_k * l_k) / t`` (:func:`ipa_fast.ops.reference.mix_experts`
    in float32, a weight of 0 ignoring its expert), hoisted out of the chunk loop."""

    def __init__(self, w: torch.Tensor, t: torch.Tensor):
        self.w, self.t = w, t
        self.zero = [bool(z) for z in (w == 0).any(dim=0).tolist()]
        self.unit = [bool(u) for u in (w == 1).all(dim=0).tolist()]
        self.unit_t = bool((t == 1).all())

    def __call__(self, s: int, e: int, experts) -> torch.Tensor:
        """float32 ``[e - s, V]`` mixed logits of rows s:e (a fresh tensor)."""
        z = None
        for k, x in enumerate(experts):
            wk = self.w[s:e, k:k + 1]
            if z is None:
                z = x[s:e].to(torch.float32, copy=True)
                if self.zero[k]:
                    z = torch.where(wk == 0, torch.zeros((), device=z.device), z * wk)
                elif not self.unit[k]:
                    z.mul_(wk)
            elif self.zero[k]:  # rows with w_k == 0 ignore expert k (no 0 * -inf)
                z.add_(torch.where(wk == 0, torch.zeros((), device=z.device), x[s:e].float() * wk))
            elif self.unit[k]:
                z.add_(x[s:e])
            else:
                z.addcmul_(x[s:e], wk)
        return z if self.unit_t else z.div_(self.t[s:e])


# The op: ``torch.ops.ipa_fast.experts_token_stats`` (and its backward), registered so that
# torch.compile treats it as one opaque node (the chunk loop reads per-call constants on the host)
# and torch.library.opcheck can check it. It trusts its inputs: the public functions below check
# them (docs/DESIGN.md §4.1).
_LIB = torch.library.Library("ipa_fast", "FRAGMENT")
_LIB.define("experts_token_stats(Tensor targets, Tensor weights, Tensor temperature, Tensor ref_weights, "
            "int chunk_rows, Tensor[] experts, Tensor[] ref_experts) -> (Tensor, Tensor, Tensor)")
_LIB.define("experts_token_stats_backward(Tensor targets, Tensor weights, Tensor temperature, "
            "Tensor ref_weights, int chunk_rows, Tensor[] experts, Tensor[] ref_experts, Tensor entropy, "
            "Tensor kl, Tensor? grad_logprob, Tensor? grad_entropy, Tensor? grad_kl, bool[] wanted) -> Tensor[]")


def _token_stats(targets, w, t, ref_w, chunk, experts, ref):
    """Forward: ``(logprob, entropy, kl)`` per row, chunk by chunk; ``w`` [N, K], ``t`` [N, 1],
    ``ref_w`` [N, K_ref] float32, ``targets`` [N] int64 in range."""
    N = experts[0].shape[0]
    mix, ref_mix = _Mix(w, t), _Mix(ref_w, t)
    logprob, entropy, kl = (torch.empty(N, dtype=torch.float32, device=experts[0].device) for _ in range(3))
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        logp = torch.log_softmax(mix(s, e, experts), dim=1)
        p = logp.exp()
        logprob[s:e] = logp.gather(1, targets[s:e].unsqueeze(1)).squeeze(1)
        masked = _has_neg_inf(logp)  # masked tokens: their 0 * log 0 terms must count as 0
        dead = (p == 0) if masked else None
        entropy[s:e] = -_rowdot(p, logp.masked_fill(dead, 0.0) if masked else logp)
        diff = torch.log_softmax(ref_mix(s, e, ref), dim=1).neg_().add_(logp)  # log pi - log pi_ref
        kl[s:e] = _rowdot(p, diff.masked_fill_(dead, 0.0) if masked else diff)
    return logprob, entropy, kl


def _token_stats_backward(targets, w, t, ref_w, chunk, experts, ref, entropy, kl, g_lp, g_h, g_kl, wanted):
    """Backward: recomputes each chunk's log pi and log pi_ref; returns dL / d experts[k] (``w_k / T``
    times dL/dz, in expert k's dtype) for each k with ``wanted[k]``, in order."""
    want = [k for k, flag in enumerate(wanted) if flag]
    grads = [torch.zeros_like(experts[k]) for k in want]
    if not want or (g_lp is None and g_h is None and g_kl is None):
        return grads
    N = experts[0].shape[0]
    mix, ref_mix = _Mix(w, t), _Mix(ref_w, t)
    zeros = torch.zeros(N, dtype=torch.float32, device=experts[0].device)
    g_lp = zeros if g_lp is None else g_lp
    g_h = zeros if g_h is None else g_h
    use_kl = g_kl is not None
    g_kl = zeros if g_kl is None else g_kl
    # dL/dz = -p * inner + g_lp * onehot(target), with
    # inner = g_lp + g_h (log pi + H) - g_kl (log pi - log pi_ref - KL)
    #       = c0 + (g_h - g_kl) log pi + g_kl log pi_ref,   c0 = g_lp + g_h H + g_kl KL
    c0 = (g_lp + g_h * entropy + g_kl * kl).unsqueeze(1)
    c1 = (g_h - g_kl).unsqueeze(1)
    scale = torch.where(w == 0, torch.zeros((), device=w.device), w / t)  # [N, K]: dz / d l_k
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        logp = torch.log_softmax(mix(s, e, experts), dim=1)
        p = logp.exp()
        masked = _has_neg_inf(logp)
        inner = logp.mul_(c1[s:e])  # log pi is not needed after this
        if use_kl:
            inner.add_(torch.log_softmax(ref_mix(s, e, ref), dim=1).mul_(g_kl[s:e].unsqueeze(1)))
        inner.add_(c0[s:e])
        if masked:
            inner.masked_fill_(p == 0, 0.0)
        gz = inner.mul_(p).neg_()
        gz.scatter_add_(1, targets[s:e].unsqueeze(1), g_lp[s:e].unsqueeze(1))
        for k, g in zip(want, grads):
            torch.mul(gz, scale[s:e, k:k + 1], out=g[s:e]) if g.dtype == torch.float32 \
                else g[s:e].copy_(gz * scale[s:e, k:k + 1])
    return grads


def _token_stats_fake(targets, w, t, ref_w, chunk, experts, ref):
    N = experts[0].shape[0]
    return tuple(torch.empty(N, dtype=torch.float32, device=experts[0].device) for _ in range(3))


def _token_stats_backward_fake(targets, w, t, ref_w, chunk, experts, ref, entropy, kl, g_lp, g_h, g_kl, wanted):
    return [torch.empty_like(x) for x, flag in zip(experts, wanted) if flag]


def _setup_context(ctx, inputs, output):
    targets, w, t, ref_w, chunk, experts, ref = inputs
    ctx.save_for_backward(targets, w, t, ref_w, output[1], output[2], *experts, *ref)
    ctx.chunk, ctx.n_policy = chunk, len(experts)
    ctx.wanted = [x.requires_grad for x in experts]  # gradients go to the trained experts only
    ctx.set_materialize_grads(False)


def _backward(ctx, g_lp, g_h, g_kl):
    targets, w, t, ref_w, entropy, kl, *tensors = ctx.saved_tensors
    experts, ref = tensors[:ctx.n_policy], tensors[ctx.n_policy:]
    grads = iter(torch.ops.ipa_fast.experts_token_stats_backward(
        targets, w, t, ref_w, ctx.chunk, experts, ref, entropy, kl, g_lp, g_h, g_kl, ctx.wanted))
    return (None, None, None, None, None, [next(grads) if flag else None for flag in ctx.wanted],
            [None] * len(ref))


_LIB.impl("experts_token_stats", _token_stats, "CompositeExplicitAutograd")
_LIB.impl("experts_token_stats_backward", _token_stats_backward, "CompositeExplicitAutograd")
torch.library.register_fake("ipa_fast::experts_token_stats", _token_stats_fake, lib=_LIB)
torch.library.register_fake("ipa_fast::experts_token_stats_backward", _token_stats_backward_fake, lib=_LIB)
torch.library.register_autograd("ipa_fast::experts_token_stats", _backward, setup_context=_setup_context, lib=_LIB)


def _check_targets(targets, N: int, V: int, device):
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.shape != (N,):
        raise ValueError(f"targets must be [N] = [{N}], got shape {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if targets.dtype == torch.uint64:
        raise TypeError("targets must be a signed integer tensor (int64 or narrower), got torch.uint64")
    targets = targets.to(device=device, dtype=torch.int64)
    return targets, [("targets", targets, (targets >= 0) & (targets < V), f"in [0, {V}) (the vocabulary)")]


def _chunk_rows(chunk_rows, V: int) -> int:
    if chunk_rows is None:
        # With several threads every op of a chunk is a fork/join: give each thread a bigger
        # share (1M elements) so the joins stay rare, on a busy machine too.
        threads = max(1, torch.get_num_threads())
        elements = _CHUNK_ELEMENTS if threads == 1 else 4 * _CHUNK_ELEMENTS * min(threads, 16)
        chunk_rows = max(1, elements // V)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, numbers.Integral):
        raise TypeError(f"chunk_rows must be an int, got {type(chunk_rows).__name__}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return int(chunk_rows)


def _prepare(base, adapter, targets, alpha, temperature, ref_adapter):
    check_logits("base", base)
    check_logits("adapter", adapter, like=base)
    if ref_adapter is not None:
        check_logits("ref_adapter", ref_adapter, like=base)
    N, V = base.shape
    # one host sync for the targets' and the parameters' range checks together
    targets, pending = _check_targets(targets, N, V, base.device)
    a = param_tensor("alpha", alpha, N, base.device, validate=True, pending=pending, ranges=OP_RANGES)
    t = param_tensor("temperature", temperature, N, base.device, validate=True, pending=pending, ranges=OP_RANGES)
    targets, a, t = check_pending(pending, [targets, a, t])
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
    chunk = _chunk_rows(chunk_rows, base.shape[1])
    # the K = 2 case of experts_token_stats: weights (1, alpha), the reference (1, alpha) over
    # [base, ref_adapter] or the base alone
    w = full_weights(a, True)
    base = base.detach()
    ref = [base] if ref_adapter is None else [base, ref_adapter.detach()]
    ref_w = w if ref_adapter is not None else w[:, :1]
    return torch.ops.ipa_fast.experts_token_stats(targets, w, t, ref_w, chunk, [base, adapter], ref)


def _prepare_experts(experts, weights, targets, temperature, ref_experts, ref_weights):
    """Check and normalise the K-expert op's arguments (one host sync for every value check):
    ``(experts, targets, w [N, K], t [N], ref_experts, ref_w [N, K_ref])``; the reference is the
    first expert alone when ``ref_experts`` is None, and takes ``weights`` when ``ref_weights`` is."""
    experts = check_experts(experts)
    N, V = experts[0].shape
    dev = experts[0].device
    targets, pending = _check_targets(targets, N, V, dev)
    w = weights_tensor(weights, len(experts), N, dev, validate=True, pending=pending)
    if ref_experts is None:
        if ref_weights is not None:
            raise ValueError("ref_weights needs ref_experts")
        ref_experts, ref_w = [experts[0]], torch.ones(N, 1, dtype=torch.float32, device=dev)
    else:
        ref_experts = check_experts(ref_experts)
        for k, x in enumerate(ref_experts):
            check_logits(f"ref_experts[{k}]", x, like=experts[0])
        ref_w = weights_tensor(weights if ref_weights is None else ref_weights, len(ref_experts), N, dev,
                               validate=True, pending=pending)
    t = param_tensor("temperature", temperature, N, dev, validate=True, pending=pending, ranges=OP_RANGES)
    targets, w, t, ref_w = check_pending(pending, [targets, w, t, ref_w])
    return experts, targets, w, t, ref_experts, ref_w


def experts_token_stats(experts, weights, targets: torch.Tensor, *, temperature=1.0, ref_experts=None,
                        ref_weights=None, chunk_rows: int | None = None):
    """:func:`tailored_token_stats` for K weighted experts: ``(logprob, entropy, kl)``, each
    float32 ``[N]``, with ``z = (sum_k w_k * l_k) / T`` (:func:`ipa_fast.ops.reference.mix_experts`:
    a weight of 0 ignores its expert) and ``pi_ref`` built the same way from ``ref_experts`` and
    ``ref_weights`` (defaults: ``ref_experts`` = ``experts[:1]`` with weight 1, i.e. the first
    expert — the base — alone; ``ref_weights`` = ``weights`` when ``ref_experts`` is given and
    has as many entries).

    ``experts`` / ``ref_experts``: lists of ``[N, V]`` logits on one device; ``weights`` /
    ``ref_weights``: K numbers, a ``[K]`` or an ``[N, K]`` tensor, finite (``ValueError`` naming
    ``weights`` otherwise). Differentiable w.r.t. every policy expert that requires grad (the
    trained ones; pass the frozen ones detached to skip their gradient), never w.r.t. the
    reference. Same memory behaviour as :func:`tailored_token_stats`: one ``[N, V]`` gradient per
    trained expert. ``tailored_token_stats(base, adapter, targets, alpha=a)`` is
    ``experts_token_stats([base.detach(), adapter], [1, a], targets)``.
    """
    experts, targets, w, t, ref_experts, ref_w = _prepare_experts(experts, weights, targets, temperature,
                                                                  ref_experts, ref_weights)
    chunk = _chunk_rows(chunk_rows, experts[0].shape[1])
    ref = [x.detach() for x in ref_experts]
    return torch.ops.ipa_fast.experts_token_stats(targets, w, t.unsqueeze(1), ref_w, chunk, experts, ref)


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


def experts_token_stats_reference(experts, weights, targets: torch.Tensor, *, temperature=1.0, ref_experts=None,
                                  ref_weights=None):
    """The plain PyTorch formula of :func:`experts_token_stats` (autograd through full ``[N, V]``
    tensors, the mix of :func:`ipa_fast.ops.reference.mix_experts`): the oracle for tests."""
    experts, targets, w, t, ref_experts, ref_w = _prepare_experts(experts, weights, targets, temperature,
                                                                  ref_experts, ref_weights)
    logp = torch.log_softmax(mix_experts(experts, w) / t.unsqueeze(1), dim=-1)
    logr = torch.log_softmax(mix_experts([x.detach() for x in ref_experts], ref_w) / t.unsqueeze(1), dim=-1)
    p = logp.exp()
    logprob = logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    live = p > 0
    entropy = -(p * torch.where(live, logp, 0.0)).sum(-1)
    kl = (p * torch.where(live, logp - logr, 0.0)).sum(-1)
    return logprob, entropy, kl
