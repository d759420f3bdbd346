"""``ipa-fast generate``: tailored decoding from the command line.

    ipa-fast generate --base PATH --adapter PATH --prompt "The cat" --max-new-tokens 32 --top-p 0.9
    ipa-fast generate --api-base http://127.0.0.1:8000/v1 --adapter PATH --prompts prompts.txt

``--prompts FILE``: one prompt per line, or JSON lines with a ``"prompt"`` field. Without
``--base`` / ``--adapter`` the shipped models are used when they exist.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--base", default=None, help="base model: HF name or local path (default: the shipped base)")
    p.add_argument("--adapter", default=None,
                   help="adapter: HF name or local path, with ipa_adapter.json if saved by ipa_fast "
                        "(default: the shipped adapter)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the adapter's, else the base's)")
    p.add_argument("--api-base", default=None, metavar="URL",
                   help="use an OpenAI-compatible completions server with top-k log-probs as the base")
    p.add_argument("--api-model", default=None, help="the model name to send to --api-base")
    p.add_argument("--top-logprobs", type=int, default=20, help="top-k log-probs asked of --api-base (default 20)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None, metavar="FILE", help="prompts file: text lines or JSON lines")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--min-new-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=0.9, help="default 0.9 (docs/DESIGN.md §6 evaluation decoding)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--alpha", type=float, default=None, help="adapter weight (default: saved, else 1.0)")
    p.add_argument("--adapter-prefix", default=None,
                   help="text or comma-separated ids the adapter sees before each prompt (default: saved)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="row r uses seed + r (default 0)")
    p.add_argument("--device", default=None, help="device for both models (default cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="dtype of the base")


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts file not found: {path}")
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
    if not prompts:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def shipped_models():
    """``(base_dir, adapter_dir)`` of the shipped models, or None when this build has none."""
    try:
        from . import embedded
        paths = embedded.base_path(), embedded.adapter_init_path()
    except (ImportError, AttributeError, FileNotFoundError, OSError):
        return None
    return tuple(str(p) for p in paths) if all(Path(p).exists() for p in paths) else None


def default_paths(args) -> tuple[str | None, str, bool]:
    """``(base, adapter, shipped)``: the user's paths, the shipped models filling the gaps."""
    base, adapter = args.base, args.adapter
    if adapter is not None and (base is not None or args.api_base):
        return base, adapter, False
    shipped = shipped_models()
    if shipped is None:
        raise ValueError("the shipped models are not available in this build: pass --base PATH "
                         "(or --api-base URL) and --adapter PATH")
    return (base or (None if args.api_base else shipped[0])), (adapter or shipped[1]), True


def parse_prefix(text):
    if text is None:
        return None
    if all(part.strip().isdigit() for part in text.split(",")):
        return [int(part) for part in text.split(",")]
    return text


def run(args) -> dict:
    import torch

    from .api_base import APIBase, APIBaseError
    from .cli import UsageError
    from .decoding import TailoredLM

    prompts = read_prompts(args)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    base_path, adapter_path, shipped = default_paths(args)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    elif shipped or args.api_base:
        from .decoding import _try_tokenizer
        from .tokenizer import load_gpt2_tokenizer
        tokenizer = _try_tokenizer(adapter_path) or (load_gpt2_tokenizer() if shipped else None)
        if tokenizer is None:
            raise ValueError(f"no tokenizer in {adapter_path}: pass --tokenizer PATH")
    base = APIBase(args.api_base, tokenizer, model=args.api_model, top_logprobs=args.top_logprobs) \
        if args.api_base else base_path
    t0 = time.perf_counter()
    lm = TailoredLM.from_pretrained(base, adapter_path, tokenizer=tokenizer, alpha=args.alpha,
                                    adapter_prefix=parse_prefix(args.adapter_prefix), base_dtype=dtype,
                                    base_device=args.device, adapter_device=args.device)
    load_s = time.perf_counter() - t0
    for w in lm.metadata.get("warnings", []):
        print(f"warning: {w}")
    t0 = time.perf_counter()
    try:
        out = lm.generate(prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop=args.stop or None,
                          min_new_tokens=args.min_new_tokens, repetition_penalty=args.repetition_penalty)
    except APIBaseError as e:  # server down / timeout / malformed reply: one line, exit 2
        raise UsageError(str(e)) from None
    gen_s = time.perf_counter() - t0
    n_tokens = sum(len(t) for t in out.token_ids)
    print(f"base: {args.api_base or base_path}   adapter: {adapter_path}   alpha: {lm.alpha}   "
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
        "adapter_prefix": lm.adapter_prefix,
        "decoding": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                     "top_k": args.top_k, "min_p": args.min_p, "seed": args.seed, "stop": args.stop},
        "results": [{"prompt": p, "text": out.texts[r], "token_ids": out.token_ids[r], "logprobs": out.logprobs[r],
                     "adapter_logprobs": out.adapter_logprobs[r], "finish_reason": out.finish_reasons[r]}
                    for r, p in enumerate(prompts)],
        "tokens": n_tokens, "generate_s": gen_s, "tokens_per_s": n_tokens / max(gen_s, 1e-9), "load_s": load_s,
    }
