"""scripts/sweep_alpha.py's shipping rule (`choose`) on sweep rows written by hand: the highest score
within the perplexity and distinct-2 bars relative to alpha 0, never the adapter alone."""
import pytest

from scripts.sweep_alpha import choose


def row(alpha, score, ppl, d2, base_weight=1.0):
    return {"alpha": alpha, "base_weight": base_weight, "score": score, "perplexity": ppl, "distinct_2": d2}


BASE = row(0.0, 0.20, 8.0, 0.88)


def test_highest_score_within_the_bars():
    rows = [BASE, row(0.5, 0.33, 8.4, 0.86), row(0.7, 0.37, 9.9, 0.87), row(1.0, 0.40, 10.1, 0.86)]
    # 1.25 x 8.0 = 10.0: alpha 1 (10.1) is out, alpha 0.7 (9.9) is the best left
    alpha, why = choose(rows)
    assert alpha == 0.7 and "1.24x" in why


def test_distinct2_bar_and_custom_ratios():
    rows = [BASE, row(0.5, 0.30, 8.1, 0.85), row(1.0, 0.45, 8.2, 0.78)]
    assert choose(rows)[0] == 0.5  # 0.78 < 0.9 x 0.88 = 0.792
    assert choose(rows, min_distinct2_ratio=0.85)[0] == 1.0
    assert choose(rows, max_perplexity_ratio=1.01)[0] is None


def test_adapter_alone_never_chosen_and_ties_go_to_the_smaller_alpha():
    rows = [BASE, row(1.0, 0.9, 8.0, 0.88, base_weight=0.0), row(1.0, 0.3, 8.0, 0.88), row(0.5, 0.3, 8.0, 0.88)]
    assert choose(rows)[0] == 0.5


def test_nothing_qualifies():
    alpha, why = choose([BASE, row(1.0, 0.5, 20.0, 0.5)])
    assert alpha is None and "no alpha" in why


def test_needs_the_base_first():
    with pytest.raises(ValueError, match="alpha 0"):
        choose([row(1.0, 0.5, 8.0, 0.9), BASE])
