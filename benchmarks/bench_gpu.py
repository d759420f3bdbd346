"""GPU sampler benchmark: HF chain, torch.compile(reference), triton, cuda, and the read floor.

For B in {1, 8, 64, 256}, V in {50257, 128256}, float32 and bfloat16, top_k=50 + top_p=0.9,
alpha=1, T=1: median device time of each contender (``triton.testing.do_bench``, CUDA events),
eager and, for the fused backends, replayed from a CUDA graph (``do_bench_cudagraph``; the
form a decoding loop uses). The floor is one plain read of both inputs (two row reductions).
Writes ``$OUT/RESULTS.md`` (or ``--out``) and ``bench_gpu.json`` beside it, and prints the goals:
>= 10x the HF chain at B=64, V=128256; within 2x of the floor at B >= 64; <= 15 us at B=1.

    python benchmarks/bench_gpu.py [--quick] [--no-compile] [--out DIR]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback

import torch

import ipa_fast
from ipa_fast.ops import dispatch
from ipa_fast.ops import reference
from ipa_fast.ops.bench_sampler import hf_chain, kernel_params

BATCHES = (1, 8, 64, 256)
VOCABS = (50257, 128256)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOP_K, TOP_P = 50, 0.9


def bench(fn, graph: bool) -> float:
    """Median microseconds of ``fn`` on the current stream."""
    import triton.testing as tt
    if graph:
        ms = tt.do_bench_cudagraph(fn, rep=100, return_mode="median")
    else:
        ms = tt.do_bench(fn, warmup=10, rep=100, return_mode="median")
    return 1e3 * ms


def contenders(args, base, adapter, params, compiled):
    """name -> (callable, graph-capturable)"""
    out = {
        "floor": (lambda: torch.maximum(base.amax(1).float(), adapter.amax(1).float()), True),
        "hf": (lambda: hf_chain(base, adapter, 1.0, top_k=TOP_K, top_p=TOP_P), False),
    }
    if compiled is not None:
        out["compile"] = (lambda: compiled(base, adapter, **params), True)
    for name in ("triton", "cuda"):
        if ipa_fast.backends().get(name) == "ok":
            impl = dispatch.resolve(name, base)
            out[name] = (lambda impl=impl: impl(base, adapter, **params), True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="B in {1, 64}, V=128256 only")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/gpu"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name(dev)
    batches, vocabs = ((1, 64), (128256,)) if args.quick else (BATCHES, VOCABS)
    compiled = None
    if not args.no_compile:
        compiled = torch.compile(reference.sample, dynamic=True)
    rows = []
    for dname, dtype in DTYPES.items():
        for V in vocabs:
            for B in batches:
                base = (torch.randn(B, V, device=dev) * 3).to(dtype)
                adapter = torch.randn(B, V, device=dev).to(dtype)
                params = {k: v.to(dev) for k, v in kernel_params(B, 1.0, top_k=TOP_K, top_p=TOP_P).items()}
                for name, (fn, capturable) in contenders(args, base, adapter, params, compiled).items():
                    for graph in ((False, True) if capturable and name in ("triton", "cuda") else (False,)):
                        label = name + ("+graph" if graph else "")
                        try:
                            t0 = time.perf_counter()
                            us = bench(fn, graph)
                            note = ""
                        except Exception as exc:  # report, keep going
                            us, note = float("nan"), f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
                            traceback.print_exc(limit=2)
                        rows.append(dict(dtype=dname, V=V, B=B, method=label, us=us, note=note))
                        print(f"{dname} V={V:6d} B={B:3d} {label:13s} {us:10.1f} us  "
                              f"({time.perf_counter() - t0:.1f}s) {note}", flush=True)
                del base, adapter
                torch.cuda.empty_cache()
    write(args, card, rows)
    return 0


def write(args, card, rows):
    def get(d, V, B, m):
        return next((r["us"] for r in rows if (r["dtype"], r["V"], r["B"], r["method"]) == (d, V, B, m)), float("nan"))

    methods = sorted({r["method"] for r in rows}, key=lambda m: ["floor", "hf", "compile", "triton", "triton+graph",
                                                                 "cuda", "cuda+graph"].index(m))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# GPU sampler benchmark ({card}, {now})", "",
             f"Command: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`; torch {torch.__version__}; "
             f"top_k={TOP_K}, top_p={TOP_P}, alpha=1, T=1; median us (do_bench; +graph = CUDA-graph replay).", "",
             "| dtype | V | B | " + " | ".join(methods) + " | best fused | best fused / floor | HF / best fused |",
             "|---|---|---|" + "---|" * (len(methods) + 3)]
    goals = []
    for d in DTYPES:
        for V in sorted({r["V"] for r in rows}):
            for B in sorted({r["B"] for r in rows}):
                vals = [get(d, V, B, m) for m in methods]
                fused = [(get(d, V, B, m), m) for m in methods if m.startswith(("triton", "cuda"))]
                fused = [f for f in fused if f[0] == f[0]]
                best, best_name = min(fused) if fused else (float("nan"), "-")
                floor, hf = get(d, V, B, "floor"), get(d, V, B, "hf")
                lines.append(f"| {d} | {V} | {B} | " + " | ".join(f"{v:.1f}" for v in vals)
                             + f" | {best_name} | {best / floor:.2f} | {hf / best:.1f} |")
                if B == 64 and V == 128256:
                    goals.append(f"{d} B=64 V=128256: HF / best fused = {hf / best:.1f}x (goal >= 10x)")
                if B >= 64:
                    goals.append(f"{d} B={B} V={V}: best fused / floor = {best / floor:.2f} (goal <= 2)")
                if B == 1:
                    goals.append(f"{d} B=1 V={V}: best fused = {best:.1f} us (goal <= 15 us)")
    lines += ["", "Goals:", ""] + [f"- {g}" for g in goals]
    lines += ["", f"backend='auto' on CUDA picks: {dispatch.auto_choice('cuda')} (ORDER_CUDA in ipa_fast/ops/dispatch.py)", ""]
    text = "\n".join(lines)
    with open(os.path.join(args.out, "RESULTS.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
        json.dump(dict(card=card, date=now, torch=torch.__version__, rows=rows), f, indent=1)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
