"""Tailored decoding: a frozen base LM and small expert LMs stepping in lock step.

    pi(x_t | x_<t)  ∝  p_base(x_t | x_<t) · p_adapter(x_t | adapter_prefix, x_<t)^alpha

    lm = TailoredLM.from_pretrained("path/to/base", "path/to/adapter", alpha=1.0)
    out = lm.generate(["The cat"], max_new_tokens=32, top_p=0.9, seed=0)
    out.texts, out.token_ids, out.logprobs

More generally the base and K >= 1 experts, each with its own weight and prefix, are mixed as
``z = base + sum_k w_k * expert_k`` (``TailoredLM(base, experts=[...], weights=[...])``; the
adapter above is the case K = 1 with ``w_0 = alpha``). The presets :meth:`TailoredLM.ipa`,
:meth:`~TailoredLM.compose`, :meth:`~TailoredLM.dexperts` and :meth:`~TailoredLM.proxy_tuning`
name the usual formulas.

The loop (:meth:`TailoredLM.generate`) reads top to bottom: encode → left-pad → prefill every
model (each with its own KV cache) → per step: trim logits to the shared vocabulary V, hard
masks, one fused :func:`ipa_fast.sample_experts` call (the mix happens in the kernel),
bookkeeping, one cached forward of each model. A row's randomness is keyed by (its seed, the
unpadded position of the token being drawn), so its output does not depend on the batch it is in.
"""
from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ipa_fast.decoding.heads import final_hidden, head_key, shared_head
from ipa_fast.decoding.residual import ResidualAdapter
from ipa_fast.ops.log_softmax import experts_log_softmax
from ipa_fast.ops.reference import RANGES, mix_experts
from ipa_fast.ops.sampling import sample_experts

ADAPTER_META_FILE = "ipa_adapter.json"
ADAPTER_META_VERSION = 1


@dataclass
class GenerationOutput:
    """What :meth:`TailoredLM.generate` returns; every field is a list with one entry per prompt.

    ``token_ids`` / ``logprobs`` / ``adapter_logprobs`` are ragged: generated tokens only, EOS
    included when drawn, tokens up to the one that completed a stop string included.
    ``logprobs[r][t]`` is the sampler's: log pi(token) under the *unfiltered* tailored policy at
    the call's temperature, after hard masks / repetition penalty (log pi at T=1 for greedy rows).
    ``adapter_logprobs[r][t]`` is the adapter's own log-softmax at T=1 (its own prefix, no
    masks) of the chosen token, when asked for (``generate(..., output_adapter_logprobs=True)``;
    None otherwise).
    ``texts`` are the decoded generated tokens (special tokens skipped), cut before the first
    stop string. ``finish_reasons`` is "eos", "stop" or "length".
    """
    texts: list[str]
    token_ids: list[list[int]]
    logprobs: list[list[float]]
    adapter_logprobs: list[list[float]] | None
    finish_reasons: list[str]
    prompt_token_ids: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("texts", "token_ids", "logprobs", "adapter_logprobs",
                                              "finish_reasons", "prompt_token_ids")}


@dataclass
class ScoreOutput:
    """Teacher-forced scores of given completions: one ``[len(completion)]`` float32 tensor per row.

    ``logprobs``: log pi under the tailored policy at ``temperature`` (no masks, no penalty);
    ``adapter_logprobs``: the adapter's own log-softmax at T=1. Differentiable w.r.t. the
    adapter's parameters when called with grad enabled.
    """
    logprobs: list[torch.Tensor]
    adapter_logprobs: list[torch.Tensor]


# ----------------------------------------------------------------------------------------------
# One model with a KV cache, over a left-padded batch
# ----------------------------------------------------------------------------------------------

def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, L], attention_mask [B, L])`` with every row right-aligned."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, L - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, L - len(r):] = 1
    return ids.to(device), mask.to(device)


class CachedLM:
    """A Hugging Face causal LM decoding a left-padded batch with its own KV cache.

    ``prefill(rows)`` runs the prompts and returns the next-token logits ``[B, V_model]``;
    ``step(tokens)`` appends one token per row and returns the next logits. Position ids come
    from the attention mask (pads do not count), so a row's positions equal its unpadded ones.
    """

    def __init__(self, model, pad_id: int = 0, hidden: bool = False):
        self.model = model
        self.pad_id = pad_id
        self.hidden = hidden
        self.device = next(model.parameters()).device

    def prefill(self, rows: list[list[int]], max_new_tokens: int) -> torch.Tensor:
        ids, mask = left_pad(rows, self.pad_id, self.device)
        B, P = ids.shape
        # The whole mask is allocated once; each step uses one more column of it.
        self.mask = torch.ones((B, P + max_new_tokens), dtype=torch.long, device=self.device)
        self.mask[:, :P] = mask
        self.width = P
        self.next_pos = mask.sum(1)  # [B] unpadded position of the next input token
        pos = (mask.cumsum(1) - 1).clamp_(min=0)
        last, self.cache = self._forward(input_ids=ids, attention_mask=mask, position_ids=pos, cache=None,
                                         prefill=True)
        return last

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.width += 1
        last, self.cache = self._forward(input_ids=tokens.to(self.device).view(-1, 1),
                                         attention_mask=self.mask[:, :self.width],
                                         position_ids=self.next_pos.view(-1, 1), cache=self.cache, prefill=False)
        self.next_pos = self.next_pos + 1
        return last

    def _forward(self, *, prefill: bool, **kwargs):
        """``(the last position's output, the new cache)``: its logits ``[B, V_model]``, or with
        ``hidden`` its last hidden state ``[B, d]`` (after the final norm; the residual of a
        residual adapter) for the shared-head path, where one product with the common output head
        follows the mix (:mod:`ipa_fast.decoding.heads`)."""
        if self.hidden:
            hidden, cache = final_hidden(self.model, use_cache=True, **kwargs)
            return hidden[:, -1], cache
        out = self.model(use_cache=True, **kwargs, **({"logits_to_keep": 1} if prefill else {}))
        return out.logits[:, -1], out.cache


class SparseBase:
    """A local base reduced to its top-k log-probs per step, densified with ``-inf`` outside
    them: the in-process twin of an API-only base (docs/DESIGN.md §2.10 sparse base)."""

    def __init__(self, lm: CachedLM, top_k: int, vocab_size: int):
        self.lm, self.top_k, self.V = lm, top_k, vocab_size
        self.vocab_size = vocab_size  # as the cached-LM protocol names it (a SparseBase may be an expert)

    def _sparse(self, logits: torch.Tensor) -> torch.Tensor:
        lp = torch.log_softmax(logits[:, :self.V].float(), dim=-1)
        vals, ids = lp.topk(min(self.top_k, self.V), dim=-1)
        return densify_top_k(ids, vals, self.V)

    def prefill(self, rows, max_new_tokens):
        return self._sparse(self.lm.prefill(rows, max_new_tokens))

    def step(self, tokens):
        return self._sparse(self.lm.step(tokens))


def densify_top_k(ids: torch.Tensor, values: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[B, K]`` ids + log-probs → ``[B, V]`` float32 with ``-inf`` outside the top-k."""
    dense = torch.full((ids.shape[0], vocab_size), float("-inf"), dtype=torch.float32, device=ids.device)
    return dense.scatter_(1, ids, values.float())


class StaticCachedLM(CachedLM):
    """A :class:`CachedLM` over a pre-allocated (static) KV cache, for the compiled decode step.

    ``prefill`` allocates a transformers ``StaticCache`` of ``max_cache_len`` = prompt width +
    ``max_new_tokens`` rounded up to a multiple of :data:`STATIC_CACHE_BUCKET` (calls whose
    lengths round alike share a compiled graph) and an attention mask of that width (pads 0,
    every later slot 1: the causal mask hides the slots not written yet). ``forward_step(tokens)``
    — the part that is traced — writes one slot per row at the cache's own position counter and
    reads the whole mask, so every step has the same shapes; the caller advances ``next_pos``
    (each row's unpadded position) in place. ``top_k``: reduce the logits to their top-k log-probs as
    :class:`SparseBase` does (``vocab_size`` = V then). ``hidden``: return the last hidden state
    instead of logits, as :class:`CachedLM` does (the shared-head path). A residual adapter gets
    one static cache per network.
    """

    def __init__(self, model, pad_id: int = 0, top_k: int | None = None, vocab_size: int | None = None,
                 hidden: bool = False):
        super().__init__(model, pad_id, hidden)
        self.top_k, self.V = top_k, vocab_size

    def prefill(self, rows: list[list[int]], max_new_tokens: int) -> torch.Tensor:
        from transformers import StaticCache

        ids, mask = left_pad(rows, self.pad_id, self.device)
        B, P = ids.shape
        L = -(-(P + max_new_tokens) // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET
        if isinstance(self.model, ResidualAdapter):
            self.cache = tuple(StaticCache(config=m.config, max_cache_len=L)
                               for m in (self.model.trained, self.model.initial))
        else:
            self.cache = StaticCache(config=self.model.config, max_cache_len=L)
        self.mask = torch.ones((B, L), dtype=torch.long, device=self.device)
        self.mask[:, :P] = mask
        self.next_pos = mask.sum(1)
        pos = (mask.cumsum(1) - 1).clamp_(min=0)
        return self._last(input_ids=ids, attention_mask=self.mask, position_ids=pos, prefill=True)

    def forward_step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._last(input_ids=tokens.to(self.device).view(-1, 1), attention_mask=self.mask,
                          position_ids=self.next_pos.view(-1, 1), prefill=False)

    def _last(self, *, prefill: bool, **kwargs) -> torch.Tensor:
        """The last position's logits (reduced to top-k when asked) or hidden state; the static
        cache is updated in place."""
        last, _ = self._forward(cache=self.cache, prefill=prefill, **kwargs)
        return last if self.hidden else self._reduce(last)

    def _reduce(self, logits):
        if not self.top_k:
            return logits
        lp = torch.log_softmax(logits[:, :self.V].float(), dim=-1)
        vals, ids = lp.topk(min(self.top_k, self.V), dim=-1)
        return densify_top_k(ids, vals, self.V)


STATIC_CACHE_BUCKET = 16


# ----------------------------------------------------------------------------------------------
# Vocabulary checks
# ----------------------------------------------------------------------------------------------

def _out_vocab(model) -> int:
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.vocab_size


def _in_vocab(model) -> int:
    return model.get_input_embeddings().weight.shape[0]


def shared_vocab_size(base, adapter, tokenizer, vocab_size: int | None = None, *,
                      names: tuple[str, str] = ("the base", "the adapter")) -> int:
    """The shared output vocabulary V, or a ValueError naming the mismatch.

    V = ``len(tokenizer)`` trimmed to the base's output size: a padded embedding matrix (more
    outputs than the tokenizer has tokens) is trimmed; a tokenizer with extra *added* tokens the
    base cannot emit (e.g. Quark control tokens for the adapter) keeps them out of V. A base or
    adapter with fewer outputs than the tokenizer's own vocabulary is refused. ``names``: how
    the messages call the two models.
    """
    nb, na = _out_vocab(base), _out_vocab(adapter)
    n_tok = len(tokenizer)
    n_core = getattr(tokenizer, "vocab_size", n_tok)  # without added tokens
    if vocab_size is None:
        vocab_size = min(n_tok, nb)
        if nb < n_core:
            raise ValueError(
                f"vocabulary mismatch: {names[0]} has {nb} output logits but the tokenizer has "
                f"{n_core} tokens; {names[0]} and {names[1]} must share the tokenizer's vocabulary")
    if nb < vocab_size or na < vocab_size:
        raise ValueError(
            f"vocabulary mismatch: the shared vocabulary has {vocab_size} tokens but {names[0]} has "
            f"{nb} output logits and {names[1]} {na}; {names[0]} and {names[1]} must share one tokenizer")
    return vocab_size


def _is_cached_lm(model) -> bool:
    """An object following the cached-LM protocol (``prefill(rows, max_new_tokens)``,
    ``step(tokens)``, ``vocab_size``) rather than a Hugging Face model."""
    return not isinstance(model, torch.nn.Module) and callable(getattr(model, "prefill", None)) \
        and callable(getattr(model, "step", None))


# ----------------------------------------------------------------------------------------------
# TailoredLM
# ----------------------------------------------------------------------------------------------

class TailoredLM:
    """Product-of-experts decoding of a frozen ``base`` and weighted experts over one tokenizer.

    ``TailoredLM(base, adapter, tokenizer, alpha=1.0, adapter_prefix=None)``: IPA,
    ``z = base + alpha * adapter``. ``TailoredLM(base, experts=[...], weights=[...],
    prefixes=[...], tokenizer=...)``: ``z = base + sum_k weights[k] * experts[k]`` (K >= 1
    experts, one finite weight each, default 1; negative weights allowed); the first expert is
    "the adapter" (``lm.adapter``, its log-probs are ``adapter_logprobs``, ``adapter_prefix`` in
    :meth:`generate` / :meth:`score` overrides its prefix). The presets :meth:`ipa`,
    :meth:`compose`, :meth:`dexperts` and :meth:`proxy_tuning` build the usual formulas.

    ``base``, the adapter, the experts: Hugging Face causal LMs (any architectures, dtypes and
    devices; logits are moved to the base's device for sampling) over the base's vocabulary, or
    objects following the cached-LM protocol (``prefill(rows, max_new_tokens)`` and
    ``step(tokens)`` returning ``[B, >= V]`` logits, and ``vocab_size``), e.g. an
    :class:`ipa_fast.decoding.api_base.APIBase`. ``adapter_prefix`` / ``prefixes[k]``: token ids (or a
    string) that expert sees before every prompt (e.g. a Quark reward token; ids >= V allowed:
    input-only rows of its embedding). ``base_top_k``: reduce a local base to its top-k
    log-probs per step (the sparse-base path API bases take). ``vocab_size``: override the
    shared vocabulary V. An expert given as top-k log-probs (-inf elsewhere) needs a weight
    >= 0: -inf times a negative weight is +inf, an invalid row.
    """

    def __init__(self, base, adapter=None, tokenizer=None, alpha=None, adapter_prefix=None, *,
                 experts=None, weights=None, prefixes=None, base_top_k: int | None = None,
                 vocab_size: int | None = None, metadata: dict | None = None):
        from ipa_fast.decoding.api_base import APIBase  # local import: api_base imports this module

        if experts is None:
            if adapter is None:
                raise ValueError("no adapter: pass TailoredLM(base, adapter, tokenizer) or experts=[...] with weights")
            if weights is not None or prefixes is not None:
                raise ValueError("weights= and prefixes= go with experts=[...]; a single adapter takes alpha= "
                                 "and adapter_prefix=")
            experts, weights, prefixes = [adapter], [1.0 if alpha is None else alpha], [adapter_prefix]
        else:
            if adapter is not None or alpha is not None or adapter_prefix is not None:
                raise ValueError("pass adapter= (with alpha=, adapter_prefix=) or experts= (with weights=, "
                                 "prefixes=), not both")
            if not isinstance(experts, (list, tuple)):
                raise TypeError(f"experts must be a list of models, got {type(experts).__name__}")
            if not experts:
                raise ValueError("experts is empty: pass at least one expert model")
            K = len(experts)
            weights = [1.0] * K if weights is None else weights
            prefixes = [None] * K if prefixes is None else prefixes
            for name, values in (("weights", weights), ("prefixes", prefixes)):
                if not isinstance(values, (list, tuple)) or len(values) != K:
                    n = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
                    raise ValueError(f"{name} must be a list with one entry per expert: {K} experts, got {n}")
        if tokenizer is None:
            raise ValueError("no tokenizer: pass tokenizer=... (the one the base and the experts share)")
        self.base, self.experts, self.tokenizer = base, list(experts), tokenizer
        self.weights = [_finite_weight(f"weights[{k}]" if len(experts) > 1 else "alpha", w)
                        for k, w in enumerate(weights)]
        self.is_api_base = isinstance(base, APIBase)
        self.V = self._shared_vocab(vocab_size)
        for k, (m, w) in enumerate(zip(self.experts, self.weights)):
            if isinstance(m, APIBase) and w < 0:
                raise ValueError(f"{self._expert_name(k)} is an API model (top-k log-probs, -inf elsewhere) and "
                                 f"needs a weight >= 0, got {w}: -inf times a negative weight is +inf")
        self.base_top_k = base_top_k
        self.prefixes = [self._prefix_ids(p, k) for k, p in enumerate(prefixes)]
        self.metadata = dict(metadata or {})
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else pad
        self.device = base.device if _is_cached_lm(base) else next(base.parameters()).device

    # -- the experts ---------------------------------------------------------------------------

    @property
    def adapter(self):
        """The first expert (the adapter of ``TailoredLM(base, adapter, tokenizer)``)."""
        return self.experts[0]

    @property
    def alpha(self) -> float | None:
        """The adapter's weight; None when there are several experts (see ``weights``)."""
        return self.weights[0] if len(self.experts) == 1 else None

    @alpha.setter
    def alpha(self, value) -> None:
        if len(self.experts) != 1:
            raise ValueError(f"alpha is the weight of a single adapter; this TailoredLM has {len(self.experts)} "
                             f"experts: set weights[k]")
        self.weights[0] = _finite_weight("alpha", value)

    @property
    def adapter_prefix(self) -> list[int]:
        """The first expert's prefix ids."""
        return self.prefixes[0]

    @adapter_prefix.setter
    def adapter_prefix(self, value) -> None:
        self.prefixes[0] = self._prefix_ids(value, 0)

    def _expert_name(self, k: int) -> str:
        return "the adapter" if len(self.experts) == 1 else f"experts[{k}]"

    def _shared_vocab(self, vocab_size: int | None) -> int:
        """V over the base and every expert (:func:`shared_vocab_size` on the Hugging Face models,
        ``vocab_size`` >= V on cached-LM objects; an API model's vocabulary is the tokenizer's)."""
        from ipa_fast.decoding.api_base import APIBase

        models = [("the base", self.base)] + [(self._expert_name(k), m) for k, m in enumerate(self.experts)]
        hf = []
        for name, m in models:
            if isinstance(m, torch.nn.Module) and callable(getattr(m, "get_output_embeddings", None)):
                hf.append((name, m))
            elif not _is_cached_lm(m):
                raise TypeError(f"{name} must be a Hugging Face causal LM or an object with prefill(rows, "
                                f"max_new_tokens) and step(tokens), got {type(m).__name__}")
        if hf:
            first_name, first = hf[0]
            V = shared_vocab_size(first, first, self.tokenizer, vocab_size, names=(first_name, first_name))
            for name, m in hf[1:]:
                shared_vocab_size(first, m, self.tokenizer, V, names=(first_name, name))
        else:
            V = vocab_size or len(self.tokenizer)
        for name, m in models:
            if isinstance(m, APIBase):  # the server's vocabulary is the tokenizer's
                m.vocab_size = V
            elif _is_cached_lm(m):
                n = getattr(m, "vocab_size", None)
                if not isinstance(n, int) or n < V:
                    raise ValueError(f"vocabulary mismatch: the shared vocabulary has {V} tokens but {name} "
                                     f"has vocab_size {n!r}; every model must cover the shared vocabulary")
        return V

    # -- presets -------------------------------------------------------------------------------

    @classmethod
    def ipa(cls, base, adapter, tokenizer, *, alpha: float = 1.0, adapter_prefix=None, **kwargs) -> "TailoredLM":
        """IPA (Lu et al. 2023): ``z = base + alpha * adapter``, i.e.
        ``pi ∝ p_base · p_adapter^alpha``. The same as ``TailoredLM(base, adapter, tokenizer, alpha)``."""
        return cls(base, adapter, tokenizer, alpha=alpha, adapter_prefix=adapter_prefix, **kwargs)

    @classmethod
    def compose(cls, base, adapters, tokenizer, *, weights=None, prefixes=None, **kwargs) -> "TailoredLM":
        """Composition of adapters: ``z = base + sum_i weights[i] * adapters[i]``, i.e.
        ``pi ∝ p_base · prod_i p_i^weights[i]`` (each adapter with its own prefix)."""
        return cls(base, tokenizer=tokenizer, experts=adapters, weights=weights, prefixes=prefixes, **kwargs)

    @classmethod
    def dexperts(cls, base, expert, anti_expert, tokenizer, *, alpha: float = 1.0, prefixes=None,
                 **kwargs) -> "TailoredLM":
        """DExperts (Liu et al. 2021): ``z = base + alpha * (expert - anti_expert)``, i.e.
        ``pi ∝ p_base · (p_expert / p_anti)^alpha``; experts ``[expert, anti_expert]`` with
        weights ``[alpha, -alpha]`` (the anti-expert's logits must be finite)."""
        a = _finite_weight("alpha", alpha)
        return cls(base, tokenizer=tokenizer, experts=[expert, anti_expert], weights=[a, -a], prefixes=prefixes,
                   **kwargs)

    @classmethod
    def proxy_tuning(cls, base, tuned, untuned, tokenizer, *, alpha: float = 1.0, prefixes=None,
                     **kwargs) -> "TailoredLM":
        """Proxy-tuning (Liu et al. 2024): a large ``base`` steered by a small ``tuned`` model
        and its ``untuned`` starting point, ``z = base + alpha * (tuned - untuned)`` (alpha 1 in
        the paper): :meth:`dexperts` with the tuned model as the expert and the untuned one as
        the anti-expert."""
        return cls.dexperts(base, tuned, untuned, tokenizer, alpha=alpha, prefixes=prefixes, **kwargs)

    # -- loading / saving ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, base_name_or_path, adapter_name_or_path, *, tokenizer=None,
                        alpha=None, adapter_prefix=None, base_dtype=None, base_device=None,
                        adapter_dtype=None, adapter_device=None, base_top_k: int | None = None,
                        dtype=None, torch_dtype=None, device_map=None, **model_kwargs) -> "TailoredLM":
        """Load both models (``AutoModelForCausalLM``) and the tokenizer.

        ``adapter_name_or_path``: one adapter, or a list of adapters to compose
        (``z = base + sum_i alpha_i * adapter_i``, see :meth:`compose`); then ``alpha`` and
        ``adapter_prefix`` are lists with one entry per adapter (or None), an entry of None
        taking that adapter's saved value, ``lm.metadata["adapters"]`` holds each adapter's
        ``ipa_adapter.json`` and the adapters load as the single one does.

        ``base_name_or_path`` may also be an :class:`~ipa_fast.decoding.api_base.APIBase`, or a base model
        already loaded (shared by several adapters: only the adapter is loaded, onto the base's
        device, and ``tokenizer`` defaults to the adapter directory's). When the
        adapter directory holds ``ipa_adapter.json`` (see :func:`save_adapter`), its alpha and
        control prefix are restored unless given here, and a base other than the one it was
        trained with is reported in ``lm.metadata["warnings"]``. Tokenizers of base and adapter
        (where both ship one) must hash equal.

        Precision and placement, as in transformers' ``from_pretrained``:

        - ``dtype`` (or its older name ``torch_dtype``; both with different values raise
          ``TypeError``): a ``torch.dtype``, its name (``"bfloat16"``) or ``"auto"`` (the
          checkpoint's own), for both models. ``base_dtype`` / ``adapter_dtype`` override it per
          model. Default: float32 for a model that ends up on the CPU (fp16 / bf16 matmuls are
          slow there), ``"auto"`` elsewhere.
        - ``device_map`` (``"auto"``, a device, or a module -> device dict; needs ``accelerate``)
          is passed to transformers for the base (for the adapter when the base is an
          :class:`~ipa_fast.decoding.api_base.APIBase`). The adapter then goes to the device of the
          base's first parameters, where decoding samples, unless ``adapter_device`` is given.
          ``base_device`` and ``device_map`` together raise ``TypeError``.
        - ``base_device`` / ``adapter_device``: move the loaded model there (the adapter may sit
          on another device than the base: its logits are moved to the base's device).

        Other keyword arguments (``revision``, ``attn_implementation``, ...) go to both models'
        ``from_pretrained``.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ipa_fast.decoding.api_base import APIBase
        from ipa_fast.decoding.tokenizer import tokenizer_hash

        def as_dtype(name, value):
            """``value`` as a torch.dtype, or "auto", or None."""
            if value is None or isinstance(value, torch.dtype) or value == "auto":
                return value
            if isinstance(value, str) and isinstance(getattr(torch, value.removeprefix("torch."), None), torch.dtype):
                return getattr(torch, value.removeprefix("torch."))
            raise TypeError(f"{name} must be a torch.dtype, a dtype name such as 'bfloat16', or 'auto'; got {value!r}")

        both = as_dtype("dtype", dtype), as_dtype("torch_dtype", torch_dtype)
        if None not in both and both[0] != both[1]:
            raise TypeError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree: torch_dtype is the older "
                            f"name of dtype; pass one of them")
        dtype = both[0] if both[0] is not None else both[1]
        base_dtype, adapter_dtype = as_dtype("base_dtype", base_dtype), as_dtype("adapter_dtype", adapter_dtype)
        api_base = isinstance(base_name_or_path, APIBase)
        loaded_base = isinstance(base_name_or_path, torch.nn.Module)
        if loaded_base and (device_map is not None or base_device is not None or base_dtype is not None):
            raise TypeError("a base model that is already loaded takes no device_map, base_device or base_dtype")
        if device_map is not None and (adapter_device if api_base else base_device) is not None:
            raise TypeError(f"pass {'adapter_device' if api_base else 'base_device'} or device_map, not both")

        def mapped_device(device_map):
            """The device type a device_map puts a model on: "cuda"-like or "cpu" (for the default dtype)."""
            values = device_map.values() if isinstance(device_map, dict) else [device_map]
            for v in values:
                if isinstance(v, int) and not isinstance(v, bool):
                    return "cuda"
                if str(v) in ("auto", "balanced", "balanced_low_0", "sequential"):
                    return "cuda" if torch.cuda.is_available() else "cpu"
                if str(v) not in ("cpu", "disk", "meta"):
                    return str(v)
            return "cpu"

        def load(path, own_dtype, device, placement):
            """One model: ``placement`` is a device_map (passed to transformers) or None."""
            where = device if placement is None else mapped_device(placement)
            kwargs = dict(model_kwargs, dtype=own_dtype or dtype or _default_dtype(where))
            if placement is not None:
                kwargs["device_map"] = placement
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
            if device is not None:
                model.to(device)
            return model

        many = isinstance(adapter_name_or_path, (list, tuple))
        paths = list(adapter_name_or_path) if many else [adapter_name_or_path]
        if not paths:
            raise ValueError("no adapters: pass an adapter directory or a list of them")
        per_adapter = {}
        for name, value in (("alpha", alpha), ("adapter_prefix", adapter_prefix)):
            if not many or value is None:
                per_adapter[name] = [value] * len(paths)
            elif not isinstance(value, (list, tuple)) or len(value) != len(paths):
                raise ValueError(f"{name} must be a list with one entry per adapter ({len(paths)}) when several "
                                 f"adapters are loaded, got {value!r}")
            else:
                per_adapter[name] = list(value)

        def load_adapter(path):
            if api_base:
                return load(path, adapter_dtype, adapter_device, device_map)
            if loaded_base or device_map is not None:  # the adapter follows the base unless told where to go
                return load(path, adapter_dtype,
                            adapter_device if adapter_device is not None else next(base.parameters()).device, None)
            return load(path, adapter_dtype, adapter_device, None)

        metas = [load_adapter_metadata(p) for p in paths]

        def load_adapters():
            """Each adapter; a residual one (ipa_adapter.json: residual_of) wrapped with its initial
            weights, loaded the same way (ipa_fast.decoding.residual). Residual adapters of the same
            initial weights share one frozen copy of them (each keeps its own cache)."""
            from ipa_fast.decoding.residual import wrap_if_residual
            initial = {}

            def load_initial(path):
                key = str(Path(path).resolve())
                if key not in initial:
                    initial[key] = load_adapter(path)
                return initial[key]
            return [wrap_if_residual(load_adapter(p), m, p, load_initial) for p, m in zip(paths, metas)]

        if api_base or loaded_base:
            base = base_name_or_path
            adapters = load_adapters()
        elif device_map is None:
            adapters = load_adapters()
            base = load(base_name_or_path, base_dtype, base_device, None)
        else:
            base = load(base_name_or_path, base_dtype, None, device_map)
            adapters = load_adapters()
        ad_toks = [_try_tokenizer(p) for p in paths]
        base_tok = None if api_base or loaded_base else _try_tokenizer(base_name_or_path)
        named = ([(base_name_or_path, base_tok)] if base_tok is not None else []) + \
            [(p, t) for p, t in zip(paths, ad_toks) if t is not None]
        for other, tok in named[1:]:
            if _core_hash(named[0][1]) != _core_hash(tok):
                raise ValueError(f"tokenizer mismatch: {named[0][0]} and {other} ship different tokenizers; "
                                 f"they must share one vocabulary")
        if tokenizer is None:
            tokenizer = next((t for t in ad_toks if t is not None), base_tok) or getattr(base, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("no tokenizer found beside the base or the adapter; pass tokenizer=...")
        if isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        alphas, prefixes = per_adapter["alpha"], per_adapter["adapter_prefix"]
        for k, (path, meta) in enumerate(zip(paths, metas)):
            # composed adapters share the vocabulary below V (checked above) but may each add their own
            # tokens (Quark's control tokens): each is checked against, and its prefix read with, its own
            own = ad_toks[k] if len(paths) > 1 and ad_toks[k] is not None else tokenizer
            if meta:
                if meta.get("tokenizer_hash") and meta["tokenizer_hash"] != tokenizer_hash(own):
                    raise ValueError(f"tokenizer mismatch: {path} was saved with tokenizer "
                                     f"{meta['tokenizer_hash'][:12]}…, got {tokenizer_hash(own)[:12]}…")
                alphas[k] = meta.get("alpha", 1.0) if alphas[k] is None else alphas[k]
                prefixes[k] = meta.get("adapter_prefix") if prefixes[k] is None else prefixes[k]
            if isinstance(prefixes[k], str) and own is not tokenizer:
                prefixes[k] = own(prefixes[k], add_special_tokens=False)["input_ids"]
            alphas[k] = 1.0 if alphas[k] is None else alphas[k]
        sizes = {m["vocab_size"] for m in metas if m and m.get("vocab_size") is not None}
        if len(sizes) > 1:
            raise ValueError(f"the adapters were saved with different shared vocabularies {sorted(sizes)}; "
                             f"composed adapters must share one")
        vocab_size = sizes.pop() if sizes else None
        if many:
            lm = cls(base, tokenizer=tokenizer, experts=adapters, weights=alphas, prefixes=prefixes,
                     base_top_k=base_top_k, vocab_size=vocab_size, metadata={"adapters": metas})
        else:
            lm = cls(base, adapters[0], tokenizer, alpha=alphas[0], adapter_prefix=prefixes[0],
                     base_top_k=base_top_k, vocab_size=vocab_size, metadata=metas[0])
        for path, meta in zip(paths, metas):
            trained = (meta or {}).get("base")
            if trained and not (api_base or loaded_base) and str(base_name_or_path) != trained:
                lm.metadata.setdefault("warnings", []).append(
                    (f"adapter {str(path)!r} " if many else "adapter ")
                    + f"was trained with base {trained!r}, now paired with {str(base_name_or_path)!r}")
        return lm

    def save_adapter(self, directory, *, base: str | None = None, reference_policy: str | None = None,
                     control_tokens: list[str] | None = None, extra: dict | None = None) -> Path:
        """Write the adapter (HF files), the tokenizer and ``ipa_adapter.json`` to ``directory``."""
        if len(self.experts) != 1:
            raise ValueError(f"save_adapter saves a single adapter; this TailoredLM has {len(self.experts)} experts: "
                             f"save each with ipa_fast.save_adapter(directory, model, tokenizer, alpha=weight)")
        return save_adapter(directory, self.adapter, self.tokenizer, alpha=self.alpha,
                            adapter_prefix=self.adapter_prefix, vocab_size=self.V,
                            base=base or self.metadata.get("base"),
                            reference_policy=reference_policy or self.metadata.get("reference_policy"),
                            control_tokens=control_tokens or self.metadata.get("control_tokens"), extra=extra)

    # -- input handling ------------------------------------------------------------------------

    def _prefix_ids(self, prefix, k: int = 0) -> list[int]:
        """Expert ``k``'s prefix (ids or a string) as ids, checked against its embedding rows."""
        if prefix is None:
            return []
        if isinstance(prefix, str):
            return self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
        ids = [int(i) for i in prefix]
        model = self.experts[k]
        n_in = len(self.tokenizer) if _is_cached_lm(model) else _in_vocab(model)
        if any(i < 0 or i >= n_in for i in ids):
            name = "adapter_prefix" if len(self.experts) == 1 else f"prefixes[{k}]"
            raise ValueError(f"{name} ids must be in [0, {n_in}) ({self._expert_name(k)}'s embedding rows), got {ids}")
        return ids

    def _row_prefixes(self, prefix, B) -> list[list[list[int]]]:
        """Each expert's prefix for each row (``[K][B]`` id lists): the experts' own, except
        that ``prefix`` (when given) replaces the first expert's: one for all rows, or one per
        row (a list of B strings / id lists, e.g. Quark quantile tokens during training)."""
        rest = [[p] * B for p in self.prefixes[1:]]
        if prefix is None:
            return [[self.prefixes[0]] * B] + rest
        if isinstance(prefix, torch.Tensor):
            prefix = prefix.tolist()
        if isinstance(prefix, (list, tuple)) and prefix and not isinstance(prefix[0], numbers.Integral):
            if len(prefix) != B:
                raise ValueError(f"adapter_prefix has {len(prefix)} per-row entries for {B} prompts")
            return [[self._prefix_ids(p) for p in prefix]] + rest
        return [[self._prefix_ids(prefix)] * B] + rest

    def encode(self, prompts) -> list[list[int]]:
        """Prompts (strings or token-id lists) → token-id lists, validated against the base."""
        if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], numbers.Integral)):
            raise TypeError("prompts must be a list of strings or of token-id lists (wrap one prompt in a list)")
        if len(prompts) == 0:
            raise ValueError("prompts is empty: pass at least one prompt")
        rows = []
        for p in prompts:
            if isinstance(p, str):
                ids = self.tokenizer(p)["input_ids"]
            elif isinstance(p, torch.Tensor):
                ids = p.view(-1).tolist()
            else:
                ids = [int(i) for i in p]
            if not ids:  # an empty prompt conditions on the beginning of a text
                if self.tokenizer.bos_token_id is None:
                    raise ValueError("an empty prompt needs a tokenizer with a bos token")
                ids = [self.tokenizer.bos_token_id]
            if min(ids) < 0 or max(ids) >= self.V:
                raise ValueError(f"prompt token ids must be in [0, {self.V}) (the shared vocabulary); "
                                 f"put adapter-only control tokens in adapter_prefix")
            rows.append(ids)
        return rows

    def _per_row(self, name, value, B, integer=False):
        if isinstance(value, (list, tuple)):
            if len(value) != B:
                raise ValueError(f"{name} has {len(value)} entries for {B} prompts")
            return torch.tensor(value, dtype=torch.int64 if integer else torch.float32, device=self.device)
        return value

    def _base_lm(self):
        if _is_cached_lm(self.base):
            return self.base
        lm = CachedLM(self.base, self.pad_id)
        return SparseBase(lm, self.base_top_k, self.V) if self.base_top_k else lm

    def _expert_lm(self, model):
        return model if _is_cached_lm(model) else CachedLM(model, self.pad_id)

    def _shared_head(self, experts=None):
        """The output head the base and ``experts`` (default: all of them) share
        (:func:`ipa_fast.decoding.heads.shared_head`), or None; asked again only when a head tensor
        changed (its identity or version) or the set of experts did."""
        experts = self.experts if experts is None else experts
        key = head_key(self.base, experts)
        memo = self.__dict__.setdefault("_head_memo", {})  # one entry per set of experts run
        if key not in memo:
            if len(memo) >= 8:
                memo.clear()
            memo[key] = shared_head(self.base, experts)
        return memo[key]

    def _call_weights(self, alpha, weights, base_weight, B) -> torch.Tensor:
        """float32 ``[B, K']`` weights of one call, on the base's device: the base's column
        (left out when ``base_weight == 0``: the base is then not run), then each expert's
        (``self.weights``, ``alpha`` for a single adapter, or ``weights``: K entries, each a
        number or one per prompt, or a ``[B, K]`` tensor). Values are checked by the sampler."""
        K = len(self.experts)
        if weights is not None and alpha is not None:
            raise ValueError("pass alpha= (a single adapter's weight) or weights= (one per expert), not both")
        if weights is None and alpha is not None:
            if K != 1:
                raise ValueError(f"alpha= is the weight of a single adapter; this TailoredLM has {K} experts: "
                                 f"pass weights=[...] with one weight per expert")
            weights = [alpha]
        if weights is None:
            weights = self.weights
        if isinstance(weights, torch.Tensor) and weights.dim() == 2:
            if tuple(weights.shape) != (B, K):
                raise ValueError(f"weights must be [B, K] = [{B}, {K}] (one row per prompt, one column per "
                                 f"expert), got shape {tuple(weights.shape)}")
            weights = list(weights.unbind(1))
        if not isinstance(weights, (list, tuple)) or len(weights) != K:
            n = len(weights) if isinstance(weights, (list, tuple, torch.Tensor)) else type(weights).__name__
            raise ValueError(f"weights must have one entry per expert: {K} experts, got {n}")
        cols = ([] if base_weight == 0 else [base_weight]) + list(weights)
        names = ([] if base_weight == 0 else ["base_weight"]) + (["alpha"] if K == 1 else
                                                                [f"weights[{k}]" for k in range(K)])
        out = []
        for name, w in zip(names, cols):
            t = torch.as_tensor(self._per_row(name, w, B), dtype=torch.float32, device=self.device)
            if t.dim() == 0:
                t = t.expand(B)
            if t.shape != (B,):
                raise ValueError(f"{name} must be a number or one per prompt ({B}), got shape {tuple(t.shape)}")
            out.append(t)
        return torch.stack(out, dim=1).contiguous()

    def _compile_backend(self, compile, base_weight) -> str | None:
        """``generate``'s ``compile=`` as a torch.compile backend name (None: eager), or a
        one-line error naming the model the compiled step cannot run."""
        if compile is None or compile is False:
            return None
        if compile is True:
            backend = "inductor"
        elif (isinstance(compile, str) and compile) or callable(compile):
            backend = compile
        else:
            raise TypeError(f"compile must be True, False or a torch.compile backend (a name or a callable), "
                            f"got {compile!r}")
        models = ([] if base_weight == 0 else [("the base", self.base)]) + \
            [(self._expert_name(k), m) for k, m in enumerate(self.experts)]
        for name, m in models:
            if not isinstance(m, torch.nn.Module):
                raise ValueError(f"compile={compile!r}: {name} is a {type(m).__name__}, not a local Hugging Face "
                                 f"model; the compiled step needs every model's forward in the graph: pass "
                                 f"compile=False")
            if not getattr(m, "_can_compile_fullgraph", False):
                raise ValueError(f"compile={compile!r}: {name} ({type(m).__name__}) does not support torch.compile "
                                 f"with a static KV cache in this transformers version; pass compile=False")
        return backend

    # -- decoding ------------------------------------------------------------------------------

    @torch.inference_mode()  # no autograd bookkeeping at all (5-6 % of an eager CPU step)
    def generate(self, prompts, max_new_tokens=32, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                 seed=None, stop=None, adapter_prefix=None, min_new_tokens=0, bad_words_ids=None,
                 repetition_penalty=1.0, eos_token_id=None, alpha=None, weights=None, base_weight=1.0,
                 backend="auto", truncate_prompt=None, compile=False,
                 output_adapter_logprobs=False) -> GenerationOutput:
        """Sample continuations of ``prompts`` from the tailored policy.

        ``z = base_weight * base + sum_k w_k * expert_k`` (``base_weight * base + alpha * adapter``
        for a single adapter). ``base_weight=0`` samples from the experts alone (each with its
        prefix; the base model is not run), as the paper's adapter-only comparison does;
        ``alpha=0`` gives the base alone. ``alpha`` (a single adapter) or ``weights`` (K entries,
        each a number or one per prompt, or a ``[B, K]`` tensor) override the model's weights
        for this call.

        ``max_new_tokens``: int or one per prompt (>= 1). ``seed``: int (row r gets seed + r), a
        list / ``[B]`` tensor (one per prompt), or None (torch's generator draws seeds).
        ``temperature`` / ``top_k`` / ``top_p`` / ``min_p`` / ``alpha``: scalars or one per prompt,
        as :func:`ipa_fast.sample_experts` (T = 0 is greedy). ``stop``: string(s) ending a row;
        the text is cut before it. ``adapter_prefix``: overrides the adapter's (the first
        expert's) for this call (ids or a string for every row, or a list with one per row).
        Hard masks — ``bad_words_ids`` (HF semantics: a token is banned when the row ends with
        the sequence's prefix) and EOS before ``min_new_tokens`` — and ``repetition_penalty``
        (HF semantics, over prompt + generated tokens) act on the *mixed* logits, after
        mixing and before filtering, as the official IPA code applies its masks (a mask goes to
        the sampler as one more expert of weight 1, 0 or -inf; the penalty, not linear in the
        experts, mixes them first with :func:`ipa_fast.ops.reference.mix_experts`).
        ``truncate_prompt``: a prompt that does not fit the base's (or an expert's, with its
        prefix) context together with ``max_new_tokens`` raises ValueError naming the lengths;
        ``"left"`` keeps its last tokens instead (``prompt_token_ids`` of the output show it).

        ``compile``: ``True`` (torch's default backend, inductor) or a ``torch.compile`` backend
        (a name such as ``"aot_eager"``, or a callable) runs every step after the first — each
        model's one-token forward over a static (pre-allocated) KV cache, the hard masks /
        penalty, the fused sampler and the adapter's log-prob — as one
        ``torch.compile(fullgraph=True)`` graph; the prefill and the first draw stay eager. Same
        tokens as ``compile=False`` for the same seed (up to float rounding at a CDF boundary). A
        call compiles once per batch size and cache width (prompt + new tokens, rounded up to 64)
        and models; later calls of that shape reuse the graph whatever their prompts, seeds and
        sampling knobs. Every model must be a local Hugging Face model with static-cache support:
        anything else (an API base, a cached-LM object) is a one-line ValueError, a graph break a
        one-line RuntimeError (docs/DESIGN.md §5.7).

        ``output_adapter_logprobs``: also return the adapter's own log-prob of each drawn token
        (``adapter_logprobs``; None otherwise). Without it, when the base and every expert share one
        output head (the embedded base and adapters over its tied embedding), the loop (eager or
        compiled) mixes their last hidden states and applies the head once per step (docs/DESIGN.md §5.8): the
        same distribution up to float rounding, at a fraction of the experts' cost; the adapter's
        own log-probs would need its full logits again.
        """
        from ipa_fast.decoding.api_base import APIBase

        compile_backend = self._compile_backend(compile, base_weight)
        rows = self.encode(prompts)
        B = len(rows)
        max_new = self._per_row("max_new_tokens", max_new_tokens, B, integer=True)
        max_new = torch.as_tensor(max_new, device=self.device).expand(B).clone()
        if int(max_new.min()) <= 0:
            raise ValueError(f"max_new_tokens must be >= 1, got {int(max_new.min())}")
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        steps = int(max_new.max())
        if base_weight == 0 and self.is_api_base:
            raise ValueError("base_weight=0 (the experts alone) is not available with an API base")
        w = self._call_weights(alpha, weights, base_weight, B)  # [B, K'] float32
        knobs = dict(temperature=self._per_row("temperature", temperature, B),
                     top_k=self._per_row("top_k", top_k, B, integer=True), top_p=self._per_row("top_p", top_p, B),
                     min_p=self._per_row("min_p", min_p, B), backend=backend)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        seeds = self._per_row("seed", seed, B, integer=True)
        if compile_backend is not None:  # numbers as [B] tensors: a new seed or top-p reuses the compiled graph
            from ipa_fast.ops.sampling import param_tensor, seeds_for
            seeds = seeds_for(seeds, None, B, self.device)
            knobs.update({k: param_tensor(k, knobs[k], B, self.device, validate=True)
                          for k in ("temperature", "top_k", "top_p", "min_p")})
        prefixes = self._row_prefixes(adapter_prefix, B)  # [K][B]
        rows = self._fit_context(rows, prefixes, steps, truncate_prompt, base_weight != 0)
        eos_ids = _as_id_list(self.tokenizer.eos_token_id if eos_token_id is None else eos_token_id)
        if any(not 0 <= i < self.V for i in eos_ids):
            raise ValueError(f"eos_token_id must be in [0, {self.V}), got {eos_ids}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        banned_single, banned_seqs = _split_bad_words(bad_words_ids, self.V)
        V, dev = self.V, self.device

        # An expert weighted 0 in every row adds nothing to the mix and is not run (alpha=0: the base
        # alone), unless the adapter's own log-probs are asked for.
        nb = 0 if base_weight == 0 else 1
        run = [k for k in range(len(self.experts))
               if bool((w[:, nb + k] != 0).any()) or (k == 0 and output_adapter_logprobs)] or ([] if nb else [0])
        experts, prefixes = [self.experts[k] for k in run], [prefixes[k] for k in run]
        w = w[:, list(range(nb)) + [nb + k for k in run]]

        # Prefill: the base sees the prompt, each expert its prefix + the prompt.
        head = None if output_adapter_logprobs or self.base_top_k else self._shared_head(experts)
        # (asked of the experts as given: the merge below runs the same networks)
        if not output_adapter_logprobs:  # residual adapters of one initial network: it runs once
            experts, prefixes, w = _merge_shared_initials(experts, prefixes, w, nb)
        hidden = head is not None  # every model returns its last hidden state; one head product per step
        if compile_backend is not None:
            lms = ([] if base_weight == 0 else
                   [StaticCachedLM(self.base, self.pad_id, self.base_top_k, self.V, hidden=hidden)]) \
                + [StaticCachedLM(m, self.pad_id, hidden=hidden) for m in experts]
        elif hidden:
            lms = ([] if base_weight == 0 else [CachedLM(self.base, self.pad_id, hidden=True)]) + \
                [CachedLM(m, self.pad_id, hidden=True) for m in experts]
        else:
            lms = ([] if base_weight == 0 else [self._base_lm()]) + [self._expert_lm(m) for m in experts]
        inputs = ([] if base_weight == 0 else [rows]) + [[p + r for p, r in zip(pre, rows)] for pre in prefixes]
        logits = [lm.prefill(x, steps) for lm, x in zip(lms, inputs)]
        # the adapter's (the first expert's) index in lms, when its own log-probs are asked for
        first = nb if output_adapter_logprobs else None
        w_masked = torch.cat([w, torch.ones((B, 1), device=dev)], dim=1)  # a hard mask: one more expert
        w_one = torch.ones((B, 1), device=dev)
        w_mix = w
        if head is not None:  # the sampler sees one expert: the mixed logits
            w, w_masked = w_one, torch.ones((B, 2), device=dev)
            head = head[:V]
        prompt_len = torch.tensor([len(r) for r in rows], device=dev)
        seen = None
        if repetition_penalty != 1.0:
            seen = torch.zeros((B, V), dtype=torch.bool, device=dev)
            for i, r in enumerate(rows):
                seen[i, r] = True

        out_tokens = torch.zeros((B, steps), dtype=torch.long, device=dev)
        out_lp = torch.zeros((B, steps), dtype=torch.float32, device=dev)
        out_alp = torch.zeros((B, steps), dtype=torch.float32, device=dev)
        n_out = torch.zeros(B, dtype=torch.long, device=dev)  # generated tokens kept per row
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        finish = ["length"] * B
        eos_t = torch.tensor(eos_ids, device=dev)
        host_tokens = [[] for _ in range(B)] if (stops or banned_seqs) else None

        draw = dict(w=w, w_masked=w_masked, w_one=w_one, seeds=seeds, knobs=knobs, first=first,
                    penalty=repetition_penalty)
        no_mask = None if compile_backend is None else torch.zeros((B, V), dtype=torch.bool, device=dev)
        step_fn = None if compile_backend is None else _compiled_step(compile_backend, [lm.model for lm in lms])
        for t in range(steps):
            mask = self._hard_mask(t, rows, host_tokens, min_new_tokens, eos_t, banned_single, banned_seqs)
            if t == 0 or step_fn is None:  # eager: the prefill's outputs, or every step without compile
                zs = [_mixed_through_head(logits, w_mix, head, dev)] if hidden else [z[:, :V].to(dev) for z in logits]
                tok, lp, alp = _draw(zs, mask, seen, offset=prompt_len + t, **draw)
            else:  # one graph: every model's forward of the last token, then the same draw
                # (an all-False mask adds a zero expert: the same mix, one graph for every step)
                tok, lp, alp = _run_compiled(step_fn, lms, tok, mask if mask is not None else no_mask, seen,
                                             offset=prompt_len + t, V=V, dev=dev, head=head, w_mix=w_mix, **draw)
                for lm in lms:
                    lm.next_pos += 1
            active = ~done
            out_tokens[:, t] = tok
            out_lp[:, t] = lp
            if alp is not None:
                out_alp[:, t] = alp
            n_out += active.long()
            if seen is not None:
                seen.scatter_(1, tok.view(-1, 1), True)
            hit_eos = (tok.view(-1, 1) == eos_t).any(1) & active
            ended = hit_eos | (n_out >= max_new)
            if host_tokens is not None:
                tok_host = tok.tolist()
                for i in (~done).nonzero().view(-1).tolist():
                    host_tokens[i].append(tok_host[i])
                    if stops and _hits_stop(self.tokenizer, host_tokens[i], stops):
                        ended[i] = True
                        finish[i] = "stop"
            for i in (hit_eos & (~done)).nonzero().view(-1).tolist():
                finish[i] = "eos"
            done |= ended
            if bool(done.all()):
                break
            tok = torch.where(done, torch.full_like(tok, self.pad_id), tok)
            if step_fn is None:
                logits = [lm.step(tok, ~done) if isinstance(lm, APIBase) else lm.step(tok) for lm in lms]

        n = n_out.tolist()
        ids_all, lp_all, alp_all = out_tokens.tolist(), out_lp.tolist(), out_alp.tolist()
        token_ids = [ids_all[i][:n[i]] for i in range(B)]
        texts = [_cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), stops) for ids in token_ids]
        return GenerationOutput(texts=texts, token_ids=token_ids, logprobs=[lp_all[i][:n[i]] for i in range(B)],
                                adapter_logprobs=[alp_all[i][:n[i]] for i in range(B)] if output_adapter_logprobs
                                else None, finish_reasons=finish,
                                prompt_token_ids=rows)

    def _fit_context(self, rows, prefixes, steps, truncate_prompt, with_base=True):
        """Check every row against the models' position limits (max_position_embeddings /
        n_positions): decoding ``steps`` tokens feeds ``len(prompt) + steps - 1`` positions to
        the base and ``len(prefix) + len(prompt) + steps - 1`` to each expert (``prefixes``:
        ``[K][B]``)."""
        if truncate_prompt not in (None, "left"):
            raise ValueError(f"truncate_prompt must be None or 'left', got {truncate_prompt!r}")
        limits = [(self._expert_name(k).removeprefix("the "), _context_size(m), pre)
                  for k, (m, pre) in enumerate(zip(self.experts, prefixes))]
        if with_base:
            limits.insert(0, ("base", _context_size(self.base), [[]] * len(rows)))
        out = []
        for i, row in enumerate(rows):
            keep = len(row)
            for name, ctx, pre in limits:
                if ctx is None:
                    continue
                room = ctx - len(pre[i]) - (steps - 1)  # the most prompt tokens that fit
                if room < 1:
                    raise ValueError(f"max_new_tokens {steps} does not fit the {name}'s context of {ctx} positions"
                                     + (f" (with its {len(pre[i])}-token prefix)" if pre[i] else ""))
                if len(row) > room and truncate_prompt is None:
                    raise ValueError(
                        f"prompt {i} is too long: {len(row)} tokens + {steps} new tokens need "
                        f"{len(pre[i]) + len(row) + steps - 1} positions"
                        + (f" (with the {name}'s {len(pre[i])}-token prefix)" if pre[i] else "")
                        + f" but the {name}'s context is {ctx}; shorten it to {room} tokens, lower "
                        f"max_new_tokens, or pass truncate_prompt='left' to keep its last {room} tokens")
                keep = min(keep, room)
            out.append(row[len(row) - keep:])
        return out

    def _hard_mask(self, t, rows, host_tokens, min_new_tokens, eos_t, banned_single, banned_seqs):
        """``[B, V]`` bool of banned tokens at step ``t``, or None when nothing is banned."""
        if t >= min_new_tokens and banned_single is None and not banned_seqs:
            return None
        B = len(rows)
        mask = torch.zeros((B, self.V), dtype=torch.bool, device=self.device)
        if t < min_new_tokens:
            mask[:, eos_t] = True
        if banned_single is not None:
            mask[:, banned_single] = True
        for seq in banned_seqs:
            head, last = seq[:-1], seq[-1]
            for i in range(B):
                if (rows[i] + host_tokens[i])[-len(head):] == head:
                    mask[i, last] = True
        return mask

    # -- teacher-forced scoring ----------------------------------------------------------------

    def score(self, prompts, completions_ids, *, adapter_prefix=None, temperature=1.0, alpha=None,
              weights=None) -> ScoreOutput:
        """Per-token tailored and adapter log-probs of given completions (teacher forcing).

        ``logprobs``: log-softmax of the mix ``(base + sum_k w_k * expert_k) / T``
        (:func:`ipa_fast.experts_log_softmax`); ``adapter_logprobs``: the adapter's (the first
        expert's) own log-softmax at T = 1. ``alpha`` / ``weights`` / ``adapter_prefix`` as in
        :meth:`generate`. One no-cache forward of each model over prompt + completion
        (left-padded). No hard masks or penalties are applied. Runs with grad if grad is enabled
        (the experts' parameters get gradients; the base runs under ``no_grad``).
        """
        if any(_is_cached_lm(m) for m in [self.base, *self.experts]):
            raise NotImplementedError("score() needs local Hugging Face models (an API model returns top-k "
                                      "log-probs only)")
        rows = self.encode(prompts)
        comps = [[int(i) for i in c] for c in completions_ids]
        if len(comps) != len(rows):
            raise ValueError(f"{len(comps)} completions for {len(rows)} prompts")
        prefixes = self._row_prefixes(adapter_prefix, len(rows))
        w = self._call_weights(alpha, weights, 1.0, len(rows))
        full = [r + c for r, c in zip(rows, comps)]
        with torch.no_grad():
            base_logits = _full_logits(self.base, full, self.pad_id)
        expert_logits = [_full_logits(m, [p + f for p, f in zip(pre, full)], self.pad_id)
                         for m, pre in zip(self.experts, prefixes)]
        lps, alps = [], []
        for i, (r, c) in enumerate(zip(rows, comps)):
            # Row i is right-aligned: its last len(c) tokens are the completion, predicted by the
            # logits one position earlier.
            n = len(c)
            if n == 0:
                lps.append(torch.zeros(0)), alps.append(torch.zeros(0))
                continue
            zb = base_logits[i, -n - 1:-1, :self.V]
            zs = [zb] + [e[i, -n - 1:-1, :self.V].to(zb.device) for e in expert_logits]
            target = torch.tensor(c, device=zb.device).view(-1, 1)
            lp = experts_log_softmax(zs, w[i].to(zb.device), temperature=temperature).gather(1, target).view(-1)
            alp = torch.log_softmax(zs[1].float(), dim=-1).gather(1, target).view(-1)
            lps.append(lp), alps.append(alp)
        return ScoreOutput(lps, alps)


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------

def _draw(zs, mask, seen, *, w, w_masked, w_one, seeds, knobs, first, penalty, offset):
    """One step's draw from the experts' ``[B, V]`` logits ``zs``: ``(tokens, logprobs,
    adapter_logprobs)``. ``mask``: ``[B, V]`` bool of banned tokens or None; ``seen``: the
    repetition penalty's ``[B, V]`` bool of tokens seen so far, or None."""
    if seen is not None:  # penalty on the mixed logits: mix here, sample the mix alone
        z = _repetition_penalty(mix_experts(zs, w), seen, penalty)
        if mask is not None:
            z = z.masked_fill(mask, float("-inf"))
        s = sample_experts([z], w_one, seed=seeds, offset=offset, **knobs)
    elif mask is not None:  # -inf under weight 1 masks the mixed logit whatever the weights
        hard = torch.zeros(mask.shape, device=mask.device).masked_fill_(mask, float("-inf"))
        s = sample_experts(zs + [hard], w_masked, seed=seeds, offset=offset, **knobs)
    else:
        s = sample_experts(zs, w, seed=seeds, offset=offset, **knobs)
    return s.tokens, s.logprobs, None if first is None else _gather_log_softmax(zs[first], s.tokens)


def _merge_shared_initials(experts, prefixes, w, nb):
    """``(experts, prefixes, w)`` with the residual adapters that share one initial network (the
    same module object, loaded once by ``from_pretrained``) and see the same prefixes split into
    their trained networks and that initial network, run once at weight ``-sum_k w_k``:
    ``sum_k w_k (trained_k - initial) = sum_k w_k trained_k - (sum_k w_k) initial``, the same
    mix up to float rounding, one network fewer per extra adapter. ``w``: ``[B, nb + K]`` (the
    base's column first when ``nb`` is 1). Unchanged when no initial network is shared."""
    groups: dict = {}
    for k, e in enumerate(experts):
        if isinstance(e, ResidualAdapter):
            groups.setdefault((id(e.initial), repr(prefixes[k])), []).append(k)
    if not any(len(ks) > 1 for ks in groups.values()):
        return experts, prefixes, w
    out_e, out_p, cols = [], [], [w[:, j] for j in range(nb)]
    merged = {k: ks for ks in groups.values() if len(ks) > 1 for k in ks}
    for k, e in enumerate(experts):
        if k not in merged:
            out_e.append(e), out_p.append(prefixes[k]), cols.append(w[:, nb + k])
            continue
        out_e.append(e.trained), out_p.append(prefixes[k]), cols.append(w[:, nb + k])
        ks = merged[k]
        if k == ks[-1]:  # the shared initial network once, after the last of its adapters
            out_e.append(e.initial), out_p.append(prefixes[k])
            cols.append(-sum(w[:, nb + j] for j in ks))
    return out_e, out_p, torch.stack(cols, dim=1).contiguous()


def _mixed_through_head(hidden, w, head, dev) -> torch.Tensor:
    """``head @ sum_j w[:, j] * hidden[j]``: the mixed logits ``[B, V]`` (float32) from the models'
    last hidden states ``[B, d]`` and their ``[B, K']`` weights, through the shared ``head [V, d]``."""
    h = sum(w[:, j:j + 1] * x.to(dev).float() for j, x in enumerate(hidden))
    return (h.to(head.dtype) @ head.T).float()


def _decode_step(lms, tokens, mask, seen, V, dev, draw, head=None, w_mix=None):
    """The compiled step: every model's one-token forward over its static cache (hidden states mixed
    through the shared ``head`` with weights ``w_mix`` when given), then :func:`_draw`."""
    outs = [lm.forward_step(tokens) for lm in lms]
    zs = [_mixed_through_head(outs, w_mix, head, dev)] if head is not None else [z[:, :V].to(dev) for z in outs]
    return _draw(zs, mask, seen, **draw)


_COMPILED_STEPS: dict = {}


_FROZEN_VERSIONS: dict = {}


def _compiled_step(backend, models):
    """``torch.compile(_decode_step, fullgraph=True)`` for ``backend``, made once per process (torch
    keeps one graph per distinct set of models, batch, cache width and Python knobs). Inductor's
    graphs hold frozen copies of the weights: when a model's weights changed in place since its
    last compiled call (their version counters moved), torch's compiled graphs are dropped."""
    if backend == "inductor":
        key = tuple(id(m) for m in models)
        versions = tuple(sum(p._version for p in m.parameters()) for m in models)
        if _FROZEN_VERSIONS.get(key, versions) != versions:
            torch._dynamo.reset()
        _FROZEN_VERSIONS[key] = versions
    fn = _COMPILED_STEPS.get(backend)
    if fn is None:
        # inductor's freezing folds the (frozen, no-grad) weights into the graph as constants, which
        # lets it pre-pack them for its CPU matmul kernels
        options = {"freezing": True} if backend == "inductor" else None
        fn = _COMPILED_STEPS[backend] = torch.compile(_decode_step, fullgraph=True, dynamic=False, backend=backend,
                                                      options=options)
    return fn


def _run_compiled(step_fn, lms, tokens, mask, seen, *, V, dev, head=None, w_mix=None, **draw):
    try:
        return step_fn(lms, tokens, mask, seen, V, dev, draw, head, w_mix)
    except torch._dynamo.exc.TorchDynamoException as exc:  # a graph break, a backend failure
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RuntimeError(f"compile: the decode step could not be compiled as one graph ({first_line}); "
                           f"pass compile=False") from None


def _context_size(model) -> int | None:
    """The model's position limit from its config (None when it declares none)."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _default_dtype(device) -> "torch.dtype | str":
    """The checkpoint's own dtype ("auto"), except float32 on the CPU: CPU matmuls in fp16/bf16
    are several times slower than in fp32 (the shipped models are stored in fp16)."""
    if device is None or torch.device(device).type == "cpu":
        return torch.float32
    return "auto"


def _full_logits(model, rows, pad_id):
    dev = next(model.parameters()).device
    ids, mask = left_pad(rows, pad_id, dev)
    pos = (mask.cumsum(1) - 1).clamp_(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits


def _finite_weight(name: str, value) -> float:
    """An expert's weight as a float: a real number in ``RANGES["weights"]`` (finite, within
    float32), else a one-line ValueError / TypeError naming it."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond any float
        v = float("inf")
    if not RANGES["weights"].ok(v):
        raise ValueError(f"{name} must be {RANGES['weights'].rule}, got {value!r}")
    return v


def _repetition_penalty(z, seen, penalty):
    return torch.where(seen, torch.where(z > 0, z / penalty, z * penalty), z)


def _gather_log_softmax(z, tok):
    # One fused log_softmax kernel beats logsumexp's separate passes on CPU (2.3 vs 3.0 ms at [16, 50257]).
    return torch.log_softmax(z.float(), dim=-1).gather(1, tok.view(-1, 1)).view(-1)


def _as_id_list(x) -> list[int]:
    if x is None:
        return []
    if isinstance(x, numbers.Integral):
        return [int(x)]
    return [int(i) for i in x]


def _split_bad_words(bad_words_ids, V):
    if not bad_words_ids:
        return None, []
    single, seqs = [], []
    for seq in bad_words_ids:
        seq = [int(i) for i in seq]
        if not seq or min(seq) < 0 or max(seq) >= V:
            raise ValueError(f"bad_words_ids entries must be non-empty lists of ids in [0, {V}), got {seq}")
        (single.append(seq[0]) if len(seq) == 1 else seqs.append(seq))
    return (single or None), seqs


def _hits_stop(tokenizer, ids: list[int], stops: list[str]) -> bool:
    # A stop string of n characters spans at most 4n byte-level tokens: decode only that tail.
    window = 4 * max(len(s) for s in stops) + 1
    tail = tokenizer.decode(ids[-window:], skip_special_tokens=True)
    return any(s in tail for s in stops)


def _cut_at_stop(text: str, stops: list[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def _try_tokenizer(path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception:
        return None


def _core_hash(tok) -> str:
    """The tokenizer's own vocabulary and merges, ignoring added tokens (control tokens an
    adapter's copy may add): two tokenizers with equal core hashes share token ids below V."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return json.dumps(sorted(tok.get_vocab().items()))
    model = json.loads(backend.to_str())["model"]
    return json.dumps([model.get("vocab"), model.get("merges")], sort_keys=True)


# ----------------------------------------------------------------------------------------------
# Adapter metadata
# ----------------------------------------------------------------------------------------------

def save_adapter(directory, adapter, tokenizer, *, alpha=1.0, adapter_prefix=None, vocab_size=None,
                 base=None, reference_policy=None, control_tokens=None, extra=None) -> Path:
    """Save an adapter as Hugging Face files plus ``ipa_adapter.json`` with what restores the
    tailored policy exactly: alpha, the adapter's control prefix (ids and tokens), the shared
    vocabulary size, the tokenizer hash, the base it was trained with and the reference policy."""
    from ipa_fast.decoding.tokenizer import tokenizer_hash

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    adapter.save_pretrained(d)
    tokenizer.save_pretrained(d)
    prefix = [int(i) for i in (adapter_prefix or [])]
    meta = {
        "format": "ipa_fast.adapter", "version": ADAPTER_META_VERSION,
        "alpha": float(alpha), "adapter_prefix": prefix,
        "adapter_prefix_tokens": tokenizer.convert_ids_to_tokens(prefix) if prefix else [],
        "control_tokens": list(control_tokens or []),
        "vocab_size": vocab_size, "tokenizer_hash": tokenizer_hash(tokenizer),
        "base": None if base is None else str(base), "reference_policy": reference_policy,
        **(extra or {}),
    }
    tmp = d / (ADAPTER_META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(d / ADAPTER_META_FILE)
    return d


def load_adapter_metadata(directory) -> dict | None:
    """The ``ipa_adapter.json`` beside an adapter's files, or None when there is none."""
    f = Path(str(directory)) / ADAPTER_META_FILE
    if not f.is_file():
        return None
    meta = json.loads(f.read_text())
    if meta.get("format") != "ipa_fast.adapter":
        raise ValueError(f"{f} is not an ipa_fast adapter metadata file")
    _check_shared_tensors(Path(str(directory)), meta)
    return meta


def _check_shared_tensors(directory: Path, meta: dict) -> None:
    """A shipped adapter's own directory (``models/adapters/<task>``) leaves out the tensors it
    shares with the base (``shared_with_base``); transformers would load it with those tensors
    freshly initialised, so it is refused in one line that names the assembled copy."""
    shared = meta.get("shared_with_base") or {}
    files = sorted(directory.glob("*.safetensors"))
    if not shared or not files:
        return
    from safetensors import safe_open

    names = set()
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            names.update(fh.keys())
    missing = sorted(set(shared) - names)
    if missing:
        raise ValueError(f"adapter {directory} holds only its own layers ({missing[0]} is shared with the base and "
                         f"not in its weight files): load the copy `ipa-fast setup` assembles, "
                         f"ipa_fast.embedded.adapter_path(task) for a shipped adapter")
