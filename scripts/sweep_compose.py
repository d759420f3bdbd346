#!/usr/bin/env python
"""Choose the weights of a composition of shipped adapters on validation rows.

Decodes every task of the composition (each has a shipped adapter) with the demo's protocol
(docs/DESIGN.md §6) on the first ``--rows`` rows of its split: the base alone, the task's own
adapter alone with the base at its shipped alpha, and the composed policy
``z = base + sum_i w_i * adapter_i`` at every weight tuple of ``--weights``. For each tuple and
task it reports the gain kept, (composed - base) / (own adapter - base), with perplexity under
the base and distinct-2 against the base's; the chosen tuple has the highest smallest gain kept
over the tasks among the tuples that keep, on every task, perplexity <= ``--max-perplexity-ratio``
(1.25) x the base's and distinct-2 >= ``--min-distinct2-ratio`` (0.9) x the base's.

    python scripts/sweep_compose.py --tasks lexical grounded --weights 0.5:0.7,0.7:0.6 \\
        --split validation --rows 200 100 [--json out.json]

The chosen weights are then evaluated on the test split with
``ipa-fast demo --compose lexical grounded --compose-weights W1 W2``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ipa_fast import embedded, tasks


def parse_weights(text: str, k: int) -> list[tuple[float, ...]]:
    """``"0.5:0.7,0.7:0.6"`` -> ``[(0.5, 0.7), (0.7, 0.6)]``, each tuple ``k`` finite numbers >= 0."""
    out = []
    for item in text.split(","):
        try:
            w = tuple(float(x) for x in item.split(":"))
        except ValueError:
            raise ValueError(f"--weights: {item!r} is not numbers separated by ':'") from None
        if len(w) != k or any(not (0 <= x < float("inf")) for x in w):
            raise ValueError(f"--weights: {item!r} must be {k} finite numbers >= 0 (one per task), ':'-separated")
        out.append(w)
    return out


def passes(row: dict, base: dict, max_ppl: float, min_d2: float) -> bool:
    return row["perplexity"] <= max_ppl * base["perplexity"] and row["distinct_2"] >= min_d2 * base["distinct_2"]


def choose(grid: list[dict], refs: dict, max_ppl: float = 1.25, min_d2: float = 0.9):
    """The grid entry with the highest smallest gain kept over the tasks among those within the
    fluency bars on every task; ``(entry or None, reason)``."""
    ok = [g for g in grid if all(passes(g["tasks"][t], refs[t]["base"], max_ppl, min_d2) for t in refs)]
    if not ok:
        return None, f"no weights keep perplexity <= {max_ppl:g}x and distinct-2 >= {min_d2:g}x the base's on every task"
    best = max(ok, key=lambda g: min(g["tasks"][t]["gain_kept"] for t in refs))
    return best, "highest smallest gain kept within the fluency bars: " + ", ".join(
        f"{t} {100 * best['tasks'][t]['gain_kept']:.0f} %" for t in refs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", required=True, choices=list(tasks.names()),
                    help="two or more tasks with shipped adapters, in the order of --weights' numbers")
    ap.add_argument("--weights", required=True, help="weight tuples, e.g. 0.5:0.7,0.7:0.6 (one number per task)")
    ap.add_argument("--split", default="validation", choices=["validation", "test"])
    ap.add_argument("--rows", type=int, nargs="+", default=[100], help="rows per task (one number, or one per task)")
    ap.add_argument("--max-perplexity-ratio", type=float, default=1.25)
    ap.add_argument("--min-distinct2-ratio", type=float, default=0.9)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    names = list(dict.fromkeys(args.tasks))
    if len(names) < 2:
        ap.error(f"--tasks needs two or more tasks, got {names}")
    try:
        grid_w = parse_weights(args.weights, len(names))
    except ValueError as exc:
        ap.error(str(exc))
    rows = args.rows * len(names) if len(args.rows) == 1 else args.rows
    if len(rows) != len(names) or min(rows) < 1:
        ap.error(f"--rows takes one number >= 1 or one per task ({len(names)})")

    import torch

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ipa_fast.cli.demo import evaluate_variant, load_composed, load_pair, trained_adapters

    paths = trained_adapters(names)
    if len(paths) < len(names):
        ap.error(f"no shipped adapter in the cache for {sorted(set(names) - set(paths))} (`ipa-fast setup` builds them)")
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(embedded.base_path()))
    tok.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(str(embedded.base_path()), dtype=torch.float32).eval()
    data = {t: embedded.read_task(t, args.split)[:n] for t, n in zip(names, rows)}
    refs = {}
    for t in names:
        own = load_pair(base, paths[t], tok)
        t0 = time.time()
        refs[t] = {"base": evaluate_variant(own, t, data[t], alpha=0.0),
                   "own": dict(evaluate_variant(own, t, data[t], alpha=own.alpha), alpha=own.alpha)}
        print(f"{t}: base {refs[t]['base']['score']:.3f}, own adapter (alpha {own.alpha:g}) "
              f"{refs[t]['own']['score']:.3f}  ({time.time() - t0:.0f} s)", flush=True)
    grid = []
    for w in grid_w:
        lm, _ = load_composed(base, tok, {t: paths[t] for t in names}, weights=list(w))
        entry = {"weights": dict(zip(names, w)), "tasks": {}}
        for t in names:
            r = evaluate_variant(lm, t, data[t], alpha=None)
            b, own = refs[t]["base"], refs[t]["own"]
            gain = own["score"] - b["score"]
            entry["tasks"][t] = {"score": r["score"], "gain_kept": (r["score"] - b["score"]) / gain if gain else None,
                                 "perplexity": r["perplexity"], "distinct_2": r["distinct_2"],
                                 "perplexity_ratio": r["perplexity"] / b["perplexity"],
                                 "distinct_2_ratio": r["distinct_2"] / b["distinct_2"]}
        grid.append(entry)
        print("weights " + ", ".join(f"{t} {x:g}" for t, x in zip(names, w)) + ": " + "; ".join(
            f"{t} {e['score']:.3f} (kept {100 * e['gain_kept']:.0f} %, perplexity {e['perplexity_ratio']:.2f}x, "
            f"distinct-2 {e['distinct_2_ratio']:.2f}x)" for t, e in entry["tasks"].items()), flush=True)
    best, why = choose(grid, refs, args.max_perplexity_ratio, args.min_distinct2_ratio)
    print(f"chosen weights: {'none' if best is None else ' '.join(f'{x:g}' for x in best['weights'].values())} ({why})")
    if args.json:
        strip = ("per_prompt", "texts")
        Path(args.json).write_text(json.dumps({
            "tasks": names, "split": args.split, "rows": dict(zip(names, rows)),
            "references": {t: {k: {m: x for m, x in v.items() if m not in strip} for k, v in r.items()}
                           for t, r in refs.items()},
            "grid": grid, "chosen": None if best is None else best["weights"],
            "rule": {"max_perplexity_ratio": args.max_perplexity_ratio, "min_distinct2_ratio": args.min_distinct2_ratio},
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
