"""``ipa-fast demo`` end to end on a home of tiny models and data (the shipped models are too
slow for CI). Checks the JSON contract of the embedded-default issue and that each variant is
what it says: the base-alone score equals decoding with alpha=0 recomputed here."""
import json

import pytest

from ipa_fast.cli import main
from ipa_fast.decoding import TailoredLM, save_adapter
from tiny_models import make_tiny_pair

LEXICAL = [{"prompt": f"Write a sentence with: cat, {w}.\n", "concepts": ["cat", w], "reference": f"the cat and the {w}"}
           for w in ("dog", "park", "ball", "tree", "sun", "book")]
DETOX = [{"prompt": p} for p in ("the quick brown", "people walk to", "she writes a", "we play music")]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    base, adapter, tok = make_tiny_pair(seed=4)
    base.save_pretrained(home / "models/base")
    tok.save_pretrained(home / "models/base")
    adapter.save_pretrained(home / "models/adapter-init")
    tok.save_pretrained(home / "models/adapter-init")
    for task in ("lexical", "detox"):
        save_adapter(home / "models/adapters" / task, adapter, tok, alpha=0.5)
    for split in ("train", "validation", "test"):
        write_jsonl(home / f"data/tasks/lexical/{split}.jsonl", LEXICAL)
        write_jsonl(home / f"data/tasks/detox/{split}.jsonl", DETOX)
    return home


@pytest.mark.parametrize("live_task, algo, sft", [("detox", "ppo", 0), ("lexical", "quark", 3)])
def test_demo_quick_end_to_end(home, tmp_path, monkeypatch, live_task, algo, sft):
    monkeypatch.setenv("IPA_FAST_HOME", str(home))
    out = tmp_path / "demo.json"
    rc = main(["demo", "--quick", "--home", str(home), "--out", str(tmp_path / "run"), "--prompts", "4",
               "--train-steps", "4", "--live-task", live_task, "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["mode"] == "ipa"
    for task in ("lexical", "detox"):
        for variant in ("base", "ipa", "ipa_untrained", "adapter_only"):
            m = result["tasks"][task][variant]
            assert 0.0 <= m["score"] <= 1.0 and m["perplexity"] > 1.0 and 0.0 <= m["distinct_2"] <= 1.0
        # here the "trained" adapters are copies of the initial one, so the untrained row (the
        # initial adapter at the trained adapter's alpha) must reproduce the IPA row exactly
        assert result["tasks"][task]["ipa_untrained"] == result["tasks"][task]["ipa"]
    live = result["live_training"]
    assert live["task"] == live_task and live["algo"] == algo and live["steps"] == 4 and live["sft_steps"] == sft
    assert {"reward_before", "reward_after"} <= set(live)
    assert (tmp_path / "run/demo.png").stat().st_size > 0

    # the base-alone lexical score, recomputed independently of the demo's code path
    from ipa_fast.demo import PROTOCOL
    from ipa_fast.training.rewards import lexical_coverage
    lm = TailoredLM.from_pretrained(str(home / "models/base"), str(home / "models/adapters/lexical"))
    rows = LEXICAL[:4]
    gen = lm.generate([r["prompt"] for r in rows], PROTOCOL["max_new_tokens"], top_p=PROTOCOL["top_p"],
                      seed=PROTOCOL["seed"], alpha=0.0)
    cov = lexical_coverage([r["prompt"] for r in rows], gen.texts, [r["concepts"] for r in rows])
    assert result["tasks"]["lexical"]["base"]["score"] == pytest.approx(sum(cov) / len(cov))


def test_demo_without_models_says_what_is_missing(tmp_path, capsys, monkeypatch):
    import ipa_fast.demo as demo
    seen = {}
    monkeypatch.setattr(demo, "run_sampler_fallback", lambda args, missing: seen.setdefault("missing", missing) and {})
    assert main(["demo", "--home", str(tmp_path)]) == 0
    assert any(p.endswith("models/base") for p in seen["missing"])


def test_demo_quick_on_the_shipped_models(tmp_path):
    """`ipa-fast demo --quick` on the embedded default itself (what `make demo` runs, smaller)."""
    from ipa_fast import demo, embedded

    home = embedded.root()
    if demo.missing_models(home):
        pytest.skip("the shipped models are not all present")
    out = tmp_path / "demo.json"
    assert main(["demo", "--quick", "--out", str(tmp_path / "run"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mode"] == "ipa" and result["live_training"]["steps"] == demo.LIVE_STEPS[True]
    for task in ("lexical", "detox"):
        for variant in ("base", "ipa", "ipa_untrained", "adapter_only"):
            m = result["tasks"][task][variant]
            assert 0.0 <= m["score"] <= 1.0 and m["perplexity"] > 1.0 and 0.0 <= m["distinct_2"] <= 1.0
