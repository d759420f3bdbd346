"""The sampler's random stream: Philox-4x32-10 keyed by a per-row seed, countered by an offset.

This is part of the public API (``RNG_STREAM_VERSION``, docs/DESIGN.md §3): golden tests pin
the tokens it gives; any change to what follows is a new stream version.

For row ``r`` with seed ``s`` (uint64) and offset ``o`` (uint64):

    key     = (lo32(s), hi32(s))
    counter = (lo32(o), hi32(o), 0, 0)
    x0, x1, x2, x3 = philox4x32_10(counter, key)
    u = ((x0 << 21 | x1 >> 11) + 0.5) * 2**-53          # a double in (0, 1)

which is what Triton's ``tl.randint4x(seed, offset)`` computes, and what the C++ and CUDA
kernels compute (``csrc/philox.h``). Known answer (Random123): key (0, 0), counter (0, 0, 0, 0)
gives 0x6627e8d5 0xe169c58d 0xbc57ac4c 0x9b00dbd8. The row's token is then the smallest kept
index whose inclusive cumulative kept mass exceeds ``u`` times the total kept mass.

This module is the reference; it works on any device with int64 arithmetic only (a 32x32-bit
product is split so it never overflows int64).
"""
from __future__ import annotations

import torch

RNG_STREAM_VERSION = 1

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product of constant ``a`` and uint32 ``b`` (int64)."""
    a_hi, a_lo = a >> 16, a & _MASK16
    p_lo = b * a_lo                      # < 2**48
    p_hi = b * a_hi                      # < 2**48
    mid = p_hi + (p_lo >> 16)            # product >> 16, < 2**49
    hi = mid >> 16
    lo = ((mid & _MASK16) << 16) | (p_lo & _MASK16)
    return hi & _MASK32, lo & _MASK32


def philox4x32_10(counter: tuple, key: tuple) -> tuple[torch.Tensor, ...]:
    """Philox-4x32 with 10 rounds. ``counter`` four and ``key`` two int64 tensors holding uint32."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for rnd in range(10):
        if rnd:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def split_u64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lo32, hi32 of int64 tensors read as uint64 (two's complement)."""
    x = x.to(torch.int64)
    return x & _MASK32, (x >> 32) & _MASK32


def uniform(seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Per-row uniforms in (0, 1), float64, from int64 ``seed`` and ``offset`` tensors of one shape."""
    s_lo, s_hi = split_u64(seed)
    o_lo, o_hi = split_u64(offset)
    zero = torch.zeros_like(o_lo)
    x0, x1, _, _ = philox4x32_10((o_lo, o_hi, zero, zero), (s_lo, s_hi))
    bits53 = (x0 << 21) | (x1 >> 11)
    return (bits53.to(torch.float64) + 0.5) * 2.0**-53


def as_int64_u64(value: int) -> int:
    """A Python int read modulo 2**64, as the int64 with the same bits."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def draw_seeds(batch: int, generator: torch.Generator | None) -> torch.Tensor:
    """Per-row seeds drawn from ``generator`` (torch's default generator when None), int64 on CPU."""
    return torch.randint(-(2**63), 2**63 - 1, (batch,), dtype=torch.int64,
                         generator=generator, device="cpu")
