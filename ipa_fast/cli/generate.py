"""``ipa-fast generate``: tailored decoding from the command line.

    ipa-fast generate --task detox --prompt "The cat"                 # the shipped trained adapter
    ipa-fast generate --base PATH --adapter PATH --prompt "The cat" --max-new-tokens 32 --top-p 0.9
    ipa-fast generate --api-base http://127.0.0.1:8000/v1 --adapter PATH --prompts prompts.txt
    ipa-fast generate --base PATH --adapter A:0.5 --adapter B:0.3 --prompt "The cat"   # composition
    ipa-fast generate --base PATH --adapter EXPERT:2 --adapter ANTI:-2 --prompt "The cat"  # DExperts

``--task {detox,lexical}`` picks the shipped *trained* adapter of that task (from the embedded
assets, :mod:`ipa_fast.embedded`); otherwise ``--adapter`` is required. ``--base`` defaults to
the shipped base. alpha and the adapter's control prefix come from the adapter's
``ipa_adapter.json`` (what it was trained / exported with); ``--alpha`` overrides.
``--adapter DIR:WEIGHT`` repeated composes adapters, ``z = base + sum_i WEIGHT_i * adapter_i``
(each with its own saved prefix; a weight left out is the adapter's saved alpha, else 1;
negative weights subtract, as DExperts' anti-expert or proxy-tuning's untuned model).
``--prompts FILE``: one prompt per line, or JSON lines with a ``"prompt"`` field.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

TASKS = ("detox", "lexical")


def add_arguments(p) -> None:
    from ipa_fast.cli.main import existing_file, model_ref, nonneg_float, nonneg_int, open_unit_float, positive_float, \
        positive_int, unit_float

    which = p.add_mutually_exclusive_group()
    which.add_argument("--task", choices=TASKS, default=None,
                       help="use the shipped trained adapter of this task (with its saved alpha and prefix)")
    which.add_argument("--adapter", type=adapter_ref, action="append", default=None, metavar="DIR[:WEIGHT]",
                       help="adapter: local directory (with ipa_adapter.json when saved by ipa_fast: its alpha "
                            "and prefix are used) or HF name, optionally with its weight; repeat to compose "
                            "adapters, z = base + sum_i WEIGHT_i * adapter_i (negative weights subtract); "
                            "required unless --task")
    p.add_argument("--base", type=model_ref("base model"), default=None,
                   help="base model: local directory or HF name (default: the shipped base)")
    p.add_argument("--tokenizer", type=model_ref("tokenizer"), default=None,
                   help="tokenizer path (default: the adapter's, else the base's)")
    p.add_argument("--api-base", default=None, metavar="URL",
                   help="use an OpenAI-compatible completions server with top-k log-probs as the base")
    p.add_argument("--api-model", default=None, help="the model name to send to --api-base")
    p.add_argument("--top-logprobs", type=positive_int, default=20,
                   help="top-k log-probs asked of --api-base (default 20)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", type=existing_file, default=None, metavar="FILE",
                   help="prompts file: text lines or JSON lines")
    p.add_argument("--truncate-prompt", choices=["left"], default=None,
                   help="a prompt too long for the model's context is refused; 'left' keeps its last tokens "
                        "instead (and says so)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--min-new-tokens", type=nonneg_int, default=0)
    p.add_argument("--temperature", type=nonneg_float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=open_unit_float, default=0.9, help="default 0.9 (docs/DESIGN.md §6 evaluation decoding)")
    p.add_argument("--top-k", type=nonneg_int, default=0, help="0 = off")
    p.add_argument("--min-p", type=unit_float, default=0.0, help="0 = off")
    p.add_argument("--alpha", type=positive_float, default=None,
                   help="adapter weight, > 0 (default: the adapter's ipa_adapter.json, else 1.0)")
    p.add_argument("--adapter-prefix", default=None,
                   help="text or comma-separated ids the adapter sees before each prompt "
                        "(default: the adapter's ipa_adapter.json)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--repetition-penalty", type=positive_float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="row r uses seed + r (default 0)")
    p.add_argument("--device", default=None, help="device for both models (default cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="dtype of the base")


def adapter_ref(text: str) -> tuple[str, float | None]:
    """``DIR[:WEIGHT]`` -> ``(model reference, weight or None)``. A text that names an existing
    path is a path even with a colon in it; the weight is a finite nonzero number."""
    from ipa_fast.cli.main import model_ref

    path, weight = text, None
    head, sep, tail = text.rpartition(":")
    if sep and head and not Path(text).expanduser().exists():
        try:
            weight = float(tail)
        except ValueError:
            weight = None
        else:
            path = head
            if not math.isfinite(weight) or weight == 0:
                raise argparse.ArgumentTypeError(f"the weight in DIR:WEIGHT must be a finite nonzero number, "
                                                 f"got {tail!r} in {text}")
    return model_ref("adapter")(path), weight


adapter_ref.__name__ = "adapter"


def validate(args) -> None:
    """Everything checkable before loading a model: prompts, flag combinations, model paths."""
    several = args.adapter is not None and len(args.adapter) > 1
    if several and args.alpha is not None:
        raise ValueError("--alpha sets a single adapter's weight; with several --adapter give each its weight "
                         "as --adapter DIR:WEIGHT")
    if several and args.adapter_prefix is not None:
        raise ValueError("--adapter-prefix applies to a single adapter; composed adapters use the prefixes "
                         "saved in their ipa_adapter.json")
    if args.adapter and args.alpha is not None and args.adapter[0][1] is not None:
        raise ValueError(f"the adapter's weight is given twice (--alpha {args.alpha} and "
                         f"--adapter DIR:{args.adapter[0][1]:g}); pass one")
    if args.min_new_tokens > args.max_new_tokens:
        raise ValueError(f"--min-new-tokens ({args.min_new_tokens}) must be <= --max-new-tokens "
                         f"({args.max_new_tokens})")
    if args.api_model and not args.api_base:
        raise ValueError("--api-model needs --api-base URL")
    if args.api_base and args.base:
        raise ValueError("pass --base or --api-base, not both")
    if args.api_base and not args.api_base.startswith(("http://", "https://")):
        raise ValueError(f"--api-base must be an http(s) URL, got {args.api_base!r}")
    args.prompt_list = read_prompts(args)
    args.base_path, args.adapter_path = model_paths(args)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts file not found: {path}")
        n_before = len(prompts)
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    prompts.append(json.loads(line)["prompt"])
                except (json.JSONDecodeError, KeyError):
                    raise ValueError(f"{path}: a JSON line needs a \"prompt\" field: {line[:80]}") from None
            else:
                prompts.append(line)
        if len(prompts) == n_before:
            raise ValueError(f"--prompts {path}: no prompts in the file")
    if not prompts:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def trained_adapter_path(task: str) -> Path:
    """The shipped trained adapter of ``task``, through :mod:`ipa_fast.embedded`."""
    from ipa_fast import embedded

    return Path(embedded.adapter_path(task))


def model_paths(args) -> tuple[str | None, str | list[str]]:
    """``(base, adapter)``: the user's, the shipped base filling a missing ``--base`` (unless
    ``--api-base``), the shipped trained adapter for ``--task``; ``adapter`` is a list of paths
    when several ``--adapter`` are composed. Sets ``args.adapter_weights`` (one weight or None per
    adapter). Missing assets: one-line error."""
    from ipa_fast import embedded

    if args.adapter is None and args.task is None:
        raise ValueError(f"pass --task {{{','.join(TASKS)}}} (a shipped trained adapter) or --adapter PATH")
    refs = args.adapter or [(str(trained_adapter_path(args.task)), None)]
    args.adapter_weights = [w for _, w in refs]
    adapter = refs[0][0] if len(refs) == 1 else [path for path, _ in refs]
    base = args.base
    if base is None and not args.api_base:
        base = str(embedded.base_path())
    return base, adapter


def parse_prefix(text):
    if text is None:
        return None
    if all(part.strip().isdigit() for part in text.split(",")):
        return [int(part) for part in text.split(",")]
    return text


def run(args) -> dict:
    import torch

    from ipa_fast.decoding.api_base import APIBase, APIBaseError
    from ipa_fast.cli.main import UsageError
    from ipa_fast.decoding.tailored import TailoredLM, _try_tokenizer

    from transformers.utils import logging as hf_logging

    if not hasattr(args, "adapter_path"):  # called without the CLI's validate step
        validate(args)
    hf_logging.disable_progress_bar()  # "Loading weights" bars: noise on a command line's stderr
    prompts, base_path, adapter_path = args.prompt_list, args.base_path, args.adapter_path
    several = isinstance(adapter_path, list)
    weights = getattr(args, "adapter_weights", None) or [None] * (len(adapter_path) if several else 1)
    alpha = weights if several else (args.alpha if args.alpha is not None else weights[0])
    dtype = getattr(torch, args.dtype) if args.dtype else None
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    elif args.api_base:
        first = adapter_path[0] if several else adapter_path
        tokenizer = _try_tokenizer(first)
        if tokenizer is None:
            raise ValueError(f"no tokenizer in {first}: pass --tokenizer PATH")
    base = APIBase(args.api_base, tokenizer, model=args.api_model, top_logprobs=args.top_logprobs) \
        if args.api_base else base_path
    t0 = time.perf_counter()
    try:
        lm = TailoredLM.from_pretrained(base, adapter_path, tokenizer=tokenizer, alpha=alpha,
                                        adapter_prefix=parse_prefix(args.adapter_prefix), base_dtype=dtype,
                                        base_device=args.device, adapter_device=args.device)
    except OSError as exc:  # a hub id that is neither cached nor reachable, a directory without weights
        adapters = ", ".join(adapter_path) if several else adapter_path
        raise ValueError(f"cannot load {base_path or args.api_base} + {adapters}: {exc}") from exc
    load_s = time.perf_counter() - t0
    for w in lm.metadata.get("warnings", []):
        print(f"warning: {w}")
    t0 = time.perf_counter()
    try:
        out = lm.generate(prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop=args.stop or None,
                          min_new_tokens=args.min_new_tokens, repetition_penalty=args.repetition_penalty,
                          truncate_prompt=args.truncate_prompt,
                          output_adapter_logprobs=bool(args.json))  # they go to --json only
    except APIBaseError as e:  # server down / timeout / malformed reply: one line, exit 2
        raise UsageError(str(e)) from None
    except ValueError as e:
        raise UsageError(str(e).replace("truncate_prompt='left'", "--truncate-prompt left")) from None
    gen_s = time.perf_counter() - t0
    for r, (prompt, ids) in enumerate(zip(prompts, out.prompt_token_ids)):
        full = len(lm.tokenizer(prompt)["input_ids"])
        if len(ids) < full:
            print(f"warning: prompt {r} truncated from the left to its last {len(ids)} of {full} tokens "
                  f"(--truncate-prompt left)")
    n_tokens = sum(len(t) for t in out.token_ids)
    mix = (f"adapters: {', '.join(f'{p} ({w:g})' for p, w in zip(adapter_path, lm.weights))}" if several
           else f"adapter: {adapter_path}   alpha: {lm.alpha}")
    print(f"base: {args.api_base or base_path}   {mix}   "
          f"T={args.temperature} top_p={args.top_p} top_k={args.top_k} min_p={args.min_p} seed={args.seed}")
    print(f"{'#':>3}  {'finish':6}  {'toks':>4}  {'mean lp':>7}  text")
    for r, prompt in enumerate(prompts):
        lp = out.logprobs[r]
        mean = sum(lp) / len(lp) if lp else float("nan")
        text = (prompt + "⟨" + out.texts[r] + "⟩").replace("\n", "\\n")
        print(f"{r:>3}  {out.finish_reasons[r]:6}  {len(lp):>4}  {mean:7.3f}  {text}")
    print(f"{n_tokens} tokens in {gen_s:.2f} s ({n_tokens / max(gen_s, 1e-9):.1f} tokens/s; load {load_s:.1f} s)")
    return {
        "base": args.api_base or base_path, "adapter": adapter_path, "alpha": lm.alpha,
        "adapter_prefix": lm.adapter_prefix, "weights": lm.weights, "prefixes": lm.prefixes,
        "decoding": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                     "top_k": args.top_k, "min_p": args.min_p, "seed": args.seed, "stop": args.stop},
        "results": [{"prompt": p, "text": out.texts[r], "token_ids": out.token_ids[r], "logprobs": out.logprobs[r],
                     "adapter_logprobs": out.adapter_logprobs[r], "finish_reason": out.finish_reasons[r]}
                    for r, p in enumerate(prompts)],
        "tokens": n_tokens, "generate_s": gen_s, "tokens_per_s": n_tokens / max(gen_s, 1e-9), "load_s": load_s,
    }
