"""``ipa-fast bench sampler``: the fused sampler vs the Hugging Face chain and the memory floor.

For each vocabulary V, batch B and filter setting it times (median wall time over interleaved
rounds, inputs resident, the same process and thread count for every contender):

- ``hf``        what users write today: ``log_softmax(base) + alpha * log_softmax(adapter)``,
                transformers' ``TopKLogitsWarper`` / ``TopPLogitsWarper``, ``softmax``,
                ``torch.multinomial``;
- ``reference`` ``ipa_fast.sample(..., backend="reference")`` (pure PyTorch, sorts);
- ``cpu``       ``ipa_fast.sample(..., backend="cpu")`` through the public API (validation included);
- ``kernel``    the cpu backend called directly with normalised parameters (no API overhead);
- ``floor``     one plain read of both inputs in C++ (the memory floor no sampler can beat).

Inputs are Gaussian logits times ``--scale`` (3 by default, a spread like a language model's;
``--scale 1`` gives near-flat rows where the top-p nucleus holds most of the vocabulary).
"""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch

FULL = dict(vocabs=(50257, 128256), batches=(1, 8, 32, 64), filters=("top_p=0.9", "top_k=50,top_p=0.9"))
QUICK = dict(vocabs=(50257,), batches=(1, 32), filters=("top_p=0.9",))


def add_arguments(parser) -> None:
    from .cli import nonneg_float, positive_float, positive_int

    parser.add_argument("--quick", action="store_true", help="a small subset (V=50257, B in {1, 32}, top_p=0.9)")
    parser.add_argument("--plot", metavar="PNG", default=None, help="write a speed-up vs batch size plot")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch / OpenMP threads for every contender (default: $OMP_NUM_THREADS, else torch's)")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed rounds: one call of each slow contender, five of each fast one (default 7, quick 3)")
    parser.add_argument("--scale", type=positive_float, default=3.0, help="std of the Gaussian logits (default 3)")
    parser.add_argument("--alpha", type=nonneg_float, default=1.0, help="adapter weight (default 1)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) reference backend")


def parse_filter(text: str) -> dict:
    out = {}
    for part in text.split(","):
        key, value = part.split("=")
        out[key] = int(value) if key == "top_k" else float(value)
    return out


def hf_chain(base, adapter, alpha, top_k=0, top_p=1.0):
    """The baseline: mix log-probs, HF warpers (a full sort), softmax, multinomial."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    x = torch.log_softmax(base.float(), dim=-1) + alpha * torch.log_softmax(adapter.float(), dim=-1)
    if top_k:
        x = TopKLogitsWarper(top_k=top_k)(None, x)
    if top_p < 1.0:
        x = TopPLogitsWarper(top_p=top_p)(None, x)
    return torch.multinomial(torch.softmax(x, dim=-1), 1).squeeze(1)


def kernel_params(batch: int, alpha: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> dict:
    """The normalised [B] parameters that ipa_fast.sample hands to a backend."""
    full = lambda v, dt: torch.full((batch,), v, dtype=dt)  # noqa: E731
    return dict(alpha=full(alpha, torch.float32), temperature=full(1.0, torch.float32),
                top_k=full(top_k, torch.int64), top_p=full(top_p, torch.float32), min_p=full(min_p, torch.float32),
                seed=torch.arange(batch, dtype=torch.int64), offset=full(0, torch.int64))


def interleaved_median_ms(slow: dict, fast: dict, rounds: int, fast_per_round: int = 5) -> dict:
    """Median ms of every contender. Each round calls every slow contender once and every fast
    one ``fast_per_round`` times, so all of them share the (shared) machine's load of the moment."""
    every = {**slow, **fast}
    for fn in every.values():  # warm-up: page in, thread pools, caches
        fn()
    times = {name: [] for name in every}

    def timed(name, fn):
        t = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t)

    for _ in range(rounds):
        for name, fn in slow.items():
            timed(name, fn)
        for _ in range(fast_per_round):
            for name, fn in fast.items():
                timed(name, fn)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def run(args) -> dict:
    import ipa_fast
    from ipa_fast import cpu_backend

    if ipa_fast.backends()["cpu"] != "ok":
        raise ValueError(f"the cpu backend is not available: {ipa_fast.backends()['cpu']}")
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or torch.get_num_threads()
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    grid = QUICK if args.quick else FULL
    repeats = args.repeats or (3 if args.quick else 7)
    dtype = getattr(torch, args.dtype)
    print(f"ipa-fast bench sampler: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"{threads} thread(s), {args.dtype}, logits ~ N(0, {args.scale}^2), alpha={args.alpha}, "
          f"medians over {repeats} interleaved rounds")
    header = (f"{'V':>7} {'B':>3} {'filter':<18} {'hf ms':>9} {'ref ms':>9} {'cpu ms':>8} {'kernel':>8} {'floor ms':>8} "
              f"{'cpu vs hf':>9} {'cpu/floor':>9}")
    print(header)
    print("-" * len(header))
    rows = []
    g = torch.Generator().manual_seed(0)
    for V in grid["vocabs"]:
        for B in grid["batches"]:
            base = (torch.randn(B, V, generator=g) * args.scale).to(dtype)
            adapter = (torch.randn(B, V, generator=g) * args.scale).to(dtype)
            for ftext in grid["filters"]:
                f = parse_filter(ftext)
                prm = kernel_params(B, args.alpha, **f)
                slow = {"hf": lambda: hf_chain(base, adapter, args.alpha, **f)}
                if not args.no_reference:
                    slow["reference"] = lambda: ipa_fast.sample(base, adapter, alpha=args.alpha, seed=0,
                                                                backend="reference", **f)
                fast = {
                    "cpu": lambda: ipa_fast.sample(base, adapter, alpha=args.alpha, seed=0, backend="cpu", **f),
                    "kernel": lambda: cpu_backend.sample(base, adapter, **prm),
                    "floor": lambda: cpu_backend.read_pass(base, adapter),
                }
                t = interleaved_median_ms(slow, fast, repeats)
                hf, ref, cpu, kernel, floor = t["hf"], t.get("reference"), t["cpu"], t["kernel"], t["floor"]
                row = dict(vocab=V, batch=B, filter=ftext, hf_ms=hf, reference_ms=ref, cpu_ms=cpu, kernel_ms=kernel,
                           floor_ms=floor,
                           cpu_speedup_vs_hf=hf / cpu, reference_speedup_vs_hf=None if ref is None else hf / ref,
                           cpu_over_floor=cpu / floor)
                rows.append(row)
                ref_s = "-" if ref is None else f"{ref:9.2f}"
                print(f"{V:>7} {B:>3} {ftext:<18} {hf:9.2f} {ref_s:>9} {cpu:8.3f} {kernel:8.3f} {floor:8.3f} "
                      f"{hf / cpu:8.1f}x {cpu / floor:8.1f}x", flush=True)
    result = dict(
        suite="sampler", quick=bool(args.quick), threads=threads, dtype=args.dtype, scale=args.scale,
        alpha=args.alpha, repeats=repeats, torch=torch.__version__, machine=platform.machine(),
        cpu_count=os.cpu_count(), rows=rows,
    )
    if args.plot:
        write_plot(rows, args.plot, threads)
        result["plot"] = args.plot
        print(f"plot: {args.plot}")
    return result


def write_plot(rows: list[dict], path: str, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = sorted({(r["vocab"], r["filter"]) for r in rows})
    for V, ftext in keys:
        sel = sorted((r for r in rows if r["vocab"] == V and r["filter"] == ftext), key=lambda r: r["batch"])
        xs = [r["batch"] for r in sel]
        line, = ax.plot(xs, [r["cpu_speedup_vs_hf"] for r in sel], marker="o", label=f"cpu, V={V}, {ftext}")
        if all(r["reference_speedup_vs_hf"] for r in sel):
            ax.plot(xs, [r["reference_speedup_vs_hf"] for r in sel], marker="x", linestyle="--",
                    color=line.get_color(), alpha=0.6, label=f"reference, V={V}, {ftext}")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    batches = sorted({r["batch"] for r in rows})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("speed-up vs HF warpers + multinomial")
    ax.set_title(f"ipa_fast.sample on CPU ({threads} thread(s))")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
