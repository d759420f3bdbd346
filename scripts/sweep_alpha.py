#!/usr/bin/env python
"""Task score, perplexity under the base and distinct-2 of base x adapter at several alphas.

The demo's evaluation protocol (T = 1, top-p 0.9, 32 new tokens, fixed seeds; docs/DESIGN.md §6) on the
first ``--rows`` rows of a task split, one line per alpha (alpha 0 = the base alone). Used to
choose the shipped alpha of an adapter on *validation* rows, never on the test split:

    python scripts/sweep_alpha.py runs/lexical-v3/adapter --task lexical --alphas 0,1,1.5,2 \\
        --split validation --rows 200 [--json out.json]

With alpha 0 first, it also names the alpha to ship (``choose``): the highest task score among the
alphas whose perplexity under the base is at most ``--max-perplexity-ratio`` (1.25) times the base
alone's and whose distinct-2 is at least ``--min-distinct2-ratio`` (0.9) times it; none if no
alpha qualifies.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ipa_fast import embedded, tasks


def sweep(adapter: str, task: str, alphas: list[float], split: str, rows: int, base: str,
          seeds: int = 1, adapter_alone: bool = False) -> list[dict]:
    from ipa_fast import TailoredLM
    from ipa_fast.cli.demo import adapter_alone as alone, evaluate_variant, mean_ci95

    lm = TailoredLM.from_pretrained(base, adapter)
    data = embedded.read_task(task, split)[:rows]
    out, first = [], None
    # the adapter alone: its own distribution (alpha 1, base weight 0; a residual adapter's trained network)
    runs = [(lm, a, 1.0) for a in alphas] + ([(alone(lm), 1.0, 0.0)] if adapter_alone else [])
    for policy, a, base_weight in runs:
        r = evaluate_variant(policy, task, data, alpha=a, base_weight=base_weight, seeds=seeds)
        first = first or r["per_prompt"]
        delta = mean_ci95([x - y for x, y in zip(r["per_prompt"], first)])  # paired, against the first alpha
        out.append({"alpha": a, "base_weight": base_weight, "score": r["score"], "score_ci95": r["score_ci95"], "delta_vs_first_ci95": delta,
                    "perplexity": r["perplexity"], "distinct_2": r["distinct_2"],
                    **{k: v for k, v in r.items() if k not in ("score", "score_ci95", "per_prompt", "texts",
                                                                "perplexity", "distinct_2")}})
        print(f"alpha {a:g}{'' if base_weight else ' (adapter alone)'}: score {r['score']:.3f} [{r['score_ci95'][0]:.3f}, {r['score_ci95'][1]:.3f}]  "
              f"vs alpha {alphas[0]:g} {delta[0]:+.3f}..{delta[1]:+.3f}  perplexity under the base "
              f"{r['perplexity']:.1f}  distinct-2 {r['distinct_2']:.3f}  e.g. {r['texts'][0]!r}", flush=True)
    return out


def choose(results: list[dict], max_perplexity_ratio: float = 1.25, min_distinct2_ratio: float = 0.9):
    """The alpha to ship from :func:`sweep`'s rows: the first row must be alpha 0 (the base alone);
    among the other tailored rows (the adapter alone never counts), the highest score whose
    perplexity <= ``max_perplexity_ratio`` x the base's and distinct-2 >= ``min_distinct2_ratio`` x
    the base's. Returns ``(alpha or None, reason)``."""
    if not results or results[0]["alpha"] != 0 or results[0]["base_weight"] != 1.0:
        raise ValueError("choose needs alpha 0 (the base alone) as the first alpha")
    base = results[0]
    ok = [r for r in results[1:] if r["base_weight"] == 1.0
          and r["perplexity"] <= max_perplexity_ratio * base["perplexity"]
          and r["distinct_2"] >= min_distinct2_ratio * base["distinct_2"]]
    if not ok:
        return None, (f"no alpha keeps perplexity <= {max_perplexity_ratio:g}x and distinct-2 >= "
                      f"{min_distinct2_ratio:g}x the base's")
    best = max(ok, key=lambda r: (r["score"], -r["alpha"]))
    return best["alpha"], (f"highest score {best['score']:.3f} at perplexity {best['perplexity'] / base['perplexity']:.2f}x "
                           f"and distinct-2 {best['distinct_2'] / base['distinct_2']:.2f}x the base's")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("adapter", help="adapter directory (e.g. an `ipa-fast train --out` run's adapter/)")
    ap.add_argument("--task", required=True, choices=list(tasks.names()))
    ap.add_argument("--alphas", default="0,1", help="comma-separated alphas (0 = the base alone)")
    ap.add_argument("--split", default="validation", choices=["validation", "test"])
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=1, help="decode every prompt with this many seeds (the demo's "
                    "protocol: intervals over prompts, each the mean over its seeds)")
    ap.add_argument("--base", default=None, help="default: the embedded base (`ipa-fast setup`)")
    ap.add_argument("--adapter-alone", action="store_true",
                    help="also evaluate the adapter alone (its own distribution: base weight 0, alpha 1)")
    ap.add_argument("--max-perplexity-ratio", type=float, default=1.25)
    ap.add_argument("--min-distinct2-ratio", type=float, default=0.9)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        alphas = [float(x) for x in args.alphas.split(",")]
    except ValueError:
        ap.error(f"--alphas must be comma-separated numbers, got {args.alphas!r}")
    if any(a < 0 for a in alphas) or args.rows < 1 or args.seeds < 1:
        ap.error("--alphas must be >= 0, --rows and --seeds >= 1")
    import torch
    torch.set_num_threads(1)
    if args.base is None:
        from ipa_fast import embedded
        args.base = str(embedded.base_path())
    res = sweep(args.adapter, args.task, alphas, args.split, args.rows, args.base, args.seeds, args.adapter_alone)
    chosen = None
    if alphas[0] == 0:
        chosen, why = choose(res, args.max_perplexity_ratio, args.min_distinct2_ratio)
        print(f"chosen alpha: {'none' if chosen is None else f'{chosen:g}'} ({why})")
    if args.json:
        Path(args.json).write_text(json.dumps({"task": args.task, "split": args.split, "rows": args.rows,
                                               "adapter": args.adapter, "results": res, "chosen_alpha": chosen,
                                               "rule": {"max_perplexity_ratio": args.max_perplexity_ratio,
                                                        "min_distinct2_ratio": args.min_distinct2_ratio}},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
