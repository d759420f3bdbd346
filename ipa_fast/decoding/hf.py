"""Tailoring inside Hugging Face ``model.generate()``: a ``LogitsProcessor``.

    proc = TailoredLogitsProcessor.from_pretrained("models/adapters/detox", pad_token_id=tok.pad_token_id)
    # or, with an adapter model already loaded: TailoredLogitsProcessor(adapter, alpha=0.5, ...)
    base.generate(**tok(prompts, return_tensors="pt", padding=True), do_sample=True, top_p=0.9,
                  logits_processor=LogitsProcessorList([proc]))

``from_pretrained`` loads an adapter directory and restores what its ``ipa_adapter.json``
records (written by :func:`ipa_fast.save_adapter` / ``ipa-fast train``): alpha, the adapter's
control prefix and the shared vocabulary size; explicit arguments override. A trained adapter
is meant to be used at its saved alpha (e.g. 0.5 for the shipped detox adapter).
At each step the processor returns ``scores + alpha * adapter_logits`` (the tailored policy's
logits up to a per-row constant); HF's warpers (temperature, top-k, top-p) and its draw then act
on the mixed logits, as in the official IPA code. The processor keeps its own adapter KV cache:
the first call prefills the adapter on the prompt, later calls feed one token. It cannot see the
attention mask, so it derives it from ``pad_token_id``: only *leading* pad tokens are padding
(left-padded batches; a pad/eos token inside a prompt still counts as a token).
Use ``TailoredLM`` for the fused sampler, per-row seeds and log-probs; this is for users of
``generate()``. Greedy and sampling work; beam search is not supported (rows are reordered).
"""
from __future__ import annotations

import torch

from ipa_fast.decoding.tailored import CachedLM

try:
    from transformers import LogitsProcessor
except ImportError:  # pragma: no cover
    LogitsProcessor = object


class TailoredLogitsProcessor(LogitsProcessor):
    """Mix an ``adapter`` LM's logits into the base's scores inside ``model.generate()``.

    ``adapter_prefix``: ids the adapter sees before every prompt (e.g. a Quark control token).
    ``vocab_size``: the shared vocabulary V; score columns >= V (a padded base head) are set to
    ``-inf``. Default: the adapter's output size, trimmed to the scores' width.
    """

    def __init__(self, adapter, alpha: float = 1.0, pad_token_id: int | None = None, *,
                 adapter_prefix: list[int] | None = None, vocab_size: int | None = None):
        self.adapter = adapter.eval()
        self.alpha = float(alpha)
        self.pad_token_id = pad_token_id
        self.adapter_prefix = [int(i) for i in (adapter_prefix or [])]
        self.vocab_size = vocab_size
        self.metadata: dict = {}
        self.reset()

    @classmethod
    def from_pretrained(cls, adapter_name_or_path, *, alpha: float | None = None, pad_token_id: int | None = None,
                        adapter_prefix: list[int] | None = None, vocab_size: int | None = None, dtype=None,
                        device=None, **model_kwargs) -> "TailoredLogitsProcessor":
        """Load the adapter (``AutoModelForCausalLM``) and the settings its ``ipa_adapter.json``
        saved: ``alpha`` (else 1.0), ``adapter_prefix`` and ``vocab_size``; arguments given here
        win. ``pad_token_id``: default the adapter directory's tokenizer's pad (else eos) id."""
        from transformers import AutoModelForCausalLM

        from ipa_fast.decoding.tailored import _try_tokenizer, load_adapter_metadata

        from ipa_fast.decoding.residual import wrap_if_residual

        meta = load_adapter_metadata(adapter_name_or_path) or {}

        def load(path):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **model_kwargs)
            return model if device is None else model.to(device)

        # a residual adapter (ipa_adapter.json: residual_of) steps as adapter - its initial weights
        model = wrap_if_residual(load(adapter_name_or_path), meta, adapter_name_or_path, load)
        if pad_token_id is None:
            tok = _try_tokenizer(adapter_name_or_path)
            if tok is not None:
                pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        proc = cls(model, alpha=meta.get("alpha", 1.0) if alpha is None else alpha, pad_token_id=pad_token_id,
                   adapter_prefix=meta.get("adapter_prefix") if adapter_prefix is None else adapter_prefix,
                   vocab_size=meta.get("vocab_size") if vocab_size is None else vocab_size)
        proc.metadata = meta
        return proc

    def reset(self) -> None:
        """Forget the adapter cache (done automatically when a new ``generate()`` starts)."""
        self._lm = None
        self._seen = None  # the input_ids the cache holds

    def _mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.pad_token_id is None:
            return torch.ones_like(input_ids)
        return ((input_ids != self.pad_token_id).long().cumsum(1) > 0).long()

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        continuing = (self._seen is not None and input_ids.shape[0] == self._seen.shape[0]
                      and input_ids.shape[1] == self._seen.shape[1] + 1
                      and torch.equal(input_ids[:, :-1], self._seen))
        if continuing:
            logits = self._lm.step(input_ids[:, -1])
        else:
            self._lm = CachedLM(self.adapter, 0 if self.pad_token_id is None else self.pad_token_id)
            mask = self._mask(input_ids)
            rows = [self.adapter_prefix + r[m.bool()].tolist() for r, m in zip(input_ids.cpu(), mask.cpu())]
            logits = self._lm.prefill(rows, max_new_tokens=16)  # the mask grows below
        self._seen = input_ids
        self._lm.mask = _grow(self._lm.mask, self._lm.width + 1)
        V = min(scores.shape[1], logits.shape[1], self.vocab_size or scores.shape[1])
        out = scores.float().clone()
        if self.alpha != 0:
            out[:, :V] += self.alpha * logits[:, :V].to(out.device).float()
        if V < scores.shape[1]:
            out[:, V:] = float("-inf")
        return out.to(scores.dtype)


def _grow(mask: torch.Tensor, width: int) -> torch.Tensor:
    if mask.shape[1] >= width:
        return mask
    extra = torch.ones((mask.shape[0], max(width, 2 * mask.shape[1]) - mask.shape[1]), dtype=mask.dtype,
                       device=mask.device)
    return torch.cat([mask, extra], 1)
