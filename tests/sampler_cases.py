"""Shared helpers for the sampler tests of every backend (reference, cpu, triton, cuda).

A new backend joins by being listed in ``BACKENDS``; ``backend_params()`` skips the ones
``ipa_fast.backends()`` reports unavailable. Oracles here are independent of ipa_fast's own
code: transformers' warpers for kept sets, float64 softmax for probabilities.
"""
from __future__ import annotations

import math

import pytest
import torch
from transformers import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import ipa_fast

BACKENDS = ["reference", "cpu"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def backend_params(names=BACKENDS):
    """``pytest.param`` per backend, skipped with the reason when it is unavailable here."""
    status = ipa_fast.backends()
    out = []
    for name in names:
        reason = status.get(name, "unknown backend")
        marks = [] if reason == "ok" else [pytest.mark.skip(reason=f"backend {name}: {reason}")]
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def random_logits(batch: int, vocab: int, *, seed: int = 0, scale: float = 2.0, dtype=torch.float32,
                  masked: float = 0.0) -> torch.Tensor:
    """Gaussian logits times ``scale``; a fraction ``masked`` of entries set to -inf (never a whole row)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, vocab, generator=g) * scale
    if masked > 0:
        drop = torch.rand(batch, vocab, generator=g) < masked
        drop[:, 0] = False
        x = x.masked_fill(drop, float("-inf"))
    return x.to(dtype)


def random_params(batch: int, vocab: int, *, seed: int = 0) -> dict:
    """Per-row parameters mixing every filter on and off (T > 0)."""
    g = torch.Generator().manual_seed(seed + 1)
    r = torch.rand(batch, 6, generator=g)
    top_k = torch.where(r[:, 0] < 0.5, torch.zeros(batch), 1 + (r[:, 1] * min(vocab, 64)).floor()).long()
    top_p = torch.where(r[:, 2] < 0.3, torch.ones(batch), 0.05 + 0.9 * r[:, 3])
    min_p = torch.where(r[:, 4] < 0.6, torch.zeros(batch), 0.3 * r[:, 5])
    temperature = 0.5 + torch.rand(batch, generator=g)
    a = torch.rand(batch, generator=g)
    alpha = torch.where(a < 0.1, torch.zeros(batch), a * 1.5)  # >= 0: a masked (-inf) adapter stays -inf
    return dict(top_k=top_k, top_p=top_p.float(), min_p=min_p.float(), temperature=temperature.float(),
                alpha=alpha.float())


def mixed(base, adapter, alpha, temperature) -> torch.Tensor:
    """float32 ``(base + alpha * adapter) / T`` per row, as docs/DESIGN.md §2.4 states it (alpha == 0 drops the adapter)."""
    z = base.float()
    if adapter is not None:
        a = torch.as_tensor(alpha, dtype=torch.float32).reshape(-1, 1).expand(z.shape[0], 1)
        z = z + torch.where(a == 0, torch.zeros(()), a * adapter.float())
    t = torch.as_tensor(temperature, dtype=torch.float32).reshape(-1, 1)
    return z / t


def _row_param(value, row):
    return value[row].item() if isinstance(value, torch.Tensor) else value


def hf_kept_mask(z: torch.Tensor, top_k, top_p, min_p) -> torch.Tensor:
    """[B, V] bool: what transformers' TopK -> TopP -> MinP warper chain keeps, row by row."""
    B, V = z.shape
    keep = torch.zeros(B, V, dtype=torch.bool)
    for row in range(B):
        s = z[row:row + 1].clone()
        k, p, mp = int(_row_param(top_k, row)), float(_row_param(top_p, row)), float(_row_param(min_p, row))
        if k > 0:
            s = TopKLogitsWarper(top_k=k)(None, s)
        if p < 1.0:
            s = TopPLogitsWarper(top_p=p)(None, s)
        if mp > 0.0:
            s = MinPLogitsWarper(min_p=mp)(None, s)
        keep[row] = s[0] > float("-inf")
    return keep


def boundary_near_tie(z: torch.Tensor, top_k, top_p, min_p, tol: float = 1e-6) -> torch.Tensor:
    """[B] bool: rows whose kept set is decided by a tie or a near-tie (docs/DESIGN.md §2.5): at the top-p
    boundary (equal values there, or an exclusive mass within ``tol`` of p), or a token whose
    pi / max pi is within a relative 1e-5 of min_p. Such rows may differ from HF legitimately."""
    B, V = z.shape
    out = torch.zeros(B, dtype=torch.bool)
    zd = z.double()
    for row in range(B):
        k, p, mp = int(_row_param(top_k, row)), float(_row_param(top_p, row)), float(_row_param(min_p, row))
        v, _ = torch.sort(zd[row], descending=True)
        if 0 < k < V:
            v = v[v >= v[k - 1]]
        w = torch.exp(v - v[0])
        if p < 1.0:
            probs = w / w.sum()
            excl = torch.cumsum(probs, 0) - probs
            last = int((excl < p).sum()) - 1
            if bool(((excl - p).abs() < tol).any()):
                out[row] = True
            elif last + 1 < len(v) and v[last] == v[last + 1]:
                out[row] = True
        if mp > 0.0 and bool(((w - mp).abs() <= 1e-5 * mp).any()):
            out[row] = True
    return out


def filtered_probs(z_row: torch.Tensor, keep_row: torch.Tensor) -> torch.Tensor:
    """float64 probabilities of the filtered, renormalised distribution of one row."""
    zd = z_row.double()
    w = torch.exp(zd - zd.max()) * keep_row
    return w / w.sum()


def log_softmax64(z: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(z.double(), dim=-1)


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square p-value of observed ``counts`` against ``probs`` (zero-prob cells must be empty)."""
    from scipy.stats import chisquare

    support = probs > 0
    assert int(counts[~support].sum()) == 0, "a token outside the kept set was drawn"
    n = counts.sum().item()
    return float(chisquare(counts[support].double().numpy(), (probs[support] * n).numpy()).pvalue)


def ulps(a: float, b: float) -> float:
    return abs(a - b) / max(math.ulp(abs(b)), 1e-45)


