"""``ipa-fast demo`` end to end on a home of tiny models and data (the shipped models are too
slow for CI). Checks the JSON contract of the embedded-default issue and that each variant is
what it says: the base-alone score equals decoding with alpha=0 recomputed here."""
import json

import pytest

from ipa_fast.cli.main import main
from ipa_fast.decoding.tailored import TailoredLM, save_adapter
from tiny_models import make_tiny_pair

LEXICAL = [{"prompt": f"Write a sentence with: cat, {w}.\n", "concepts": ["cat", w], "reference": f"the cat and the {w}"}
           for w in ("dog", "park", "ball", "tree", "sun", "book")]
DETOX = [{"prompt": p} for p in ("the quick brown", "people walk to", "she writes a", "we play music")]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def stamp(d):
    (d / "embedded.json").write_text("{}")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A cache laid out as `ipa-fast setup` builds it, holding tiny models and its own data."""
    home = tmp_path_factory.mktemp("home")
    base, adapter, tok = make_tiny_pair(seed=4)
    base.save_pretrained(home / "models/base")
    tok.save_pretrained(home / "models/base")
    adapter.save_pretrained(home / "models/adapter-init")
    tok.save_pretrained(home / "models/adapter-init")
    save_adapter(home / "models/adapter-init", adapter, tok, alpha=0.5)
    for d in ("models/base", "models/adapter-init"):
        stamp(home / d)
    for task in ("lexical", "detox"):
        save_adapter(home / "models/adapters" / task, adapter, tok, alpha=0.5)
        stamp(home / "models/adapters" / task)
    for split in ("train", "validation", "test"):
        write_jsonl(home / f"data/tasks/lexical/{split}.jsonl", LEXICAL)
        write_jsonl(home / f"data/tasks/detox/{split}.jsonl", DETOX)
    return home


@pytest.mark.parametrize("live_task", ["lexical", "detox"])
def test_demo_quick_end_to_end(home, tmp_path, monkeypatch, live_task):
    monkeypatch.setenv("IPA_FAST_HOME", str(home))
    out = tmp_path / "demo.json"
    rc = main(["demo", "--quick", "--home", str(home), "--out", str(tmp_path / "run"), "--prompts", "4",
               "--train-steps", "2", "--live-task", live_task, "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["mode"] == "ipa" and set(result["models"]) == {"base", "adapter_init"}
    assert result["models"]["base"]["parameters"] == sum(p.numel() for p in make_tiny_pair(seed=4)[0].parameters())
    for task in ("lexical", "detox"):
        for variant in ("base", "ipa", "ipa_untrained", "adapter_only"):
            m = result["tasks"][task][variant]
            assert 0.0 <= m["score"] <= 1.0 and m["perplexity"] > 1.0 and 0.0 <= m["distinct_2"] <= 1.0
            lo, hi = m["score_ci95"]
            assert lo <= m["score"] <= hi
        # here the "trained" adapters are copies of the initial one, so the untrained row (the
        # initial adapter at the trained adapter's alpha) must reproduce the IPA row exactly
        assert result["tasks"][task]["ipa_untrained"]["score"] == result["tasks"][task]["ipa"]["score"]
        assert result["tasks"][task]["ipa"]["delta_vs_untrained_ci95"] == [0.0, 0.0]
    assert all("all_concepts" in v for v in result["tasks"]["lexical"].values())
    assert all("second_score" in v for v in result["tasks"]["detox"].values())
    live = result["live_training"]
    assert live["task"] == live_task and live["algo"] == "ppo" and live["steps"] == 2
    assert {"reward_before", "reward_after"} <= set(live)
    assert (tmp_path / "run/demo.png").stat().st_size > 0

    # the base-alone lexical score, recomputed independently of the demo's code path
    from ipa_fast.cli.demo import PROTOCOL
    from ipa_fast.training.rewards import lexical_coverage
    lm = TailoredLM.from_pretrained(str(home / "models/base"), str(home / "models/adapters/lexical"))
    rows = LEXICAL[:4]
    gen = lm.generate([r["prompt"] for r in rows], PROTOCOL["max_new_tokens"], top_p=PROTOCOL["top_p"],
                      seed=PROTOCOL["seed"], alpha=0.0)
    cov = lexical_coverage([r["prompt"] for r in rows], gen.texts, [r["concepts"] for r in rows])
    assert result["tasks"]["lexical"]["base"]["score"] == pytest.approx(sum(cov) / len(cov))


def test_demo_without_a_trained_adapter_says_so(home, tmp_path, monkeypatch, capsys):
    """A task with no shipped adapter shows the base, the initial product and the initial adapter alone."""
    import shutil
    h = tmp_path / "h"
    shutil.copytree(home, h)
    shutil.rmtree(h / "models/adapters/detox")
    monkeypatch.setenv("IPA_FAST_HOME", str(h))
    out = tmp_path / "demo.json"
    assert main(["demo", "--quick", "--prompts", "2", "--seeds", "2", "--train-steps", "0", "--out",
                 str(tmp_path / "run"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["tasks"]["detox"]) == {"base", "ipa_untrained", "adapter_init_only"}
    # two seeds: the per-prompt score is the mean of two single-seed runs, the second one shifted
    from ipa_fast.cli import demo
    from ipa_fast.decoding.tailored import TailoredLM
    lm = TailoredLM.from_pretrained(str(h / "models/base"), str(h / "models/adapter-init"))
    rows = embedded_rows = LEXICAL[:2]
    one = [demo._evaluate_once(lm, "lexical", rows, alpha=0.0, seed_offset=demo.SEED_STRIDE * s)["per_prompt"]
           for s in range(2)]
    assert result["tasks"]["lexical"]["base"]["score"] == pytest.approx(sum(map(sum, one)) / 4)
    assert result["seeds"] == 2 and embedded_rows
    assert result["live_training"] is None
    assert "no trained adapter is shipped for this task yet" in capsys.readouterr().out


def test_demo_without_models_says_what_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IPA_FAST_HOME", str(tmp_path))
    assert main(["demo", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ipa-fast setup" in err[0] and "base" in err[0]


@pytest.mark.slow
def test_demo_quick_on_the_embedded_default(tmp_path):
    """`ipa-fast demo --quick` on the embedded default itself (what `make demo` runs, smaller)."""
    from ipa_fast import embedded

    try:
        embedded.base_path(), embedded.adapter_init_path()
    except FileNotFoundError:
        pytest.skip("the embedded default is not in the cache: run `ipa-fast setup`")
    out = tmp_path / "demo.json"
    assert main(["demo", "--quick", "--prompts", "2", "--train-steps", "1", "--out", str(tmp_path / "run"),
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["models"]["base"]["name"] == "SmolLM2-135M-Instruct"
    for task in ("lexical", "detox"):
        for m in result["tasks"][task].values():
            assert 0.0 <= m["score"] <= 1.0 and m["perplexity"] > 1.0 and 0.0 <= m["distinct_2"] <= 1.0


def test_an_adapter_trained_from_a_zeroed_output_has_the_base_as_its_untrained_row(home, tmp_path, monkeypatch):
    """zero_init_output: the untrained product was the base itself, so the untrained row is the base's
    (not the initial adapter's product, which would flatter the trained adapter)."""
    import shutil
    from ipa_fast.decoding.tailored import load_adapter_metadata
    h = tmp_path / "h"
    shutil.copytree(home, h)
    meta_path = h / "models/adapters/lexical/ipa_adapter.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "zero_init_output": True}))
    assert load_adapter_metadata(h / "models/adapters/lexical")["zero_init_output"] is True
    monkeypatch.setenv("IPA_FAST_HOME", str(h))
    out = tmp_path / "demo.json"
    assert main(["demo", "--quick", "--prompts", "2", "--train-steps", "0", "--out", str(tmp_path / "run"),
                 "--json", str(out)]) == 0
    lex = json.loads(out.read_text())["tasks"]["lexical"]
    assert lex["ipa_untrained"]["untrained_is_base"] is True
    assert lex["ipa_untrained"]["score"] == lex["base"]["score"]
    assert lex["ipa"]["delta_vs_untrained_ci95"] == lex["ipa"]["delta_vs_base_ci95"]
    detox = json.loads(out.read_text())["tasks"]["detox"]
    assert "untrained_is_base" not in detox["ipa_untrained"]  # its adapter records no zeroed start


def test_a_residual_adapter_has_the_base_as_its_untrained_row_and_its_trained_network_alone_as_adapter_only(
        home, tmp_path, monkeypatch):
    """A residual adapter (policy base + alpha * (trained - initial)) started as the base: its untrained
    row is the base's; the IPA row is the three-model product and the adapter-alone row is the
    trained network's own distribution (recomputed here through explicit experts)."""
    import shutil

    import torch
    from ipa_fast.cli.demo import PROTOCOL
    from ipa_fast.decoding.residual import residual_record
    from ipa_fast.training.rewards import lexical_coverage
    h = tmp_path / "h"
    shutil.copytree(home, h)
    init = h / "models/adapter-init"
    _, trained, tok = make_tiny_pair(seed=4)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    dest = h / "models/adapters/lexical"
    shutil.rmtree(dest)
    save_adapter(dest, trained, tok, alpha=0.7, extra={"residual_of": residual_record(init)})
    stamp(dest)
    monkeypatch.setenv("IPA_FAST_HOME", str(h))
    out = tmp_path / "demo.json"
    assert main(["demo", "--quick", "--prompts", "4", "--tasks", "lexical", "--train-steps", "0", "--out",
                 str(tmp_path / "run"), "--json", str(out)]) == 0
    lex = json.loads(out.read_text())["tasks"]["lexical"]
    assert lex["ipa_untrained"]["untrained_is_base"] is True and lex["ipa_untrained"]["score"] == lex["base"]["score"]
    base = TailoredLM.from_pretrained(str(h / "models/base"), str(init)).base
    initial = TailoredLM.from_pretrained(str(h / "models/base"), str(init)).adapter
    rows = LEXICAL[:4]

    def score(lm, **kw):
        gen = lm.generate([r["prompt"] for r in rows], PROTOCOL["max_new_tokens"], top_p=PROTOCOL["top_p"],
                          seed=PROTOCOL["seed"], **kw)
        cov = lexical_coverage([r["prompt"] for r in rows], gen.texts, [r["concepts"] for r in rows])
        return sum(cov) / len(cov)

    product = TailoredLM(base, experts=[trained, initial], weights=[0.7, -0.7], tokenizer=tok)
    assert lex["ipa"]["score"] == pytest.approx(score(product))
    alone = TailoredLM(base, trained, tok, alpha=1.0)
    assert lex["adapter_only"]["score"] == pytest.approx(score(alone, base_weight=0.0))


@pytest.mark.parametrize("weights", [None, (0.3, 0.8)])
def test_demo_compose_decodes_every_shipped_adapter_at_once(home, tmp_path, monkeypatch, capsys, weights):
    """--compose: on each task with its own adapter, the other adapter with the base and all of them
    at once; the composed row equals decoding the explicit K-expert product (at the shipped alphas,
    or at --compose-weights), and gain_kept is the composed gain over the task adapter's gain."""
    from ipa_fast.cli.demo import PROTOCOL
    from ipa_fast.training.rewards import lexical_coverage
    monkeypatch.setenv("IPA_FAST_HOME", str(home))
    out = tmp_path / "demo.json"
    assert main(["demo", "--quick", "--prompts", "4", "--tasks", "lexical", "--compose", "lexical", "detox",
                 *(["--compose-weights", *map(str, weights)] if weights else []), "--train-steps", "0",
                 "--no-larger-base", "--out", str(tmp_path / "run"), "--json", str(out)]) == 0
    lex = json.loads(out.read_text())["tasks"]["lexical"]
    assert {"base", "ipa", "ipa_untrained", "adapter_only", "ipa_detox", "composed"} <= set(lex)
    w = weights or (0.5, 0.5)  # the fixture adapters' saved alphas
    assert lex["composed"]["weights"] == {"lexical": w[0], "detox": w[1]}
    lm = TailoredLM.from_pretrained(str(home / "models/base"), str(home / "models/adapters/lexical"))
    detox = TailoredLM.from_pretrained(str(home / "models/base"), str(home / "models/adapters/detox")).adapter
    product = TailoredLM(lm.base, tokenizer=lm.tokenizer, experts=[lm.adapter, detox], weights=list(w))
    rows = LEXICAL[:4]
    gen = product.generate([r["prompt"] for r in rows], PROTOCOL["max_new_tokens"], top_p=PROTOCOL["top_p"],
                           seed=PROTOCOL["seed"])
    cov = lexical_coverage([r["prompt"] for r in rows], gen.texts, [r["concepts"] for r in rows])
    assert lex["composed"]["score"] == pytest.approx(sum(cov) / len(cov))
    gain = lex["ipa"]["score"] - lex["base"]["score"]
    if gain:
        assert lex["composed"]["gain_kept"] == pytest.approx((lex["composed"]["score"] - lex["base"]["score"]) / gain)
        assert "composed keeps" in capsys.readouterr().out
    else:
        assert lex["composed"]["gain_kept"] is None


@pytest.mark.parametrize("argv, says", [
    (["--compose", "lexical", "detox", "--compose-weights", "0.5"], "--compose-weights takes 2 finite numbers"),
    (["--compose", "lexical", "detox", "--compose-weights", "0.5", "nan"], "--compose-weights takes 2 finite numbers"),
    (["--compose", "lexical", "detox", "--compose-weights", "0.5", "-1"], "--compose-weights takes 2 finite numbers"),
    (["--compose-weights", "0.5", "0.5"], "--compose-weights needs --compose"),
])
def test_demo_compose_weights_bad_input_is_one_line(home, tmp_path, monkeypatch, capsys, argv, says):
    monkeypatch.setenv("IPA_FAST_HOME", str(home))
    assert main(["demo", "--quick", "--tasks", "lexical", *argv, "--out", str(tmp_path / "run")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not (tmp_path / "run").exists()


def test_demo_compose_needs_two_shipped_adapters_of_the_named_tasks(home, tmp_path, monkeypatch, capsys):
    import shutil
    h = tmp_path / "h"
    shutil.copytree(home, h)
    shutil.rmtree(h / "models/adapters/detox")
    monkeypatch.setenv("IPA_FAST_HOME", str(h))
    for compose, says in ((["lexical", "detox"], "no shipped adapter in the cache for ['detox']"),
                          (["lexical", "lexical"], "two or more"),
                          (["lexical", "grounded"], "no shipped adapter in the cache for ['grounded']")):
        assert main(["demo", "--quick", "--compose", *compose, "--out", str(tmp_path / "run")]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
