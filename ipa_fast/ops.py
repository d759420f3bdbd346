"""Companion ops with the sampler's semantics: the tailored log-softmax (autograd)."""
from __future__ import annotations

import torch

from .sampling import check_logits, per_row


def tailored_log_softmax(base: torch.Tensor, adapter: torch.Tensor | None = None, alpha=1.0,
                         temperature=1.0) -> torch.Tensor:
    """``log_softmax((base + alpha * adapter) / T)`` over the vocabulary, float32 ``[B, V]``.

    Differentiable w.r.t. ``adapter`` (and ``base``). ``alpha`` and ``temperature`` are scalars
    or ``[B]`` tensors; ``temperature`` must be > 0 (greedy has no log-softmax). Rows where
    ``alpha == 0`` ignore the adapter (no ``0 * -inf`` NaN).
    """
    check_logits("base", base)
    if adapter is not None:
        check_logits("adapter", adapter, like=base)
    B = base.shape[0]
    a = per_row("alpha", alpha, B, base.device, torch.float32, integer=False).unsqueeze(1)
    t = per_row("temperature", temperature, B, base.device, torch.float32, integer=False)
    if not bool((t > 0).all()):
        raise ValueError(f"temperature must be > 0 for tailored_log_softmax, got {t.min().item()}")
    z = base.float()
    if adapter is not None:
        z = z + torch.where(a == 0, torch.zeros((), device=z.device), a * adapter.float())
    return torch.log_softmax(z / t.unsqueeze(1), dim=-1)
