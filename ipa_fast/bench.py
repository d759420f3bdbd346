"""``ipa-fast bench {sampler,decode,train}``: each suite lives in its own module
(``add_arguments(parser)``, ``run(args) -> dict``), imported lazily."""
from __future__ import annotations

import importlib

SUITES = {
    "sampler": ("ipa_fast.bench_sampler", "fused sampler vs the HF chain and the memory read floor"),
    "decode": ("ipa_fast.bench_decode", "TailoredLM tokens/s vs a naive per-step HF loop"),
    "train": ("ipa_fast.training.bench", "training step phases and the loss op's peak memory"),
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for name, (module, help_text) in SUITES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON to PATH")
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
        p.set_defaults(_suite_module=module)


def run(args) -> dict:
    return importlib.import_module(args._suite_module).run(args)
