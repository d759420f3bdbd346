"""Every ``ipa-fast`` input error is one line on stderr with a non-zero exit status, found before
any work starts (no traceback, no model loaded where a flag alone is wrong). Also the defaults
that replaced the silent ones: ``generate --task`` (the trained adapter at its saved alpha),
``train --task`` presets, ``TailoredLogitsProcessor.from_pretrained``, custom rewards from the
current directory, and the end-of-run diversity warning."""
import json
import textwrap

import pytest

from ipa_fast.cli.main import build_parser, main
from ipa_fast.decoding.tailored import save_adapter
from tiny_models import make_tiny_pair

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(argv, capsys):
    """``(exit status, stdout, stderr)`` of ``ipa-fast ARGV`` run in-process."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse errors, --version, --help
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(argv, capsys, *needles):
    rc, _, err = cli(argv, capsys)
    assert rc not in (0, None), (argv, err)
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture
def no_work(monkeypatch):
    """Fail loudly if a command gets past validation into its real work."""
    import ipa_fast.cli.demo
    import ipa_fast.training.trainer

    def boom(*a, **k):
        raise AssertionError("the command started its work despite a bad input")
    monkeypatch.setattr(ipa_fast.cli.demo, "run_task", boom)
    monkeypatch.setattr(ipa_fast.training.trainer, "train", boom)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny base (context 48 positions) and two adapters saved the way ipa_fast saves them."""
    d = tmp_path_factory.mktemp("tiny")
    from tiny_models import make_tiny_model
    base, adapter, tok = make_tiny_pair(seed=3)
    short = make_tiny_model("gpt2", len(tok), seed=3, max_positions=48)
    short.save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    save_adapter(d / "adapter", adapter, tok, alpha=0.5, base=str(d / "base"))
    save_adapter(d / "adapter-prefixed", adapter, tok, alpha=2.0, adapter_prefix=[5, 6])
    return d


# ---------------------------------------------------------------------------------------
# one-line errors

@pytest.mark.parametrize("argv, needles", [
    (["generate", "--prompt", "The cat"], ["--task", "--adapter"]),
    (["generate", "--base", "/nonexistent", "--task", "detox", "--prompt", "x"], ["base model not found: /nonexistent"]),
    (["generate", "--adapter", "./no/such/adapter", "--prompt", "x"], ["adapter not found: ./no/such/adapter"]),
    (["generate", "--task", "detox", "--alpha", "-1", "--prompt", "x"], ["--alpha", "> 0"]),
    (["generate", "--task", "detox", "--alpha", "0", "--prompt", "x"], ["--alpha", "> 0"]),
    (["generate", "--task", "detox", "--alpha", "nan", "--prompt", "x"], ["--alpha"]),
    (["generate", "--task", "nope", "--prompt", "x"], ["--task", "invalid choice"]),
    (["generate", "--task", "detox", "--adapter", "x", "--prompt", "x"], ["not allowed"]),
    (["generate", "--task", "detox", "--max-new-tokens", "0", "--prompt", "x"], ["--max-new-tokens"]),
    (["generate", "--task", "detox", "--top-p", "1.5", "--prompt", "x"], ["--top-p"]),
    (["generate", "--task", "detox", "--top-k", "-2", "--prompt", "x"], ["--top-k"]),
    (["generate", "--task", "detox", "--temperature", "-1", "--prompt", "x"], ["--temperature"]),
    (["generate", "--task", "detox", "--min-new-tokens", "9", "--max-new-tokens", "4", "--prompt", "x"],
     ["--min-new-tokens"]),
    (["generate", "--task", "detox", "--prompts", "/no/such/prompts.txt"], ["file not found: /no/such/prompts.txt"]),
    (["generate", "--task", "detox"], ["no prompts"]),
    (["generate", "--task", "detox", "--api-model", "m", "--prompt", "x"], ["--api-base"]),
    (["generate", "--task", "detox", "--truncate-prompt", "right", "--prompt", "x"], ["--truncate-prompt"]),
    (["train", "--task", "detox", "--alpha", "-1"], ["--alpha", "> 0"]),
    (["train", "--task", "detox", "--steps", "-3"], ["--steps"]),
    (["train", "--task", "detox", "--batch-size", "0"], ["--batch-size"]),
    (["train", "--task", "detox", "--top-p", "0"], ["--top-p"]),
    (["train", "--task", "detox", "--base", "/nonexistent"], ["base model not found: /nonexistent"]),
    (["train", "--reward", "os:getcwd", "--prompts", "/no/such.jsonl"], ["file not found: /no/such.jsonl"]),
    (["train", "--task", "lexical", "--sft-steps", "70"], ["sft_steps", "--preset none"]),
    (["train", "--algo", "dpo"], ["--algo"]),
    (["train"], ["--task"]),
    (["demo", "--prompts", "0"], ["--prompts", "> 0"]),
    (["demo", "--prompts", "-4"], ["--prompts"]),
    (["demo", "--train-steps", "-1"], ["--train-steps"]),
    (["demo", "--home", "/no/such/home"], ["--home", "/no/such/home"]),
    (["demo", "--live-task", "nope"], ["--live-task"]),
    (["bench", "decode", "--batch", "0"], ["--batch"]),
    (["bench", "sampler", "--repeats", "0"], ["--repeats"]),
    (["bench", "train", "--steps", "0"], ["--steps"]),
    (["bench", "train", "--algos", "dpo"], ["dpo"]),
    (["bench", "nope"], ["invalid choice"]),
    (["nope"], ["invalid choice"]),
    ([], ["COMMAND"]),
])
def test_bad_input_is_one_line(argv, needles, capsys, no_work):
    assert_one_line_error(argv, capsys, *needles)


def test_version(capsys):
    from importlib.metadata import version

    import ipa_fast
    rc, out, _ = cli(["--version"], capsys)
    assert rc == 0 and out.strip() == f"ipa-fast {ipa_fast.__version__}" and ipa_fast.__version__ == version("ipa_fast")


def test_missing_assets_name_the_asset_and_the_setup_command(tmp_path, monkeypatch, capsys, no_work):
    monkeypatch.setenv("IPA_FAST_HOME", str(tmp_path / "empty"))
    from pathlib import Path
    shipped = [t for t in ("lexical", "detox")
               if (Path(__file__).resolve().parents[1] / "models/adapters" / t / "ipa_adapter.json").is_file()]
    for argv in (["demo", "--quick"], ["train", "--task", "detox"],
                 *[["generate", "--task", t, "--prompt", "x"] for t in shipped],
                 ["generate", "--adapter", str(tmp_path), "--prompt", "x"]):
        err = assert_one_line_error(argv, capsys, "ipa-fast setup", str(tmp_path / "empty"))
        assert "not found" in err


def test_unexpected_exceptions_are_one_line(monkeypatch, capsys):
    import ipa_fast.ops.bench_sampler as bs

    monkeypatch.setattr(bs, "run", lambda args: {}["nope"])
    assert_one_line_error(["bench", "sampler", "--quick"], capsys, "nope")
    monkeypatch.setenv("IPA_FAST_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["bench", "sampler", "--quick"])


def test_bench_train_accepts_quick():
    from ipa_fast.training import bench

    args = build_parser().parse_args(["bench", "train", "--quick"])
    bench.validate(args)
    assert (args.n, args.steps, args.batch_size, args.max_new_tokens) == tuple(bench.QUICK[k] for k in
                                                                               ("n", "steps", "batch_size", "max_new_tokens"))
    args = build_parser().parse_args(["bench", "train", "--quick", "--steps", "5"])
    bench.validate(args)
    assert args.steps == 5


# ---------------------------------------------------------------------------------------
# prompts longer than the context

def test_prompt_longer_than_the_context(tiny_dirs, capsys):
    long = "the cat sat on the mat and looked at the dog. " * 8
    common = ["generate", "--base", str(tiny_dirs / "base"), "--adapter", str(tiny_dirs / "adapter"),
              "--max-new-tokens", "8"]
    err = assert_one_line_error([*common, "--prompt", long], capsys, "too long", "context is 48", "--truncate-prompt left")
    assert "8 new tokens" in err
    rc, out, err = cli([*common, "--prompt", long, "--prompt", "the cat", "--truncate-prompt", "left", "--json",
                        str(tiny_dirs / "g.json")], capsys)
    assert rc == 0, err
    assert "prompt 0 truncated from the left to its last 41 of" in out and "prompt 1 truncated" not in out
    res = json.loads((tiny_dirs / "g.json").read_text())
    assert res["alpha"] == 0.5 and all(len(r["token_ids"]) == 8 for r in res["results"])
    assert_one_line_error([*common, "--max-new-tokens", "60", "--prompt", "x"], capsys, "max_new_tokens 60", "48")


def test_generate_api_refuses_and_truncates(tiny_dirs):
    from ipa_fast import TailoredLM

    lm = TailoredLM.from_pretrained(str(tiny_dirs / "base"), str(tiny_dirs / "adapter-prefixed"))
    long = [list(range(1, 45))]
    with pytest.raises(ValueError, match=r"prompt 0 is too long: 44 tokens \+ 8 new tokens need 51 positions"):
        lm.generate(long, 8)
    out = lm.generate(long + [[1, 2]], 8, truncate_prompt="left", seed=0)
    assert out.prompt_token_ids[0] == long[0][-41:] and out.prompt_token_ids[1] == [1, 2]
    fits = lm.generate([long[0][-41:]], 8, seed=0)
    assert fits.token_ids[0] == out.token_ids[0]


# ---------------------------------------------------------------------------------------
# defaults: saved alpha / prefix, presets

def test_logits_processor_reads_ipa_adapter_json(tiny_dirs):
    from ipa_fast.decoding.hf import TailoredLogitsProcessor

    proc = TailoredLogitsProcessor.from_pretrained(str(tiny_dirs / "adapter-prefixed"))
    assert proc.alpha == 2.0 and proc.adapter_prefix == [5, 6] and proc.pad_token_id is not None
    assert proc.metadata["alpha"] == 2.0
    proc = TailoredLogitsProcessor.from_pretrained(str(tiny_dirs / "adapter-prefixed"), alpha=0.25, adapter_prefix=[])
    assert proc.alpha == 0.25 and proc.adapter_prefix == []


def test_generate_uses_the_saved_alpha_unless_given(tiny_dirs, capsys):
    common = ["generate", "--base", str(tiny_dirs / "base"), "--adapter", str(tiny_dirs / "adapter-prefixed"),
              "--prompt", "the cat", "--max-new-tokens", "2", "--json", str(tiny_dirs / "a.json")]
    assert cli(common, capsys)[0] == 0
    res = json.loads((tiny_dirs / "a.json").read_text())
    assert res["alpha"] == 2.0 and res["adapter_prefix"] == [5, 6]
    assert cli([*common, "--alpha", "0.75"], capsys)[0] == 0
    assert json.loads((tiny_dirs / "a.json").read_text())["alpha"] == 0.75


def test_generate_task_picks_the_shipped_trained_adapter(monkeypatch, tmp_path):
    from ipa_fast import embedded
    from ipa_fast.cli import generate as generate_cli

    monkeypatch.setattr(embedded, "adapter_path", lambda task: tmp_path / "adapters" / task)
    monkeypatch.setattr(embedded, "base_path", lambda: tmp_path / "base")
    args = build_parser().parse_args(["generate", "--task", "lexical", "--prompt", "x"])
    generate_cli.validate(args)
    assert (args.base_path, args.adapter_path) == (str(tmp_path / "base"), str(tmp_path / "adapters/lexical"))
    assert args.alpha is None  # the adapter's ipa_adapter.json decides


def test_train_presets(capsys):
    from ipa_fast.training import TrainConfig
    from ipa_fast.training.cli import PRESETS, config_from_args

    def cfg(*argv):
        return config_from_args(build_parser().parse_args(["train", *argv]))

    detox = cfg("--task", "detox")
    assert all(getattr(detox, k) == v for k, v in PRESETS["detox"].items())
    assert detox.freeze_shared_embedding  # the embedded adapter-init shares the base's embedding
    assert cfg("--task", "detox", "--lr", "0.01", "--steps", "3").lr == 0.01
    assert cfg("--task", "detox", "--steps", "3").steps == 3
    lex = cfg("--task", "lexical")
    assert all(getattr(lex, k) == v for k, v in PRESETS["lexical"].items())
    assert lex.residual and lex.train_split == "warmstart" and lex.sft_field == "best"
    with pytest.raises(ValueError, match="held-out splits are never trained on"):
        cfg("--task", "lexical", "--train-split", "test").validate()
    plain = cfg("--task", "detox", "--preset", "none")
    defaults = TrainConfig()
    assert (plain.algo, plain.alpha, plain.lr, plain.batch_size) == (defaults.algo, defaults.alpha, defaults.lr,
                                                                    defaults.batch_size)
    assert cfg("--reward", "os:getcwd", "--prompts", __file__).alpha == defaults.alpha  # no task: no preset
    assert cfg("--reward", "os:getcwd", "--prompts", __file__, "--preset", "detox").algo == "ppo"
    # the recipes are the shipped adapters' (their ipa_adapter.json records algo and, for detox, alpha)
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "models/adapters"
    for task, recipe in PRESETS.items():
        meta = root / task / "ipa_adapter.json"
        if meta.is_file():
            saved = json.loads(meta.read_text())
            assert saved.get("algo", recipe["algo"]) == recipe["algo"]
            assert saved.get("reference_policy", recipe["reference"]) == recipe["reference"]


# ---------------------------------------------------------------------------------------
# custom rewards from the current directory

def test_reward_module_from_the_current_directory(tmp_path, monkeypatch):
    import sys

    from ipa_fast.training.rewards import load_reward

    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        THRESHOLD = 3
        def polite(prompts, completions):
            return [float("please" in c) for c in completions]
    """))
    (tmp_path / "broken_rewards.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.chdir(tmp_path)
    for name in ("my_rewards", "broken_rewards"):
        sys.modules.pop(name, None)
    before = list(sys.path)
    assert load_reward("my_rewards:polite")(["p"], ["please sit"]) == [1.0]
    assert sys.path == before  # the current directory is on sys.path only while importing
    assert load_reward("my_rewards.py:polite")(["p"], ["no"]) == [0.0]
    for spec, msg in [("no_such_rewards_xyz:f", "cannot import module 'no_such_rewards_xyz'"),
                      ("my_rewards:missing", "has no callable 'missing'"),
                      ("my_rewards:THRESHOLD", "is not callable"),
                      ("broken_rewards:f", "cannot import broken_rewards: ModuleNotFoundError"),
                      ("missing_file.py:f", "file not found"),
                      ("my_rewards:", "module:function")]:
        with pytest.raises(ValueError, match=msg) as info:
            load_reward(spec)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------
# end-of-run summary: distinct-2 and KL beside the reward, the collapse warning, the plot

def test_summary_warns_when_diversity_collapses(tmp_path):
    from ipa_fast.training.trainer import diversity_and_kl, plot_reward_curve, summary_lines

    train = [{"type": "train", "step": s, "reward": 0.5 + s / 10, "ppo/kl_seq": 0.1 * s} for s in range(1, 7)]
    ok = diversity_and_kl({"reward": 0.5, "distinct_2": 0.80}, {"reward": 0.9, "distinct_2": 0.70}, train)
    assert ok["diversity_warning"] is None and ok["kl"]["key"] == "ppo/kl_seq"
    assert ok["kl"]["mean_last_steps"] == pytest.approx(0.4)  # steps 2..6
    bad = diversity_and_kl({"reward": 0.5, "distinct_2": 0.80}, {"reward": 0.9, "distinct_2": 0.60}, train)
    assert "distinct-2 0.800 -> 0.600" in bad["diversity_warning"]
    lines = summary_lines({"algo": "ppo", "steps": 6, "initial_eval": {"reward": 0.5}, "final_eval": {"reward": 0.9},
                           **bad})
    assert len(lines) == 2 and "distinct-2 0.800 -> 0.600" in lines[0] and "KL" in lines[0]
    assert lines[1].startswith("warning: diversity collapsed")

    log = tmp_path / "metrics.jsonl"
    evals = [{"type": "eval", "step": s, "reward": 0.5, "distinct_2": d} for s, d in ((0, 0.8), (6, 0.6))]
    log.write_text("".join(json.dumps(r) + "\n" for r in [evals[0], *train, evals[1]]))
    plot_reward_curve(log, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0
