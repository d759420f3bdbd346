"""Checkpoints that resume a run exactly, written atomically.

Layout under ``<out>/checkpoints/``::

    step_000010/state.pt   # one torch.save'd dict: everything the trainer needs to resume
    step_000020/state.pt
    latest                 # text file: the name of the newest complete checkpoint

A checkpoint is first written to a hidden temporary directory (``.tmp-step_...``), fsync'd,
then renamed into place with ``os.replace``; ``latest`` is rewritten the same way (temp
file + ``os.replace``) only after that. A process killed at any point therefore leaves
either the previous checkpoint or the new one as ``latest``, never a half-written one;
leftover temporaries are removed by the next :func:`save` or :func:`load_latest`.
Only the newest ``keep`` checkpoints are kept.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "state.pt"
LATEST = "latest"


def rng_state() -> dict:
    """The global RNG states of torch, numpy and Python's ``random``."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clean_temporaries(root: Path) -> None:
    for tmp in root.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())


def save(root: str | Path, step: int, state: dict, keep: int = 3) -> Path:
    """Write ``state`` as checkpoint ``step`` atomically; keep the newest ``keep``; return its dir."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _clean_temporaries(root)
    name = f"step_{step:06d}"
    final = root / name
    if (final / STATE_FILE).is_file():
        # Same step, same state (nothing changes between steps): keep the complete one rather
        # than opening a window in which neither exists.
        return final
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # an incomplete directory of that name (no state file): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / f".tmp-{LATEST}-{os.getpid()}"
    pointer.write_text(name + "\n")
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: str | Path) -> dict:
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)


def load_latest(root: str | Path) -> tuple[dict, Path] | None:
    """The newest loadable checkpoint ``(state, dir)`` under ``root``, or None if there is none.

    Follows ``latest``; if it is missing or unreadable, falls back to the newest complete
    ``step_*`` directory that loads.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    _clean_temporaries(root)
    candidates = []
    pointer = root / LATEST
    if pointer.is_file():
        candidates.append(root / pointer.read_text().strip())
    candidates += list(reversed(checkpoint_dirs(root)))
    for path in candidates:
        if (path / STATE_FILE).is_file():
            try:
                return load(path), path
            except Exception:  # noqa: BLE001 - a damaged file: try the previous checkpoint
                continue
    return None
