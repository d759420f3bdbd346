"""The ``ipa-fast`` command: demo, generate, train, bench.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> dict``; this file only parses, dispatches, prints errors as one line and
writes ``--json PATH``. The modules are imported lazily so ``ipa-fast --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

COMMANDS = {
    "demo": ("ipa_fast.demo", "the main job on the embedded default, offline, minutes on a CPU"),
    "generate": ("ipa_fast.generate_cli", "tailored decoding from the command line"),
    "train": ("ipa_fast.training.cli", "RL training of an adapter (task or custom reward)"),
    "bench": ("ipa_fast.bench", "sampler, decoding and training benchmarks vs baselines"),
}


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit status 2."""


def add_lazy_commands(subparsers, table: dict, module_key: str) -> None:
    """One sub-parser per ``{name: (module, help)}`` entry; each module adds its own arguments.
    A module that is not there leaves a ``_missing`` reason instead of breaking ``--help``."""
    for name, (module, help_text) in table.items():
        p = subparsers.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON to PATH")
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            p.set_defaults(_missing=f"'{name}' is not available in this build ({module} is missing)")
        p.set_defaults(**{module_key: module})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ipa-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_lazy_commands(sub, COMMANDS, "_module")
    return parser


def write_json(path: str, result: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "_missing", None):
        print(f"ipa-fast {args.command}: error: {args._missing}", file=sys.stderr)
        return 2
    try:
        result = importlib.import_module(args._module).run(args)
    except (UsageError, ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        print(f"ipa-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ipa-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    if args.json:
        write_json(args.json, result or {})
    return 0


if __name__ == "__main__":
    sys.exit(main())
