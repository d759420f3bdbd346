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
``--vocab`` / ``--batch`` / ``--filter`` replace the grid's values.

Two other comparisons share the options:

- ``--experts K [K ...]``: the cost of the experts, ``ipa_fast.sample_experts`` over K mixed
  experts for each K given (public API and kernel), and each K's time over the first K's;
- ``--vs-llama-cpp``: llama.cpp's own sampler chain vs ours in this process, on one thread
  (:mod:`ipa_fast.ops.bench_llama_cpp`; needs llama-cpp-python, ``make bench-llama-cpp``).
"""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch

FULL = dict(vocabs=(50257, 128256), batches=(1, 8, 32, 64), filters=("top_p=0.9", "top_k=50,top_p=0.9"))
QUICK = dict(vocabs=(50257,), batches=(1, 32), filters=("top_p=0.9",))
FILTER_KEYS = {"top_k": int, "top_p": float, "min_p": float}


def add_arguments(parser) -> None:
    from ipa_fast.cli.main import nonneg_float, positive_float, positive_int

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
    parser.add_argument("--vocab", type=positive_int, action="append", default=None, metavar="V",
                        help="vocabulary size instead of the grid's (repeatable)")
    parser.add_argument("--batch", type=positive_int, action="append", default=None, metavar="B",
                        help="batch size instead of the grid's (repeatable)")
    parser.add_argument("--filter", type=filter_spec, action="append", default=None, metavar="SPEC",
                        help="filter setting instead of the grid's, e.g. top_k=50,top_p=0.9 (repeatable)")
    parser.add_argument("--experts", type=positive_int, nargs="+", default=None, metavar="K",
                        help="time sample_experts over K mixed experts for each K (e.g. --experts 2 3) and "
                             "report each K's time over the first K's, instead of the HF comparison")
    parser.add_argument("--vs-llama-cpp", action="store_true",
                        help="llama.cpp's sampler chain (top_k -> top_p -> dist) vs ours, same logits, one "
                             "process, one thread (V=49152, B in {1, 32} unless given); needs llama_cpp "
                             "importable: `make bench-llama-cpp` runs it in the engines venv")


def filter_spec(text: str) -> str:
    """An argparse type: ``key=value[,key=value]`` with keys top_k (int >= 0), top_p (in (0, 1]),
    min_p (in [0, 1]); returned as given, :func:`parse_filter` reads it."""
    import argparse

    try:
        f = parse_filter(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected key=value[,key=value] with keys {', '.join(FILTER_KEYS)}, "
                                         f"got {text!r}") from None
    bad = [k for k in f if k not in FILTER_KEYS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown filter {bad[0]!r} in {text!r} (known: {', '.join(FILTER_KEYS)})")
    if f.get("top_k", 0) < 0 or not 0 < f.get("top_p", 1.0) <= 1 or not 0 <= f.get("min_p", 0.0) <= 1:
        raise argparse.ArgumentTypeError(f"out of range in {text!r}: top_k >= 0, top_p in (0, 1], min_p in [0, 1]")
    return text


def validate(args) -> None:
    from ipa_fast.cli.main import UsageError

    if args.vs_llama_cpp and args.experts:
        raise UsageError("--vs-llama-cpp and --experts are separate runs: give one of them")
    if args.plot and (args.vs_llama_cpp or args.experts):
        raise UsageError("--plot draws the HF comparison only: drop it with --vs-llama-cpp or --experts")
    if args.vs_llama_cpp:
        if args.threads not in (None, 1):
            raise UsageError("--vs-llama-cpp runs on one thread (llama.cpp's sampler chain has one): "
                             f"drop --threads {args.threads}")
        if args.dtype != "float32":
            raise UsageError(f"--vs-llama-cpp takes float32 logits (llama.cpp's), got --dtype {args.dtype}")
        from ipa_fast.ops.bench_llama_cpp import require_llama_cpp

        require_llama_cpp()


def pick_grid(args, default: dict) -> dict:
    """``default`` with the values --vocab / --batch / --filter give."""
    return dict(vocabs=tuple(args.vocab or default["vocabs"]), batches=tuple(args.batch or default["batches"]),
                filters=tuple(args.filter or default["filters"]))


def parse_filter(text: str) -> dict:
    out = {}
    for part in text.split(","):
        key, value = part.split("=")
        out[key.strip()] = FILTER_KEYS.get(key.strip(), float)(value)
    return out


def hf_chain(base, adapter, alpha, top_k=0, top_p=1.0, min_p=0.0):
    """The baseline: mix log-probs, HF warpers (a full sort), softmax, multinomial."""
    from transformers import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    x = torch.log_softmax(base.float(), dim=-1) + alpha * torch.log_softmax(adapter.float(), dim=-1)
    if top_k:
        x = TopKLogitsWarper(top_k=top_k)(None, x)
    if top_p < 1.0:
        x = TopPLogitsWarper(top_p=top_p)(None, x)
    if min_p > 0.0:
        x = MinPLogitsWarper(min_p=min_p)(None, x)
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


def timed_medians(contenders: dict, rounds: int, per_round: int) -> tuple[dict, dict]:
    """Median ms per contender ``name: (setup, fn)`` by wall clock and by this thread's CPU time
    (the work of a one-thread contender, whatever else the machine runs). ``setup`` (or None)
    runs untimed before each timed ``fn()``; the contenders take turns ``per_round`` times in every
    round, so they share the machine's load of the moment."""
    for setup, fn in contenders.values():  # warm-up
        if setup:
            setup()
        fn()
    wall = {name: [] for name in contenders}
    cpu = {name: [] for name in contenders}
    for _ in range(rounds):
        for _ in range(per_round):
            for name, (setup, fn) in contenders.items():
                if setup:
                    setup()
                t, c = time.perf_counter(), time.thread_time()
                fn()
                c, t = time.thread_time() - c, time.perf_counter() - t
                wall[name].append(t)
                cpu[name].append(c)
    med = lambda d: {name: 1e3 * statistics.median(ts) for name, ts in d.items()}  # noqa: E731
    return med(wall), med(cpu)


def run(args) -> dict:
    import ipa_fast
    from ipa_fast.ops import cpu_backend

    repeats = args.repeats or (3 if args.quick else 7)
    if args.vs_llama_cpp:
        from ipa_fast.ops import bench_llama_cpp

        return bench_llama_cpp.run(args, pick_grid(args, bench_llama_cpp.GRID), repeats)
    if ipa_fast.backends()["cpu"] != "ok":
        raise ValueError(f"the cpu backend is not available: {ipa_fast.backends()['cpu']}")
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or torch.get_num_threads()
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    grid = pick_grid(args, QUICK if args.quick else FULL)
    if args.experts:
        return run_experts(args, grid, repeats, threads)
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


def run_experts(args, grid: dict, repeats: int, threads: int) -> dict:
    """The cost of the experts: ``sample_experts`` over the first K of the same Gaussian experts
    (weights 1, then ``--alpha``), public API and kernel, every K interleaved in each round."""
    import ipa_fast
    from ipa_fast.ops import cpu_backend

    ks = list(dict.fromkeys(args.experts))
    dtype = getattr(torch, args.dtype)
    clock = "this thread's CPU time (wall-clock ratios at the right)" if threads == 1 else "wall clock"
    print(f"ipa-fast bench sampler --experts {' '.join(map(str, ks))}: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, {threads} thread(s), {args.dtype}, logits ~ N(0, {args.scale}^2), weights 1 then "
          f"alpha={args.alpha}, medians over {repeats} rounds x 5 interleaved calls; ms are "
          f"{clock}")
    header = (f"{'V':>7} {'B':>3} {'filter':<18} " + " ".join(f"{f'K={k} ms':>9}" for k in ks) + " "
              + " ".join(f"{f'kern K={k}':>10}" for k in ks) + " "
              + " ".join(f"{f'K{k}/K{ks[0]}':>8}" for k in ks[1:]) + " "
              + " ".join(f"{f'wall K{k}/K{ks[0]}':>13}" for k in ks[1:]))
    print(header)
    print("-" * len(header))
    rows = []
    g = torch.Generator().manual_seed(0)
    for V in grid["vocabs"]:
        for B in grid["batches"]:
            experts = [(torch.randn(B, V, generator=g) * args.scale).to(dtype) for _ in range(max(ks))]
            for ftext in grid["filters"]:
                f = parse_filter(ftext)
                prm = kernel_params(B, args.alpha, **f)
                prm.pop("alpha")
                fast = {}
                for k in ks:
                    w = [1.0] + [args.alpha] * (k - 1)
                    wt = torch.tensor(w, dtype=torch.float32).expand(B, k).contiguous()
                    fast[f"api{k}"] = (None, lambda k=k, w=w: ipa_fast.sample_experts(experts[:k], w, seed=0,
                                                                                     backend="cpu", **f))
                    fast[f"kernel{k}"] = (None, lambda k=k, wt=wt: cpu_backend.sample_experts(experts[:k], wt, **prm))
                wall, cpu = timed_medians(fast, repeats, 5)
                t = cpu if threads == 1 else wall
                row = dict(vocab=V, batch=B, filter=ftext, experts=ks,
                           ms={k: t[f"api{k}"] for k in ks}, kernel_ms={k: t[f"kernel{k}"] for k in ks},
                           over_first={k: t[f"api{k}"] / t[f"api{ks[0]}"] for k in ks},
                           kernel_over_first={k: t[f"kernel{k}"] / t[f"kernel{ks[0]}"] for k in ks},
                           wall_ms={k: wall[f"api{k}"] for k in ks},
                           wall_over_first={k: wall[f"api{k}"] / wall[f"api{ks[0]}"] for k in ks})
                rows.append(row)
                print(f"{V:>7} {B:>3} {ftext:<18} " + " ".join(f"{row['ms'][k]:9.3f}" for k in ks) + " "
                      + " ".join(f"{row['kernel_ms'][k]:10.3f}" for k in ks) + " "
                      + " ".join(f"{row['over_first'][k]:7.2f}x" for k in ks[1:]) + " "
                      + " ".join(f"{row['wall_over_first'][k]:12.2f}x" for k in ks[1:]), flush=True)
    return dict(suite="sampler", mode="experts", experts=ks, threads=threads,
                clock="thread CPU time (time.thread_time); wall_* by time.perf_counter" if threads == 1 else
                "wall clock (time.perf_counter)", dtype=args.dtype, scale=args.scale,
                alpha=args.alpha, repeats=repeats, torch=torch.__version__, machine=platform.machine(),
                cpu_count=os.cpu_count(), rows=rows)


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
