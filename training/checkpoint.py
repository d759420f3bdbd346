"""Checkpoints that resume a run exactly, cannot run code, and are verified before use.

Layout under a checkpoint root (the trainer's ``<out>/checkpoints/``)::

    step_000010/tensors.safetensors   # every tensor of the state (weights, optimiser, RNG bytes)
    step_000010/state.json            # everything else, tensors replaced by references
    step_000010/MANIFEST.json         # written last: the step and the sha256 of both files
    step_000020/...
    latest                            # text: the name of the newest good checkpoint

Nothing is ever unpickled: tensors go through safetensors and the rest through JSON (tuples,
non-string dict keys and non-finite floats are tagged so they come back as they went in), so
a checkpoint folder from anywhere can be loaded without running code from it. Python's and
numpy's RNG states are stored as plain integers; torch's as its uint8 state tensor.

A checkpoint is *good* when its manifest names its own step and both files match their
sha256 (and then parse). :func:`load_latest` takes the newest good one; a newer one that is
unreadable is reported (one warning line naming it and why) and skipped; if checkpoints exist
but none is good it raises :class:`CheckpointError` rather than letting a run start again
from step 0. ``latest`` is only a hint that must name a ``step_NNNNNN`` directory directly
under the root: anything else (``..``, an absolute path, a symlink) is ignored with a warning.

Writes are atomic: a checkpoint is written to a hidden temporary directory (``.tmp-...``),
fsync'd, the manifest last, then renamed into place; ``latest`` is replaced the same way
after that. A process killed at any point leaves the previous good checkpoint loadable;
leftover temporaries are removed by the next :func:`save` or :func:`load_latest`. An existing
directory of the same step that is not good is replaced, never taken for a saved one.
Retention keeps the newest ``keep`` good checkpoints (unreadable ones older than the newest
good one are removed too) and never removes the newest good one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "MANIFEST.json"
LATEST = "latest"
FORMAT = "ipa_fast-checkpoint"
VERSION = 1
_STEP_DIR = re.compile(r"step_(\d{6,})")

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """No usable checkpoint where one is needed, or a checkpoint that does not verify."""


def _warn(msg: str) -> None:
    log.warning(msg)


# ---------------------------------------------------------------------------------------
# RNG states as plain values

def rng_state() -> dict:
    """The global RNG states of torch (uint8 tensor), numpy and Python's ``random`` (ints)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": str(kind), "key": [int(k) for k in key], "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
            "python": {"version": int(version), "internal": [int(x) for x in internal],
                       "gauss_next": gauss_next}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


# ---------------------------------------------------------------------------------------
# state <-> (JSON, tensors)

def _encode(obj, path: str, tensors: dict):
    """A JSON-able image of ``obj``; its tensors go into ``tensors`` under their path."""
    if isinstance(obj, torch.Tensor):
        name, n = path or "tensor", 1
        while name in tensors:  # keys like "a/b" and ("a", "b") could meet
            name, n = f"{path or 'tensor'}#{n}", n + 1
        tensors[name] = obj.detach().cpu().clone(memory_format=torch.contiguous_format)
        return {"$tensor": name}
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else {"$float": repr(float(obj))}
    if isinstance(obj, np.ndarray):
        return {"$ndarray": {"dtype": str(obj.dtype), "shape": list(obj.shape),
                             "data": _encode(obj.ravel().tolist(), path, tensors)}}
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, f"{path}/{k}" if path else k, tensors) for k, v in obj.items()}
        return {"$dict": [[_encode(k, f"{path}/$key{i}", tensors), _encode(v, f"{path}/{k}", tensors)]
                          for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"cannot store {type(obj).__name__} at {path or '/'} in a checkpoint "
                    "(tensors, numbers, strings, None, lists, tuples and dicts only)")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (tag, val), = obj.items()
        if tag == "$tensor":
            return tensors[val]
        if tag == "$float":
            if val not in ("nan", "inf", "-inf"):
                raise ValueError(f"bad $float {val!r}")
            return float(val)
        if tag == "$tuple":
            return tuple(_decode(v, tensors) for v in val)
        if tag == "$dict":
            return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in val}
        if tag == "$ndarray":
            return np.asarray(_decode(val["data"], tensors), dtype=np.dtype(val["dtype"])).reshape(val["shape"])
    if any(k.startswith("$") for k in obj):
        raise ValueError(f"unknown tag in {sorted(obj)}")
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _hashable(key):
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def to_files(state: dict) -> dict[str, bytes]:
    """``state`` as the bytes of :data:`STATE_FILE` and :data:`TENSORS_FILE`."""
    from safetensors.torch import save as st_save

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, "", tensors)
    doc = json.dumps({"format": FORMAT, "version": VERSION, "state": tree}, allow_nan=False,
                     separators=(",", ":")).encode()
    return {STATE_FILE: doc, TENSORS_FILE: st_save(tensors)}


def from_files(files: dict[str, bytes]) -> dict:
    from safetensors.torch import load as st_load

    doc = json.loads(files[STATE_FILE])
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise ValueError(f"{STATE_FILE} is not a version-{VERSION} {FORMAT} state")
    return _decode(doc["state"], st_load(files[TENSORS_FILE]))


# ---------------------------------------------------------------------------------------
# compact model and optimiser states (what can be rebuilt is not written)

def pack_module_state(sd: dict, reference_rows: dict | None = None) -> dict:
    """A module's ``state_dict`` without what can be rebuilt exactly, for a checkpoint.

    A tensor that is another entry's tensor (tied weights) is stored once and named in ``tied``;
    for an entry of ``reference_rows`` (name -> table, e.g. the base's embedding that a frozen
    adapter shares), the leading rows that equal the table bit for bit are left out (``rows_from_
    reference``), and only the rows after them are stored. :func:`unpack_module_state` inverts it
    given the same tables; anything that does not match is stored whole.
    """
    reference_rows = reference_rows or {}
    tensors, tied, from_ref, seen = {}, {}, {}, {}
    for name, t in sd.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and ident in seen:
            tied[name] = seen[ident]
            continue
        seen[ident] = name
        ref = reference_rows.get(name)
        n = 0 if ref is None else ref.shape[0]
        if (n and t.dim() >= 1 and t.shape[0] >= n and t.shape[1:] == ref.shape[1:] and t.dtype == ref.dtype
                and torch.equal(t[:n].cpu(), ref.cpu())):
            from_ref[name] = n
            t = t[n:]
        tensors[name] = t
    return {"tensors": tensors, "tied": tied, "rows_from_reference": from_ref}


def unpack_module_state(packed: dict, reference_rows: dict | None = None) -> dict:
    """The ``state_dict`` that :func:`pack_module_state` packed; a plain state dict (an older
    checkpoint) comes back as it is. Raises :class:`CheckpointError` when a reference table is
    missing or has another shape."""
    if set(packed) != {"tensors", "tied", "rows_from_reference"} or not isinstance(packed["tensors"], dict):
        return packed
    reference_rows = reference_rows or {}
    sd = {}
    for name, t in packed["tensors"].items():
        n = packed["rows_from_reference"].get(name)
        if n is not None:
            ref = reference_rows.get(name)
            if ref is None or ref.shape[0] != n or ref.shape[1:] != t.shape[1:]:
                raise CheckpointError(f"{name}: the checkpoint takes its first {n} rows from a shared table "
                                      "that this run does not provide with that shape")
            t = torch.cat([ref.detach().to(t.device, t.dtype), t])
        sd[name] = t
    for name, target in packed["tied"].items():
        if target not in sd:
            raise CheckpointError(f"{name}: tied to {target}, which the checkpoint does not hold")
        sd[name] = sd[target]
    return sd


def pack_optimizer_state(sd: dict) -> dict:
    """An optimiser's ``state_dict`` with the leading all-zero rows of its 2-D+ state tensors left
    out (Adam's moments of frozen embedding rows stay exactly 0); ``leading_zero_rows`` records
    them by ``"<param index>/<name>"``."""
    state, zeros = {}, {}
    for idx, per in sd["state"].items():
        out = {}
        for key, t in per.items():
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[0]:
                nonzero = t.reshape(t.shape[0], -1).ne(0).any(1)
                z = int(nonzero.long().argmax()) if bool(nonzero.any()) else t.shape[0]
                if z:
                    zeros[f"{idx}/{key}"] = z
                    t = t[z:]
            out[key] = t
        state[idx] = out
    return {**sd, "state": state, "leading_zero_rows": zeros}


def unpack_optimizer_state(packed: dict) -> dict:
    """Inverse of :func:`pack_optimizer_state` (a plain state dict comes back as it is)."""
    zeros = packed.get("leading_zero_rows")
    if zeros is None:
        return packed
    state = {idx: dict(per) for idx, per in packed["state"].items()}
    for ref, z in zeros.items():
        idx, key = ref.rsplit("/", 1)
        idx = next((i for i in state if str(i) == idx), None)
        if idx is None or key not in state[idx]:
            raise CheckpointError(f"optimizer state {ref}: not in the checkpoint")
        t = state[idx][key]
        state[idx][key] = torch.cat([t.new_zeros((z, *t.shape[1:])), t])
    return {k: v for k, v in packed.items() if k != "leading_zero_rows"} | {"state": state}


# ---------------------------------------------------------------------------------------
# files

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    """Write and fsync one file (tests replace this to simulate a kill mid-write)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Replace ``path`` by ``data`` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    _write_file(tmp, data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _read_file(path: Path) -> bytes:
    """Read a regular file without following a symlink."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _clean_temporaries(root: Path) -> None:
    for tmp in root.glob(".tmp-*"):
        _remove(tmp)
    for old in root.glob(".old-step_*"):  # a good checkpoint set aside while being replaced
        name = old.name[len(".old-"):].rsplit("-", 1)[0]
        target = root / name
        if _STEP_DIR.fullmatch(name) and not target.exists() and not target.is_symlink() and not old.is_symlink():
            os.replace(old, target)
        else:
            _remove(old)


def step_of(path: Path) -> int | None:
    m = _STEP_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else None


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Every ``step_NNNNNN`` directory directly under ``root`` (good or not; no symlinks),
    oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if step_of(p) is not None and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=step_of)


def _read_verified(path: Path) -> dict[str, bytes]:
    """The files of checkpoint ``path`` after checking its manifest; raises CheckpointError."""
    path = Path(path)
    step = step_of(path)
    if step is None or path.is_symlink() or not path.is_dir():
        raise CheckpointError("not a step_NNNNNN directory")
    try:
        manifest = json.loads(_read_file(path / MANIFEST_FILE))
    except FileNotFoundError:
        hint = " (an old pickle checkpoint, which is never loaded)" if (path / "state.pt").exists() else ""
        raise CheckpointError(f"no {MANIFEST_FILE}{hint}") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable {MANIFEST_FILE} ({exc})") from None
    if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT
            or manifest.get("version") != VERSION or not isinstance(manifest.get("files"), dict)):
        raise CheckpointError(f"{MANIFEST_FILE} is not a version-{VERSION} {FORMAT} manifest")
    if manifest.get("step") != step:
        raise CheckpointError(f"{MANIFEST_FILE} is for step {manifest.get('step')!r}, not {step}")
    if set(manifest["files"]) != {STATE_FILE, TENSORS_FILE}:
        raise CheckpointError(f"{MANIFEST_FILE} lists {sorted(manifest['files'])}")
    files = {}
    for name, want in manifest["files"].items():
        try:
            data = _read_file(path / name)
        except OSError as exc:
            raise CheckpointError(f"cannot read {name} ({exc.strerror or exc})") from None
        if not isinstance(want, dict) or _sha256(data) != want.get("sha256"):
            raise CheckpointError(f"sha256 mismatch in {name}")
        files[name] = data
    return files


def verify(path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless checkpoint ``path`` matches its manifest."""
    _read_verified(Path(path))


def is_good(path: str | Path) -> bool:
    try:
        verify(path)
    except CheckpointError:
        return False
    return True


def load(path: str | Path) -> dict:
    """The state of checkpoint ``path``; raises :class:`CheckpointError` naming what is wrong."""
    files = _read_verified(Path(path))
    try:
        return from_files(files)
    except Exception as exc:  # noqa: BLE001 - verified bytes that still do not parse
        raise CheckpointError(f"cannot parse the state ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------------------------------
# save and load

def save(root: str | Path, step: int, state: dict, keep: int = 3, replace: bool = False) -> Path:
    """Write ``state`` as checkpoint ``step`` atomically; keep the newest ``keep`` good ones.

    An existing good checkpoint of the same step is kept as it is (the trainer's state does not
    change between steps), unless ``replace``; one that is not good is always replaced.
    Returns the checkpoint directory.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _clean_temporaries(root)
    name = f"step_{step:06d}"
    final = root / name
    existing_good = final.is_dir() and not final.is_symlink() and is_good(final)
    if not existing_good or replace:
        files = to_files(state)  # before touching the disk: an unstorable state fails here
        tmp = root / f".tmp-{name}-{os.getpid()}"
        _remove(tmp)
        tmp.mkdir()
        for fname, data in files.items():
            _write_file(tmp / fname, data)
        manifest = {"format": FORMAT, "version": VERSION, "step": step,
                    "files": {k: {"sha256": _sha256(v), "bytes": len(v)} for k, v in files.items()}}
        _write_file(tmp / MANIFEST_FILE, (json.dumps(manifest, indent=1) + "\n").encode())
        _fsync_dir(tmp)
        aside = None
        if final.exists() or final.is_symlink():
            # a good one goes to .old- (restored by the next clean-up if we die before the
            # rename below); a bad one to .tmp- (removed)
            aside = root / (f".old-{name}-{os.getpid()}" if existing_good else f".tmp-bad-{name}-{os.getpid()}")
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_dir(root)
        if aside is not None:
            _remove(aside)
    _retain(root, keep)
    return final


def _retain(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` good checkpoints; point ``latest`` at the newest good one."""
    dirs = checkpoint_dirs(root)
    good = [p for p in dirs if is_good(p)]
    if not good:  # pragma: no cover - save just wrote one
        return
    newest = good[-1]
    write_atomic(root / LATEST, newest.name + "\n")
    kept = set(good[-keep:])
    for p in dirs:
        if p not in kept and step_of(p) < step_of(newest):
            _remove(p)


def _latest_hint(root: Path) -> Path | None:
    """The directory ``latest`` names, if it is a valid direct child; else warn and None."""
    pointer = root / LATEST
    if not pointer.exists() and not pointer.is_symlink():
        return None
    why = None
    if pointer.is_symlink() or not pointer.is_file():
        why = "it is not a regular file"
    else:
        raw = _read_file(pointer)[:256].decode("utf-8", "replace").strip()
        target = root / raw
        if not _STEP_DIR.fullmatch(raw):
            why = f"{raw!r} is not a step_NNNNNN name"
        elif target.is_symlink():
            why = f"{raw} is a symlink"
        elif not target.is_dir():
            why = f"{raw} does not exist"
        elif target.resolve().parent != root.resolve():
            why = f"{raw} is outside {root}"
        else:
            return target
    _warn(f"ignoring {pointer}: {why}; using the newest good checkpoint in {root}")
    return None


def _no_good_error(root: Path, failures: list[tuple[Path, str]]) -> CheckpointError:
    return CheckpointError(f"no readable checkpoint in {root}: "
                           + "; ".join(f"{p.name} ({why})" for p, why in failures)
                           + "; move the folder away to start afresh")


def newest_good(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root`` that matches its manifest, without loading it or
    warning; None if there are no checkpoints, CheckpointError if none is good (a cheap check
    before expensive work such as loading models)."""
    failures = []
    for path in reversed(checkpoint_dirs(root)):
        try:
            verify(path)
            return path
        except CheckpointError as exc:
            failures.append((path, str(exc)))
    if failures:
        raise _no_good_error(Path(root), failures)
    return None


def load_latest(root: str | Path) -> tuple[dict, Path] | None:
    """The newest good checkpoint ``(state, dir)`` under ``root``, or None if there is none.

    Unreadable newer checkpoints are skipped with one warning line each; if checkpoints exist
    but none is good, raises :class:`CheckpointError` listing each and why.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    _clean_temporaries(root)
    _latest_hint(root)  # only checked: the newest good directory is what resumes
    for link in root.glob("step_*"):
        if link.is_symlink():
            _warn(f"ignoring {link}: a symlink, not a checkpoint directory")
    failures: list[tuple[Path, str]] = []
    for path in reversed(checkpoint_dirs(root)):
        try:
            state = load(path)
        except CheckpointError as exc:
            failures.append((path, str(exc)))
            continue
        for bad, why in failures:
            _warn(f"checkpoint {bad} is unreadable ({why}); falling back to {path.name}")
        return state, path
    if failures:
        raise _no_good_error(root, failures)
    return None


# ---------------------------------------------------------------------------------------
# logs written beside the checkpoints

def _split_torn_tail(path: Path) -> tuple[list[str], str | None]:
    """The complete lines of ``path`` and its unterminated last line (None if it ends in \\n)."""
    text = _read_file(path).decode("utf-8", "replace")
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline
    return lines, (tail if tail else None)


def trim_jsonl_log(path: str | Path, step: int) -> None:
    """Make a JSON-lines log agree with a checkpoint of ``step``: drop records of later steps
    (the resumed run writes them again) and a torn last line left by a kill mid-write (with a
    warning); rewrite the file atomically. A bad line before the last raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        return
    lines, tail = _split_torn_tail(path)
    if tail is not None:
        try:
            json.loads(tail)
            lines.append(tail)  # complete but for its newline
        except ValueError:
            _warn(f"{path}: dropping a torn last line ({len(tail)} characters) left by an interrupted write")
    keep = []
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except ValueError as exc:
            raise CheckpointError(f"{path}:{i} is not JSON ({exc}); fix or remove that line to resume") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step", 0), int) or rec.get("step", 0) <= step:
            keep.append(ln)
    write_atomic(path, "".join(ln + "\n" for ln in keep))


def trim_text_log(path: str | Path, step: int, header: str = r"eval @ step (\d+):") -> None:
    """Make a text log of blocks (each opened by a line matching ``header``, whose group is its
    step) agree with a checkpoint of ``step``: drop later blocks and a torn last line."""
    path = Path(path)
    if not path.is_file():
        return
    lines, tail = _split_torn_tail(path)
    if tail is not None:
        _warn(f"{path}: dropping a torn last line ({len(tail)} characters) left by an interrupted write")
    pattern = re.compile(header)
    keep, block_step = [], None
    for ln in lines:
        m = pattern.match(ln)
        if m:
            block_step = int(m.group(1))
        if block_step is None or block_step <= step:
            keep.append(ln)
    write_atomic(path, "".join(ln + "\n" for ln in keep))
