"""``ipa-fast demo``: the main job on the embedded default, offline, minutes on a CPU.

With the shipped models present (``models/base``, ``models/adapter-init`` and one trained
adapter per task under ``models/adapters/<task>``) it shows IPA working, per docs/DESIGN.md §6:

1. for each task (lexical constraints, offensive language), on held-out test prompts: the base
   alone, base + trained IPA adapter, and the adapter alone — task score, perplexity under the
   base, distinct-2 — with side-by-side samples;
2. a short live IPA training (PPO on detox by default) from the initial adapter, with a progress bar, and the
   held-out reward before and after;
3. a JSON summary (``--json``) and a PNG plot.

Until those models are shipped it runs the sampler benchmark in quick mode instead (a real
job: the fused sampler against the Hugging Face chain) and says so.
Content warning: the offensive-language task prints model outputs that may be offensive.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import embedded

# the evaluation protocol of docs/DESIGN.md §6, fixed and printed
PROTOCOL = {"temperature": 1.0, "top_p": 0.9, "samples_per_prompt": 1, "max_new_tokens": 32, "seed": 20261126}
EVAL_CHUNK = 64  # prompts per generate() call in the evaluation
LIVE_STEPS = {False: 20, True: 4}
# the live run from the initial adapter: the shipped adapters' recipes (their MODEL_CARD.md); detox runs the
# shipped recipe for 20 steps (the same seed and batch), lexical a small-scale version of its recipe
LIVE = {
    "detox": dict(algo="ppo", alpha=0.5, lr=1e-3, batch_size=32, minibatch_size=16, ppo_epochs=2, kl_coef=0.05,
                  reference="initial", repeat_coef=1.0, min_new_tokens=32),
    "lexical": dict(algo="quark", lr=1e-4, sft_lr=3e-3, sft_target="adapter", sft_batch_size=64, batch_size=16,
                    minibatch_size=16),
}
TASK_SCORE = {"lexical": "coverage (higher is better)", "detox": "offensive rate (lower is better)"}


def add_arguments(parser) -> None:
    from .cli import positive_int

    parser.add_argument("--quick", action="store_true", help="fewer prompts and training steps (< 2 minutes)")
    parser.add_argument("--out", default="runs/demo", help="where the live training and the plot go")
    parser.add_argument("--plot", default=None, help="PNG path (default: <out>/demo.png)")
    parser.add_argument("--prompts", type=positive_int, default=None,
                        help="held-out test prompts per task, >= 1 (default: all, at most 500; quick 32)")
    parser.add_argument("--train-steps", type=positive_int, default=None,
                        help=f"live training steps, >= 1 (default {LIVE_STEPS[False]}, quick {LIVE_STEPS[True]})")
    parser.add_argument("--live-task", choices=list(LIVE), default="detox",
                        help="the task of the live training (default: detox)")
    parser.add_argument("--home", default=None, help="a root holding models/ and data/ (default: the shipped ones)")


def validate(args) -> None:
    """Before any work: every model and data file the demo reads is there (looked up through
    :mod:`ipa_fast.embedded` only, with ``--home`` as ``IPA_FAST_HOME``); otherwise one line
    naming what is missing and the command that gets it."""
    import os

    if args.home:
        if not Path(args.home).is_dir():
            raise FileNotFoundError(f"--home directory not found: {args.home}")
        os.environ["IPA_FAST_HOME"] = str(Path(args.home))
    if args.plot and not args.plot.lower().endswith(".png"):
        raise ValueError(f"--plot must be a .png path, got {args.plot}")
    needs = [(embedded.base_path, ()), (embedded.adapter_init_path, ())]
    needs += [(embedded.adapter_path, (t,)) for t in embedded.TASKS]
    needs += [(embedded.task_data_path, (t, s)) for t in embedded.TASKS for s in ("validation", "test")]
    missing = []
    for fn, fn_args in needs:
        try:
            fn(*fn_args)
        except FileNotFoundError as exc:
            missing.append(exc)
    if missing:
        more = f" (and {len(missing) - 1} more missing asset(s))" if len(missing) > 1 else ""
        raise FileNotFoundError(f"the demo needs the embedded models and data: {missing[0]}{more}")


def trained_adapter_path(task: str, home: Path) -> Path:
    return home / "models" / "adapters" / task


def missing_models(home: Path) -> list[str]:
    need = [home / "models/base", home / "models/adapter-init"]
    need += [trained_adapter_path(t, home) for t in embedded.TASKS]
    need += [home / "data/tasks" / t / f"{s}.jsonl" for t in embedded.TASKS for s in ("validation", "test")]
    return [str(p) for p in need if not p.exists()]


def evaluate_variant(lm, task: str, rows: list[dict], *, alpha: float, base_weight: float = 1.0) -> dict:
    """Score one decoding variant on ``rows`` with the fixed protocol."""
    from .evaluation import distinct_n, perplexity
    from .training.rewards import lexical_coverage, offensive_rate

    prompts = [r["prompt"] for r in rows]
    texts, prompt_ids, token_ids = [], [], []
    for start in range(0, len(prompts), EVAL_CHUNK):  # row r's seed is PROTOCOL seed + r in any chunking
        gen = lm.generate(prompts[start:start + EVAL_CHUNK], max_new_tokens=PROTOCOL["max_new_tokens"],
                          temperature=PROTOCOL["temperature"], top_p=PROTOCOL["top_p"],
                          seed=PROTOCOL["seed"] + start, alpha=alpha, base_weight=base_weight)
        texts += gen.texts
        prompt_ids += gen.prompt_token_ids
        token_ids += gen.token_ids
    if task == "lexical":
        score = sum(lexical_coverage(prompts, texts, [r["concepts"] for r in rows])) / len(rows)
    else:
        score = offensive_rate(texts)
    ppl = perplexity(lm.base, prompt_ids, token_ids, pad_token_id=lm.pad_id)
    return {"score": score, "perplexity": ppl, "distinct_2": distinct_n(texts, 2), "texts": texts}


def run_task(task: str, home: Path, rows: list[dict]) -> tuple[dict, list[dict]]:
    from .decoding import TailoredLM

    from transformers import AutoModelForCausalLM

    lm = TailoredLM.from_pretrained(str(home / "models/base"), str(trained_adapter_path(task, home)))
    # the same product of experts with the *initial* adapter: a second LM alone sharpens the
    # base (a lower-temperature effect), so this row separates what training added; it shares
    # lm's base and loads the initial adapter like lm's adapter (same dtype and device)
    first = next(lm.adapter.parameters())
    init = AutoModelForCausalLM.from_pretrained(str(home / "models/adapter-init"), dtype=first.dtype)
    untrained = TailoredLM(lm.base, init.to(first.device).eval(), lm.tokenizer, alpha=lm.alpha)
    variants = {
        "base": evaluate_variant(lm, task, rows, alpha=0.0),
        "ipa": evaluate_variant(lm, task, rows, alpha=lm.alpha),
        "ipa_untrained": evaluate_variant(untrained, task, rows, alpha=lm.alpha),
        "adapter_only": evaluate_variant(lm, task, rows, alpha=1.0, base_weight=0.0),
    }
    samples = [{"prompt": r["prompt"], **{k: v["texts"][i] for k, v in variants.items()}} for i, r in enumerate(rows[:3])]
    return {k: {m: v[m] for m in ("score", "perplexity", "distinct_2")} for k, v in variants.items()}, samples


def live_training(home: Path, out: Path, task: str, steps: int, quick: bool) -> dict:
    """A short IPA training run from the initial adapter (``ipa-fast train`` in-process), with
    its progress bar; held-out reward before and after (the task's validation split)."""
    from .training import TrainConfig, train

    knobs = dict(LIVE[task])
    if "sft_lr" in knobs:
        knobs["sft_steps"] = steps * 3 // 4
    run_dir = out / f"live-training-{task}"
    if run_dir.exists():  # a live run is cheap and must reflect the models as they are now: start afresh
        import shutil
        shutil.rmtree(run_dir)
    cfg = TrainConfig(task=task, steps=steps, out=str(run_dir), base=str(home / "models/base"),
                      adapter=str(home / "models/adapter-init"), eval_size=16 if quick else 150,
                      eval_every=0, checkpoint_every=max(steps, 1), **knobs)
    summary = train(cfg)
    return {"task": task, "algo": cfg.algo, "steps": summary["steps"], "sft_steps": cfg.sft_steps,
            "reward_before": summary["initial_eval"]["reward"], "reward_after": summary["final_eval"]["reward"],
            "reward_curve": summary["reward_curve"]}


def print_table(results: dict) -> None:
    print(f"\nEvaluation protocol: {PROTOCOL}")
    print(f"{'task':8} {'variant':13} {'score':>8} {'perplexity':>11} {'distinct-2':>11}")
    for task, variants in results.items():
        for name, m in variants.items():
            print(f"{task:8} {name:13} {m['score']:8.3f} {m['perplexity']:11.2f} {m['distinct_2']:11.3f}")
        print(f"{'':8} score = {TASK_SCORE[task]}")


def plot(results: dict, live: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results) + 1, figsize=(4 * (len(results) + 1), 3.2))
    for ax, (task, variants) in zip(axes, results.items()):
        names = list(variants)
        labels = [{"base": "base\nalone", "ipa": "base +\nIPA", "ipa_untrained": "base +\nuntrained",
                   "adapter_only": "adapter\nalone"}.get(n, n) for n in names]
        bars = ax.bar(labels, [variants[n]["score"] for n in names], color=["#999", "#1f77b4", "#aec7e8", "#ff7f0e"])
        for bar, n in zip(bars, names):  # the score alone can hide degenerate text: show fluency and diversity
            ax.annotate(f"ppl {variants[n]['perplexity']:.3g}\ndist-2 {variants[n]['distinct_2']:.2f}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
        ax.margins(y=0.3)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_title(f"{task}: {TASK_SCORE[task]}", fontsize=9)
    vals = [live["reward_before"], live["reward_after"]]
    axes[-1].bar(["before", "after"], vals, color=["#999", "#2ca02c"])
    for x, v in enumerate(vals):
        axes[-1].text(x, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    lo, hi = min(vals), max(vals)  # a zoomed axis: the change is small next to the reward itself
    axes[-1].set_ylim(max(0.0, lo - 2 * (hi - lo) - 0.02), hi + (hi - lo) + 0.02)
    axes[-1].set_title(f"live {live['algo']} training ({live['task']}), {live['steps']} steps:\nheld-out reward", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_sampler_fallback(args, missing: list[str]) -> dict:
    from . import bench_sampler

    print("The shipped models are not all present yet, so the demo runs the fused sampler benchmark "
          "(quick mode) instead.\nMissing: " + ", ".join(missing) + "\n")
    bench_args = argparse.Namespace(**{a.dest: a.default for a in _bench_parser()._actions if a.dest != "help"})
    bench_args.quick = True
    bench_args.plot = args.plot
    result = bench_sampler.run(bench_args)
    return {"mode": "sampler-benchmark", "missing": missing, "sampler": result}


def _bench_parser() -> argparse.ArgumentParser:
    from . import bench_sampler

    p = argparse.ArgumentParser()
    p.add_argument("--json", default=None)
    bench_sampler.add_arguments(p)
    return p


def run(args) -> dict:
    home = Path(args.home) if args.home else embedded.root()
    missing = missing_models(home)
    if missing:
        return run_sampler_fallback(args, missing)
    if args.home:
        import os
        os.environ["IPA_FAST_HOME"] = str(home)
    n_prompts = args.prompts or (32 if args.quick else 500)
    steps = args.train_steps if args.train_steps is not None else LIVE_STEPS[args.quick]
    out = Path(args.out)
    t0 = time.perf_counter()
    results, samples = {}, {}
    for task in embedded.TASKS:
        rows = embedded.read_task(task, "test")[:n_prompts]
        print(f"[demo] {task}: base alone vs base + IPA adapter (trained, untrained) vs adapter alone on {len(rows)} held-out test prompts"
              + (" (content warning: outputs may be offensive)" if task == "detox" else ""))
        results[task], samples[task] = run_task(task, home, rows)
    print_table(results)
    for task, rows in samples.items():
        print(f"\nSamples ({task}):")
        for row in rows:
            print(f"  prompt: {row['prompt']!r}")
            for name in ("base", "ipa", "ipa_untrained", "adapter_only"):
                print(f"    {name:13} {row[name]!r}")
    print(f"\n[demo] live IPA training ({LIVE[args.live_task]['algo']}, {args.live_task}) from the initial adapter, "
          f"{steps} steps")
    live = live_training(home, out, args.live_task, steps, args.quick)
    print(f"[demo] held-out reward {live['reward_before']:.3f} -> {live['reward_after']:.3f}")
    plot_path = Path(args.plot) if args.plot else out / "demo.png"
    plot(results, live, plot_path)
    print(f"[demo] plot: {plot_path}   total {time.perf_counter() - t0:.0f} s")
    return {"mode": "ipa", "protocol": PROTOCOL, "tasks": results, "live_training": live,
            "samples": samples, "plot": str(plot_path), "seconds": time.perf_counter() - t0}
