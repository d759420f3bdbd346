"""Tailored decoding: a frozen base LM and a small adapter LM stepping in lock step.

    pi(x_t | x_<t)  ∝  p_base(x_t | x_<t) · p_adapter(x_t | adapter_prefix, x_<t)^alpha

    lm = TailoredLM.from_pretrained("path/to/base", "path/to/adapter", alpha=1.0)
    out = lm.generate(["The cat"], max_new_tokens=32, top_p=0.9, seed=0)
    out.texts, out.token_ids, out.logprobs, out.adapter_logprobs

The loop (:meth:`TailoredLM.generate`) reads top to bottom: encode → left-pad → prefill both
models (each with its own KV cache) → per step: trim logits to the shared vocabulary V, hard
masks, one fused :func:`ipa_fast.sample` call, bookkeeping, one cached forward of each model.
A row's randomness is keyed by (its seed, the unpadded position of the token being drawn), so
its output does not depend on the batch it is in.
"""
from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .ops import tailored_log_softmax
from .sampling import sample

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
    masks) of the chosen token — what RL needs for KL terms.
    ``texts`` are the decoded generated tokens (special tokens skipped), cut before the first
    stop string. ``finish_reasons`` is "eos", "stop" or "length".
    """
    texts: list[str]
    token_ids: list[list[int]]
    logprobs: list[list[float]]
    adapter_logprobs: list[list[float]]
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

    def __init__(self, model, pad_id: int = 0):
        self.model = model
        self.pad_id = pad_id
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
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         logits_to_keep=1)
        self.cache = out.cache
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.width += 1
        out = self.model(input_ids=tokens.to(self.device).view(-1, 1),
                         attention_mask=self.mask[:, :self.width],
                         position_ids=self.next_pos.view(-1, 1), cache=self.cache, use_cache=True)
        self.next_pos = self.next_pos + 1
        self.cache = out.cache
        return out.logits[:, -1]


class _ZeroLM:
    """Zero logits in place of a base: ``base_weight=0`` decodes with the adapter alone."""

    def __init__(self, vocab_size: int, device):
        self.V, self.device = vocab_size, device

    def prefill(self, rows, max_new_tokens):
        self.B = len(rows)
        return torch.zeros((self.B, self.V), device=self.device)

    def step(self, tokens):
        return torch.zeros((self.B, self.V), device=self.device)


class SparseBase:
    """A local base reduced to its top-k log-probs per step, densified with ``-inf`` outside
    them: the in-process twin of an API-only base (docs/DESIGN.md §2.10 sparse base)."""

    def __init__(self, lm: CachedLM, top_k: int, vocab_size: int):
        self.lm, self.top_k, self.V = lm, top_k, vocab_size

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


# ----------------------------------------------------------------------------------------------
# Vocabulary checks
# ----------------------------------------------------------------------------------------------

def _out_vocab(model) -> int:
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.vocab_size


def _in_vocab(model) -> int:
    return model.get_input_embeddings().weight.shape[0]


def shared_vocab_size(base, adapter, tokenizer, vocab_size: int | None = None) -> int:
    """The shared output vocabulary V, or a ValueError naming the mismatch.

    V = ``len(tokenizer)`` trimmed to the base's output size: a padded embedding matrix (more
    outputs than the tokenizer has tokens) is trimmed; a tokenizer with extra *added* tokens the
    base cannot emit (e.g. Quark control tokens for the adapter) keeps them out of V. A base or
    adapter with fewer outputs than the tokenizer's own vocabulary is refused.
    """
    nb, na = _out_vocab(base), _out_vocab(adapter)
    n_tok = len(tokenizer)
    n_core = getattr(tokenizer, "vocab_size", n_tok)  # without added tokens
    if vocab_size is None:
        vocab_size = min(n_tok, nb)
        if nb < n_core:
            raise ValueError(
                f"vocabulary mismatch: the base has {nb} output logits but the tokenizer has "
                f"{n_core} tokens; base and adapter must share the tokenizer's vocabulary")
    if nb < vocab_size or na < vocab_size:
        raise ValueError(
            f"vocabulary mismatch: the shared vocabulary has {vocab_size} tokens but the base has "
            f"{nb} output logits and the adapter {na}; base and adapter must share one tokenizer")
    return vocab_size


# ----------------------------------------------------------------------------------------------
# TailoredLM
# ----------------------------------------------------------------------------------------------

class TailoredLM:
    """Product-of-experts decoding of a frozen ``base`` and an ``adapter`` over one tokenizer.

    ``base``, ``adapter``: Hugging Face causal LMs (any architectures, dtypes and devices; the
    adapter's logits are moved to the base's device for sampling), or ``base`` an
    :class:`ipa_fast.api_base.APIBase`. ``adapter_prefix``: token ids (or a string) the adapter
    sees before every prompt (e.g. a Quark reward token; ids >= V allowed: input-only rows of the
    adapter's embedding). ``base_top_k``: reduce a local base to its top-k log-probs per step
    (the sparse-base path API bases take). ``vocab_size``: override the shared vocabulary V.
    """

    def __init__(self, base, adapter, tokenizer, alpha=1.0, adapter_prefix=None, *,
                 base_top_k: int | None = None, vocab_size: int | None = None, metadata: dict | None = None):
        from .api_base import APIBase  # local import: api_base imports this module

        self.base, self.adapter, self.tokenizer = base, adapter, tokenizer
        self.alpha = alpha
        self.is_api_base = isinstance(base, APIBase)
        if self.is_api_base:  # the server's vocabulary is the tokenizer's: check the adapter alone
            self.V = shared_vocab_size(adapter, adapter, tokenizer, vocab_size)
            base.vocab_size = self.V
        else:
            self.V = shared_vocab_size(base, adapter, tokenizer, vocab_size)
        self.base_top_k = base_top_k
        self.adapter_prefix = self._prefix_ids(adapter_prefix)
        self.metadata = dict(metadata or {})
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else pad
        self.device = base.device if self.is_api_base else next(base.parameters()).device

    # -- loading / saving ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, base_name_or_path, adapter_name_or_path, *, tokenizer=None,
                        alpha: float | None = None, adapter_prefix=None, base_dtype=None, base_device=None,
                        adapter_dtype=None, adapter_device=None, base_top_k: int | None = None,
                        dtype=None, torch_dtype=None, device_map=None, **model_kwargs) -> "TailoredLM":
        """Load both models (``AutoModelForCausalLM``) and the tokenizer.

        ``base_name_or_path`` may also be an :class:`~ipa_fast.api_base.APIBase`, or a base model
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
          :class:`~ipa_fast.api_base.APIBase`). The adapter then goes to the device of the
          base's first parameters, where decoding samples, unless ``adapter_device`` is given.
          ``base_device`` and ``device_map`` together raise ``TypeError``.
        - ``base_device`` / ``adapter_device``: move the loaded model there (the adapter may sit
          on another device than the base: its logits are moved to the base's device).

        Other keyword arguments (``revision``, ``attn_implementation``, ...) go to both models'
        ``from_pretrained``.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .api_base import APIBase
        from .tokenizer import tokenizer_hash

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

        meta = load_adapter_metadata(adapter_name_or_path)
        if api_base:
            base = base_name_or_path
            adapter = load(adapter_name_or_path, adapter_dtype, adapter_device, device_map)
        elif loaded_base:
            base = base_name_or_path
            adapter = load(adapter_name_or_path, adapter_dtype,
                           adapter_device if adapter_device is not None else next(base.parameters()).device, None)
        elif device_map is None:
            adapter = load(adapter_name_or_path, adapter_dtype, adapter_device, None)
            base = load(base_name_or_path, base_dtype, base_device, None)
        else:  # the adapter follows the base unless told where to go
            base = load(base_name_or_path, base_dtype, None, device_map)
            adapter = load(adapter_name_or_path, adapter_dtype,
                           adapter_device if adapter_device is not None else next(base.parameters()).device, None)
        ad_tok = _try_tokenizer(adapter_name_or_path)
        base_tok = None if api_base or loaded_base else _try_tokenizer(base_name_or_path)
        if base_tok is not None and ad_tok is not None and _core_hash(base_tok) != _core_hash(ad_tok):
            raise ValueError(f"tokenizer mismatch: {base_name_or_path} and {adapter_name_or_path} ship "
                             f"different tokenizers; base and adapter must share one vocabulary")
        if tokenizer is None:
            tokenizer = ad_tok or base_tok or getattr(base, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("no tokenizer found beside the base or the adapter; pass tokenizer=...")
        if isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if meta:
            if meta.get("tokenizer_hash") and meta["tokenizer_hash"] != tokenizer_hash(tokenizer):
                raise ValueError(f"tokenizer mismatch: {adapter_name_or_path} was saved with tokenizer "
                                 f"{meta['tokenizer_hash'][:12]}…, got {tokenizer_hash(tokenizer)[:12]}…")
            alpha = meta.get("alpha", 1.0) if alpha is None else alpha
            adapter_prefix = meta.get("adapter_prefix") if adapter_prefix is None else adapter_prefix
        lm = cls(base, adapter, tokenizer, alpha=1.0 if alpha is None else alpha, adapter_prefix=adapter_prefix,
                 base_top_k=base_top_k, vocab_size=(meta or {}).get("vocab_size"), metadata=meta)
        trained = (meta or {}).get("base")
        if trained and not (api_base or loaded_base) and str(base_name_or_path) != trained:
            lm.metadata.setdefault("warnings", []).append(
                f"adapter was trained with base {trained!r}, now paired with {str(base_name_or_path)!r}")
        return lm

    def save_adapter(self, directory, *, base: str | None = None, reference_policy: str | None = None,
                     control_tokens: list[str] | None = None, extra: dict | None = None) -> Path:
        """Write the adapter (HF files), the tokenizer and ``ipa_adapter.json`` to ``directory``."""
        return save_adapter(directory, self.adapter, self.tokenizer, alpha=self.alpha,
                            adapter_prefix=self.adapter_prefix, vocab_size=self.V,
                            base=base or self.metadata.get("base"),
                            reference_policy=reference_policy or self.metadata.get("reference_policy"),
                            control_tokens=control_tokens or self.metadata.get("control_tokens"), extra=extra)

    # -- input handling ------------------------------------------------------------------------

    def _prefix_ids(self, prefix) -> list[int]:
        if prefix is None:
            return []
        if isinstance(prefix, str):
            return self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
        ids = [int(i) for i in prefix]
        n_in = _in_vocab(self.adapter)
        if any(i < 0 or i >= n_in for i in ids):
            raise ValueError(f"adapter_prefix ids must be in [0, {n_in}) (the adapter's embedding rows), got {ids}")
        return ids

    def _row_prefixes(self, prefix, B) -> list[list[int]]:
        """The adapter's prefix for each row: the model's, one for all rows, or one per row
        (a list of B strings / id lists, e.g. Quark quantile tokens during training)."""
        if prefix is None:
            return [self.adapter_prefix] * B
        if isinstance(prefix, torch.Tensor):
            prefix = prefix.tolist()
        if isinstance(prefix, (list, tuple)) and prefix and not isinstance(prefix[0], numbers.Integral):
            if len(prefix) != B:
                raise ValueError(f"adapter_prefix has {len(prefix)} per-row entries for {B} prompts")
            return [self._prefix_ids(p) for p in prefix]
        return [self._prefix_ids(prefix)] * B

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
        if self.is_api_base:
            return self.base
        lm = CachedLM(self.base, self.pad_id)
        return SparseBase(lm, self.base_top_k, self.V) if self.base_top_k else lm

    # -- decoding ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens=32, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                 seed=None, stop=None, adapter_prefix=None, min_new_tokens=0, bad_words_ids=None,
                 repetition_penalty=1.0, eos_token_id=None, alpha=None, base_weight=1.0,
                 backend="auto", truncate_prompt=None) -> GenerationOutput:
        """Sample continuations of ``prompts`` from the tailored policy.

        ``base_weight`` scales the base logits: ``z = base_weight * base + alpha * adapter``.
        ``base_weight=0`` samples from the adapter alone (with its prefix; the base model is
        not run), as the paper's adapter-only comparison does; ``alpha=0`` gives the base alone.

        ``max_new_tokens``: int or one per prompt (>= 1). ``seed``: int (row r gets seed + r), a
        list / ``[B]`` tensor (one per prompt), or None (torch's generator draws seeds).
        ``temperature`` / ``top_k`` / ``top_p`` / ``min_p`` / ``alpha``: scalars or one per prompt,
        as :func:`ipa_fast.sample` (T = 0 is greedy). ``stop``: string(s) ending a row; the text
        is cut before it. ``adapter_prefix``: overrides the model's for this call (ids or a
        string for every row, or a list with one per row).
        Hard masks — ``bad_words_ids`` (HF semantics: a token is banned when the row ends with
        the sequence's prefix) and EOS before ``min_new_tokens`` — and ``repetition_penalty``
        (HF semantics, over prompt + generated tokens) act on the *mixed* logits, after
        mixing and before filtering, as the official IPA code applies its masks.
        ``truncate_prompt``: a prompt that does not fit the base's (or the adapter's, with its
        prefix) context together with ``max_new_tokens`` raises ValueError naming the lengths;
        ``"left"`` keeps its last tokens instead (``prompt_token_ids`` of the output show it).
        """
        rows = self.encode(prompts)
        B = len(rows)
        max_new = self._per_row("max_new_tokens", max_new_tokens, B, integer=True)
        max_new = torch.as_tensor(max_new, device=self.device).expand(B).clone()
        if int(max_new.min()) <= 0:
            raise ValueError(f"max_new_tokens must be >= 1, got {int(max_new.min())}")
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        steps = int(max_new.max())
        alpha = self.alpha if alpha is None else alpha
        knobs = dict(alpha=self._per_row("alpha", alpha, B), temperature=self._per_row("temperature", temperature, B),
                     top_k=self._per_row("top_k", top_k, B, integer=True), top_p=self._per_row("top_p", top_p, B),
                     min_p=self._per_row("min_p", min_p, B), backend=backend)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        seeds = self._per_row("seed", seed, B, integer=True)
        prefixes = self._row_prefixes(adapter_prefix, B)
        rows = self._fit_context(rows, prefixes, steps, truncate_prompt, base_weight != 0)
        eos_ids = _as_id_list(self.tokenizer.eos_token_id if eos_token_id is None else eos_token_id)
        if any(not 0 <= i < self.V for i in eos_ids):
            raise ValueError(f"eos_token_id must be in [0, {self.V}), got {eos_ids}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        banned_single, banned_seqs = _split_bad_words(bad_words_ids, self.V)
        V, dev = self.V, self.device

        # Prefill: the base sees the prompt, the adapter its prefix + the prompt.
        if base_weight == 0 and self.is_api_base:
            raise ValueError("base_weight=0 (adapter alone) is not available with an API base")
        base_lm = _ZeroLM(V, dev) if base_weight == 0 else self._base_lm()
        adapter_lm = CachedLM(self.adapter, self.pad_id)
        base_logits = base_lm.prefill(rows, steps)
        adapter_logits = adapter_lm.prefill([p + r for p, r in zip(prefixes, rows)], steps)
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

        for t in range(steps):
            z_base = base_logits[:, :V] if base_weight == 1 else base_weight * base_logits[:, :V].float()
            z_adapter = adapter_logits[:, :V].to(dev)
            mask = self._hard_mask(t, rows, host_tokens, min_new_tokens, eos_t, banned_single, banned_seqs)
            if seen is not None:  # penalty on the mixed logits: mix here, sample without adapter
                z_base = _repetition_penalty(_mix(z_base, z_adapter, knobs["alpha"]), seen, repetition_penalty)
                if mask is not None:
                    z_base = z_base.masked_fill(mask, float("-inf"))
                s = sample(z_base, None, seed=seeds, offset=prompt_len + t,
                           **{k: v for k, v in knobs.items() if k != "alpha"})
            else:  # a -inf base logit masks the mixed logit whatever alpha is
                if mask is not None:
                    z_base = z_base.masked_fill(mask, float("-inf"))
                s = sample(z_base, z_adapter, seed=seeds, offset=prompt_len + t, **knobs)
            tok = s.tokens
            active = ~done
            out_tokens[:, t] = tok
            out_lp[:, t] = s.logprobs
            out_alp[:, t] = _gather_log_softmax(z_adapter, tok)
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
            base_logits = base_lm.step(tok, ~done) if self.is_api_base else base_lm.step(tok)
            adapter_logits = adapter_lm.step(tok)

        n = n_out.tolist()
        ids_all, lp_all, alp_all = out_tokens.tolist(), out_lp.tolist(), out_alp.tolist()
        token_ids = [ids_all[i][:n[i]] for i in range(B)]
        texts = [_cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), stops) for ids in token_ids]
        return GenerationOutput(texts=texts, token_ids=token_ids, logprobs=[lp_all[i][:n[i]] for i in range(B)],
                                adapter_logprobs=[alp_all[i][:n[i]] for i in range(B)], finish_reasons=finish,
                                prompt_token_ids=rows)

    def _fit_context(self, rows, prefixes, steps, truncate_prompt, with_base=True):
        """Check every row against the models' position limits (max_position_embeddings /
        n_positions): decoding ``steps`` tokens feeds ``len(prompt) + steps - 1`` positions to
        the base and ``len(prefix) + len(prompt) + steps - 1`` to the adapter."""
        if truncate_prompt not in (None, "left"):
            raise ValueError(f"truncate_prompt must be None or 'left', got {truncate_prompt!r}")
        limits = [("adapter", _context_size(self.adapter), prefixes)]
        if with_base and not self.is_api_base:
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
                        + (f" (with the adapter's {len(pre[i])}-token prefix)" if pre[i] else "")
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

    def score(self, prompts, completions_ids, *, adapter_prefix=None, temperature=1.0, alpha=None) -> ScoreOutput:
        """Per-token tailored and adapter log-probs of given completions (teacher forcing).

        One no-cache forward of each model over prompt + completion (left-padded). No hard
        masks or penalties are applied. Runs with grad if grad is enabled (the adapter's
        parameters get gradients; the base runs under ``no_grad``).
        """
        if self.is_api_base:
            raise NotImplementedError("score() needs a local base (an API base returns top-k log-probs only)")
        rows = self.encode(prompts)
        comps = [[int(i) for i in c] for c in completions_ids]
        if len(comps) != len(rows):
            raise ValueError(f"{len(comps)} completions for {len(rows)} prompts")
        prefixes = self._row_prefixes(adapter_prefix, len(rows))
        alpha = self.alpha if alpha is None else alpha
        full = [r + c for r, c in zip(rows, comps)]
        with torch.no_grad():
            base_logits = _full_logits(self.base, full, self.pad_id)
        adapter_logits = _full_logits(self.adapter, [p + f for p, f in zip(prefixes, full)], self.pad_id)
        lps, alps = [], []
        for i, (r, c) in enumerate(zip(rows, comps)):
            # Row i is right-aligned: its last len(c) tokens are the completion, predicted by the
            # logits one position earlier.
            n = len(c)
            if n == 0:
                lps.append(torch.zeros(0)), alps.append(torch.zeros(0))
                continue
            zb = base_logits[i, -n - 1:-1, :self.V]
            za = adapter_logits[i, -n - 1:-1, :self.V].to(zb.device)
            target = torch.tensor(c, device=zb.device).view(-1, 1)
            a = alpha[i] if isinstance(alpha, torch.Tensor) and alpha.dim() else alpha
            lp = tailored_log_softmax(zb, za, alpha=float(a), temperature=temperature).gather(1, target).view(-1)
            alp = torch.log_softmax(za.float(), dim=-1).gather(1, target).view(-1)
            lps.append(lp), alps.append(alp)
        return ScoreOutput(lps, alps)


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------

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


def _mix(base, adapter, alpha):
    a = torch.as_tensor(alpha, dtype=torch.float32, device=base.device)
    a = a.view(-1, 1) if a.dim() else a
    return base.float() + torch.where(a == 0, torch.zeros((), device=base.device), a * adapter.float())


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
    from .tokenizer import tokenizer_hash

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
    return meta
