"""``ipa_fast.sample``: argument checking, normalisation to per-row tensors, backend dispatch.

The semantics live in :mod:`ipa_fast.reference`; backends receive every parameter as a ``[B]``
tensor on the logits' device (float32 alpha / temperature / top_p / min_p, int64 top_k / seed /
offset) and return ``(tokens, logprobs, filtered_logprobs, valid)``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from . import dispatch as _dispatch
from .rng import as_int64_u64, draw_seeds

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class SampleOutput:
    tokens: torch.Tensor             # [B] int64
    logprobs: torch.Tensor           # [B] float32, log pi(token), unfiltered, at this T
    filtered_logprobs: torch.Tensor  # [B] float32, log-prob under the filtered, renormalised pi
    valid: torch.Tensor              # [B] bool


def check_logits(name: str, x: torch.Tensor, like: torch.Tensor | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, V], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have B >= 1 and V >= 1, got shape {tuple(x.shape)}")
    if like is not None:
        if x.shape != like.shape:
            raise ValueError(f"{name} shape {tuple(x.shape)} does not match logits shape {tuple(like.shape)}")
        if x.device != like.device:
            raise ValueError(f"{name} is on {x.device} but logits are on {like.device}")


def per_row(name: str, value, batch: int, device, dtype, integer: bool) -> torch.Tensor:
    """A Python scalar or a [B] tensor -> a [B] tensor of ``dtype`` on ``device``."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(batch)
        if value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(f"{name} must be a scalar or a [B] = [{batch}] tensor, got shape {tuple(value.shape)}")
        if integer and value.is_floating_point():
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        if value.dtype == torch.bool:
            raise TypeError(f"{name} must be numeric, got a bool tensor")
        return value.to(device=device, dtype=dtype, non_blocking=True).contiguous()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or a [B] tensor, got {type(value).__name__}")
    if integer and not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return torch.full((batch,), value, dtype=dtype, device=device)


_INTEGER = {"alpha": False, "temperature": False, "top_k": True, "top_p": False, "min_p": False}
_RULES = {  # name -> (predicate on a scalar or a tensor, the rule in words)
    "alpha": (lambda x: abs(x) < float("inf") if not isinstance(x, torch.Tensor) else torch.isfinite(x), "finite"),
    "temperature": (lambda x: x >= 0, ">= 0"),
    "top_k": (lambda x: x >= 0, ">= 0 (0 = off)"),
    "top_p": (lambda x: (x > 0) & (x <= 1), "in (0, 1] (1 = off)"),
    "min_p": (lambda x: (x >= 0) & (x <= 1), "in [0, 1] (0 = off)"),
}


def _check_ranges(raw: dict) -> None:
    """Python scalars are checked in Python; tensors with one host sync for all of them."""
    tensors = {}
    for name, value in raw.items():
        ok, rule = _RULES[name]
        if isinstance(value, torch.Tensor):
            tensors[name] = ok(value if _INTEGER[name] else value.float()).reshape(-1).all()
        elif isinstance(value, numbers.Real) and not isinstance(value, bool) and not ok(value):
            raise ValueError(f"{name} must be {rule}, got {value}")
    if tensors:
        flags = torch.stack(list(tensors.values())).tolist()  # the one host sync
        for (name, _), good in zip(tensors.items(), flags):
            if not good:
                value = raw[name].reshape(-1)
                bad = value[~_RULES[name][0](value)][0].item()
                raise ValueError(f"{name} must be {_RULES[name][1]}, got {bad}")


def seeds_for(seed, generator, batch: int, device) -> torch.Tensor:
    if seed is not None and generator is not None:
        raise TypeError("pass either seed or generator, not both")
    if seed is None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return draw_seeds(batch, generator).to(device)
    if isinstance(seed, torch.Tensor):
        return per_row("seed", seed, batch, device, torch.int64, integer=True)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or a [B] int64 tensor, got {type(seed).__name__}")
    base = as_int64_u64(int(seed))
    rows = torch.arange(batch, dtype=torch.int64, device=device)
    return rows + base  # int64 addition wraps modulo 2**64, as uint64 seeds do


def sample(logits, adapter_logits=None, *, alpha=1.0, temperature=1.0, top_k=0, top_p=1.0,
           min_p=0.0, seed=None, generator=None, offset=0, validate=True, backend="auto") -> SampleOutput:
    """Mix, filter and draw one token per row: ``softmax((logits + alpha*adapter_logits)/T)``.

    See SPEC §2 and :mod:`ipa_fast.reference` for the exact semantics. ``validate=False`` skips
    every host sync (CUDA-graph capture): invalid rows then get token 0 and ``valid=False``.
    """
    check_logits("logits", logits)
    if adapter_logits is not None:
        check_logits("adapter_logits", adapter_logits, like=logits)
    B = logits.shape[0]
    dev = logits.device
    raw = dict(alpha=alpha, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    if validate:
        _check_ranges(raw)
    params = {name: per_row(name, raw[name], B, dev, _INTEGER[name] and torch.int64 or torch.float32,
                            integer=_INTEGER[name]) for name in raw}
    params["seed"] = seeds_for(seed, generator, B, dev)
    params["offset"] = per_row("offset", offset, B, dev, torch.int64, integer=True)
    impl = _dispatch.resolve(backend, logits)
    tokens, logprobs, filtered, valid = impl(
        logits.contiguous(), None if adapter_logits is None else adapter_logits.contiguous(), **params)
    if validate and not bool(valid.all()):
        row = int((~valid).nonzero()[0, 0])
        raise ValueError(
            f"logits row {row} is invalid: it holds NaN or +inf, or every token is -inf "
            f"(after mixing with adapter_logits)")
    return SampleOutput(tokens, logprobs, filtered, valid)
