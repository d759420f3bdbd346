"""Where a run's models, tokenizer, prompts and reward come from.

Models: ``--base`` / ``--adapter`` (a local directory or hub name, ``AutoModelForCausalLM``);
by default the shipped models (``ipa_fast.embedded``) once they exist, and until then a seeded
tiny GPT-2 pair over the GPT-2 tokenizer (:func:`tiny_gpt2_pair`: random weights, 2 layers,
width 64 for the base and 1 layer for the adapter — enough to exercise the machinery, not to
write English). Prompts: JSON lines ``{"prompt": ..., <field>: ...}``; every other field is
passed to the reward by name.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _embedded(name: str):
    try:
        from ipa_fast import embedded
    except ImportError:
        return None
    fn = getattr(embedded, name, None)
    return fn


def task_data_path(task: str, split: str) -> Path:
    fn = _embedded("task_data_path")
    if fn is not None:
        try:
            return Path(fn(task, split))
        except Exception:  # noqa: BLE001 - fall back to the source tree's data/
            pass
    return ROOT / "data" / "tasks" / task / f"{split}.jsonl"


def read_prompts(path: str | Path) -> list[dict]:
    """JSON lines with a string ``"prompt"`` in every row; clear errors naming the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f'{path}:{n}: each line must be an object with a string "prompt"')
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    keys = set(rows[0])
    for n, row in enumerate(rows, 1):
        if set(row) != keys:
            raise ValueError(f"{path}: row {n} has fields {sorted(row)} but row 1 has {sorted(keys)}; "
                             "every row must have the same fields (they are passed to the reward as lists)")
    return rows


def tiny_gpt2(vocab_size: int, seed: int, n_layer: int, n_embd: int = 64, n_head: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=512, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_gpt2_pair(seed: int = 0):
    """The fallback default: ``(base, adapter, tokenizer)``, random GPT-2 models (base seed 0,
    2 layers; adapter seed 1, 1 layer; width 64) over the GPT-2 tokenizer (V = 50257)."""
    from ipa_fast.tokenizer import load_gpt2_tokenizer

    tok = load_gpt2_tokenizer()
    V = len(tok)
    return tiny_gpt2(V, seed, 2), tiny_gpt2(V, seed + 1, 1), tok


def load_models(base: str | None, adapter: str | None):
    """``(base, adapter, tokenizer, base_name, adapter_name)`` for the given paths (or defaults)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shipped_base, shipped_adapter = _existing(_embedded("base_path")), _existing(_embedded("adapter_init_path"))
    if base is None and adapter is None:
        if shipped_base is None or shipped_adapter is None:  # the shipped pair is not built (yet)
            b, a, tok = tiny_gpt2_pair()
            return b, a, tok, "tiny-gpt2(seed=0)", "tiny-gpt2(seed=1)"
        base, adapter = shipped_base, shipped_adapter
    base, adapter = base or shipped_base, adapter or shipped_adapter
    if base is None or adapter is None:
        raise ValueError("pass both --base and --adapter (the shipped pair is not available to complete one)")
    try:
        b = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        a = AutoModelForCausalLM.from_pretrained(adapter, dtype=torch.float32).eval()
    except OSError as exc:
        raise ValueError(f"cannot load the models: {exc}".splitlines()[0]) from exc
    tok = None
    for path in (adapter, base):
        try:
            tok = AutoTokenizer.from_pretrained(path)
            break
        except Exception:  # noqa: BLE001 - try the other directory, then the GPT-2 tokenizer
            continue
    if tok is None:
        from ipa_fast.tokenizer import load_gpt2_tokenizer
        tok = load_gpt2_tokenizer()
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return b, a, tok, str(base), str(adapter)


def _existing(fn):
    if fn is None:
        return None
    try:
        p = fn()
    except Exception:  # noqa: BLE001 - shipped models not built yet
        return None
    return str(p) if p is not None and Path(p).exists() else None
