"""Tailoring inside Hugging Face ``model.generate()``: a ``LogitsProcessor``.

    proc = TailoredLogitsProcessor(adapter, alpha=1.0, pad_token_id=tok.pad_token_id)
    base.generate(**tok(prompts, return_tensors="pt", padding=True), do_sample=True, top_p=0.9,
                  logits_processor=LogitsProcessorList([proc]))

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

from .decoding import CachedLM

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
        self.reset()

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
