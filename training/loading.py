"""Where a run's models, tokenizer, prompts and reward come from.

Models: ``--base`` / ``--adapter`` (a local directory or hub name, ``AutoModelForCausalLM``);
by default the shipped base and adapter initialisation. Every shipped asset (models, task
data) is resolved through :mod:`ipa_fast.embedded` and nowhere else: when one is missing its
``FileNotFoundError`` says what and how to get it. :func:`tiny_gpt2_pair` (random weights,
2 layers, width 64 for the base and 1 layer for the adapter, over the GPT-2 tokenizer) is for
tests and benchmarks that ask for it, never a silent default. Prompts: JSON lines
``{"prompt": ..., <field>: ...}``; every other field is passed to the reward by name. Frozen
experts (``--frozen-adapter DIR[:WEIGHT]``): adapter directories, loaded by
:func:`load_frozen_experts`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def task_data_path(task: str, split: str) -> Path:
    """``ipa_fast.embedded.task_data_path`` (the one place task data is looked up)."""
    from ipa_fast import embedded

    return Path(embedded.task_data_path(task, split))


def shipped_pair() -> tuple[str, str]:
    """``(base, adapter_init)`` paths of the shipped models; FileNotFoundError (one line, from
    :mod:`ipa_fast.embedded`) naming the missing one and how to get it."""
    from ipa_fast import embedded

    return str(embedded.base_path()), str(embedded.adapter_init_path())


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
    """For tests and benchmarks: ``(base, adapter, tokenizer)``, random GPT-2 models (base seed 0,
    2 layers; adapter seed 1, 1 layer; width 64) over the GPT-2 tokenizer (V = 50257)."""
    from ipa_fast.decoding.tokenizer import load_gpt2_tokenizer

    tok = load_gpt2_tokenizer()
    V = len(tok)
    return tiny_gpt2(V, seed, 2), tiny_gpt2(V, seed + 1, 1), tok


def load_models(base: str | None, adapter: str | None):
    """``(base, adapter, tokenizer, base_name, adapter_name)`` for the given paths; a missing one
    is the shipped model (FileNotFoundError when that is not there)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ipa_fast import embedded

    if base is None:
        base = str(embedded.base_path())
    if adapter is None:
        adapter = str(embedded.adapter_init_path())
    b = _load(AutoModelForCausalLM, base, "base model")
    a = _load(AutoModelForCausalLM, adapter, "adapter")
    tok = None
    for path in (adapter, base):
        try:
            tok = AutoTokenizer.from_pretrained(path)
            break
        except Exception:  # noqa: BLE001 - try the other directory, then the GPT-2 tokenizer
            continue
    if tok is None:
        from ipa_fast.decoding.tokenizer import load_gpt2_tokenizer
        tok = load_gpt2_tokenizer()
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return b, a, tok, str(base), str(adapter)


def adapter_tokenizer(adapter: str | None):
    """``(adapter_path, tokenizer)`` for a run against a served base: the adapter directory
    (default the shipped initialisation) and the tokenizer saved beside it, which must be the
    served base's (checked by :func:`connect_api_base`)."""
    from transformers import AutoTokenizer

    from ipa_fast import embedded

    if adapter is None:
        adapter = str(embedded.adapter_init_path())
    try:
        tok = AutoTokenizer.from_pretrained(adapter)
    except Exception as exc:  # noqa: BLE001 - one line: the tokenizer must come from the adapter here
        raise ValueError(f"--api-base: the adapter {adapter} holds no loadable tokenizer (the served base's "
                         f"tokenizer must be saved beside the adapter): {type(exc).__name__}") from None
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return str(adapter), tok


def load_adapter(adapter: str):
    """The adapter model alone (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, adapter, "adapter")


def connect_api_base(url: str, tokenizer, *, top_k: int = 20, dialect: str | None = None, timeout: float = 60.0,
                     ambiguous: str = "error"):
    """An :class:`~ipa_fast.decoding.api_base.APIBase` for ``url``, checked before training:
    the server answers (dialect detected or given) and tokenises a probe text to the tokenizer's
    ids (one ``/tokenize`` round trip; where the server has none, the probe's scored ids must lie
    in the tokenizer's vocabulary). :class:`~ipa_fast.decoding.api_base.APIBaseError` (one line)
    otherwise."""
    from ipa_fast.decoding.api_base import APIBase

    base = APIBase(url, tokenizer, top_logprobs=top_k, dialect=dialect, timeout=timeout, ambiguous=ambiguous)
    base.detect_dialect()
    if not base.check_tokenizer():
        probe = tokenizer(base.TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
        base.score_top_k([probe], 2 if base.dialect == "llama-cpp-python" else 1)  # ids >= V fail here
    return base


def _load(cls, name: str, what: str):
    if not Path(name).expanduser().exists():
        from ipa_fast.cli.main import looks_like_path
        if looks_like_path(name):
            raise FileNotFoundError(f"{what} not found: {name}")
    try:
        return cls.from_pretrained(name, dtype=torch.float32).eval()
    except (OSError, ValueError) as exc:  # hub id not found / not cached, bad config: one line
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ValueError(f"cannot load {what} {name}: {first}") from exc


def parse_frozen_adapter(text: str, what: str | None = None) -> tuple[str, float | None]:
    """``DIR[:WEIGHT]`` (the syntax of ``ipa-fast generate --adapter``, parsed by its
    :func:`~ipa_fast.cli.generate.adapter_ref`) -> ``(directory, weight or None)``; the directory
    must exist here (its weights are hashed). ValueError (one line, prefixed by ``what``) otherwise."""
    from ipa_fast.cli.generate import adapter_ref

    head = f"{what}: " if what else ""
    try:
        path, weight = adapter_ref(text)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"{head}{exc}") from None
    if not Path(path).expanduser().is_dir():
        raise ValueError(f"{head}frozen adapter not found: {path} (a local adapter directory)")
    return path, weight


def load_frozen_experts(refs: list[str], tokenizer, device=None) -> list:
    """The frozen experts of ``refs`` (``"DIR"`` or ``"DIR:WEIGHT"`` each) as
    :class:`~ipa_fast.training.policy.FrozenExpert`: the model (float32, eval mode, on
    ``device``), its weight (given, else the ``alpha`` of its ipa_adapter.json, else 1), its
    saved prefix, its directory as its name and the sha256 of its weight files. A tokenizer
    saved beside it must share the run's vocabulary (ids below V; added control tokens aside)."""
    from transformers import AutoModelForCausalLM

    from ipa_fast.decoding.residual import weight_hashes
    from ipa_fast.decoding.tailored import _core_hash, _try_tokenizer, load_adapter_metadata

    from .policy import FrozenExpert

    experts = []
    for i, text in enumerate(refs):
        path, weight = parse_frozen_adapter(text, f"frozen_adapters[{i}]")
        meta = load_adapter_metadata(path) or {}
        own = _try_tokenizer(path)
        if own is not None and _core_hash(own) != _core_hash(tokenizer):
            raise ValueError(f"tokenizer mismatch: frozen adapter {path} ships another tokenizer than the run's; "
                             "the experts must share one vocabulary")
        sha256 = weight_hashes(path)
        if not sha256:
            raise ValueError(f"frozen adapter {path} has no weights file (*.safetensors or pytorch_model*.bin)")
        model = _load(AutoModelForCausalLM, path, "frozen adapter")
        if device is not None:
            model.to(device)
        experts.append(FrozenExpert(model=model, weight=float(meta.get("alpha", 1.0) if weight is None else weight),
                                    prefix=[int(t) for t in meta.get("adapter_prefix") or []], name=str(path),
                                    sha256=sha256))
    return experts
