"""The reference backend: the one definition of the sampler's semantics, in plain PyTorch.

Every fast path (C++ ``cpu``, ``triton``, ``cuda``) is tested against this file. It is written
for clarity, not speed: it sorts, and it accumulates masses in float64. docs/DESIGN.md §2
states the same semantics in prose; :data:`RANGES` below is the one definition of the
parameters' accepted values (used by :func:`ipa_fast.sample`, the companion ops, the
backends returned by :func:`ipa_fast.dispatch.resolve` and :func:`row_validity` here).

Inputs arrive normalised by :func:`ipa_fast.sampling.sample` — every parameter is a ``[B]``
tensor on the logits' device — so this module only states the maths:

    z        = (base + alpha * adapter) / T         (alpha == 0 ignores the adapter)
    top-k    : keep z >= the k-th largest z            (ties at the k-th value all kept)
    top-p    : over the top-k survivors, renormalised, keep i iff the mass of tokens with
               z strictly greater than z_i is < p      (value-based: tied tokens go together)
    min-p    : keep i iff pi_i >= min_p * max pi, i.e. exp(z_i - max z) >= min_p
    kept set : the intersection; it is always {i : z_i >= tau} for one threshold tau
    draw     : u from the Philox stream (``ipa_fast.rng``); token = smallest index i in the
               kept set whose inclusive cumulative kept mass (index order) exceeds u * total
    T == 0   : greedy argmax of base + alpha * adapter, lowest index on ties; logprobs at T = 1
               and filtered_logprobs = 0.
    invalid  : a row whose z holds a NaN or +inf (a finite logit divided by a tiny T can
               overflow), or has no finite entry, or whose parameters are outside
               :data:`RANGES`: token 0, logprobs NaN, valid False.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

FLOAT32_TINY = 2.0 ** -126                      # float32's smallest normal number, 1.1754944e-38
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # 3.4028235e+38
INT64_MAX = 2 ** 63 - 1
UINT64_END = 2 ** 64


@dataclass(frozen=True)
class Range:
    """The accepted values of one parameter.

    ``ok`` uses only comparisons and ``&`` / ``|``, so it answers for a Python number and,
    elementwise, for a tensor alike (NaN fails every rule). ``per_row``: a value outside the
    range makes a row invalid (False for ``seed`` / ``offset``, whose every int64 tensor value is
    a valid uint64 bit pattern and whose out-of-range Python ints have no representation at all).
    ``invalid``: the kernel-form value that marks a row invalid in every backend.
    """

    integer: bool
    ok: Callable
    rule: str
    per_row: bool = True
    invalid: float = float("nan")


RANGES = {
    "alpha": Range(False, lambda x: (x >= -FLOAT32_MAX) & (x <= FLOAT32_MAX),
                   "finite, with |alpha| <= 3.4028235e+38 (float32's largest)"),
    "temperature": Range(False, lambda x: (x == 0) | ((x >= FLOAT32_TINY) & (x <= FLOAT32_MAX)),
                         "0 (greedy) or in [1.1754944e-38, 3.4028235e+38] (float32's smallest normal "
                         "and largest finite numbers)", invalid=-1.0),
    "top_k": Range(True, lambda x: x >= 0, ">= 0 (0 = off; k >= V keeps every token)", invalid=-1),
    "top_p": Range(False, lambda x: (x > 0) & (x <= 1), "in (0, 1] (1 = off)", invalid=0.0),
    "min_p": Range(False, lambda x: (x >= 0) & (x <= 1), "in [0, 1] (0 = off)", invalid=-1.0),
    "seed": Range(True, lambda x: (x >= -(2 ** 63)) & (x < UINT64_END),
                  "an int in [-2**63, 2**64) (read modulo 2**64 as a uint64) or an integer [B] tensor",
                  per_row=False),
    "offset": Range(True, lambda x: (x >= 0) & (x < UINT64_END),
                    "an int in [0, 2**64) (a uint64) or an integer [B] tensor", per_row=False),
}

# The companion ops (tailored_log_softmax, tailored_token_stats) have no greedy limit: T > 0.
OP_RANGES = {
    "alpha": RANGES["alpha"],
    "temperature": Range(False, lambda x: (x >= FLOAT32_TINY) & (x <= FLOAT32_MAX),
                         "in [1.1754944e-38, 3.4028235e+38] (> 0: the op has no greedy limit)", invalid=-1.0),
}


def kernel_value(name: str, x):
    """An in-range value as the kernels take it. ``top_p`` below float32's smallest normal keeps
    the same tokens as that number does (the top value's alone: its mass is >= 1 / V), so it is
    raised to it rather than rounded to 0; ``top_k`` beyond int64 keeps every token, as
    ``2**63 - 1`` does."""
    if name == "top_p":
        return x.clamp(min=FLOAT32_TINY) if isinstance(x, torch.Tensor) else max(x, FLOAT32_TINY)
    if name == "top_k" and not isinstance(x, torch.Tensor):
        return min(x, INT64_MAX)
    return x


def mixed_logits(base: torch.Tensor, adapter: torch.Tensor | None, alpha: torch.Tensor) -> torch.Tensor:
    """float32 ``base + alpha * adapter`` ([B, V]), with rows where alpha == 0 ignoring the adapter."""
    z = base.float()
    if adapter is None:
        return z
    a = alpha.float().unsqueeze(1)
    term = torch.where(a == 0, torch.zeros((), device=z.device), a * adapter.float())
    return z + term


def row_validity(z: torch.Tensor, temperature, top_k, top_p, min_p) -> torch.Tensor:
    """[B] bool: logits usable (no NaN / +inf, some finite entry) and parameters in :data:`RANGES`
    (alpha needs no check here: a NaN or infinite alpha makes z NaN or infinite)."""
    ok = ~(torch.isnan(z) | (z == float("inf"))).any(dim=1)
    ok &= torch.isfinite(z).any(dim=1)
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p)):
        ok &= RANGES[name].ok(value)
    return ok


def kept_mask(z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """[B, V] bool: the tokens that survive top-k, then top-p, then min-p (rows valid, T > 0)."""
    B, V = z.shape
    sorted_z, _ = torch.sort(z, dim=1, descending=True)
    # top-k: threshold at the k-th largest value; k == 0 or k >= V keeps every token.
    k = torch.where((top_k <= 0) | (top_k >= V), torch.full_like(top_k, V), top_k)
    tau_k = sorted_z.gather(1, (k - 1).unsqueeze(1))
    keep = z >= tau_k
    # top-p over the top-k survivors: in descending order, the last position whose exclusive
    # cumulative mass is < p sets the threshold; its tied equals are then kept by value.
    m = sorted_z[:, :1]
    w = torch.exp((sorted_z - m).double()) * (sorted_z >= tau_k)
    total = w.sum(dim=1, keepdim=True)
    exclusive = torch.cumsum(w, dim=1) - w
    below = exclusive < top_p.double().unsqueeze(1) * total
    last = below.sum(dim=1, keepdim=True) - 1          # below is a prefix of True values
    tau_p = sorted_z.gather(1, last.clamp(min=0))
    keep &= (z >= tau_p) | (top_p >= 1).unsqueeze(1)
    # min-p relative to the row max (unchanged by renormalisation over the survivors).
    keep &= torch.exp(z - m) >= min_p.unsqueeze(1)
    return keep


def sample(base, adapter, alpha, temperature, top_k, top_p, min_p, seed, offset):
    """Returns (tokens int64, logprobs float32, filtered_logprobs float32, valid bool), each [B]."""
    from .rng import uniform

    B, V = base.shape
    x = mixed_logits(base, adapter, alpha)                    # T = 1 mixed logits
    greedy = temperature == 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float().unsqueeze(1)
    z = x / t
    # validity is judged on z itself: a tiny T can overflow finite logits to +inf
    valid = row_validity(z, temperature, top_k, top_p, min_p)
    z = torch.where(valid.unsqueeze(1), z, torch.zeros((), device=x.device))

    keep = kept_mask(z, top_k, top_p, min_p)
    m = z.max(dim=1, keepdim=True).values
    w = torch.exp((z - m).double()) * keep
    total = w.sum(dim=1, keepdim=True)
    u = uniform(seed, offset).to(z.device).unsqueeze(1)
    cdf = torch.cumsum(w, dim=1)
    hit = keep & (cdf > u * total)
    # the first hit; if rounding leaves none, the last kept token of positive weight
    last_kept = V - 1 - (w > 0).flip(1).int().argmax(dim=1)
    tokens = torch.where(hit.any(dim=1), hit.int().argmax(dim=1), last_kept)
    tokens = torch.where(greedy, z.argmax(dim=1), tokens)   # argmax returns the lowest index on ties

    z_tok = z.gather(1, tokens.unsqueeze(1)).squeeze(1)
    lse = torch.logsumexp(z.double(), dim=1)
    logprobs = (z_tok.double() - lse).float()
    filtered = (z_tok.double() - m.squeeze(1).double() - torch.log(total.squeeze(1))).float()
    filtered = torch.where(greedy, torch.zeros_like(filtered), filtered)

    nan = torch.full_like(logprobs, float("nan"))
    tokens = torch.where(valid, tokens, torch.zeros_like(tokens))
    return tokens, torch.where(valid, logprobs, nan), torch.where(valid, filtered, nan), valid
