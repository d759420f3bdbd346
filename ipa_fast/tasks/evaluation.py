"""The evaluation protocol's task-independent metrics (docs/DESIGN.md §6).

- Fluency: perplexity = exp(total NLL / total tokens) of the continuations given the plain
  prompt, under the base model alone.
- Diversity: distinct-2 over all continuations (unique word bigrams / all word bigrams).
Task scores (lexical coverage, offensive rate) are the rewards in ``ipa_fast.training.rewards``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Unique word n-grams over all n-grams of all texts (0.0 when there is none)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen, total = set(), 0
    for text in texts:
        words = text.split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


@torch.no_grad()
def perplexity(model, prompt_ids: Sequence[Sequence[int]], continuation_ids: Sequence[Sequence[int]],
               batch_size: int = 16, pad_token_id: int = 0) -> float:
    """exp(total NLL / total tokens) of each continuation given its prompt, under ``model``.

    Sequences are left-padded into batches with position ids from the attention mask, so
    the result does not depend on ``batch_size`` beyond float rounding.
    """
    if len(prompt_ids) != len(continuation_ids):
        raise ValueError(f"got {len(prompt_ids)} prompts but {len(continuation_ids)} continuations")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, len(prompt_ids), batch_size):
        prompts = prompt_ids[start:start + batch_size]
        conts = continuation_ids[start:start + batch_size]
        seqs = [list(p) + list(c) for p, c in zip(prompts, conts)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        target = torch.zeros((len(seqs), width), dtype=torch.bool)
        for row, (seq, p) in enumerate(zip(seqs, prompts)):
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
            target[row, width - len(seq) + max(len(p), 1):] = True   # tokens after the prompt
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       position_ids=position_ids.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tok_logp = logp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        sel = target[:, 1:].to(device)
        nll -= float(tok_logp[sel].double().sum())
        count += int(sel.sum())
    if count == 0:
        raise ValueError("no continuation tokens to score")
    return math.exp(nll / count)


def all_concepts_rate(coverages: Sequence[float]) -> float:
    """Fraction of outputs that use every one of their concepts (coverage exactly 1)."""
    if not coverages:
        raise ValueError("no coverages to rate")
    return sum(1 for c in coverages if c >= 1.0) / len(coverages)


def wordlist_offensive_rate(texts: Sequence[str]) -> float:
    """The evaluation-only offensiveness scorer: the fraction of texts that contain a word or
    phrase of ``better-profanity``'s word list (with its leetspeak variants). A different kind of
    judge from the training reward (``alt-profanity-check``, a linear model over character and
    word n-grams): a detox adapter that games the reward's model is not rewarded by this list."""
    from better_profanity import profanity

    if not texts:
        raise ValueError("no texts to rate")
    if not getattr(wordlist_offensive_rate, "_loaded", False):
        profanity.load_censor_words()
        wordlist_offensive_rate._loaded = True
    return sum(1 for t in texts if profanity.contains_profanity(t)) / len(texts)
