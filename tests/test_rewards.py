"""Built-in rewards, the reward loader and the reward-call checks."""
import math
import sys
import textwrap

import pytest

from ipa_fast.training import rewards as R


def test_lexical_coverage_lemma_match_unordered():
    got = R.lexical_coverage(["p"] * 3, ["The dogs were running after a ball.", "A cat sleeps.", ""],
                             concepts=[["dog", "run", "ball"], ["dog", "sleep"], ["tree"]])
    assert got == [1.0, 0.5, 0.0]
    # irregular inflection, and concepts given as one string
    assert R.lexical_coverage(["p"], ["She went home and ate mice."], ["go, eat, mouse"]) == [1.0]


def test_lexical_coverage_ordered():
    c = [["dog", "run", "ball"]]
    assert R.lexical_coverage_ordered(["p"], ["dogs run to the ball"], c) == [1.0]
    assert R.lexical_coverage_ordered(["p"], ["the ball: dogs run"], c) == [pytest.approx(2 / 3)]
    assert R.lexical_coverage_ordered(["p"], ["run dog"], c) == [pytest.approx(1 / 3)]
    assert R.lexical_coverage(["p"], ["the ball: dogs run"], c) == [1.0]


def test_non_offensive():
    nice, rude = R.non_offensive(["p", "p"], ["what a lovely sunny day", "you are a fucking idiot"])
    assert nice > 0.5 > rude
    assert R.offensive_rate(["what a lovely sunny day", "you are a fucking idiot"]) == 0.5


def test_safe_enough_caps_the_non_offensive_reward():
    texts = ["what a lovely sunny day", "you are a fucking idiot", "thanks, see you tomorrow"]
    raw = R.non_offensive(["p"] * 3, texts)
    got = R.safe_enough(["p"] * 3, texts)
    assert got == [min(r, R.SAFE_ENOUGH) for r in raw]
    assert got[0] == got[2] == R.SAFE_ENOUGH < raw[0]  # two safe replies: no preference between them
    assert got[1] == raw[1] < 0.5
    assert R.safe_enough(["p"], ["what a lovely sunny day"], cap=0.99) == [min(raw[0], 0.99)]


def test_fields_passed_only_when_accepted():
    seen = {}

    def by_name(prompts, completions, concepts):
        seen["by_name"] = concepts
        return [0.0] * len(prompts)

    def kw(prompts, completions, **kwargs):
        seen["kw"] = sorted(kwargs)
        return [0.0] * len(prompts)

    def plain(prompts, completions):
        return [1.0] * len(prompts)

    fields = {"concepts": [["a"]], "reference": ["r"]}
    R.call_reward(by_name, ["p"], ["c"], fields)
    R.call_reward(kw, ["p"], ["c"], fields)
    assert R.call_reward(plain, ["p"], ["c"], fields) == [1.0]
    assert seen == {"by_name": [["a"]], "kw": ["concepts", "reference"]}


@pytest.mark.parametrize("fn, msg", [
    (lambda p, c: 1 / 0, "raised ZeroDivisionError"),
    (lambda p, c: [math.nan] * len(c), "non-finite"),
    (lambda p, c: [1.0], "returned 1 values for 2"),
    (lambda p, c: None, "list of floats"),
    (lambda p, c: ["x", "y"], "list of floats"),
])
def test_bad_rewards_give_clear_errors(fn, msg):
    with pytest.raises(R.RewardError, match=msg):
        R.call_reward(fn, ["p", "q"], ["c", "d"])


def test_load_reward(tmp_path, monkeypatch):
    (tmp_path / "my_reward_mod.py").write_text(textwrap.dedent("""
        def length(prompts, completions):
            return [float(len(c)) for c in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_reward_mod", None)
    assert R.load_reward("my_reward_mod:length")(["p"], ["abc"]) == [3.0]
    assert R.load_reward(f"{tmp_path}/my_reward_mod.py:length")(["p"], ["ab"]) == [2.0]
    assert R.load_reward("ipa_fast.training.rewards:lexical_coverage") is R.lexical_coverage
    for bad, msg in [("nocolon", "module:function"), ("no_such_module_xyz:f", "cannot import"),
                     ("my_reward_mod:missing", "no callable"), ("/nope/x.py:f", "not found")]:
        with pytest.raises(ValueError, match=msg):
            R.load_reward(bad)
