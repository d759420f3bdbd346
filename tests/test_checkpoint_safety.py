"""Checkpoint faults, each with one clear outcome: nothing lost, nothing executed.

Corrupt checkpoints (all, or the newest), a torn metrics line, a crafted ``latest``, crafted
pickles, changed hyperparameters, a hanging reward, retention among bad checkpoints, and
exact resume after a kill. Runs go through ``ipa-fast train`` in-process on a tiny model pair
(tests/tiny_models.py); one subprocess for the SIGKILL case.
"""
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ipa_fast.training import checkpoint as ckpt
from tests.tiny_models import save_tiny_pair, single_thread

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["the cat", "a dog", "we play", "birds sing", "she writes", "he cooks"]
STEPS = 3
LOGGER = "ipa_fast.training.checkpoint"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny models, prompts and rewards on disk (the command line loads them from there)."""
    d = tmp_path_factory.mktemp("assets")
    save_tiny_pair(d, seed=0)
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (d / "rewards.py").write_text(textwrap.dedent("""
        import os, time
        from pathlib import Path
        def even(prompts, completions, completion_ids):
            return [sum(i % 2 == 0 for i in ids) / max(1, len(ids)) for ids in completion_ids]
        def hangs_at_third_call(prompts, completions, completion_ids):
            counter = Path(os.environ["HANG_CALLS_FILE"])
            n = int(counter.read_text()) + 1 if counter.exists() else 1
            counter.write_text(str(n))
            if n == 3:  # hang "forever", as far as the run is concerned (until the test ends)
                release = Path(os.environ["HANG_RELEASE"])
                while not release.exists():
                    time.sleep(0.05)
            return even(prompts, completions, completion_ids)
    """))
    return d


def argv(assets, out, *extra, steps=STEPS, reward="even"):
    return ["train", "--reward", f"{assets}/rewards.py:{reward}", "--prompts", f"{assets}/prompts.jsonl",
            "--eval-prompts", f"{assets}/prompts.jsonl", "--base", f"{assets}/base", "--adapter",
            f"{assets}/adapter", "--algo", "quark", "--steps", str(steps), "--out", str(out),
            "--batch-size", "4", "--minibatch-size", "2", "--max-new-tokens", "4", "--eval-size", "2",
            "--eval-max-new-tokens", "4", "--eval-every", "2", "--checkpoint-every", "1",
            "--quark-updates", "1", "--lr", "1e-2", "--backend", "reference", "--no-progress", *extra]


def cli(args, capsys):
    """``ipa-fast ARGS`` in-process: (exit status, stderr)."""
    from ipa_fast.cli.main import main

    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err.splitlines()
    # transformers' model-loading progress bars are not ours
    return rc, "\n".join(ln for ln in err if ln.strip() and not ln.startswith(("Loading weights", "Writing model")))


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory):
    """A finished run of STEPS steps (checkpoints 1..3 kept): copied, then damaged, per test."""
    from ipa_fast.cli.main import main

    out = tmp_path_factory.mktemp("straight") / "run"
    with single_thread():  # as the tests' resumed runs (module fixtures precede one_thread)
        assert main(argv(assets, out)) == 0
    return out


@pytest.fixture
def run(straight, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    return out


def metrics(out):
    recs = [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in recs]


def adapter_tensors(out):
    from safetensors.torch import load_file
    return load_file(str(Path(out) / "adapter" / "model.safetensors"))


def same_tensors(a, b):
    """Equal trees of tensors (a checkpoint's packed states are dicts of dicts of tensors)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    return a == b


def corrupt(step_dir: Path, name="tensors.safetensors"):
    data = bytearray((step_dir / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (step_dir / name).write_bytes(bytes(data))


def assert_same_run(a, b):
    """Bit-identical outcome: metrics (untimed), samples, final adapter, newest checkpoint."""
    assert metrics(a) == metrics(b)
    assert (Path(a) / "samples.txt").read_text() == (Path(b) / "samples.txt").read_text()
    assert same_tensors(adapter_tensors(a), adapter_tensors(b))
    sa, pa = ckpt.load_latest(Path(a) / "checkpoints")
    sb, pb = ckpt.load_latest(Path(b) / "checkpoints")
    assert pa.name == pb.name and same_tensors(sa["adapter"], sb["adapter"])
    assert sa["pool"] == sb["pool"] and sa["optimizer"]["state"].keys() == sb["optimizer"]["state"].keys()
    assert all(same_tensors(sa["optimizer"]["state"][k], sb["optimizer"]["state"][k]) for k in sa["optimizer"]["state"])


# ---------------------------------------------------------------------------------------
# unreadable checkpoints

def test_all_checkpoints_corrupt_is_a_one_line_error_not_a_restart(run, assets, capsys):
    root = run / "checkpoints"
    for d in ckpt.checkpoint_dirs(root):
        corrupt(d)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    rc, err = cli(argv(assets, run, "--resume", steps=5), capsys)
    assert rc == 2 and "\n" not in err, err
    assert err.startswith("ipa-fast train: error: no readable checkpoint in") and "sha256 mismatch" in err
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # nothing deleted, nothing rewritten, no step-0 restart


def test_newest_corrupt_falls_back_with_a_warning_and_is_overwritten(run, straight, assets, capsys, caplog):
    root = run / "checkpoints"
    newest = root / "step_000003"
    corrupt(newest)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        state, path = ckpt.load_latest(root)
    assert state["step"] == 2 and path.name == "step_000002"
    [msg] = [r.getMessage() for r in caplog.records]
    assert str(newest) in msg and "sha256 mismatch in tensors.safetensors" in msg and "step_000002" in msg
    # resuming redoes step 3 from step 2 and replaces the corrupt directory: same run as before
    rc, err = cli(argv(assets, run, "--resume"), capsys)
    assert rc == 0, err
    ckpt.verify(newest)
    assert_same_run(run, straight)


def test_torn_metrics_line_is_dropped_and_resume_continues(run, straight, assets, capsys, caplog):
    # a kill while writing step 3's lines, before its checkpoint: step 3's records are redone
    shutil.rmtree(run / "checkpoints" / "step_000003")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "step": 4, "rew')
    with open(run / "samples.txt", "a") as f:
        f.write("eval @ step 4: rew")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        rc, err = cli(argv(assets, run, "--resume"), capsys)
    assert rc == 0, err
    msgs = [r.getMessage() for r in caplog.records]
    assert any("metrics.jsonl: dropping a torn last line" in m for m in msgs), msgs
    assert any("samples.txt: dropping a torn last line" in m for m in msgs), msgs
    # nothing repeated, nothing missing: the logs are the uninterrupted run's
    assert_same_run(run, straight)
    steps = [(r["type"], r["step"]) for r in metrics(run)]
    assert len(steps) == len(set(steps))


def test_resume_after_sigkill_mid_checkpoint_is_bit_identical(run, straight, assets, capsys, tmp_path):
    """Kill the process while it writes checkpoint 2's manifest (its files are written, not
    yet renamed into place); resume: the run ends bit-identical to the uninterrupted one."""
    killed = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, sys
        from ipa_fast.training import checkpoint as ckpt
        real = ckpt._write_file
        def dying(path, data):
            if path.name == "MANIFEST.json" and "step_000002" in str(path.parent):
                os.kill(os.getpid(), signal.SIGKILL)
            real(path, data)
        ckpt._write_file = dying
        from ipa_fast.cli.main import main
        sys.exit(main({argv(assets, killed)!r}))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert any(p.name.startswith(".tmp-step_000002") for p in (killed / "checkpoints").iterdir())
    assert ckpt.load_latest(killed / "checkpoints")[0]["step"] == 1
    rc, err = cli(argv(assets, killed, "--resume"), capsys)
    assert rc == 0, err
    assert_same_run(killed, straight)


# ---------------------------------------------------------------------------------------
# nothing outside the run directory, nothing executed

def _small_checkpoints(root, steps=(1, 2)):
    for s in steps:
        ckpt.save(root, s, {"step": s, "w": torch.full((3,), float(s))})


def test_crafted_latest_pointing_outside_is_ignored(tmp_path, caplog):
    root = tmp_path / "run" / "checkpoints"
    _small_checkpoints(root)
    evil = tmp_path / "evil"
    _small_checkpoints(evil, steps=(99,))  # a well-formed checkpoint, outside the run
    (root / "step_000100").symlink_to(evil / "step_000099", target_is_directory=True)
    for pointer in ("../../evil/step_000099", str(evil / "step_000099"), "step_000100", "..", "step_000001/../../evil"):
        (root / "latest").write_text(pointer + "\n")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            state, path = ckpt.load_latest(root)
        assert state["step"] == 2 and path == root / "step_000002", pointer
        msgs = [r.getMessage() for r in caplog.records]
        assert any(m.startswith(f"ignoring {root / 'latest'}") for m in msgs), (pointer, msgs)
        assert any("step_000100: a symlink" in m for m in msgs)
    (root / "latest").unlink()
    (root / "latest").symlink_to(evil / "latest")  # the pointer itself a symlink
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ckpt.load_latest(root)[0]["step"] == 2
    assert ckpt.checkpoint_dirs(root) == [root / "step_000001", root / "step_000002"]


class _Payload:
    """Unpickling this creates the marker file (stands for any code a pickle could run)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_pickles_never_run(run, assets, capsys, tmp_path, caplog):
    from ipa_fast.training import pretrain

    marker = tmp_path / "PWNED"
    payload = pickle.dumps({"step": 9, "x": _Payload(marker)})
    root = run / "checkpoints"
    # (1) an old-style pickle checkpoint, newest by name
    (root / "step_000009").mkdir()
    (root / "step_000009" / "state.pt").write_bytes(payload)
    # (2) the pickle in place of both files, with a manifest whose hashes match
    d = root / "step_000008"
    shutil.copytree(root / "step_000003", d)
    for name in ("tensors.safetensors", "state.json"):
        (d / name).write_bytes(payload)
    man = json.loads((d / "MANIFEST.json").read_text())
    man["step"] = 8
    for name in man["files"]:
        man["files"][name]["sha256"] = ckpt._sha256(payload)
    (d / "MANIFEST.json").write_text(json.dumps(man))
    # (3) pretrain's old single-file checkpoint
    pre = tmp_path / "pretrain-run"
    pre.mkdir()
    (pre / "ckpt.pt").write_bytes(payload)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        state, path = ckpt.load_latest(root)
        msgs = [r.getMessage() for r in caplog.records]
        assert path.name == "step_000003"
        assert any("step_000009 is unreadable (no MANIFEST.json (an old pickle checkpoint" in m for m in msgs), msgs
        assert any("step_000008 is unreadable (cannot parse the state" in m for m in msgs), msgs
        with pytest.raises(ckpt.CheckpointError, match="pickle checkpoint of an older version"):
            pretrain.load_checkpoint(pre)
    assert not marker.exists()
    # the run resumes from its newest good checkpoint (the crafted ones are newer: warned, skipped)
    rc, err = cli(argv(assets, run, "--resume", steps=4), capsys)
    assert rc == 0, err
    assert not marker.exists()
    assert ckpt.load_latest(root)[0]["step"] == 4


# ---------------------------------------------------------------------------------------
# a run is resumed with its own settings

def test_changed_hyperparameters_are_refused_unless_forced(run, assets, capsys):
    root = run / "checkpoints"
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    rc, err = cli(argv(assets, run, "--resume", "--seed", "1", "--lr", "0.05", "--batch-size", "6", steps=4), capsys)
    assert rc == 2 and "\n" not in err, err
    assert "seed 0 -> 1" in err and "lr 0.01 -> 0.05" in err and "batch_size 4 -> 6" in err and "--force" in err
    assert "steps" not in err.split("settings (")[1]  # --steps may change
    rc, err = cli(argv(assets, run, "--resume", "--algo", "ppo", "--force", steps=4), capsys)
    assert rc == 2 and "algo 'quark' -> 'ppo'" in err and "even with --force" in err
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    rc, err = cli(argv(assets, run, "--resume", "--seed", "1", "--lr", "0.05", "--force", steps=4), capsys)
    assert rc == 0, err
    last = [r for r in metrics(run) if r["type"] == "train"][-1]
    assert last["step"] == 4 and last["lr"] == pytest.approx(0.05)  # the new settings apply
    state = ckpt.load_latest(root)[0]
    assert state["config"]["seed"] == 1 and state["config"]["lr"] == 0.05
    assert json.loads((run / "config.json").read_text())["seed"] == 1


def test_changed_prompts_are_refused(run, assets, capsys, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"prompt": p + "!"}) + "\n" for p in PROMPTS))
    args = argv(assets, run, "--resume", steps=4)
    args[args.index("--prompts") + 1] = str(other)
    rc, err = cli(args, capsys)
    assert rc == 2 and "train_prompts sha256 " in err and "eval_prompts" not in err, err


# ---------------------------------------------------------------------------------------
# rewards cannot hang a run

def test_hanging_reward_times_out_and_keeps_the_last_checkpoint(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HANG_CALLS_FILE", str(tmp_path / "calls"))
    monkeypatch.setenv("HANG_RELEASE", str(tmp_path / "release"))
    out = tmp_path / "run"
    # calls: initial eval (1), step 1 (2), step 2 (3: hangs)
    rc, err = cli(argv(assets, out, "--reward-timeout", "0.5", reward="hangs_at_third_call"), capsys)
    try:
        assert rc == 2 and "\n" not in err, err
        assert "reward hangs_at_third_call did not return within 0.5 s" in err
        assert "at step 2; checkpoint of step 1 saved" in err
        state, path = ckpt.load_latest(out / "checkpoints")
        assert state["step"] == 1 and path.name == "step_000001"
        ckpt.verify(path)
    finally:
        (tmp_path / "release").touch()  # let the abandoned reward thread finish


def test_reward_timeout_config():
    from ipa_fast.training import TrainConfig
    from ipa_fast.training.rewards import RewardError
    from ipa_fast.training.trainer import call_with_deadline

    assert TrainConfig().reward_timeout == 600.0
    with pytest.raises(ValueError, match="reward_timeout"):
        TrainConfig(reward_timeout=-1).validate()
    assert call_with_deadline(lambda x: x + 1, (1,), 5, "f") == 2
    assert call_with_deadline(lambda x: x + 1, (1,), 0, "f") == 2  # no limit: this thread
    with pytest.raises(ZeroDivisionError):
        call_with_deadline(lambda: 1 / 0, (), 5, "f")
    import threading
    gate = threading.Event()
    with pytest.raises(RewardError, match="slow did not return within 0.2 s"):
        call_with_deadline(gate.wait, (30,), 0.2, "slow")
    gate.set()


# ---------------------------------------------------------------------------------------
# retention and replacement count only good checkpoints

def test_retention_keeps_the_good_one_and_save_replaces_a_corrupt_one(tmp_path, caplog):
    root = tmp_path / "ck"
    _small_checkpoints(root, steps=(1, 2))
    corrupt(root / "step_000002", "state.json")
    # the only good checkpoints are 1 and the new 3: both kept (keep=2), the corrupt 2 between
    # them removed
    ckpt.save(root, 3, {"step": 3}, keep=2)
    assert [p.name for p in ckpt.checkpoint_dirs(root)] == ["step_000001", "step_000003"]
    assert (root / "latest").read_text().strip() == "step_000003"
    # newer corrupt directories are not counted, and never displace the newest good one
    for s in (5, 6):
        (root / f"step_{s:06d}").mkdir()
        (root / f"step_{s:06d}" / "MANIFEST.json").write_text("{")
    ckpt.save(root, 4, {"step": 4}, keep=1)
    assert [p.name for p in ckpt.checkpoint_dirs(root)] == ["step_000004", "step_000005", "step_000006"]
    assert (root / "latest").read_text().strip() == "step_000004"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ckpt.load_latest(root)[0]["step"] == 4
    assert sum("is unreadable" in r.getMessage() for r in caplog.records) == 2
    # a corrupt directory of the step being saved is replaced, not taken for a saved one
    ckpt.save(root, 5, {"step": 5, "w": torch.ones(2)}, keep=1)
    assert ckpt.load(root / "step_000005")["step"] == 5
    assert [p.name for p in ckpt.checkpoint_dirs(root)] == ["step_000005", "step_000006"]
    # a good one of that step is kept as it is unless replace=True
    ckpt.save(root, 5, {"step": 5, "w": torch.zeros(2)}, keep=1)
    assert torch.equal(ckpt.load(root / "step_000005")["w"], torch.ones(2))
    ckpt.save(root, 5, {"step": 5, "w": torch.zeros(2)}, keep=1, replace=True)
    assert torch.equal(ckpt.load(root / "step_000005")["w"], torch.zeros(2))


def test_replacing_a_good_checkpoint_survives_a_kill(tmp_path):
    """Killed between setting the old good checkpoint aside and renaming the new one into
    place: the next load puts the old one back."""
    root = tmp_path / "ck"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from ipa_fast.training import checkpoint as ckpt
        ckpt.save({str(root)!r}, 1, {{"w": torch.ones(2)}})
        real = os.replace
        def dying(src, dst):
            real(src, dst)
            if ".old-" in str(dst):
                os.kill(os.getpid(), signal.SIGKILL)
        ckpt.os.replace = dying
        ckpt.save({str(root)!r}, 1, {{"w": torch.zeros(2)}}, replace=True)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not (root / "step_000001").exists()
    state, path = ckpt.load_latest(root)
    assert torch.equal(state["w"], torch.ones(2)) and path.name == "step_000001"


# ---------------------------------------------------------------------------------------
# the format

def test_state_round_trip_is_exact_and_plain(tmp_path):
    import random

    import numpy as np

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 2))], lr=1e-3)
    opt.param_groups[0]["params"][0].grad = torch.randn(3, 2)
    opt.step()
    w = torch.randn(4, 3)
    state = {"opt": opt.state_dict(), "rng": ckpt.rng_state(), "tied": {"a": w, "b": w},
             "misc": (1, 2.5, float("inf"), None, True, np.int64(7)), "keys": {1: "a", (2, 3): [4]},
             "$odd": {"$tensor": "not a tensor"}, "bf16": torch.randn(2, dtype=torch.bfloat16)}
    ckpt.save(tmp_path, 7, state)
    back = ckpt.load(tmp_path / "step_000007")
    assert sorted(p.name for p in (tmp_path / "step_000007").iterdir()) == \
        ["MANIFEST.json", "state.json", "tensors.safetensors"]
    assert back["misc"] == (1, 2.5, float("inf"), None, True, 7) and back["keys"] == {1: "a", (2, 3): [4]}
    assert back["$odd"] == {"$tensor": "not a tensor"} and torch.equal(back["bf16"], state["bf16"])
    assert same_tensors(back["tied"], state["tied"])
    assert back["opt"]["param_groups"] == state["opt"]["param_groups"]
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], state["opt"]["state"][0]["exp_avg"])
    ckpt.set_rng_state(back["rng"])
    a = (torch.rand(3), np.random.rand(3).tolist(), random.random())
    ckpt.set_rng_state(state["rng"])
    assert torch.equal(a[0], torch.rand(3)) and a[1] == np.random.rand(3).tolist() and a[2] == random.random()
    with pytest.raises(TypeError, match="cannot store"):
        ckpt.save(tmp_path, 8, {"f": lambda: 0})
    assert not (tmp_path / "step_000008").exists()


def test_pretrain_checkpoints_use_the_same_format(tmp_path):
    from ipa_fast.training import pretrain

    cfg = pretrain.Config(out=str(tmp_path), n_embd=8, n_layer=1, n_head=1, n_positions=16)
    torch.manual_seed(0)
    model = pretrain.make_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(3)
    path = pretrain.save_checkpoint(tmp_path, model, opt, 5, 100, cfg, gen,
                                    {"val_loss": None, "train_seconds": 1.5, "commands": ["x"]})
    assert path == tmp_path / "checkpoints" / "step_000005"
    ckpt.verify(path)
    state = pretrain.load_checkpoint(tmp_path)
    assert state["step"] == 5 and state["commands"] == ["x"] and state["config"]["n_embd"] == 8
    assert same_tensors(state["model"], model.state_dict())
    assert torch.equal(state["rng"]["batch"], gen.get_state())
    assert not list(tmp_path.glob("*.pt"))
