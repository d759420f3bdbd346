#!/usr/bin/env python
"""Best-of-n warm-start data for a task: sample n completions per training prompt from a policy
(the base alone by default), score them with the task's reward, and keep the best one per prompt
in a ``best`` field (rejection sampling, as in RAFT / ReST / Quark's top quantile).

The output is the task's prompt rows plus ``best`` and ``best_reward``, ``worst`` and
``worst_reward``, ``mean_reward`` (the prompt's mean over its n samples) and ``samples`` (every
sample with its reward, e.g. for preference pairs), ready for a supervised warm start of the
adapter through the product of experts:

    python scripts/best_of_n.py --task lexical --rows 256 --n 4 --out runs/lexical-best4.jsonl
    ipa-fast train --task lexical --prompts runs/lexical-best4.jsonl --sft-field best --sft-steps 200 ...

``--min-best-reward R`` keeps only the prompts whose best sample reaches R, and ``--compact``
writes only the prompt row, ``best``, ``best_reward`` and ``mean_reward``: the shipped lexical
warm-start file ``data/tasks/lexical/warmstart.jsonl`` is

    python scripts/best_of_n.py --task lexical --rows 384 --n 4 --min-best-reward 0.66 --compact \
        --out data/tasks/lexical/warmstart.jsonl

Only the task's train split is read: held-out prompts never become targets.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SEED = 20261201
SEED_STRIDE = 1_000_003  # sample j of row r uses seed SEED + SEED_STRIDE * j + r


def best_of_n(lm, task_name: str, rows: list[dict], n: int, *, alpha: float, max_new_tokens: int,
              temperature: float, top_p: float, chunk: int = 32, log=print) -> list[dict]:
    """``rows`` with ``best``/``worst`` (+ their rewards), ``mean_reward`` and ``samples`` added."""
    from ipa_fast import tasks
    from ipa_fast.training.rewards import call_reward

    spec = tasks.get(task_name)
    reward = spec.reward_fn()
    # a continuation's text is kept exactly as sampled (its leading space is part of the next word, and
    # the reward saw it); a chat reply is stripped
    keep = (lambda t: t) if spec.prompt_style == "continuation" else str.strip
    texts: list[list[str]] = [[] for _ in rows]
    scores: list[list[float]] = [[] for _ in rows]
    t0 = time.perf_counter()
    for j in range(n):
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            gen = lm.generate([r["prompt"] for r in part], max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, seed=SEED + SEED_STRIDE * j + start, alpha=alpha)
            fields = {k: [r.get(k) for r in part] for k in part[0] if k != "prompt"}
            got = call_reward(reward, [r["prompt"] for r in part], gen.texts, fields)
            for i, (text, s) in enumerate(zip(gen.texts, got)):
                texts[start + i].append(text)
                scores[start + i].append(float(s))
        log(f"best_of_n: sample {j + 1}/{n} of {len(rows)} prompts done ({time.perf_counter() - t0:.0f} s)")
    out = []
    for r, ts, ss in zip(rows, texts, scores):
        k = max(range(len(ss)), key=ss.__getitem__)
        w = min(range(len(ss)), key=ss.__getitem__)
        out.append({**r, "best": keep(ts[k]), "best_reward": ss[k], "worst": keep(ts[w]), "worst_reward": ss[w],
                    "mean_reward": sum(ss) / len(ss),
                    "samples": [{"text": keep(t), "reward": x} for t, x in zip(ts, ss)]})
    return out


SAMPLE_FIELDS = ("worst", "worst_reward", "samples")  # what --compact leaves out


def select(rows: list[dict], min_best_reward: float | None = None, compact: bool = False) -> list[dict]:
    """The rows of :func:`best_of_n` whose best reward is at least ``min_best_reward`` (all when
    None), without the per-sample fields when ``compact``."""
    kept = [r for r in rows if min_best_reward is None or r["best_reward"] >= min_best_reward]
    return [{k: v for k, v in r.items() if k not in SAMPLE_FIELDS} for r in kept] if compact else kept


def main(argv=None) -> int:
    from ipa_fast import tasks

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", required=True, choices=list(tasks.names()))
    ap.add_argument("--out", required=True, type=Path, help="JSON lines to write")
    ap.add_argument("--rows", type=int, default=256, help="training prompts to use (a seeded sample; default 256)")
    ap.add_argument("--n", type=int, default=4, help="samples per prompt (default 4)")
    ap.add_argument("--adapter", default=None, help="adapter directory (default: the embedded adapter initialisation)")
    ap.add_argument("--alpha", type=float, default=0.0, help="adapter weight of the sampling policy (default 0: base alone)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--min-best-reward", type=float, default=None,
                    help="keep only the prompts whose best sample's reward is at least this")
    ap.add_argument("--compact", action="store_true",
                    help="write only the prompt row, best, best_reward and mean_reward (a warm-start file)")
    args = ap.parse_args(argv)
    if args.rows < 1 or args.n < 1:
        ap.error("--rows and --n must be >= 1")
    import random

    import torch

    from ipa_fast import embedded
    from ipa_fast.decoding.tailored import TailoredLM

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = embedded.read_task(args.task, "train")
    rows = random.Random(SEED).sample(rows, min(args.rows, len(rows)))
    lm = TailoredLM.from_pretrained(str(embedded.base_path()), args.adapter or str(embedded.adapter_init_path()),
                                    dtype="float32")
    out = best_of_n(lm, args.task, rows, args.n, alpha=args.alpha, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p)
    mean = sum(r["mean_reward"] for r in out) / len(out)
    best = sum(r["best_reward"] for r in out) / len(out)
    n_sampled = len(out)
    out = select(out, args.min_best_reward, args.compact)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
    tmp.replace(args.out)
    print(f"best_of_n: {n_sampled} prompts x {args.n} samples: mean reward {mean:.3f}, best-of-{args.n} {best:.3f}; "
          f"{len(out)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
