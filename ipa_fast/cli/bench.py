"""``ipa-fast bench {sampler,decode,train}``: each suite lives in its own module
(``add_arguments(parser)``, ``run(args) -> dict``), imported lazily."""
from __future__ import annotations

import importlib

SUITES = {
    "sampler": ("ipa_fast.ops.bench_sampler", "fused sampler vs the HF chain and the memory read floor "
                                       "(--experts K..: the cost of K experts; --vs-llama-cpp: llama.cpp's chain)"),
    "decode": ("ipa_fast.decoding.bench", "TailoredLM tokens/s vs a naive per-step HF loop"),
    "train": ("ipa_fast.training.bench", "training step phases and the loss op's peak memory"),
}


def add_arguments(parser) -> None:
    from ipa_fast.cli.main import add_lazy_commands

    add_lazy_commands(parser.add_subparsers(dest="suite", required=True, metavar="SUITE"), SUITES, "_suite_module")


def run(args) -> dict:
    return importlib.import_module(args._suite_module).run(args)
