"""Companion ops with the sampler's semantics: the tailored log-softmax (autograd)."""
from __future__ import annotations

import torch

from .reference import OP_RANGES
from .sampling import check_logits, param_tensor, raise_pending


def op_params(alpha, temperature, rows: int, device):
    """``alpha`` and ``temperature`` of a companion op as float32 ``[rows]`` tensors, checked
    against :data:`ipa_fast.reference.OP_RANGES` (``ValueError`` naming the parameter; tensor
    values cost one host sync, Python numbers none)."""
    pending = []
    a = param_tensor("alpha", alpha, rows, device, validate=True, pending=pending, ranges=OP_RANGES)
    t = param_tensor("temperature", temperature, rows, device, validate=True, pending=pending, ranges=OP_RANGES)
    raise_pending(pending)
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
    a = a.unsqueeze(1)
    z = base.float()
    if adapter is not None:
        z = z + torch.where(a == 0, torch.zeros((), device=z.device), a * adapter.float())
    return torch.log_softmax(z / t.unsqueeze(1), dim=-1)
