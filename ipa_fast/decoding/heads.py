"""One output head for the whole product: mixing hidden states instead of logits.

When the base and every expert end in the same linear output head ``E`` (no bias, no logit
transform after it), as the embedded base and the adapters over its tied embedding do, the mix is

    z = w_0 * E h_base + sum_k w_k * E h_k  =  E (w_0 h_base + sum_k w_k h_k)

with ``h`` each model's last hidden state after its final norm: one ``[B, d] x [d, V]`` product per
step instead of one per model (for a residual adapter, ``h_k = h_trained - h_initial``). The
head is the largest single matrix of a small model (SmolLM2-135M: 28M of its 135M parameters;
the 4-layer adapter initialisation: 28M of 42M), so this removes most of an adapter's cost per
token. The logits differ from the per-model sum by float rounding only (docs/DESIGN.md §5.8).

:func:`shared_head` decides whether a set of models qualifies — every output head is the base's
(the same tensor, or equal values), has no bias, and each model's logits equal its head applied
to its decoder's last hidden state on a probe input (which rules out soft-capping, scaling or
any other transform after the head) — and :func:`final_hidden` runs one model up to that hidden
state with its KV cache.
"""
from __future__ import annotations

import torch

from ipa_fast.decoding.residual import ResidualAdapter

# A probe's logits must match head(hidden) to this relative tolerance (float32 rounding of a
# 576-term dot product is ~1e-6 relative; a soft-cap or a scale is off by far more)
PROBE_RTOL = 1e-3


def leaves(model) -> list:
    """The plain causal LMs inside ``model`` (a residual adapter's two networks)."""
    return [model.trained, model.initial] if isinstance(model, ResidualAdapter) else [model]


def _head_weight(model):
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return None
    return head.weight


def _probe_linear(model, weight) -> bool:
    """Whether ``model``'s logits are ``weight @ hidden`` on a short probe input."""
    decoder = getattr(model, "base_model", None)
    if decoder is None or decoder is model:
        return False
    device = weight.device
    n = min(4, weight.shape[0] - 1)
    ids = torch.arange(1, n + 1, device=device).view(1, -1)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
        mine = (hidden.to(weight.dtype) @ weight.T).float()
    if mine.shape != logits.shape:
        return False
    scale = logits.abs().max().clamp(min=1.0)
    return bool(((mine - logits).abs().max() <= PROBE_RTOL * scale).item())


def shared_head(base, experts) -> torch.Tensor | None:
    """The output head weight ``[V_model, d]`` that ``base`` and every expert share (the base's
    own tensor), or None when one of them has another head, a bias, a transform after its head,
    or is not a local Hugging Face causal LM (an API base, a cached-LM object)."""
    if not isinstance(base, torch.nn.Module):
        return None
    weight = _head_weight(base)
    if weight is None:
        return None
    models = [base]
    for e in experts:
        if not isinstance(e, torch.nn.Module):
            return None
        models += leaves(e)
    for m in models:
        w = _head_weight(m)
        if w is None or w.shape != weight.shape or w.device != weight.device:
            return None
        if w is not weight and w.data_ptr() != weight.data_ptr() and not torch.equal(w, weight):
            return None
    if not all(_probe_linear(m, weight) for m in models):
        return None
    return weight


def head_key(base, experts) -> tuple:
    """What :func:`shared_head`'s answer depends on, cheaply: each head tensor and its version
    counter (an in-place update moves it) — a changed key means asking again."""
    models = [base] + [leaf for e in experts if isinstance(e, torch.nn.Module) for leaf in leaves(e)]
    out = []
    for m in models:
        w = _head_weight(m) if isinstance(m, torch.nn.Module) else None
        out.append((id(m), None if w is None else (id(w), w._version)))
    return tuple(out) + (len(experts),)


def final_hidden(model, *, cache=None, use_cache: bool = False, **kwargs):
    """``(hidden [B, L, d], cache)``: ``model``'s last hidden state after its final norm (what its
    output head multiplies), ``trained - initial`` for a residual adapter (whose cache is the
    pair of the two networks' caches)."""
    if isinstance(model, ResidualAdapter):
        c_t, c_i = cache if cache is not None else (None, None)
        h_t, c_t = final_hidden(model.trained, cache=c_t, use_cache=use_cache, **kwargs)
        h_i, c_i = final_hidden(model.initial, cache=c_i, use_cache=use_cache, **kwargs)
        return h_t - h_i.to(h_t.dtype), ((c_t, c_i) if use_cache else None)
    out = model.base_model(cache=cache, use_cache=use_cache, **kwargs)
    return out.last_hidden_state, (out.cache if use_cache else None)
