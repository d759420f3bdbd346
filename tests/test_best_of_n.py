"""scripts/best_of_n.py: n samples per prompt scored by the task's reward, the best and worst kept."""
import pytest

from ipa_fast.decoding.tailored import TailoredLM
from scripts.best_of_n import SEED, SEED_STRIDE, best_of_n
from tiny_models import make_tiny_pair


def test_best_and_worst_are_the_extremes_of_the_samples_drawn_with_the_documented_seeds():
    base, adapter, tok = make_tiny_pair(seed=5, base_arch="llama", adapter_arch="llama")
    lm = TailoredLM(base, adapter, tok, alpha=0.0)
    rows = [{"prompt": p, "concepts": ["the", "a"]} for p in ("the cat", "a dog sat", "one more")]
    out = best_of_n(lm, "lexical", rows, 3, alpha=0.0, max_new_tokens=6, temperature=1.0, top_p=1.0, chunk=2,
                    log=lambda *_: None)
    from ipa_fast.training.rewards import lexical_coverage
    for i, r in enumerate(out):
        assert r["prompt"] == rows[i]["prompt"] and r["concepts"] == rows[i]["concepts"]
        # sample j of row i is the generation with seed SEED + SEED_STRIDE * j + i (chunk start + offset)
        texts = [lm.generate([rows[i]["prompt"]], max_new_tokens=6, top_p=1.0, alpha=0.0,
                             seed=SEED + SEED_STRIDE * j + (i // 2) * 2 + i % 2).texts[0].strip() for j in range(3)]
        assert [s["text"] for s in r["samples"]] == texts
        rewards = lexical_coverage([r["prompt"]] * 3, texts, [r["concepts"]] * 3)
        assert [s["reward"] for s in r["samples"]] == pytest.approx(rewards)
        assert r["best_reward"] == max(rewards) and r["worst_reward"] == min(rewards)
        assert r["best"] == texts[rewards.index(max(rewards))] and r["worst"] == texts[rewards.index(min(rewards))]
        assert r["mean_reward"] == pytest.approx(sum(rewards) / 3)


def test_select_keeps_rows_at_or_above_the_threshold_and_compact_drops_the_per_sample_fields():
    from scripts.best_of_n import select

    rows = [{"prompt": str(i), "concepts": ["x"], "best": "b", "best_reward": r, "worst": "w", "worst_reward": 0.0,
             "mean_reward": r / 2, "samples": [{"text": "b", "reward": r}]} for i, r in enumerate((0.5, 2 / 3, 1.0))]
    assert [r["prompt"] for r in select(rows, 0.66)] == ["1", "2"]
    assert select(rows) == rows
    compact = select(rows, 0.66, compact=True)
    assert [sorted(r) for r in compact] == [sorted(["prompt", "concepts", "best", "best_reward", "mean_reward"])] * 2
    assert compact[1]["best_reward"] == 1.0


def test_a_continuation_is_kept_exactly_as_sampled_and_its_reward_recomputes():
    """A continuation's leading space belongs to its first word: the kept text is the sample itself,
    so the recorded reward is the reward of the stored text (a warm start trains on exactly it)."""
    from ipa_fast import tasks
    from ipa_fast.training.rewards import call_reward
    base, adapter, tok = make_tiny_pair(seed=5, base_arch="llama", adapter_arch="llama")
    lm = TailoredLM(base, adapter, tok, alpha=0.0)
    rows = [{"prompt": p} for p in ("the cat", "a dog sat")]
    out = best_of_n(lm, "detox", rows, 2, alpha=0.0, max_new_tokens=6, temperature=1.0, top_p=1.0, chunk=2,
                    log=lambda *_: None)
    assert tasks.get("detox").prompt_style == "continuation"
    for i, r in enumerate(out):
        texts = [lm.generate([rows[i]["prompt"]], max_new_tokens=6, top_p=1.0, alpha=0.0,
                             seed=SEED + SEED_STRIDE * j + i).texts[0] for j in range(2)]
        assert [s["text"] for s in r["samples"]] == texts
        got = call_reward(tasks.get("detox").reward_fn(), [r["prompt"]], [r["best"]], {})
        assert got == pytest.approx([r["best_reward"]])
