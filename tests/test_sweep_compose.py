"""scripts/sweep_compose.py's weight parsing and choice rule (`parse_weights`, `choose`) on grid
entries written by hand: the highest smallest gain kept over the tasks among the weight tuples
within the perplexity and distinct-2 bars on every task."""
import pytest

from scripts.sweep_compose import choose, parse_weights

REFS = {"lexical": {"base": {"perplexity": 8.0, "distinct_2": 0.80}},
        "grounded": {"base": {"perplexity": 10.0, "distinct_2": 0.90}}}


def entry(wl, wg, lex, gro):
    """lex / gro: (gain kept, perplexity, distinct-2) on that task."""
    return {"weights": {"lexical": wl, "grounded": wg},
            "tasks": {t: {"gain_kept": g, "perplexity": p, "distinct_2": d}
                      for t, (g, p, d) in (("lexical", lex), ("grounded", gro))}}


def test_parse_weights():
    assert parse_weights("0.5:0.7,0.9:0", 2) == [(0.5, 0.7), (0.9, 0.0)]
    for bad in ("0.5", "0.5:x", "0.5:-1", "0.5:inf", "0.5:nan", "0.5:0.7:0.1"):
        with pytest.raises(ValueError, match="--weights"):
            parse_weights(bad, 2)


def test_highest_smallest_gain_kept_within_the_bars():
    grid = [entry(0.5, 0.7, (0.67, 9.0, 0.78), (0.84, 11.0, 0.88)),   # min 0.67
            entry(0.7, 0.6, (0.95, 9.5, 0.77), (0.82, 11.5, 0.87)),   # min 0.82: chosen
            entry(0.9, 0.5, (1.30, 9.9, 0.76), (0.60, 12.0, 0.86)),   # min 0.60
            entry(0.9, 0.7, (1.10, 10.1, 0.76), (0.99, 12.0, 0.86))]  # lexical 10.1 > 1.25 x 8: out
    best, why = choose(grid, REFS)
    assert best["weights"] == {"lexical": 0.7, "grounded": 0.6}
    assert "lexical 95 %" in why and "grounded 82 %" in why


def test_distinct2_bar_custom_ratios_and_nothing_qualifies():
    grid = [entry(0.5, 0.5, (0.9, 8.0, 0.71), (0.9, 10.0, 0.9)),      # lexical 0.71 < 0.9 x 0.80
            entry(0.4, 0.4, (0.5, 8.0, 0.80), (0.5, 10.0, 0.9))]
    assert choose(grid, REFS)[0]["weights"] == {"lexical": 0.4, "grounded": 0.4}
    assert choose(grid, REFS, min_d2=0.85)[0]["weights"] == {"lexical": 0.5, "grounded": 0.5}
    best, why = choose(grid, REFS, max_ppl=0.99)
    assert best is None and "no weights" in why
