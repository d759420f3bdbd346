"""``ipa-fast bench sampler --vs-llama-cpp``: the fused CPU sampler vs llama.cpp's own sampler
chain, in one process, on one thread, over the same float32 logits ``[B, V]``.

Both sides get already-mixed logits (the mixing is charged to neither): ours is K = 1 expert of
weight 1. llama.cpp samples one row at a time, so its side loops over the B rows. What is timed
(medians over interleaved rounds; each round times every contender ``per_round`` times; the
milliseconds are the calling thread's CPU time, which a loaded machine's preemption does not
inflate, and the wall-clock medians and ratios come along):

- ``ours``    ``ipa_fast.sample_experts([logits], [1.0], top_k=, top_p=, seed=, backend="cpu")``:
              the public API, parameter checks and the validate pass included;
- ``kernel``  the cpu backend called directly with normalised ``[B]`` parameters (no API layer);
- ``llama``   B calls of ``llama_sampler_apply(chain, &cur_p[r])`` from a Python loop, ``chain``
              = ``llama_sampler_chain_init`` + ``top_k(k)`` -> ``top_p(p, min_keep=1)`` ->
              ``dist(seed)`` (the filters a row does not use are left out). The B
              ``llama_token_data_array``s (``{id, logit, p = 0}`` per token, size V, selected -1,
              unsorted: what ``llama_sampler_sample`` builds from a context's logits) are
              refilled from a prepared copy before the clock starts, so their building is not
              timed;
- ``fill``    reported apart, in no ratio: filling those B arrays from the float32 logits with
              numpy (llama.cpp's own ``llama_sampler_sample`` does it in a C++ loop per token);
- ``copy``    reported apart, in no ratio: copying the B prepared arrays (a memcpy of 12 V bytes
              a row), about what that C++ loop costs;
- ``call``    reported apart: B calls of an empty chain, the Python -> C call overhead that
              ``llama`` includes (about a microsecond a row).

The ratios are ``llama / ours`` and ``llama / kernel``: above 1 ours is faster. Every drawn token
is checked against the kept set computed in float64 (top-k, then the nucleus), for both sides,
and so is the number of tokens llama.cpp keeps (up to the float32 rounding at the boundary).
"""
from __future__ import annotations

import ctypes
import os
import platform
import statistics

import numpy as np
import torch

GRID = dict(vocabs=(49152,), batches=(1, 32), filters=("top_k=50,top_p=0.9", "top_p=0.9", "top_k=50"))
NEEDED = ("llama_sampler_chain_default_params", "llama_sampler_chain_init", "llama_sampler_chain_add",
          "llama_sampler_init_top_k", "llama_sampler_init_top_p", "llama_sampler_init_dist",
          "llama_sampler_apply", "llama_sampler_free", "llama_token_data_array", "llama_token_data_p")
# llama_token_data {llama_token id; float logit; float p;}, 12 bytes, no padding.
TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


def require_llama_cpp():
    """The ``llama_cpp`` module, or a one-line ``UsageError`` saying why it cannot be used."""
    from ipa_fast.cli.main import UsageError, one_line

    try:
        import llama_cpp
    except Exception as exc:  # noqa: BLE001 - ImportError, or OSError when libllama does not load
        raise UsageError(f"--vs-llama-cpp needs llama-cpp-python, which does not import here "
                         f"({one_line(exc)}); `make bench-llama-cpp` runs it in the engines venv") from None
    missing = [name for name in NEEDED if not hasattr(llama_cpp, name)]
    if missing:
        raise UsageError(f"--vs-llama-cpp: llama_cpp {getattr(llama_cpp, '__version__', '?')} lacks "
                         f"{', '.join(missing)} (llama-cpp-python 0.3.x has them)")
    if ctypes.sizeof(llama_cpp.llama_token_data) != TOKEN_DATA.itemsize:
        raise UsageError(f"--vs-llama-cpp: llama_token_data is {ctypes.sizeof(llama_cpp.llama_token_data)} "
                         f"bytes, expected {TOKEN_DATA.itemsize} ({{int32 id, float logit, float p}})")
    return llama_cpp


def fill_token_data(out: np.ndarray, logits: np.ndarray) -> None:
    """``out[r, i] = {i, logits[r, i], 0}``: a context's logits as llama.cpp's candidates."""
    out["id"] = np.arange(logits.shape[1], dtype=np.int32)
    out["logit"] = logits
    out["p"] = 0.0


class Chain:
    """A llama.cpp sampler chain: top_k -> top_p -> dist (``sample=False``: no sampler at all,
    the call overhead)."""

    def __init__(self, lc, top_k: int = 0, top_p: float = 1.0, seed: int = 1234, sample: bool = True):
        self.lc = lc
        params = lc.llama_sampler_chain_default_params()
        params.no_perf = True
        self.ptr = lc.llama_sampler_chain_init(params)
        if sample:
            if top_k:
                lc.llama_sampler_chain_add(self.ptr, lc.llama_sampler_init_top_k(top_k))
            if top_p < 1.0:
                lc.llama_sampler_chain_add(self.ptr, lc.llama_sampler_init_top_p(top_p, 1))
            lc.llama_sampler_chain_add(self.ptr, lc.llama_sampler_init_dist(seed))

    def close(self) -> None:
        if self.ptr is not None:
            self.lc.llama_sampler_free(self.ptr)
            self.ptr = None


class Rows:
    """B ``llama_token_data_array``s over one numpy buffer, refilled from a prepared copy."""

    def __init__(self, lc, logits: np.ndarray):
        self.lc = lc
        self.B, self.V = logits.shape
        self.template = np.empty((self.B, self.V), TOKEN_DATA)
        fill_token_data(self.template, logits)
        self.work = np.empty_like(self.template)
        self._src, self._dst = self.template.view(np.uint8), self.work.view(np.uint8)  # plain bytes: a memcpy
        self.arrays = [lc.llama_token_data_array() for _ in range(self.B)]
        self.refs = [ctypes.byref(a) for a in self.arrays]
        self.reset()

    def reset(self) -> None:
        np.copyto(self._dst, self._src)
        for r, a in enumerate(self.arrays):
            a.data = ctypes.cast(self.work[r].ctypes.data, self.lc.llama_token_data_p)
            a.size, a.selected, a.sorted = self.V, -1, False

    def tokens(self) -> list[int]:
        """The drawn token ids (read through each array's data pointer, which a sampler may move)."""
        return [int(a.data[a.selected].id) for a in self.arrays]

    def kept(self) -> list[int]:
        return [int(a.size) for a in self.arrays]


def kept_bounds(logits: np.ndarray, top_k: int, top_p: float, tol: float = 1e-4) -> list[tuple[int, set]]:
    """Per row, what top-k then top-p keep (float64; llama.cpp's rule and ours agree: keep token
    i iff the mass of the tokens ranked above it is < p): ``(n_sure, loose)``, the number of
    tokens kept even with ``p - tol`` and the set kept with ``p + tol``. A float32 cumulative sum
    may place the nucleus boundary anywhere between the two."""
    out = []
    for row in logits.astype(np.float64):
        order = np.argsort(-row, kind="stable")
        if top_k:
            order = order[:top_k]
        if top_p >= 1.0:
            out.append((len(order), set(order.tolist())))
            continue
        p = np.exp(row[order] - row[order[0]])
        p /= p.sum()
        above = np.concatenate(([0.0], np.cumsum(p)[:-1]))
        out.append((max(1, int((above < top_p - tol).sum())), set(order[above < top_p + tol].tolist())))
    return out


def run(args, grid: dict, repeats: int) -> dict:
    import ipa_fast
    from ipa_fast.ops import cpu_backend

    from ipa_fast.ops.bench_sampler import kernel_params, parse_filter, timed_medians

    lc = require_llama_cpp()
    if ipa_fast.backends()["cpu"] != "ok":
        raise ValueError(f"the cpu backend is not available: {ipa_fast.backends()['cpu']}")
    torch.set_num_threads(1)
    per_round = 5
    print(f"ipa-fast bench sampler --vs-llama-cpp: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, 1 thread, float32 logits ~ N(0, {args.scale}^2), llama_cpp "
          f"{lc.__version__}, medians over {repeats} rounds x {per_round} interleaved calls; ms are this thread's "
          f"CPU time (wall-clock ratios at the right)")
    header = (f"{'V':>6} {'B':>3} {'filter':<18} {'ours ms':>8} {'kernel':>8} {'llama ms':>9} {'fill ms':>8} "
              f"{'copy ms':>8} {'call ms':>8} {'llama/ours':>10} {'llama/kern':>10} "
              f"{'wall l/o':>10} {'wall l/k':>10} {'kept':>6}")
    print(header)
    print("-" * len(header))
    rows = []
    g = torch.Generator().manual_seed(0)
    for V in grid["vocabs"]:
        for B in grid["batches"]:
            x = torch.randn(B, V, generator=g) * args.scale
            logits = x.numpy()
            for ftext in grid["filters"]:
                f = parse_filter(ftext)
                top_k, top_p = f.get("top_k", 0), f.get("top_p", 1.0)
                if set(f) - {"top_k", "top_p"}:
                    raise ValueError(f"--vs-llama-cpp compares top_k and top_p only, got filter {ftext!r}")
                prm = kernel_params(B, 1.0, top_k=top_k, top_p=top_p)
                prm.pop("alpha")
                ones = torch.ones(B, 1)
                chain, empty = Chain(lc, top_k, top_p), Chain(lc, sample=False)
                work, scratch = Rows(lc, logits), np.empty((B, V), TOKEN_DATA)
                src, dst = work.template.view(np.uint8), scratch.view(np.uint8)
                apply = lc.llama_sampler_apply

                def llama(c=chain.ptr, refs=work.refs):
                    for ref in refs:
                        apply(c, ref)

                def call(c=empty.ptr, refs=work.refs):
                    for ref in refs:
                        apply(c, ref)

                try:
                    contenders = {
                        "ours": (None, lambda: ipa_fast.sample_experts([x], [1.0], top_k=top_k, top_p=top_p,
                                                                       seed=0, backend="cpu")),
                        "kernel": (None, lambda: cpu_backend.sample_experts([x], ones, **prm)),
                        "llama": (work.reset, llama),
                        "fill": (None, lambda: fill_token_data(scratch, logits)),
                        "copy": (None, lambda: np.copyto(dst, src)),
                        "call": (work.reset, call),
                    }
                    wall, t = timed_medians(contenders, repeats, per_round)
                    # The draws: every token of either side must lie in the kept set.
                    bounds = kept_bounds(logits, top_k, top_p)
                    work.reset()
                    llama()
                    llama_tokens, llama_kept = work.tokens(), work.kept()
                    ours_tokens = ipa_fast.sample_experts([x], [1.0], top_k=top_k, top_p=top_p, seed=0,
                                                          backend="cpu").tokens.tolist()
                finally:
                    chain.close()
                    empty.close()
                bad = [(side, r) for side, toks in (("llama.cpp", llama_tokens), ("ours", ours_tokens))
                       for r, tok in enumerate(toks) if tok not in bounds[r][1]]
                bad += [("llama.cpp's kept count", r) for r, n in enumerate(llama_kept)
                        if not bounds[r][0] <= n <= len(bounds[r][1])]
                if bad:
                    raise RuntimeError(f"{bad[0][0]} falls outside the float64 kept set in row {bad[0][1]} "
                                       f"({ftext}, B={B}, V={V}): the two sides would not sample the same thing")
                row = dict(vocab=V, batch=B, filter=ftext, ours_ms=t["ours"], kernel_ms=t["kernel"],
                           llama_cpp_ms=t["llama"], fill_ms=t["fill"], copy_ms=t["copy"],
                           call_overhead_ms=t["call"],
                           llama_over_ours=t["llama"] / t["ours"], llama_over_kernel=t["llama"] / t["kernel"],
                           wall_ms={k: wall[k] for k in ("ours", "kernel", "llama")},
                           wall_llama_over_ours=wall["llama"] / wall["ours"],
                           wall_llama_over_kernel=wall["llama"] / wall["kernel"],
                           kept_mean=statistics.mean(llama_kept))
                rows.append(row)
                print(f"{V:>6} {B:>3} {ftext:<18} {t['ours']:8.3f} {t['kernel']:8.3f} {t['llama']:9.3f} "
                      f"{t['fill']:8.3f} {t['copy']:8.3f} {t['call']:8.4f} {row['llama_over_ours']:9.2f}x "
                      f"{row['llama_over_kernel']:9.2f}x {row['wall_llama_over_ours']:9.2f}x {row['wall_llama_over_kernel']:9.2f}x "
                      f"{row['kept_mean']:6.0f}", flush=True)
    return dict(
        suite="sampler", mode="vs-llama-cpp", threads=1, dtype="float32", scale=args.scale, repeats=repeats,
        calls_per_round=per_round, clock="thread CPU time (time.thread_time); wall_* by time.perf_counter",
        torch=torch.__version__, llama_cpp=lc.__version__, numpy=np.__version__,
        machine=platform.machine(), cpu_count=os.cpu_count(),
        timed=dict(ours="ipa_fast.sample_experts([logits], [1.0], ..., backend='cpu'), validation included",
                   kernel="cpu_backend.sample_experts with normalised [B] parameters",
                   llama_cpp="B x llama_sampler_apply(chain, &cur_p[r]) in a Python loop; chain = top_k -> "
                             "top_p(min_keep=1) -> dist; the token-data arrays refilled before the clock starts",
                   fill="filling the B token-data arrays from the logits with numpy (not in any ratio)",
                   copy="memcpy of the B prepared token-data arrays (not in any ratio)",
                   call_overhead="B x llama_sampler_apply on an empty chain (included in llama_cpp)"),
        rows=rows,
    )
