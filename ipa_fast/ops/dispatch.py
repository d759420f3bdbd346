"""Sampler backends: which are available, and which one ``backend="auto"`` picks
(docs/DESIGN.md §2.8).

Each backend is a module with two functions over normalised ``[B]`` parameter tensors (see
:func:`ipa_fast.ops.sampling.prepare`): ``sample(base, adapter, *, alpha, temperature, top_k, top_p,
min_p, seed, offset)`` and ``sample_experts(experts, weights, *, temperature, ..., offset)``
(weights ``[B, K]`` float32), each returning ``(tokens, logprobs, filtered_logprobs, valid)``. The
registered op ``torch.ops.ipa_fast.sample_experts`` (:mod:`ipa_fast.ops.sampling`) is the one caller
of these entries (:func:`backend_module`); :func:`resolve` hands one backend out behind the
sampler's checks. Loading is lazy and its failure is kept as the reason shown by :func:`backends`.
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
    from ipa_fast.ops import reference
    return reference


def _load_cpu():
    from ipa_fast.ops import cpu_backend
    return cpu_backend


def _load_triton():
    from ipa_fast.kernels import sampler_triton
    return sampler_triton


def _load_cuda():
    from ipa_fast.ops import cuda_backend
    return cuda_backend


_LOADERS = {"reference": _load_reference, "cpu": _load_cpu, "triton": _load_triton, "cuda": _load_cuda}


@functools.lru_cache(maxsize=None)
def _load(name: str):
    """(backend module, None) or (None, reason)."""
    try:
        return _LOADERS[name](), None
    except Exception as exc:  # the reason is what backends() reports
        return None, f"{type(exc).__name__}: {exc}"


def auto_choice(device_type: str) -> str:
    """The backend ``backend="auto"`` uses for tensors on ``device_type`` ("cpu" or "cuda")."""
    order = ORDER_CUDA if device_type == "cuda" else ORDER_CPU
    return next(name for name in order if _load(name)[0] is not None or name == "reference")


def backends() -> dict[str, str]:
    """``{name: "ok" | reason}`` for every sampler backend; ``reference`` always works.

    Backends (all with the semantics of :func:`ipa_fast.sample`):

    - ``"reference"``: pure PyTorch, the oracle; any device.
    - ``"cpu"``: the C++ extension ``ipa_fast._C``; CPU tensors.
    - ``"triton"``: the Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
    - ``"cuda"``: the CUDA extension ``ipa_fast._C_cuda``; CUDA tensors.

    A reason says why a backend cannot run here (not built, built for another torch, no CUDA
    device, ...). ``backend="auto"`` takes, for CPU tensors, ``cpu`` then ``reference``; for CUDA
    tensors ``cuda``, ``triton``, then ``reference``: the first that loads (never ``triton`` for
    CPU tensors). The extra key ``"auto"`` says what it picks, e.g. ``"cpu tensors: cpu; cuda
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


def backend_module(name: str, logits: torch.Tensor):
    """The raw implementation for ``name`` on ``logits``' device, or a clear error.

    It trusts its inputs: every parameter must already be in the normalised ``[B]`` form that
    :func:`ipa_fast.ops.sampling.prepare` makes (a wrong dtype would be read as other bits). The
    registered op ``torch.ops.ipa_fast.sample_experts`` calls it; use :func:`resolve` (or
    :func:`ipa_fast.sample`) unless the inputs come from ``prepare``.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
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


def resolve(name: str, logits: torch.Tensor):
    """The backend ``name`` for ``logits``' device, as a function with the checks of
    :func:`ipa_fast.sample` (``validate=False``)::

        impl = resolve("cpu", logits)
        tokens, logprobs, filtered_logprobs, valid = impl(logits, adapter_logits, alpha=..., seed=...)

    ``impl(base, adapter=None, *, alpha=1.0, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
    seed, offset=0)`` takes what :func:`ipa_fast.sample` takes (numbers or ``[B]`` tensors; the
    ranges of :data:`ipa_fast.ops.reference.RANGES`) and never synchronises with the device, so it can
    be timed in a loop or captured in a CUDA graph: types, shapes and devices raise as in
    ``sample``; out-of-range parameter values give invalid rows (token 0, ``valid = False``).
    """
    backend_module(name, logits)  # an unknown or unavailable backend raises here, not at the first call

    def checked(base, adapter=None, *, alpha=1.0, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed,
                offset=0):
        from ipa_fast.ops.sampling import sample

        if isinstance(base, torch.Tensor) and base.device != logits.device:
            raise ValueError(f"backend {name!r} was resolved for {logits.device}, got logits on {base.device}")
        s = sample(base, adapter, alpha=alpha, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   seed=seed, offset=offset, validate=False, backend=name)
        return s.tokens, s.logprobs, s.filtered_logprobs, s.valid

    return checked
