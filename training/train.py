#!/usr/bin/env python
"""RL training of an IPA adapter as a script, with the same flags as ``ipa-fast train``.

    python -m ipa_fast.training.train --task detox --algo ppo --steps 100 --out runs/detox
    python -m ipa_fast.training.train --task detox --algo ppo --steps 100 --out runs/detox --resume
    python -m ipa_fast.training.train --help

Run it as a module of the installed package: as a file (``python training/train.py``) its
folder would come first on the import path and shadow top-level modules with names like
"checkpoint" or "loading".
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from ipa_fast.cli.main import UsageError, write_json
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
