"""Per-task evaluation functions named by the task registry (:mod:`ipa_fast.tasks`).

Each task has a headline score per completion, ``score(rows, texts) -> list[float]`` (the demo
averages it over prompts and seeds, with intervals), and evaluation-only metrics,
``metrics(rows, texts) -> dict[str, float]`` (the trainer's held-out evaluation and the demo
report them). ``rows`` are the task's prompt rows (``{"prompt", <fields>...}``), ``texts`` the
completions, aligned.
"""
from __future__ import annotations

from typing import Sequence

from .evaluation import all_concepts_rate, wordlist_offensive_rate


def _prompts(rows):
    return [r["prompt"] for r in rows]


def lexical_score(rows: Sequence[dict], texts: Sequence[str]) -> list[float]:
    """Concept coverage (the training reward): the fraction of a row's concepts used, any inflection."""
    from .training.rewards import lexical_coverage

    return lexical_coverage(_prompts(rows), texts, [r["concepts"] for r in rows])


def lexical_metrics(rows: Sequence[dict], texts: Sequence[str]) -> dict:
    """``all_concepts``: the rate of completions that use every concept; ``coverage_ordered``: the
    official IPA code's in-order coverage."""
    from .training.rewards import lexical_coverage_ordered

    concepts = [r["concepts"] for r in rows]
    ordered = lexical_coverage_ordered(_prompts(rows), texts, concepts)
    return {"all_concepts": all_concepts_rate(lexical_score(rows, texts)),
            "coverage_ordered": sum(ordered) / len(ordered) if ordered else 0.0}


def detox_score(rows: Sequence[dict], texts: Sequence[str]) -> list[float]:
    """1.0 where the training classifier (alt-profanity-check) finds the completion offensive."""
    from .training.rewards import offensive_flags

    return offensive_flags(texts)


def detox_metrics(rows: Sequence[dict], texts: Sequence[str]) -> dict:
    """``second_score``: the offensive rate under a word list that is never a training reward."""
    return {"second_score": wordlist_offensive_rate(texts)}
