"""Paths of the embedded default: the shipped base, adapter initialisation and data.

Everything lives in the repository (``models/``, ``data/``), built by the project's own
scripts (see data/README.md and each model's MODEL_CARD.md); nothing is downloaded.
The root that holds ``models/`` and ``data/`` is, in order: ``IPA_FAST_HOME``; the source
checkout (an editable install); ``ipa_fast/_embedded/`` (where a wheel may carry them as
package data).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

TASKS = ("lexical", "detox")
SPLITS = ("train", "validation", "test")


def root() -> Path:
    env = os.environ.get("IPA_FAST_HOME")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for cand in (here.parent, here / "_embedded"):
        if (cand / "data/corpus/MANIFEST.json").exists() or (cand / "models/base").exists():
            return cand
    return here.parent


def _must_exist(path: Path, what: str, how: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found at {path}; build it with `{how}` "
                                f"(or set IPA_FAST_HOME to a checkout that has it)")
    return path


def base_path() -> Path:
    """The shipped base model (a Hugging Face directory, GPT-2 architecture, fp16)."""
    return _must_exist(root() / "models/base", "embedded base model",
                       "python training/pretrain.py --out runs/base --export models/base")


def adapter_init_path() -> Path:
    """The shipped adapter initialisation (a smaller GPT-2 pretrained on the same corpus)."""
    return _must_exist(root() / "models/adapter-init", "embedded adapter initialisation",
                       "python training/pretrain.py --out runs/adapter-init --n-embd 64 "
                       "--n-layer 2 --n-head 2 --export models/adapter-init")


def task_data_path(task: str, split: str) -> Path:
    """``data/tasks/<task>/<split>.jsonl`` for task in TASKS and split in SPLITS."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return _must_exist(root() / "data/tasks" / task / f"{split}.jsonl",
                       f"{task} {split} data",
                       f"python scripts/build_tasks.py --stage {task}")


def corpus_path(split: str) -> Path:
    """The gzip-compressed corpus split (one document per line)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return _must_exist(root() / "data/corpus" / f"{split}.txt.gz", f"corpus {split} split",
                       "python scripts/build_corpus.py")


def read_corpus(split: str) -> list[str]:
    """The documents of a corpus split (decompressed transparently)."""
    with gzip.open(corpus_path(split), "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def read_task(task: str, split: str) -> list[dict]:
    """The rows of a task split as dicts (``prompt`` always; ``concepts`` for lexical)."""
    import json

    with open(task_data_path(task, split), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
