#!/usr/bin/env python
"""RL training of an IPA adapter as a script, with the same flags as ``ipa-fast train``.

    python training/train.py --task detox --algo ppo --steps 100 --out runs/detox
    python training/train.py --task detox --algo ppo --steps 100 --out runs/detox --resume
    python training/train.py --help
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a script, this file's directory would shadow top-level modules with names like
# "checkpoint" or "loading": import everything through the ipa_fast package instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def main(argv=None) -> int:
    from ipa_fast.cli import UsageError, write_json
    from ipa_fast.training import cli

    parser = argparse.ArgumentParser(prog="train.py", description="RL training of an IPA adapter (Quark or PPO)")
    parser.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON to PATH")
    cli.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        result = cli.run(args)
    except (UsageError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
