"""Evaluation metrics (docs/DESIGN.md §6) against independent recomputations."""
import math

import pytest
import torch

from ipa_fast.tasks.evaluation import distinct_n, perplexity
from tests.tiny_models import make_tiny_pair


def test_distinct_2_counts_unique_word_bigrams():
    texts = ["a b c", "a b d", "x"]
    # bigrams: (a,b) (b,c) (a,b) (b,d) -> 3 unique of 4
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["x"], 2) == 0.0
    with pytest.raises(ValueError, match="n must be"):
        distinct_n(texts, 0)


def test_perplexity_matches_unbatched_recomputation():
    base, _, tok = make_tiny_pair(seed=3)
    prompts = [tok.encode("the cat sat"), tok.encode("a dog"), tok.encode("we play music together in")]
    conts = [tok.encode(" on the mat"), tok.encode(" runs in the park."), tok.encode(" the garden")]
    nll, count = 0.0, 0
    with torch.no_grad():
        for p, c in zip(prompts, conts):  # one sequence at a time, no padding
            ids = torch.tensor([p + c])
            logp = torch.log_softmax(base(input_ids=ids).logits[0, :-1].double(), dim=-1)
            targets = ids[0, 1:]
            per_tok = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            nll -= float(per_tok[len(p) - 1:].sum())
            count += len(c)
    expected = math.exp(nll / count)
    for batch_size in (1, 2, 3):
        got = perplexity(base, prompts, conts, batch_size=batch_size, pad_token_id=tok.pad_token_id)
        assert got == pytest.approx(expected, rel=1e-4)


def test_perplexity_rejects_mismatched_lengths():
    base, _, tok = make_tiny_pair(seed=3)
    with pytest.raises(ValueError, match="prompts"):
        perplexity(base, [[1, 2]], [], pad_token_id=tok.pad_token_id)


def test_all_concepts_rate():
    from ipa_fast.tasks.evaluation import all_concepts_rate

    assert all_concepts_rate([1.0, 0.5, 1.0, 0.0]) == 0.5
    with pytest.raises(ValueError):
        all_concepts_rate([])


def test_wordlist_offensive_rate_is_not_the_reward_model():
    """The evaluation-only scorer flags list words in any spelling the list knows, and nothing else."""
    from ipa_fast.tasks.evaluation import wordlist_offensive_rate

    assert wordlist_offensive_rate(["what the fuck", "a sunny day in the park"]) == 0.5
    assert wordlist_offensive_rate(["sh1t happens"]) == 1.0  # a leetspeak variant from the list
    assert wordlist_offensive_rate(["the class assessed the assistant"]) == 0.0  # no substring hits
