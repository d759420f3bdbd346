#!/usr/bin/env python
"""Held-out perplexity of a causal LM on a corpus split.

The split's documents, each followed by ``<|endoftext|>``, are concatenated in file order
and cut into non-overlapping windows of the model's context length; perplexity is
exp(total NLL / total predicted tokens) (the first token of each window is not predicted).
Computed in float32 whatever the stored dtype.

    python scripts/eval_ppl.py models/base [--split test] [--max-tokens 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def perplexity(model_dir: str, split: str = "test", max_tokens: int = 0,
               batch_size: int = 8) -> dict:
    from transformers import AutoModelForCausalLM

    from ipa_fast.decoding.tokenizer import load_gpt2_tokenizer

    tok = load_gpt2_tokenizer()
    with gzip.open(ROOT / "data/corpus" / f"{split}.txt.gz", "rt", encoding="utf-8") as f:
        docs = [l.rstrip("\n") for l in f if l.strip()]
    ids = [t for seq in tok(docs, add_special_tokens=False)["input_ids"]
           for t in (*seq, tok.eos_token_id)]
    if max_tokens:
        ids = ids[:max_tokens]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ctx = model.config.n_positions
    stream = torch.tensor(ids)
    n_win = len(stream) // ctx
    windows = stream[: n_win * ctx].view(n_win, ctx)
    nll, count = 0.0, 0
    t0 = time.time()
    with torch.no_grad():
        for chunk in windows.split(batch_size):
            logits = model(input_ids=chunk).logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                reduction="sum").item()
            count += chunk[:, 1:].numel()
    return {"model": str(model_dir), "split": split, "tokens": count, "max_tokens": max_tokens,
            "nll_per_token": nll / count, "perplexity": math.exp(nll / count),
            "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--split", default="test", choices=["train", "validation", "test"])
    ap.add_argument("--max-tokens", type=int, default=0, help="0 = the whole split")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = perplexity(args.model_dir, args.split, args.max_tokens)
    print(json.dumps(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
