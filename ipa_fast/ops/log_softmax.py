"""Companion ops with the sampler's semantics: the tailored log-softmax (autograd), for a
base + adapter pair and for K weighted experts."""
from __future__ import annotations

import torch

from ipa_fast.ops.reference import OP_RANGES, full_weights, mix_experts
from ipa_fast.ops.sampling import check_experts, check_logits, check_pending, param_tensor, weights_tensor


def op_params(alpha, temperature, rows: int, device):
    """``alpha`` and ``temperature`` of a companion op as float32 ``[rows]`` tensors, checked
    against :data:`ipa_fast.ops.reference.OP_RANGES` (``ValueError`` naming the parameter; tensor
    values cost one host sync, Python numbers none; inside torch.compile the check is an op, see
    :func:`ipa_fast.ops.sampling.check_pending`)."""
    pending = []
    a = param_tensor("alpha", alpha, rows, device, validate=True, pending=pending, ranges=OP_RANGES)
    t = param_tensor("temperature", temperature, rows, device, validate=True, pending=pending, ranges=OP_RANGES)
    a, t = check_pending(pending, [a, t])
    return a, t


def tailored_log_softmax(base: torch.Tensor, adapter: torch.Tensor | None = None, alpha=1.0,
                         temperature=1.0) -> torch.Tensor:
    """``log_softmax((base + alpha * adapter) / T)`` over the vocabulary: float32 ``[B, V]``.

    ``base``, ``adapter``: ``[B, V]`` float32 / float16 / bfloat16 logits on one device
    (``adapter=None``: the base alone); arithmetic is float32 whatever the input dtype.
    ``alpha``: a number or a ``[B]`` tensor, finite (``|alpha| <= 3.4028235e38``); rows where
    ``alpha == 0`` ignore the adapter (no ``0 * -inf`` NaN). ``temperature``: a number or a
    ``[B]`` tensor in ``[1.1754944e-38, 3.4028235e38]`` — greedy (T = 0) has no log-softmax.
    Out-of-range values raise ``ValueError`` naming the parameter. ``-inf`` logits are legal
    (masked tokens get ``-inf``). Row i equals the ``logprobs`` that :func:`ipa_fast.sample`
    reports for every token of row i at the same alpha and T. Differentiable w.r.t. ``adapter``
    (and ``base``). See docs/DESIGN.md §2.9.
    """
    check_logits("base", base)
    if adapter is not None:
        check_logits("adapter", adapter, like=base)
    a, t = op_params(alpha, temperature, base.shape[0], base.device)
    if adapter is None:
        return torch.log_softmax(base.float() / t.unsqueeze(1), dim=-1)
    z = mix_experts([base, adapter], full_weights(a.unsqueeze(1), True))  # weights (1, alpha)
    return torch.log_softmax(z / t.unsqueeze(1), dim=-1)


def op_weights(experts, weights, temperature):
    """Checked experts, float32 ``[B, K]`` weights and ``[B]`` temperature of a K-expert op
    (``ValueError`` / ``TypeError`` naming the parameter; one host sync for tensor values)."""
    experts = check_experts(experts)
    B, dev = experts[0].shape[0], experts[0].device
    pending = []
    w = weights_tensor(weights, len(experts), B, dev, validate=True, pending=pending)
    t = param_tensor("temperature", temperature, B, dev, validate=True, pending=pending, ranges=OP_RANGES)
    w, t = check_pending(pending, [w, t])
    return experts, w, t


def experts_log_softmax(experts, weights, temperature=1.0) -> torch.Tensor:
    """``log_softmax((sum_k w_k * l_k) / T)`` over the vocabulary: float32 ``[B, V]``.

    ``experts``: K >= 1 ``[B, V]`` logits tensors on one device; ``weights``: K numbers, a ``[K]``
    or a ``[B, K]`` tensor (finite). The mix is :func:`ipa_fast.ops.reference.mix_experts` — a weight
    of 0 ignores its expert; -inf with a negative weight gives +inf, hence NaN rows here (the
    sampler calls such rows invalid). ``temperature`` as in :func:`tailored_log_softmax`. Row i
    equals the ``logprobs`` :func:`ipa_fast.sample_experts` reports for every token of row i.
    Differentiable w.r.t. every expert (gradient ``w_k / T`` times that of z; 0 where
    ``w_k == 0``); ``tailored_log_softmax(base, adapter, alpha)`` is the case
    ``experts_log_softmax([base, adapter], [1, alpha])``. See docs/DESIGN.md §2.9.
    """
    experts, w, t = op_weights(experts, weights, temperature)
    return torch.log_softmax(mix_experts(experts, w) / t.unsqueeze(1), dim=-1)
