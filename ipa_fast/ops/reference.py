"""The reference backend: the one definition of the sampler's semantics, in plain PyTorch.

Every fast path (C++ ``cpu``, ``triton``, ``cuda``) is tested against this file. It is written
for clarity, not speed: it sorts, and it accumulates masses in float64. docs/DESIGN.md §2
states the same semantics in prose; :data:`RANGES` below is the one definition of the
parameters' accepted values (used by :func:`ipa_fast.sample`, the companion ops, the
backends returned by :func:`ipa_fast.ops.dispatch.resolve` and :func:`row_validity` here).

Inputs arrive normalised by :func:`ipa_fast.ops.sampling.sample` — every parameter is a ``[B]``
tensor on the logits' device — so this module only states the maths:

    z        = (sum_k w_k * l_k) / T                 K experts l_k [B, V], weights w [B, K]
               (:func:`mix_experts`: float32, left to right; w_k == 0 ignores expert k;
               ``sample(base, adapter, alpha)`` is the K = 2 case with weights (1, alpha))
    top-k    : keep z >= the k-th largest z            (ties at the k-th value all kept)
    top-p    : over the top-k survivors, renormalised, keep i iff the mass of tokens with
               z strictly greater than z_i is < p      (value-based: tied tokens go together)
    min-p    : keep i iff pi_i >= min_p * max pi, i.e. exp(z_i - max z) >= min_p
    kept set : the intersection; it is always {i : z_i >= tau} for one threshold tau
    draw     : u from the Philox stream (``ipa_fast.ops.rng``); token = smallest index i in the
               kept set whose inclusive cumulative kept mass (index order) exceeds u * total
    T == 0   : greedy argmax of the mixed logits, lowest index on ties; logprobs at T = 1
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
    # every expert weight of sample_experts / the K-expert ops (alpha is weight 1 of K = 2)
    "weights": Range(False, lambda x: (x >= -FLOAT32_MAX) & (x <= FLOAT32_MAX),
                     "finite, with |w| <= 3.4028235e+38 (float32's largest)"),
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
    "weights": RANGES["weights"],
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


def mix_experts(experts, weights: torch.Tensor) -> torch.Tensor:
    """THE mix rule: float32 ``z = w_0 * l_0 + w_1 * l_1 + ... + w_{K-1} * l_{K-1}`` ([B, V]).

    ``experts``: K >= 1 logits tensors [B, V] (any float dtype, read as float32); ``weights``:
    [B, K] float32. Each term is ``w_k * l_k`` rounded to float32, summed left to right in
    float32 (no fused multiply-add). A weight of exactly 0 makes its term 0, so that expert is
    ignored even where it holds -inf or NaN. Every other IEEE result stands: -inf times a
    positive weight gives -inf (the token is masked); -inf times a negative weight gives +inf
    (and NaN with an opposing -inf), which makes the row invalid (see :func:`row_validity`), so
    an expert with a negative weight must be finite wherever the row is to stay valid.
    With weights (1, alpha) this is exactly ``base + alpha * adapter`` (1 * x == x in IEEE).
    """
    z = None
    for k, x in enumerate(experts):
        w = weights[:, k:k + 1].float()
        term = torch.where(w == 0, torch.zeros((), device=x.device), w * x.float())
        z = term if z is None else z + term
    return z


def full_weights(weights: torch.Tensor, unit_first: bool) -> torch.Tensor:
    """[B, K] weights from the kernel form: with ``unit_first`` expert 0 has weight 1 and
    ``weights`` ([B, K - 1]) holds the others (how ``sample(base, adapter, alpha)`` passes alpha)."""
    if not unit_first:
        return weights.float()
    ones = torch.ones(weights.shape[0], 1, dtype=torch.float32, device=weights.device)
    return torch.cat([ones, weights.float()], dim=1)


def mixed_logits(base: torch.Tensor, adapter: torch.Tensor | None, alpha: torch.Tensor) -> torch.Tensor:
    """float32 ``base + alpha * adapter`` ([B, V]): :func:`mix_experts` with weights (1, alpha)."""
    if adapter is None:
        return base.float()
    return mix_experts([base, adapter], full_weights(alpha.float().unsqueeze(1), True))


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
    """Returns (tokens int64, logprobs float32, filtered_logprobs float32, valid bool), each [B]:
    :func:`sample_experts` over ``[base, adapter]`` with weights (1, alpha) (``[base]`` alone
    when ``adapter`` is None)."""
    experts = [base] if adapter is None else [base, adapter]
    w = alpha.float().reshape(-1, 1)[:, :len(experts) - 1]
    return sample_experts(experts, w, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                          offset=offset, unit_first=True)


def sample_experts(experts, weights, *, temperature, top_k, top_p, min_p, seed, offset, unit_first=False):
    """The K-expert sampler: z = :func:`mix_experts` (experts, weights) / T, then the filters
    and the draw. ``weights``: [B, K] float32 ([B, K - 1] with ``unit_first``, see
    :func:`full_weights`). Returns (tokens, logprobs, filtered_logprobs, valid), each [B]."""
    from ipa_fast.ops.rng import uniform

    B, V = experts[0].shape
    x = mix_experts(experts, full_weights(weights, unit_first))   # T = 1 mixed logits
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
