#!/usr/bin/env python
"""Held-out rewards of two groups of training runs (e.g. seeds against a local base and against a
served one), step by step: each group's mean and standard error over its runs, and whether the
difference is within two standard errors of the difference.

    python scripts/compare_runs.py --a runs/local-s0 runs/local-s1 runs/local-s2 \\
        --b runs/served-s0 runs/served-s1 runs/served-s2 --labels local served [--metric reward] [--json out.json]

Each run is an ``ipa-fast train --out`` folder; its ``metrics.jsonl`` ``eval`` records are read at the
steps every run of both groups evaluated. ``FILE.json:a`` (or ``:b``) in place of run folders stands for
that group of an earlier comparison's ``--json`` (its runs' values at its steps), for runs whose folders
are gone.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ipa_fast.cli.demo import mean_se


def evals(run: str, metric: str) -> dict[int, float]:
    """``{step: value}`` of ``metric`` in a run's held-out evaluations (one line, ValueError, when the
    run has no metrics.jsonl or no evaluation)."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run}: no metrics.jsonl (not an `ipa-fast train --out` folder?)")
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: not JSON") from None
        if rec.get("type") == "eval" and isinstance(rec.get(metric), (int, float)):
            out[int(rec["step"])] = float(rec[metric])
    if not out:
        raise ValueError(f"{path}: no held-out evaluation of {metric!r}")
    return out


def saved_group(spec: str, metric: str) -> tuple[list[str], list[dict[int, float]]]:
    """``FILE.json:a`` -> (the run names, ``[{step: value}]`` per run) of that group of a saved
    comparison (one line, ValueError, when it is not one, or compared another metric)."""
    path, _, group = spec.rpartition(":")
    try:
        saved = json.loads(Path(path).read_text())
        runs, steps = saved[group], saved["steps"]
        values = [{int(r["step"]): float(r[group][i]) for r in steps} for i in range(len(runs))]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"{spec}: not a group (a or b) of a compare_runs --json file ({type(exc).__name__})") from None
    if saved.get("metric") != metric:
        raise ValueError(f"{spec}: compared {saved.get('metric')!r}, not {metric!r}")
    return runs, values


def expand(runs: list[str], metric: str) -> tuple[list[str], list[dict[int, float]]]:
    """Run folders and saved groups -> (names, ``[{step: value}]`` per run)."""
    names, values = [], []
    for run in runs:
        if run.endswith((".json:a", ".json:b")):
            n, v = saved_group(run, metric)
            names += [f"{x} (from {run})" for x in n]
            values += v
        else:
            names.append(run)
            values.append(evals(run, metric))
    return names, values


def compare(a: list[str], b: list[str], metric: str = "reward") -> list[dict]:
    """The rows of :func:`compare_values` for two groups of run folders / saved groups."""
    return compare_values(expand(a, metric)[1], expand(b, metric)[1])


def compare_values(ea: list[dict[int, float]], eb: list[dict[int, float]]) -> list[dict]:
    """Per step every run of both groups evaluated: each group's values, mean and standard error,
    the difference and whether it lies within two standard errors."""
    steps = sorted(set.intersection(*(set(e) for e in ea + eb)))
    if not steps:
        raise ValueError("the runs share no evaluated step")
    rows = []
    for s in steps:
        va, vb = [e[s] for e in ea], [e[s] for e in eb]
        (ma, sa), (mb, sb) = mean_se(va), mean_se(vb)
        se = math.sqrt(sa ** 2 + sb ** 2)
        rows.append({"step": s, "a": va, "b": vb, "mean_a": ma, "se_a": sa, "mean_b": mb, "se_b": sb,
                     "difference": mb - ma, "se_difference": se, "within_2se": abs(mb - ma) <= 2 * se})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", nargs="+", required=True, metavar="RUN",
                    help="the first group's run folders (or FILE.json:a|b, a saved comparison's group)")
    ap.add_argument("--b", nargs="+", required=True, metavar="RUN", help="the second group's, likewise")
    ap.add_argument("--labels", nargs=2, default=["a", "b"], metavar=("A", "B"))
    ap.add_argument("--metric", default="reward", help="an eval record's key (default: reward)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        (names_a, ea), (names_b, eb) = expand(args.a, args.metric), expand(args.b, args.metric)
        rows = compare_values(ea, eb)
    except ValueError as exc:
        ap.error(str(exc))
    la, lb = args.labels
    print(f"{args.metric} on the held-out evaluation rows; mean +- standard error over runs "
          f"({len(names_a)} {la}, {len(names_b)} {lb})")
    print(f"{'step':>5} | {la:>22} | {lb:>22} | {lb} - {la} (2 SE)  | within 2 SE")
    for r in rows:
        print(f"{r['step']:>5} | {r['mean_a']:.4f} +- {r['se_a']:.4f}{'':>6} | {r['mean_b']:.4f} +- {r['se_b']:.4f}"
              f"{'':>6} | {r['difference']:+.4f} ({2 * r['se_difference']:.4f}) | {'yes' if r['within_2se'] else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"metric": args.metric, "labels": [la, lb], "a": names_a, "b": names_b,
                                               "steps": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
