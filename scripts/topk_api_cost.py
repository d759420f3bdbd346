#!/usr/bin/env python
"""What an API base's top-k log-probs cost the tailored policy, on the embedded default.

An API-only base returns its top-k log-probs, so the tailored policy is computed with the base at
``-inf`` outside them (``TailoredLM(base_top_k=k)``, ``ipa_fast.decoding.tailored.densify_top_k``). This
measures, on real decoding positions, how far that policy is from the one with the full local base:
the total variation TV = 0.5 * sum |pi_full - pi_topk| of the next-token distributions (T = 1,
before top-p), and the probability mass pi_full puts outside the base's top-k (what a draw from
the approximation can never reach).

Positions: the first ``--prompts`` lexical and detox test prompts, continued for ``--tokens``
tokens by the full tailored policy (T = 1, top-p 0.9, fixed seeds); every position of every
continuation is scored (teacher forced), for k in ``--ks``.

    python scripts/topk_api_cost.py --json benchmarks/results/topk_api.json

Adapter: the shipped trained adapter of each task when present, else the adapter initialisation,
at its stored alpha (or ``--alpha``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def position_logits(model, rows: list[list[int]], pad_id: int):
    """Logits ``[sum(len(row) - 1), V]`` predicting each token of each row from its prefix."""
    import torch

    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()


def measure(task: str, n_prompts: int, n_tokens: int, ks: list[int], alpha: float | None) -> dict:
    import torch

    from ipa_fast import TailoredLM, embedded

    try:
        adapter_dir, which = embedded.adapter_path(task), f"trained {task} adapter"
    except FileNotFoundError:
        adapter_dir, which = embedded.adapter_init_path(), "adapter initialisation"
    lm = TailoredLM.from_pretrained(str(embedded.base_path()), str(adapter_dir), dtype="float32")
    a = lm.alpha if alpha is None else alpha
    prompts = [r["prompt"] for r in embedded.read_task(task, "test")[:n_prompts]]
    gen = lm.generate(prompts, max_new_tokens=n_tokens, top_p=0.9, seed=1234, alpha=a)
    tv = {k: [] for k in ks}
    outside = {k: [] for k in ks}
    for p_ids, t_ids in zip(gen.prompt_token_ids, gen.token_ids):
        if not t_ids:
            continue
        row = list(p_ids) + list(t_ids)
        b = position_logits(lm.base, [row], lm.pad_id)[0, len(p_ids) - 1:len(row) - 1, :lm.V]
        ad = position_logits(lm.adapter, [row], lm.pad_id)[0, len(p_ids) - 1:len(row) - 1, :lm.V]
        lb = torch.log_softmax(b, -1)
        full = torch.softmax(lb + a * ad, -1)
        for k in ks:
            vals, ids = lb.topk(k, dim=-1)
            sparse = torch.full_like(lb, float("-inf")).scatter_(1, ids, vals)
            approx = torch.softmax(sparse + a * ad, -1)
            tv[k] += (0.5 * (full - approx).abs().sum(-1)).tolist()
            kept = torch.zeros_like(full, dtype=torch.bool).scatter_(1, ids, True)
            outside[k] += (full * ~kept).sum(-1).tolist()
    out = {"task": task, "adapter": which, "alpha": a, "positions": len(tv[ks[0]])}
    for k in ks:
        xs = sorted(tv[k])
        out[f"k={k}"] = {"tv_mean": sum(xs) / len(xs), "tv_p95": xs[int(0.95 * (len(xs) - 1))], "tv_max": xs[-1],
                         "mass_outside_mean": sum(outside[k]) / len(outside[k])}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--ks", default="5,20,100")
    ap.add_argument("--alpha", type=float, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.prompts < 1 or args.tokens < 1:
        ap.error("--prompts and --tokens must be >= 1")
    try:
        ks = [int(x) for x in args.ks.split(",")]
    except ValueError:
        ap.error(f"--ks must be comma-separated integers, got {args.ks!r}")
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()
    try:
        results = [measure(t, args.prompts, args.tokens, ks, args.alpha) for t in ("lexical", "detox")]
    except FileNotFoundError as exc:
        print(f"topk_api_cost: error: {exc}", file=sys.stderr)
        return 2
    for r in results:
        print(f"{r['task']} ({r['adapter']}, alpha {r['alpha']}, {r['positions']} positions):")
        for k in ks:
            m = r[f"k={k}"]
            print(f"  k={k:<4} TV mean {m['tv_mean']:.4f}  p95 {m['tv_p95']:.4f}  max {m['tv_max']:.4f}  "
                  f"mass outside top-k {m['mass_outside_mean']:.4f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": "python scripts/topk_api_cost.py " + " ".join(argv or sys.argv[1:]),
                                               "seconds": time.time() - t0, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
