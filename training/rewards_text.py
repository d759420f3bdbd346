"""Rewards of the open-ended generation and knowledge-grounded dialogue tasks, and the text
measures their evaluations share (the dialogue-safety task trains on
:func:`ipa_fast.training.rewards.non_offensive`, the detox reward).

All are plain callables ``reward(prompts, completions, **fields) -> list[float]``, higher is
better, each value in [0, 1].

- :func:`open_ended_quality` — the product ``fluency x coherence x diversity``, each in [0, 1],
  as IPA's open-ended generation reward combines its three parts:

  * *fluency* (:func:`fluency`): ``min(1, exp(mean_logp - FLUENCY_REF_LOGP))`` where ``mean_logp``
    is the completion's mean token log-likelihood given the prompt under the embedded base
    (loaded once, lazily: :func:`embedded_base`), i.e. ``min(1, ppl_ref / ppl)``.
    ``FLUENCY_REF_LOGP`` is the median of the same quantity over held-out human continuations,
    so text as predictable as human text scores 1 and there is nothing to gain from being
    more predictable than that (repetitive, bland text); an empty completion scores 0. The
    base's own samples (T=1, top-p 0.9) score 1 (all of 16 validation prompts tried): fluency
    is a floor that punishes drifting into text the base finds unlikely, and coherence (mean
    0.11 on those samples) and diversity (0.97) carry the signal.
  * *coherence* (:func:`coherence`): the cosine, clipped at 0, between the LSA vectors of the
    prompt and the completion (:class:`CoherenceSpace`: TF-IDF then a truncated SVD, fitted
    once on the corpus train split and cached on disk). A cheap, model-free stand-in for the
    sentence-embedding similarity usually used: it measures topical agreement.
  * *diversity* (:func:`diversity`): ``prod_{n=2..4} (1 - rep_n)``, ``rep_n`` the fraction of
    the completion's word n-grams that repeat an earlier one (:func:`repetition_rate`).

  Cost per reward call of 16 completions of 32 tokens: one forward of the 135M base over
  16 x (prompt + completion) tokens (a few seconds on one CPU core; 16 rows took 21 s with the
  loads, on a 2-core machine shared with a training run), next to nothing for the
  other two factors; the first call loads the base and the LSA space (fitted in ~30 s on
  first use, then read from the cache).
- :func:`faithfulness` — knowledge-grounded dialogue: the fraction of the reply's content words
  (lower-cased, stop words removed, matched by lemma as the lexical reward matches concepts)
  supported by the knowledge snippet or the question, over ``max(n, FAITHFUL_MIN_WORDS)``
  where ``n`` is the reply's number of content words: the length floor keeps an empty or
  one-word reply from scoring 1 (a reply needs ``FAITHFUL_MIN_WORDS`` supported content words
  to reach 1).
"""
from __future__ import annotations

import functools
import math
import os
import pickle
from typing import Sequence

from .rewards import _WORD, _lemmas

# ---------------------------------------------------------------------------------------
# words

def _stopwords() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


#: scikit-learn's English stop-word list (318 words)
STOPWORDS = _stopwords()


def content_words(text: str) -> list[str]:
    """The content words of ``text``, in order: lower-cased words of at least 3 letters that are
    not stop words ("john's" counts as "john"; a negated auxiliary such as "weren't" is skipped)."""
    out = []
    for w in _WORD.findall(text.lower()):
        if w.endswith("n't"):  # don't, weren't, can't: function words
            continue
        w = w.split("'")[0]
        if len(w) >= 3 and w not in STOPWORDS:
            out.append(w)
    return out


def support_set(*texts: str) -> frozenset[str]:
    """Every lemma (any part of speech) of the content words of ``texts``."""
    found: set[str] = set()
    for t in texts:
        for w in content_words(t):
            found |= _lemmas(w)
    return frozenset(found)


def is_supported(word: str, support: frozenset[str]) -> bool:
    """``word`` shares a lemma with the support set (dogs ~ dog, went ~ go)."""
    return bool(_lemmas(word) & support)


# ---------------------------------------------------------------------------------------
# knowledge-grounded dialogue

FAITHFUL_MIN_WORDS = 5


def faithfulness(prompts: Sequence[str], completions: Sequence[str], knowledge: Sequence[str],
                 question: Sequence[str]) -> list[float]:
    """Per reply: supported content words / ``max(content words, FAITHFUL_MIN_WORDS)``, the
    support being the row's ``knowledge`` snippet and ``question`` (not the chat template's
    system text)."""
    out = []
    for text, k, q in zip(completions, knowledge, question):
        support = support_set(k, q)
        words = content_words(text)
        hits = sum(is_supported(w, support) for w in words)
        out.append(hits / max(len(words), FAITHFUL_MIN_WORDS))
    return out


# ---------------------------------------------------------------------------------------
# diversity

def repetition_rate(text: str, n: int) -> float:
    """rep-n of one text: 1 - unique / all of its whitespace-word n-grams (0.0 with none)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def diversity(texts: Sequence[str]) -> list[float]:
    """Per text: ``prod_{n=2..4} (1 - rep_n)``."""
    return [math.prod(1.0 - repetition_rate(t, n) for n in (2, 3, 4)) for t in texts]


# ---------------------------------------------------------------------------------------
# coherence: an LSA space fitted on the corpus train split

COHERENCE_DIM = 128


class CoherenceSpace:
    """TF-IDF (sublinear tf, stop words removed, words of 2+ letters seen in 2+ documents) then a
    truncated SVD to ``n_components`` dimensions, fitted on ``documents``.
    :meth:`similarity` is the cosine of two texts' LSA vectors clipped at 0 (a text with no
    known word has the zero vector: similarity 0)."""

    def __init__(self, documents: Sequence[str], n_components: int = COHERENCE_DIM, seed: int = 0):
        import numpy as np
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        if len(documents) < 3:
            raise ValueError(f"a coherence space needs at least 3 documents, got {len(documents)}")
        self.tfidf = TfidfVectorizer(lowercase=True, stop_words=sorted(STOPWORDS), sublinear_tf=True,
                                     token_pattern=r"(?u)\b[a-zA-Z]{2,}\b", min_df=2, dtype=np.float32)
        x = self.tfidf.fit_transform(documents)
        k = max(1, min(n_components, x.shape[1] - 1, x.shape[0] - 1))
        self.svd = TruncatedSVD(k, random_state=seed, n_iter=5).fit(x)

    def embed(self, texts: Sequence[str]):
        import numpy as np

        z = self.svd.transform(self.tfidf.transform(list(texts)))
        norm = np.linalg.norm(z, axis=1, keepdims=True)
        return z / np.where(norm > 0, norm, 1.0)

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> list[float]:
        if len(a) != len(b):
            raise ValueError(f"got {len(a)} texts to compare with {len(b)}")
        if not len(a):
            return []
        cos = (self.embed(a) * self.embed(b)).sum(axis=1)
        return [max(0.0, min(1.0, float(c))) for c in cos]


@functools.lru_cache(maxsize=1)
def coherence_space() -> CoherenceSpace:
    """The LSA space of the corpus train split, fitted once and cached under the embedded cache
    (``<home>/cache/coherence-lsa-<corpus sha>-<sklearn version>.pkl``)."""
    import sklearn

    from ipa_fast import embedded

    corpus = embedded.corpus_path("train")
    key = f"{embedded.sha256_file(corpus)[:16]}-d{COHERENCE_DIM}-sklearn{sklearn.__version__}"
    path = embedded.home() / "cache" / f"coherence-lsa-{key}.pkl"
    if path.is_file():
        with open(path, "rb") as f:
            return pickle.load(f)
    space = CoherenceSpace(embedded.read_corpus("train"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            pickle.dump(space, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except OSError:  # a read-only cache: fit again next time
        pass
    return space


def coherence(contexts: Sequence[str], texts: Sequence[str]) -> list[float]:
    """Per pair: the clipped LSA cosine of the context and the text (:func:`coherence_space`)."""
    return coherence_space().similarity(list(contexts), list(texts))


# ---------------------------------------------------------------------------------------
# fluency under the base

#: the median mean token log-likelihood (nats) of held-out human continuations given their
#: prompts under the embedded base: the open task's 229 validation references, cut to 24 words
#: (measured: median -3.81, quartiles -4.40 and -3.25)
FLUENCY_REF_LOGP = -3.8


class BaseLM:
    """Scores text under a causal LM: per-completion mean token log-likelihood and per-text
    features (the final hidden state at the last token)."""

    def __init__(self, model, tokenizer, max_prompt_tokens: int = 256, max_completion_tokens: int = 128):
        self.model, self.tok = model.eval(), tokenizer
        self.max_prompt, self.max_completion = max_prompt_tokens, max_completion_tokens
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad = 0 if pad is None else pad
        self.start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.pad

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _ids(self, text: str, limit: int, keep: str) -> list[int]:
        ids = self.tok(text, add_special_tokens=False)["input_ids"] if text else []
        return ids[-limit:] if keep == "last" else ids[:limit]

    def _batch(self, seqs: list[list[int]]):
        """Right-padded ``(input_ids, attention_mask)`` of token-id lists."""
        import torch

        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, :len(s)] = 1
        return ids, mask

    def mean_logprobs(self, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 16) -> list:
        """Per completion: mean log p(token | prompt, earlier tokens) in nats; None when empty."""
        import torch

        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        out: list = []
        with torch.no_grad():
            for b in range(0, len(prompts), batch_size):
                pairs = [(self._ids(p, self.max_prompt, "last") or [self.start],
                          self._ids(c, self.max_completion, "first"))
                         for p, c in zip(prompts[b:b + batch_size], completions[b:b + batch_size])]
                ids, mask = self._batch([p + c for p, c in pairs])
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                tok_lp = logp.gather(-1, ids[:, 1:].to(self.device).unsqueeze(-1)).squeeze(-1).cpu()
                for r, (p, c) in enumerate(pairs):
                    out.append(float(tok_lp[r, len(p) - 1:len(p) + len(c) - 1].double().mean()) if c else None)
        return out

    def features(self, texts: Sequence[str], batch_size: int = 16):
        """``[N, hidden]`` numpy array: each text's final-layer hidden state at its last token."""
        import numpy as np
        import torch

        rows = []
        with torch.no_grad():
            for b in range(0, len(texts), batch_size):
                seqs = [self._ids(t, self.max_prompt + self.max_completion, "first") or [self.start]
                        for t in texts[b:b + batch_size]]
                ids, mask = self._batch(seqs)
                hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                    output_hidden_states=True).hidden_states[-1].float().cpu()
                last = torch.tensor([len(s) - 1 for s in seqs])
                rows.append(hidden[torch.arange(len(seqs)), last].numpy())
        return np.concatenate(rows) if rows else np.zeros((0, 0))


@functools.lru_cache(maxsize=1)
def embedded_base() -> BaseLM:
    """The embedded base (``ipa-fast setup``), float32, on the GPU when there is one; loaded once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ipa_fast import embedded

    path = embedded.base_path()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    if torch.cuda.is_available():
        model = model.to("cuda")
    return BaseLM(model, AutoTokenizer.from_pretrained(str(path)))


def fluency(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Per completion: ``min(1, exp(mean_logp - FLUENCY_REF_LOGP))`` under the embedded base; 0
    for an empty completion."""
    lps = embedded_base().mean_logprobs(list(prompts), list(completions))
    return [0.0 if lp is None else min(1.0, math.exp(lp - FLUENCY_REF_LOGP)) for lp in lps]


def open_ended_parts(prompts: Sequence[str], completions: Sequence[str]) -> dict[str, list[float]]:
    """The three factors of :func:`open_ended_quality`, per completion."""
    return {"fluency": fluency(prompts, completions), "coherence": coherence(prompts, completions),
            "diversity": diversity(completions)}


def open_ended_quality(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Open-ended generation reward: fluency x coherence x diversity (module docstring)."""
    parts = open_ended_parts(prompts, completions)
    return [f * c * d for f, c, d in zip(parts["fluency"], parts["coherence"], parts["diversity"])]


__all__ = ["BaseLM", "CoherenceSpace", "FAITHFUL_MIN_WORDS", "FLUENCY_REF_LOGP", "STOPWORDS", "coherence",
           "coherence_space", "content_words", "diversity", "embedded_base", "faithfulness", "fluency",
           "is_supported", "open_ended_parts", "open_ended_quality", "repetition_rate", "support_set"]
