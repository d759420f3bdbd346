"""``ipa-fast bench train``: seconds per training step by phase, and the loss op's peak memory.

1. **Step phases.** A short run of each algorithm (``--algos``) on the default models (the
   shipped pair, else — saying so — the seeded tiny GPT-2 pair over the GPT-2 tokenizer,
   V = 50257) with a built-in reward (``--quick``: a smaller smoke run); reports mean seconds per step for rollout / reward /
   update, excluding the first (warm-up) step.
2. **Loss-op memory.** ``tailored_token_stats`` (chunked, recompute in backward) vs the plain
   PyTorch formula (``log_softmax`` + autograd) at N positions x V vocabulary (default 4096 x
   50257, float32 inputs, with a reference adapter), forward + backward of
   ``sum(logprob) + sum(entropy) + sum(kl)``.

   How peak memory is measured on CPU: each variant runs in a fresh subprocess. After the
   inputs are allocated and touched, the process resets the kernel's resident-set high-water
   mark (``echo 5 > /proc/self/clear_refs``) and records ``VmRSS``; after forward + backward
   it reads ``VmHWM``. Peak extra memory = VmHWM - VmRSS(before) — every byte the op and its
   backward had resident at once, beyond the inputs, including the gradient it returns.
   This is valid for torch on CPU because its default CPU allocator does not cache: blocks
   this large are ``mmap``'d by malloc and returned to the kernel on free, so RSS tracks live
   tensors. (Where ``/proc/self/clear_refs`` is unavailable it falls back to ``ru_maxrss``
   in the fresh process, which also counts input creation; the report says which was used.)
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time

MEMORY_SCRIPT = r"""
import json, resource, sys, time, torch
from ipa_fast.ops.token_stats import tailored_token_stats, tailored_token_stats_reference
variant, N, V, dtype, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
if threads: torch.set_num_threads(threads)
dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
g = torch.Generator().manual_seed(0)
base = torch.randn(N, V, generator=g).to(dt)
adapter = torch.randn(N, V, generator=g).to(dt).requires_grad_(True)
ref = torch.randn(N, V, generator=g).to(dt)
targets = torch.randint(0, V, (N,), generator=g)
fn = tailored_token_stats if variant == "chunked" else tailored_token_stats_reference

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return None

def once():
    adapter.grad = None
    t = time.perf_counter()
    lp, h, kl = fn(base, adapter, targets, ref_adapter=ref)
    (lp.sum() + h.sum() + kl.sum()).backward()
    return time.perf_counter() - t

once() if N * V <= 1 << 24 else None  # warm-up only where it is cheap
method = "clear_refs"
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
except OSError:
    method, before = "ru_maxrss", status("VmRSS") or 0
secs = once()
peak = status("VmHWM") if method == "clear_refs" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
secs = min(secs, once())
print(json.dumps({"variant": variant, "peak_extra_bytes": peak - before, "seconds": secs, "method": method,
                  "input_bytes": 3 * base.numel() * base.element_size()}))
"""


QUICK = dict(n=1024, steps=2, batch_size=4, max_new_tokens=8)  # --quick: a smoke run in well under a minute
FULL = dict(n=4096, steps=3, batch_size=8, max_new_tokens=16)


def add_arguments(parser) -> None:
    from ipa_fast.cli.main import nonneg_int, positive_int

    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: N={QUICK['n']}, {QUICK['steps']} steps of batch {QUICK['batch_size']}, "
                             f"{QUICK['max_new_tokens']} new tokens (explicit flags override)")
    parser.add_argument("--n", type=positive_int, default=None,
                        help=f"positions N for the loss-op memory bench (default {FULL['n']}; quick {QUICK['n']})")
    parser.add_argument("--vocab", type=positive_int, default=50257, help="vocabulary V for the memory bench (default 50257)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="logit dtype")
    parser.add_argument("--threads", type=nonneg_int, default=0, help="torch threads in the memory bench (0 = default)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"training steps per algorithm for the phase timings (default {FULL['steps']}; "
                             f"quick {QUICK['steps']})")
    parser.add_argument("--algos", default="quark,ppo", help="comma-separated algorithms to time (empty = skip)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help=f"default {FULL['batch_size']}; quick {QUICK['batch_size']}")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help=f"default {FULL['max_new_tokens']}; quick {QUICK['max_new_tokens']}")
    parser.add_argument("--skip-memory", action="store_true", help="only time the training phases")


def validate(args) -> None:
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    bad = [a for a in args.algos.split(",") if a and a not in ("quark", "ppo")]
    if bad:
        raise ValueError(f"--algos: unknown algorithm {bad[0]!r} (choose from quark, ppo)")


def memory_bench(n: int, vocab: int, dtype: str, threads: int = 0) -> dict:
    rows = {}
    for variant in ("chunked", "plain"):
        r = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, variant, str(n), str(vocab), dtype, str(threads)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"memory bench ({variant}) failed: {r.stderr.strip().splitlines()[-1:]}")
        rows[variant] = json.loads(r.stdout.strip().splitlines()[-1])
    c, p = rows["chunked"], rows["plain"]
    return {"N": n, "V": vocab, "dtype": dtype, "method": c["method"],
            "input_mib": c["input_bytes"] / 2**20,
            "chunked": {"peak_extra_mib": c["peak_extra_bytes"] / 2**20, "seconds": c["seconds"]},
            "plain": {"peak_extra_mib": p["peak_extra_bytes"] / 2**20, "seconds": p["seconds"]},
            "memory_ratio": c["peak_extra_bytes"] / max(1, p["peak_extra_bytes"]),
            "speedup": p["seconds"] / c["seconds"]}


def phase_bench(algos: list[str], steps: int, batch_size: int, max_new_tokens: int) -> dict:
    from .trainer import TrainConfig, train

    from . import loading

    prompts = ["The weather today is", "My favourite food is", "In the morning I", "The city at night",
               "A good friend", "The old house", "When the train left", "She opened the door"]
    try:
        names = loading.shipped_pair()
    except FileNotFoundError as exc:  # the shipped pair is not installed: say so, time the tiny pair
        print(f"bench train: {exc}; timing a tiny random GPT-2 pair instead")
        names = None
    out = {}
    for algo in algos:  # fresh models per algorithm (training changes the adapter)
        base, adapter, tok = loading.load_models(*names)[:3] if names else loading.tiny_gpt2_pair()
        with tempfile.TemporaryDirectory() as d:
            cfg = TrainConfig(algo=algo, out=d, steps=steps, task="detox", batch_size=batch_size,
                              minibatch_size=min(batch_size, 4), max_new_tokens=max_new_tokens, eval_every=0,
                              eval_size=4, eval_max_new_tokens=max_new_tokens, checkpoint_every=max(1, steps),
                              progress=False, ppo_epochs=1)
            t0 = time.perf_counter()
            summary = train(cfg, train_prompts=prompts, eval_prompts=prompts[:4], base=base, adapter=adapter,
                            tokenizer=tok)
            log = [json.loads(x) for x in open(f"{d}/metrics.jsonl")]
        recs = [r for r in log if r["type"] == "train"][1:] or [r for r in log if r["type"] == "train"]
        out[algo] = {k.split("/")[1]: sum(r[k] for r in recs) / len(recs)
                     for k in ("time/rollout", "time/reward", "time/update", "time/step")}
        out[algo].update({"base": names[0] if names else "tiny-gpt2(seed=0)",
                          "adapter_init": names[1] if names else "tiny-gpt2(seed=1)",
                          "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                          "wall_seconds": time.perf_counter() - t0})
    return out


def run(args) -> dict:
    validate(args)
    result = {}
    algos = [a for a in args.algos.split(",") if a]
    if algos:
        result["seconds_per_step"] = phase_bench(algos, args.steps, args.batch_size, args.max_new_tokens)
        print(f"{'algo':<6} {'rollout':>9} {'reward':>9} {'update':>9} {'step':>9}   (seconds per step)")
        for algo, r in result["seconds_per_step"].items():
            print(f"{algo:<6} {r['rollout']:9.3f} {r['reward']:9.3f} {r['update']:9.3f} {r['step']:9.3f}")
    if not args.skip_memory:
        m = memory_bench(args.n, args.vocab, args.dtype, args.threads)
        result["loss_op_memory"] = m
        print(f"\nloss op, N={m['N']} V={m['V']} {m['dtype']} (inputs {m['input_mib']:.0f} MiB; peak extra "
              f"memory via {m['method']}):")
        print(f"{'variant':<10} {'peak MiB':>10} {'seconds':>9}")
        for v in ("chunked", "plain"):
            print(f"{v:<10} {m[v]['peak_extra_mib']:10.0f} {m[v]['seconds']:9.2f}")
        print(f"memory ratio chunked/plain = {m['memory_ratio']:.3f} (goal <= 0.333); "
              f"speed-up = {m['speedup']:.2f}x (goal >= 1)")
    return result
