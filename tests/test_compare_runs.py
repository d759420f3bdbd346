"""scripts/compare_runs.py: group means and standard errors of held-out rewards, step by step, against
numbers worked by hand; bad folders are one-line errors."""
import json
import math

import pytest

from scripts.compare_runs import compare, evals, main


def run(tmp_path, name, rewards, extra_steps=()):
    d = tmp_path / name
    d.mkdir()
    lines = [{"type": "sft", "step": 1, "sft/nll": 1.0}]
    lines += [{"type": "eval", "step": s, "reward": r} for s, r in rewards.items()]
    lines += [{"type": "eval", "step": s, "reward": 0.0} for s in extra_steps]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return str(d)


def test_means_standard_errors_and_the_two_se_rule(tmp_path):
    a = [run(tmp_path, f"a{i}", {0: 0.2, 15: v}, extra_steps=[30] if i == 0 else []) for i, v in enumerate([0.3, 0.4, 0.5])]
    b = [run(tmp_path, f"b{i}", {0: 0.2, 15: v}) for i, v in enumerate([0.6, 0.7, 0.8])]
    rows = compare(a, b)
    assert [r["step"] for r in rows] == [0, 15]  # step 30: only one run has it
    r = rows[1]
    se = math.sqrt(0.01 / 3)  # sample variance of (0.3, 0.4, 0.5) is 0.01
    assert r["mean_a"] == pytest.approx(0.4) and r["se_a"] == pytest.approx(se)
    assert r["mean_b"] == pytest.approx(0.7) and r["se_b"] == pytest.approx(se)
    assert r["difference"] == pytest.approx(0.3) and r["se_difference"] == pytest.approx(math.sqrt(2) * se)
    assert not r["within_2se"]  # 0.3 > 2 * 0.0816
    assert rows[0]["within_2se"] and rows[0]["difference"] == 0


def test_bad_folders_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        evals(str(tmp_path), "reward")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"type": "eval"\n')
    with pytest.raises(ValueError, match="metrics.jsonl:1: not JSON"):
        evals(str(bad), "reward")
    with pytest.raises(SystemExit) as exc:
        main(["--a", str(tmp_path), "--b", str(bad)])
    assert exc.value.code == 2 and "no metrics.jsonl" in capsys.readouterr().err


def test_a_saved_group_stands_for_its_runs(tmp_path, capsys):
    """FILE.json:b of an earlier --json reproduces that group's runs: comparing against it gives the
    same rows as comparing against the folders themselves; a bad spec is a one-line error."""
    a = [run(tmp_path, f"a{i}", {0: 0.2, 15: v}) for i, v in enumerate([0.3, 0.4, 0.5])]
    b = [run(tmp_path, f"b{i}", {0: 0.25, 15: v}) for i, v in enumerate([0.6, 0.7, 0.8])]
    saved = tmp_path / "saved.json"
    assert main(["--a", *a, "--b", *b, "--json", str(saved)]) == 0
    c = [run(tmp_path, f"c{i}", {0: 0.2, 15: v, 30: 0.9}) for i, v in enumerate([0.35, 0.45, 0.55])]
    assert compare(c, [f"{saved}:b"]) == compare(c, b)
    assert compare([f"{saved}:a", f"{saved}:b"], c)[1]["a"] == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    out = tmp_path / "again.json"
    assert main(["--a", *c, "--b", f"{saved}:b", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["b"] == [f"{r} (from {saved}:b)" for r in b]
    with pytest.raises(ValueError, match="not a group"):
        compare(c, [f"{tmp_path / 'missing.json'}:a"])
    with pytest.raises(ValueError, match="compared 'reward', not 'kl'"):
        compare([f"{saved}:b"], [f"{saved}:a"], metric="kl")
