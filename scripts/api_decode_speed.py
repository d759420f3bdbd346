#!/usr/bin/env python
"""Tailored decoding speed with the base served by a real engine vs the local base.

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python -m scripts.api_decode_speed \\
        [--engine llama-cpp-python|llama-server|vllm] --json benchmarks/results/api_decode_speed.json

One run, same adapter (the embedded adapter initialisation at its stored alpha), same prompts
(the first B lexical test prompts, the base's chat template), same seed, exactly ``--tokens`` new
tokens per row (end-of-text never ends a row; tokens made only of line breaks are banned in
every path, so that each row survives the text round trip llama-cpp-python's server forces),
top-p 0.9, for each B in ``--batch``:

* ``api``: ``TailoredLM(APIBase(url, tok, top_logprobs=20), adapter)`` against ``--engine``:
  ``python -m llama_cpp.server`` (the engines venv; the default) or llama.cpp's ``llama-server``
  (scripts/build_llama_server.sh; rows sent concurrently, one slot each) serving the local fp32 base
  as an f32 GGUF (``python -m scripts.write_gguf``) with an f32 KV cache and one thread, or vLLM's CPU
  build (``make vllm-venv``; all rows in one request) serving the local fp32 base directory in
  float32;
* ``local top-20``: ``TailoredLM(base_top_k=20)`` on the local fp32 base, with the ids
  llama-cpp-python's string keys cannot carry masked (that engine only): the same sparse base, so
  the same tokens (checked);
* ``local dense``: the local base with its full distribution (the usual local path).

Tokens/s = B x tokens / wall time of the whole ``generate`` call (prefill included), median
over ``--repeats`` runs interleaved across the methods, after one short warm-up each. The
machine's load average before and after is recorded: on a shared machine it bounds what the
numbers mean.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,4", help="comma-separated batch sizes")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gguf", type=Path, default=None, help="default: <cache>/models/base-f32.gguf")
    ap.add_argument("--engine", choices=("llama-cpp-python", "llama-server", "vllm"), default="llama-cpp-python")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        ap.error(f"--batch must be comma-separated integers, got {args.batch!r}")
    if min(batches) < 1 or args.tokens < 1 or args.repeats < 1:
        ap.error("--batch entries, --tokens and --repeats must be >= 1")

    import torch

    from ipa_fast import TailoredLM, embedded
    from ipa_fast.decoding.api_base import APIBase
    from tests.fixtures.engines.live import (BASE_DIR, ENGINE_VENV, F32_KV, GGUF_F32, LLAMA_SERVER, LLAMA_SERVER_F32_KV,
                                             VLLM_VENV, LlamaCppPythonServer, LlamaServer, VllmServer, ambiguous_ids,
                                             load_tokenizer)

    gguf = args.gguf or GGUF_F32
    needs = {"llama-cpp-python": (ENGINE_VENV / "bin" / "python", "no engines venv; run `make test-engines` once"),
             "llama-server": (LLAMA_SERVER, "no llama-server; build it with `scripts/build_llama_server.sh`"),
             "vllm": (VLLM_VENV / "bin" / "python", "no vLLM venv; run `make vllm-venv` once")}[args.engine]
    try:
        if args.engine != "vllm" and not gguf.is_file():
            raise FileNotFoundError(f"{gguf} not found; build it with `python -m scripts.write_gguf`")
        if not needs[0].is_file():
            raise FileNotFoundError(f"{needs[1]} ({needs[0]} not found)")
        base_dir, adapter_dir = embedded.base_path(), embedded.adapter_init_path()
        rows_all = [r["prompt"] for r in embedded.read_task("lexical", "test")[:max(batches)]]
    except FileNotFoundError as exc:
        print(f"api_decode_speed: error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    tok = load_tokenizer()
    local = TailoredLM.from_pretrained(str(base_dir), str(adapter_dir), dtype="float32", base_top_k=20)
    dense = TailoredLM(local.base, local.adapter, local.tokenizer, alpha=local.alpha)
    # Both paths ban the tokens made only of line breaks: a row ending "\n" + "\n" re-tokenises to
    # the one "\n\n" token, and this server takes text, so such a row cannot be sent (APIBase refuses).
    lines = [[i] for i in range(len(tok)) if (t := tok.decode([i])) and not t.strip(" \n") and "\n" in t]
    strings = args.engine == "llama-cpp-python"  # the one engine that keys log-probs by printed strings
    masked = ([[i] for i in ambiguous_ids(tok)] if strings else []) + lines
    rows_all = [tok(p)["input_ids"] for p in rows_all]
    n = args.tokens
    knobs = dict(top_p=0.9, seed=0, eos_token_id=[])
    results = []
    if args.engine == "llama-cpp-python":
        server, label = LlamaCppPythonServer(gguf, python=ENGINE_VENV / "bin" / "python", extra_args=F32_KV), \
            "api (llama-cpp-python, f32 GGUF)"
    elif args.engine == "llama-server":
        server, label = LlamaServer(gguf, parallel=max(batches), extra_args=LLAMA_SERVER_F32_KV), \
            "api (llama-server, f32 GGUF)"
    else:
        server, label = VllmServer(BASE_DIR, python=VLLM_VENV / "bin" / "python"), "api (vLLM CPU, float32)"
    with server:
        url = server.url + "/v1" if args.engine == "vllm" else server.url
        api = APIBase(url, tok, top_logprobs=20, timeout=300, ambiguous="drop" if strings else "error")
        remote = TailoredLM(api, local.adapter, tok, alpha=local.alpha)
        methods = {
            label: lambda rows, k: remote.generate(rows, max_new_tokens=k,
                                                                                bad_words_ids=lines, **knobs),
            "local top-20": lambda rows, k: local.generate(rows, max_new_tokens=k, bad_words_ids=masked, **knobs),
            "local dense": lambda rows, k: dense.generate(rows, max_new_tokens=k, bad_words_ids=lines, **knobs),
        }
        for fn in methods.values():  # warm-up: dialect detection, printed-string table, first forwards
            fn(rows_all[:1], 2)
        for B in batches:
            rows = rows_all[:B]
            times = {m: [] for m in methods}
            outs, requests = {}, []
            for _ in range(args.repeats):
                for m, fn in methods.items():
                    r0 = api.requests
                    t0 = time.perf_counter()
                    out = fn(rows, n)
                    times[m].append(time.perf_counter() - t0)
                    if m.startswith("api"):
                        requests.append(api.requests - r0)
                    if any(len(t) != n for t in out.token_ids):
                        raise RuntimeError(f"{m}: expected {n} tokens per row, got {[len(t) for t in out.token_ids]}")
                    outs[m] = [list(t) for t in out.token_ids]
            api_m, top_m = list(methods)[:2]
            for m in methods:
                s = statistics.median(times[m])
                results.append({"B": B, "method": m, "tokens": B * n, "seconds": s, "tok_s": B * n / s,
                                "runs_s": times[m]})
            results[-3]["requests_per_run"] = requests[0]
            results[-3]["same_tokens_as_local_top20"] = outs[api_m] == outs[top_m]
        api.close()
        server_cmd = " ".join(server.cmd)
    report = {"command": "nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python -m scripts.api_decode_speed "
                         + " ".join(argv if argv is not None else sys.argv[1:]),
              "engine": args.engine, "gguf": gguf.name if args.engine != "vllm" else None,
              "server": server_cmd.replace(str(Path.home()), "~"),
              "tokens_per_row": n, "top_p": 0.9, "top_logprobs": 20, "repeats": args.repeats,
              "torch_threads": 1, "niceness": os.nice(0), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "wall_s": time.perf_counter() - t_start, "results": results}
    for r in results:
        extra = f"  ({r['requests_per_run']} requests, same tokens: {r['same_tokens_as_local_top20']})" \
            if "requests_per_run" in r else ""
        print(f"B={r['B']:<2} {r['method']:<34} {r['tok_s']:6.2f} tok/s{extra}")
    print(f"load average before {load_before[0]:.1f}, after {report['loadavg_after'][0]:.1f}; "
          f"wall {report['wall_s']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
