"""Sampler backends: which are available, and which one ``backend="auto"`` picks.

Each backend is a function ``impl(base, adapter, *, alpha, temperature, top_k, top_p, min_p,
seed, offset) -> (tokens, logprobs, filtered_logprobs, valid)`` over normalised ``[B]``
parameter tensors (see :mod:`ipa_fast.sampling`). Loading is lazy and its failure is kept as
the reason shown by :func:`backends`.
"""
from __future__ import annotations

import functools
import os

import torch

ORDER_CPU = ("cpu", "reference")
# CUDA: the one-launch CUDA kernel first (no Python launch overhead), then the Triton kernels.
# Unmeasured on a GPU so far: benchmarks/gpu_check.sh prints which is faster; reorder from that.
ORDER_CUDA = ("cuda", "triton", "reference")


def _load_reference():
    from . import reference
    return reference.sample


def _load_cpu():
    from . import cpu_backend
    return cpu_backend.sample


def _load_triton():
    from .kernels import sampler_triton
    return sampler_triton.sample


def _load_cuda():
    from . import cuda_backend
    return cuda_backend.sample


_LOADERS = {"reference": _load_reference, "cpu": _load_cpu, "triton": _load_triton, "cuda": _load_cuda}


@functools.lru_cache(maxsize=None)
def _load(name: str):
    """(impl, None) or (None, reason)."""
    try:
        return _LOADERS[name](), None
    except Exception as exc:  # the reason is what backends() reports
        return None, f"{type(exc).__name__}: {exc}"


def auto_choice(device_type: str) -> str:
    """The backend ``backend="auto"`` uses for tensors on ``device_type`` ("cpu" or "cuda")."""
    order = ORDER_CUDA if device_type == "cuda" else ORDER_CPU
    return next(name for name in order if _load(name)[0] is not None or name == "reference")


def backends() -> dict[str, str]:
    """``{name: "ok" | reason}`` for every backend; ``reference`` always works.

    The extra key ``"auto"`` says what ``backend="auto"`` picks, e.g. ``"cpu tensors: cpu; cuda
    tensors: cuda"`` (the CUDA pick is shown even where no GPU is present).
    """
    out = {}
    for name in _LOADERS:
        impl, reason = _load(name)
        if impl is None:
            out[name] = reason
        elif name in ("cuda",) and not torch.cuda.is_available():
            out[name] = "built, but no CUDA device is available"
        elif name == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            out[name] = "importable, but needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"
        else:
            out[name] = "ok"
    out["auto"] = f"cpu tensors: {auto_choice('cpu')}; cuda tensors: {auto_choice('cuda')}"
    return out


def resolve(name: str, logits: torch.Tensor):
    """The implementation for ``name`` on ``logits``' device, or a clear error."""
    if name == "auto":
        order = ORDER_CUDA if logits.device.type == "cuda" else ORDER_CPU
        for candidate in order:
            impl, _ = _load(candidate)
            if impl is not None:
                return impl
        raise RuntimeError("no sampler backend could be loaded")  # reference always loads
    if name not in _LOADERS:
        raise ValueError(f"backend must be one of {['auto', *_LOADERS]}, got {name!r}")
    impl, reason = _load(name)
    if impl is None:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    dev = logits.device.type
    if name == "cpu" and dev != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got logits on {logits.device}")
    if name == "cuda" and dev != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got logits on {logits.device}")
    if name == "triton" and dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend 'triton' runs on CPU tensors only under TRITON_INTERPRET=1")
    return impl
