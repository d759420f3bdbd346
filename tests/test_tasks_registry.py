"""The task registry's tasks: data splits, rewards, headline scores and evaluation metrics, and
the open / dialogue-safety / grounded builders (scripts/build_paper_tasks.py)."""
import json
import math
from pathlib import Path

import pytest

from scripts import build_paper_tasks as B
from scripts import build_tasks as BT

ROOT = Path(__file__).resolve().parents[1]


def test_selection_keeps_the_highest_rates_and_confirms_on_fresh_seeds():
    rows = [{"prompt": f"context {i}", "context": f"c{i}", "template": "bare", "source_offensive_prob": p}
            for i, p in enumerate([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])]
    rate = {"context 0": 0.0, "context 1": 1.0, "context 2": 0.5, "context 3": 0.0, "context 4": 1.0,
            "context 5": 1.0}
    calls = []

    def rate_fn(prompts, samples, seed):
        calls.append((list(prompts), samples, seed))
        return [rate[p] for p in prompts]

    kept, stats = B.select_dialogue_safety(rows, rate_fn, pool=5, samples=3, keep=3, confirm_samples=2, seed=10)
    # context 5 is outside the pool; of the pool, 1 and 4 (rate 1) then 2 (0.5)
    assert sorted(r["prompt"] for r in kept) == ["context 1", "context 2", "context 4"]
    assert {r["prompt"]: r["base_unsafe_rate"] for r in kept} == {"context 1": 1.0, "context 2": 0.5,
                                                                  "context 4": 1.0}
    assert calls[0][1:] == (3, 10) and len(calls[0][0]) == 5
    assert sorted(calls[1][0]) == ["context 1", "context 2", "context 4"] and calls[1][1:] == (2, 565)
    assert stats["pool_base_unsafe_rate"] == pytest.approx(2.5 / 5, abs=1e-4)
    assert stats["selected_base_unsafe_rate"] == pytest.approx(2.5 / 3, abs=1e-4)
    assert stats["fresh_seed_base_unsafe_rate"] == pytest.approx(2.5 / 3, abs=1e-4)
    assert stats["kept"] == 3 and stats["kept_unsafe_on_selection"] == 3
    # ties on the rate go to the more offensive source
    kept, _ = B.select_dialogue_safety(rows, rate_fn, pool=6, samples=1, keep=2, confirm_samples=1, seed=0)
    assert sorted(r["prompt"] for r in kept) == ["context 1", "context 4"]
    with pytest.raises(ValueError, match="must be >= 1"):
        B.select_dialogue_safety(rows, rate_fn, pool=0, samples=1, keep=1, confirm_samples=1, seed=0)


def test_selection_samples_a_tiny_base(one_thread):
    """The real sampling path (build_tasks.base_offensive_rate over a TailoredLM at alpha 0) on tiny
    random models: one rate per pool context, in [0, 1], a multiple of 1 / samples."""
    from tiny_models import make_tiny_pair

    from ipa_fast.decoding.tailored import TailoredLM

    base, adapter, tok = make_tiny_pair(seed=0)
    lm = TailoredLM(base, adapter, tok)
    rows = [{"prompt": p, "context": p, "template": "bare", "source_offensive_prob": 0.5}
            for p in ["the cat sat on", "a dog runs in", "we play music", "birds sing in the"]]
    rate_fn = lambda prompts, samples, seed: BT.base_offensive_rate(  # noqa: E731
        None, prompts, samples, seed, batch_size=3, lm=lm)
    kept, stats = B.select_dialogue_safety(rows, rate_fn, pool=4, samples=2, keep=2, confirm_samples=1, seed=0)
    assert len(kept) == 2 and stats["pool"] == 4
    for r in kept:
        assert r["base_unsafe_rate"] in (0.0, 0.5, 1.0)
    assert 0.0 <= stats["fresh_seed_base_unsafe_rate"] <= 1.0
    # the same seeds give the same rates (per-row seeds: a sample does not depend on its batch)
    again, _ = B.select_dialogue_safety(rows, rate_fn, pool=4, samples=2, keep=2, confirm_samples=1, seed=0)
    assert again == kept


# ----------------------------------------------------------------------------- data

NEW_TASKS = {"open": ("reference",), "dialogue_safety": ("context", "template", "source_offensive_prob"),
             "grounded": ("knowledge", "question", "word", "reference")}


def _rows(task, split):
    from ipa_fast import embedded

    return embedded.read_task(task, split)


@pytest.mark.parametrize("task", sorted(NEW_TASKS))
def test_new_task_splits_sized_and_disjoint(task):
    from ipa_fast import embedded

    splits = {s: _rows(task, s) for s in ("train", "validation", "test")}
    assert 2000 <= len(splits["train"]) <= 5000
    for split, rows in splits.items():
        assert embedded.task_data_path(task, split).stat().st_size < 2 << 20
        assert len({r["prompt"] for r in rows}) == len(rows), f"{task}/{split} repeats a prompt"
        for r in rows:
            assert set(NEW_TASKS[task]) <= set(r), f"{task}/{split} row lacks a field: {sorted(r)}"
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        for key in ("prompt",) + {"open": ("reference",), "grounded": ("knowledge", "word")}.get(task, ()):
            shared = {r[key] for r in splits[a]} & {r[key] for r in splits[b]}
            assert not shared, f"{task}: {a} and {b} share {key} {sorted(shared)[:2]}"


def test_new_task_rows_are_what_the_readme_says():
    for r in _rows("open", "test"):
        assert 6 <= len(r["prompt"].split()) <= 12 and len(r["reference"].split()) >= B.OPEN_MIN_REFERENCE
    from ipa_fast.training.rewards_text import content_words, is_supported, support_set
    for split in ("train", "validation", "test"):
        rows = _rows("grounded", split)
        for r in rows:
            assert r["knowledge"].startswith(r["word"] + ": ") and r["knowledge"] in r["prompt"]
            assert r["question"] in r["prompt"] and r["prompt"].startswith("<|im_start|>")
            # the reference restates the gloss: what the builder writes
            assert r["reference"] == B.grounded_reference(*B.gloss_parts(r["knowledge"]))
        # ... and is faithful: no content word but "means" that the snippet and question do not support
        for r in rows[:50]:
            support = support_set(r["knowledge"], r["question"])
            assert [w for w in content_words(r["reference"]) if not is_supported(w, support)] in ([], ["means"])
    held = _rows("dialogue_safety", "test")
    assert 50 <= len(held) <= 300
    for r in held:
        assert r["context"] in r["prompt"] and r["template"] in B.SAFETY_TEMPLATES
        assert r["source_offensive_prob"] >= BT.DETOX_SEED_PROB and 0 <= r["base_unsafe_rate"] <= 1
    stats = json.loads((ROOT / "data/tasks/dialogue_safety/STATS.json").read_text())
    assert stats["splits"]["test"]["kept"] == len(held)


def test_builders_on_hand_written_lines():
    line = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
    row = B.open_row(line)
    k = len(row["prompt"].split())
    assert 6 <= k <= 8 and row["prompt"] + " " + row["reference"] == line  # 16 words: at least 8 left
    assert B.open_row(line + " -- An Author")["reference"] == row["reference"]  # attribution cut
    assert B.open_row("too short to cut into a prompt and a reference") is None
    assert B.open_row("dog: " + line) is None  # a gloss
    assert B.gloss_parts("hot dog: a frankfurter served hot on a bun.") == ("hot dog",
                                                                          "a frankfurter served hot on a bun.")
    assert B.gloss_parts("dog: a canine.") is None  # definition under 6 words
    assert B.gloss_parts("the dog barked at the mailman all day long") is None
    name, turns = B.safety_context("jerk: a dull stupid fatuous person who annoys everyone.")
    assert B.SAFETY_TEMPLATES[name][0] == "gloss" and '"jerk"' in turns[-1] and len(turns) == 1
    assert B.safety_context("jerk: a dull stupid person.") is None  # a gloss unfit for gloss_parts
    name, turns = B.safety_context("you are a stupid fool and everybody knows it")
    assert B.SAFETY_TEMPLATES[name][0] == "line" and len(turns) == (3 if name == "roast" else 1)


# ----------------------------------------------------------------------------- rewards and metrics

@pytest.fixture(scope="module")
def small_space():
    """A coherence space fitted on the first 3000 corpus train lines (seconds, not the full fit)."""
    from ipa_fast import embedded
    from ipa_fast.training import rewards_text as T

    return T.CoherenceSpace(embedded.read_corpus("train")[:3000], n_components=32)


@pytest.fixture
def tiny_scoring(monkeypatch, small_space, one_thread):
    """The open task's base (fluency, MAUVE features) is the tiny random GPT-2, its coherence space
    the small one: the registry can be exercised without the embedded base."""
    from tiny_models import make_tiny_pair

    from ipa_fast.training import rewards_text as T

    base, _, tok = make_tiny_pair(seed=0)
    monkeypatch.setattr(T, "embedded_base", lambda: T.BaseLM(base, tok))
    monkeypatch.setattr(T, "coherence_space", lambda: small_space)
    return base, tok


def test_every_registered_task_scores_three_test_rows(tiny_scoring):
    from ipa_fast import tasks
    from ipa_fast.training.rewards import call_reward

    texts = ["The cat sat on the mat and looked at the dog.", "", "a dog runs in the park with a ball"]
    assert set(NEW_TASKS) <= set(tasks.names())
    for name in tasks.names():
        task = tasks.get(name)
        rows = _rows(name, "test")[:3]
        fields = {f: [r[f] for r in rows] for f in task.fields}
        rewards = call_reward(task.reward_fn(), [r["prompt"] for r in rows], texts, fields)
        scores = task.score_fn(rows, texts)
        metrics = task.metrics_fn(rows, texts)
        assert len(rewards) == len(scores) == 3, name
        assert all(math.isfinite(v) for v in rewards + scores), name
        assert metrics and all(isinstance(v, float) and math.isfinite(v) for v in metrics.values()), (name, metrics)
        if task.summary_metric:
            assert task.summary_metric in metrics, name
        if name in NEW_TASKS:
            assert all(0.0 <= v <= 1.0 for v in rewards), (name, rewards)
            # the untrained product is the base itself (a zeroed adapter output, or a residual adapter)
            assert task.recipe.get("zero_init_output") or task.recipe.get("residual"), name
            assert task.recipe["freeze_shared_embedding"], name


def test_faithfulness_hand_computed():
    from ipa_fast.training.rewards_text import FAITHFUL_MIN_WORDS, faithfulness

    assert FAITHFUL_MIN_WORDS == 5
    k, q = "dog: a domesticated carnivorous mammal kept as a pet.", 'What does "dog" mean?'
    replies = ["A dog is a domesticated mammal.",  # dog, domesticated, mammal: 3 / max(3, 5)
               "Paris is the capital of France.",  # nothing supported
               "Dogs.",  # 1 / 5: the length floor
               "",
               "Dogs are domesticated pets, and they bark loudly at strangers.",  # dogs domesticated pets / 6
               "dog: a domesticated carnivorous mammal kept as a pet."]  # the snippet copied: 5 / 5
    got = faithfulness(["p"] * 6, replies, [k] * 6, [q] * 6)
    assert got == pytest.approx([0.6, 0.0, 0.2, 0.0, 0.5, 1.0])


def test_diversity_and_repetition_hand_computed():
    from ipa_fast.training.rewards_text import diversity, repetition_rate

    t = "a b a b a b"  # bigrams ab ba ab ba ab: 2 unique of 5; trigrams 2 of 4; 4-grams 2 of 3
    assert [repetition_rate(t, n) for n in (2, 3, 4)] == pytest.approx([0.6, 0.5, 1 / 3])
    assert diversity([t, "the cat sat on the mat", "", "one"]) == pytest.approx([0.4 * 0.5 * 2 / 3, 1, 1, 1])


def test_coherence_space_on_and_off_topic():
    from ipa_fast.training.rewards_text import CoherenceSpace

    docs = ["the dog barked at the cat", "a cat chased the dog", "my pet dog and pet cat sleep",
            "the bank raised interest on the loan", "a loan from the bank costs money",
            "money and interest rates at the bank"] * 2
    space = CoherenceSpace(docs)
    on, off, same, empty = space.similarity(["the dog and the cat"] * 4,
                                            ["my cat chased a dog", "interest on a bank loan",
                                             "the dog and the cat", ""])
    assert on > 0.5 > off and same == pytest.approx(1.0, abs=1e-6) and empty == 0.0


def test_base_lm_mean_logprob_matches_perplexity(pair, one_thread):
    """BaseLM's per-completion mean log-likelihood (right-padded batch) against
    evaluation.perplexity on each pair alone (left-padded, position ids from the mask)."""
    from ipa_fast.tasks.evaluation import perplexity
    from ipa_fast.training.rewards_text import BaseLM

    base, _, tok = pair
    lm = BaseLM(base, tok)
    prompts, conts = ["the cat sat", "a dog runs in the park with"], [" on the mat.", " a ball and a cat"]
    got = lm.mean_logprobs(prompts + ["hello"], conts + [""], batch_size=3)
    for p, c, g in zip(prompts, conts, got):
        ref = perplexity(base, [tok(p)["input_ids"]], [tok(c)["input_ids"]], pad_token_id=tok.pad_token_id)
        assert g == pytest.approx(-math.log(ref), abs=1e-4)
    assert got[2] is None
    feats = lm.features(["the cat", "a dog runs"])
    assert feats.shape == (2, base.config.n_embd)


def test_open_quality_is_the_product_of_its_parts(tiny_scoring):
    from ipa_fast.training import rewards_text as T

    prompts = ["The dog barked at the", "Money in the bank", "The cat"]
    texts = [" cat all night long.", " the the the the the the", ""]
    parts = T.open_ended_parts(prompts, texts)
    got = T.open_ended_quality(prompts, texts)
    product = [f * c * d for f, c, d in zip(parts["fluency"], parts["coherence"], parts["diversity"])]
    assert got == pytest.approx(product)
    assert got[2] == 0.0 and parts["fluency"][2] == 0.0  # an empty completion
    assert parts["diversity"][1] == pytest.approx(1 / 5 * 1 / 4 * 1 / 3)  # one distinct n-gram of each n
    assert all(0.0 <= v <= 1.0 for v in parts["fluency"])


def test_mauve_on_known_distributions():
    import numpy as np

    from ipa_fast.tasks.metrics import mauve, mauve_area

    # disjoint histograms: the area under (x, y) = ((1 - w)^5, w^5) is 5 B(6, 5) = 0.00397
    assert mauve_area([1, 0], [0, 1]) == pytest.approx(0.00397, abs=1e-3)
    assert mauve_area([0.5, 0.5], [0.5, 0.5]) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(60, 8)), rng.normal(size=(60, 8))
    assert mauve(a, a) == pytest.approx(1.0)
    assert mauve(a, b) > 0.9 > 0.1 > mauve(a, b + 5.0)
    with pytest.raises(ValueError, match="feature arrays"):
        mauve(a, b[:, :4])


def test_dialogue_safety_metrics_hand_written(monkeypatch, small_space):
    from ipa_fast.tasks import metrics as M
    from ipa_fast.training import rewards_text as T

    monkeypatch.setattr(T, "coherence_space", lambda: small_space)
    assert M.evasive_flags(["I\u2019m sorry, but I can't help with that.", "As an AI language model, no.",
                            "Sure! Here is a joke about cats.", "That is not appropriate here.",
                            "I cannot do that."]) == [1.0, 1.0, 0.0, 1.0, 1.0]
    rows = [{"prompt": "p", "context": "Finish this joke: my dog"}] * 2
    m = M.dialogue_safety_metrics(rows, ["you are a fucking idiot", "I'm sorry, my dog is a good boy."])
    assert m["unsafe_rate"] == 0.5 and m["second_score"] == 0.5 and m["evasive_rate"] == 0.5
    assert 0.0 <= m["coherence"] <= 1.0


def test_grounded_metrics_hand_computed(monkeypatch, small_space):
    from ipa_fast.tasks import metrics as M
    from ipa_fast.training import rewards_text as T

    monkeypatch.setattr(T, "coherence_space", lambda: small_space)
    k, q = "dog: a domesticated carnivorous mammal.", 'What does "dog" mean?'
    text = "A dog is a domesticated mammal. It loves playing fetch in Paris, and it barks."
    # clauses: "A dog is a domesticated mammal" (3/3 supported), "It loves playing fetch in Paris"
    # (0/4), "and it barks" (0/1)
    assert M.unsupported_clauses(k, q, text) == (2, 3)
    assert M.knowledge_recall(k, "A dog is a domesticated mammal") == pytest.approx(2 / 3)
    rows = [{"prompt": "p", "knowledge": k, "question": q}] * 2
    m = M.grounded_metrics(rows, [text, "A dog is a carnivorous mammal."])
    assert m["unsupported_rate"] == pytest.approx(2 / 4)
    assert m["knowledge_recall"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert m["mean_words"] == pytest.approx((15 + 6) / 2)
    assert m["faithfulness"] == pytest.approx((3 / 8 + 3 / 5) / 2)


def test_real_base_prefers_fluent_text():
    from ipa_fast import embedded
    from ipa_fast.training import rewards_text as T

    try:
        embedded.base_path()
    except FileNotFoundError:
        pytest.skip("the embedded base is not set up (ipa-fast setup)")
    import torch

    torch.set_num_threads(1)
    good, shuffled = T.fluency(["The cat sat on the"] * 2, [" mat and purred quietly in the sun.",
                                                         " sun purred the quietly mat in and."])
    assert good > shuffled and good <= 1.0


def test_opens_training_line_matches_a_linear_scan():
    """The held-out filter (a binary search over the sorted train lines) against its definition:
    some train line starts with the prompt."""
    import random

    lines = ["the cat sat", "the dog", "a b c", "zebra x", "the cat", "The Cat", "the cat sat on a mat"]
    rng = random.Random(0)
    prompts = ["", "t", "the c", "the cat sat on", "the cat sat on a mat!", "zebra", "zz", "a", "b", "The",
               *(" ".join(rng.choice(lines).split()[:rng.randint(1, 3)]) for _ in range(30))]
    for p in prompts:
        assert BT.opens_training_line(p, lines) == any(t.startswith(p) for t in lines), p
    other = ["zebra x"]  # another list is sorted anew, not answered from the first one's order
    assert BT.opens_training_line("the", other) is False and BT.opens_training_line("zeb", other) is True
