"""``ipa-fast train`` (and ``python training/train.py``): RL training of an adapter.

    ipa-fast train --task detox --out runs/detox           # the shipped detox recipe (preset "detox")
    ipa-fast train --task lexical --steps 30 --sft-steps 15 --out runs/lex     # its recipe, shorter
    ipa-fast train --reward my_rewards:polite --prompts prompts.jsonl --algo ppo --steps 100 --out runs/polite
    ipa-fast train --task lexical --preset none --algo quark --sft-steps 300 --sft-lr 1e-3 --steps 400 --out runs/lex
    ipa-fast train ... --resume          # continue a killed run in --out up to --steps
    ipa-fast train --task lexical --frozen-adapter runs/detox/adapter:0.5 --out runs/lex-with-detox
    ipa-fast train --task lexical --api-base http://127.0.0.1:8000/v1 --adapter DIR --out runs/lex-api

Every :class:`~ipa_fast.training.TrainConfig` field is a flag (``--batch-size``, ``--kl-coef``,
...). ``--task T`` starts from preset T, the recipe the shipped ``models/adapters/T`` was
trained with (its MODEL_CARD.md and ipa_adapter.json); flags given explicitly override it,
``--preset none`` starts from TrainConfig's plain defaults. Models default to the shipped base
and adapter initialisation (``ipa_fast.embedded``; a missing one is an error saying how to get
it).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing

from ipa_fast import tasks
from ipa_fast.decoding.api_base import AMBIGUOUS, DIALECTS

from .trainer import TrainConfig

# The recipes of the shipped adapters (models/adapters/<task>/MODEL_CARD.md), for the embedded
# SmolLM2 base and its distilled 4-layer adapter initialisation: the one table.
# detox: not yet trained on this base (the recipe carried over from the previous base: PPO at alpha
# 0.5 with the KL to the initial tailored policy, which there avoided the reward hacks of alpha 1).
# the presets are the task registry's recipes (ipa_fast.tasks: one definition per task)
PRESETS: dict[str, dict] = tasks.recipes()

HELP = {
    "algo": "quark (reward-quantile control tokens, the official IPA recipe) or ppo",
    "out": "run directory: metrics.jsonl, reward_curve.png, samples.txt, checkpoints/, adapter/",
    "steps": "the run's total number of steps; --resume continues up to it",
    "task": "built-in task (ipa_fast.tasks): " + ", ".join(f"{t.name} ({t.title})" for t in tasks.TASKS.values())
            + "; uses the task's embedded train/validation data and reward, and its preset (the shipped recipe)",
    "reward": "custom reward 'module:function' or 'file.py:function': "
              "fn(prompts, completions, **fields) -> list[float]",
    "prompts": "JSON lines {\"prompt\": ..., <field>: ...}; extra fields go to the reward by name",
    "train_split": "with --task and no --prompts: the task's training file, train (the split) or warmstart "
                   "(a task's shipped warm-start rows, e.g. lexical's best-of-4 base samples in field 'best')",
    "eval_prompts": "held-out JSON lines (default: the task's validation split, else the last "
                    "--eval-size rows of --prompts)",
    "base": "base model (HF directory or hub name). Default: the embedded base (`ipa-fast setup`)",
    "adapter": "initial adapter (HF directory or hub name). Default: the embedded adapter initialisation",
    "api_base": "train against a served base instead of --base (not with --base): an OpenAI-compatible "
                "completions URL (vLLM, llama.cpp's llama-server or llama-cpp-python, or python -m "
                "ipa_fast.decoding.serve); the base is then sparse (its top --api-top-k log-probs per position, -inf "
                "elsewhere) and the tokenizer comes from the --adapter directory (checked against the server's)",
    "api_top_k": "with --api-base: top-k log-probs asked of the server per position (the server's limit "
                 "applies, e.g. vLLM's --max-logprobs)",
    "api_dialect": "with --api-base: the server's dialect (default: detected from GET /v1/models)",
    "api_timeout": "with --api-base: deadline in seconds of one server call (a decoding step, or scoring a batch)",
    "api_ambiguous": "with --api-base on a server that keys log-probs by token text (llama-cpp-python): 'error' "
                     "(default) fails naming a key that several ids print as, 'drop' leaves those ids out of "
                     "that position's top-K",
    "alpha": "adapter weight of the tailored policy, > 0 (saved in the adapter's ipa_adapter.json)",
    "reference": "KL reference policy: initial (base x frozen initial adapter) or base (base alone)",
    "kl_target": "target KL for the adaptive KL controller (default: fixed --kl-coef)",
    "early_stop_kl": "PPO: stop the epochs when approx KL(old||new) > 1.5 x this",
    "sft_steps": "supervised warm start: the first N steps minimise the tailored NLL of each prompt "
                 "row's --sft-field text (then RL from there; the KL reference is the warm-started adapter)",
    "min_new_tokens": "mask EOS before this many new tokens in rollouts and in the scored policy (official "
                      "IPA: 16) so a policy cannot earn its reward by stopping early; evaluation keeps the protocol",
    "sft_field": "the prompt-file field holding the warm-start target text",
    "sft_lr": "learning rate of the warm-start steps (default: --lr)",
    "sft_batch_size": "prompt rows per warm-start step (default: --batch-size)",
    "sft_target": "warm-start loss: NLL of the tailored policy (base x adapter) or of the adapter alone "
                  "(no base forward; teaches a small adapter what the base lacks, e.g. copying)",
    "repeat_coef": "training-score penalty per unit of repeated-bigram fraction of a sample (prices "
                   "degenerate loops; evaluation reports the plain reward)",
    "zero_init_output": "start the adapter's logits at 0 (final norm gain 0): the untrained product is "
                        "exactly the base, but at first only the zeroed gain gets gradient (use --residual)",
    "residual": "train the adapter as a residual on its initial weights: pi = base + alpha * (adapter - "
                "initial adapter), so the untrained product is exactly the base and every parameter gets its "
                "full gradient from the first step; loading the saved adapter puts the initial one back "
                "(ppo only)",
    "backend": "sampler backend for rollouts (auto, reference, cpu, triton, cuda)",
    "reward_timeout": "seconds one reward call may take before the run stops with an error (the last "
                      "checkpoint stays intact); 0 = no limit",
    "frozen_adapters": "repeatable: another adapter in the product, frozen while this one trains, "
                       "z = base + alpha * adapter + WEIGHT * frozen (WEIGHT default: its ipa_adapter.json "
                       "alpha, else 1); rollouts, the scored policy, its KL reference and evaluation include "
                       "it, and the trained adapter's ipa_adapter.json records it (compose them at inference "
                       "with ipa-fast generate --adapter OUT/adapter --adapter DIR:WEIGHT)",
}
# argparse types (ipa_fast.cli.main's, the one place they are defined) for fields whose plain type
# would accept nonsense; TrainConfig.validate() checks the combinations
def _arg_types() -> dict:
    from ipa_fast.cli.main import existing_file, model_ref, nonneg_float, nonneg_int, open_unit_float, \
        positive_float, positive_int

    types_ = {name: positive_int for name in (
        "batch_size", "minibatch_size", "grad_accum", "max_new_tokens", "n_quantiles", "quark_updates",
        "ppo_epochs", "eval_size", "eval_max_new_tokens", "keep_checkpoints", "checkpoint_every", "sft_batch_size",
        "api_top_k")}
    types_.update({name: nonneg_int for name in (
        "steps", "min_new_tokens", "top_k", "warmup_steps", "sft_steps", "eval_every", "sample_rows")})
    types_.update({name: positive_float for name in (
        "alpha", "temperature", "lr", "adam_eps", "kl_target", "kl_horizon", "sft_lr", "cliprange",
        "cliprange_value", "score_clip", "early_stop_kl", "api_timeout")})
    types_.update({name: nonneg_float for name in (
        "weight_decay", "max_grad_norm", "kl_coef", "entropy_coef", "vf_coef", "repeat_coef", "reward_timeout")})
    types_.update({"top_p": open_unit_float, "eval_top_p": open_unit_float, "gamma": open_unit_float,
                   "lam": open_unit_float, "prompts": existing_file, "eval_prompts": existing_file,
                   "base": model_ref("base model"), "adapter": model_ref("adapter")})
    return types_


CHOICES = {"api_dialect": list(DIALECTS), "api_ambiguous": list(AMBIGUOUS),
           "sft_target": ["tailored", "adapter"], "algo": ["quark", "ppo"], "task": list(tasks.names()), "reference": ["initial", "base"],
           "lr_schedule": ["constant", "linear"]}


def frozen_adapter_arg(text: str) -> str:
    """argparse type of ``--frozen-adapter``: ``DIR[:WEIGHT]`` checked (ipa-fast generate's
    ``--adapter`` parser), kept as ``DIR`` or ``DIR:WEIGHT`` text in TrainConfig.frozen_adapters."""
    from .loading import parse_frozen_adapter

    try:
        path, weight = parse_frozen_adapter(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return path if weight is None else f"{path}:{weight!r}"


frozen_adapter_arg.__name__ = "frozen adapter"


def _base_type(tp):
    """``int | None`` -> int; the plain type otherwise."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_arguments(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    arg_types = _arg_types()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "frozen_adapters":  # a list: one repeatable flag, named in the singular
            parser.add_argument("--frozen-adapter", dest=f.name, type=frozen_adapter_arg, action="append",
                                default=argparse.SUPPRESS, metavar="DIR[:WEIGHT]", help=HELP[f.name])
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = arg_types.get(f.name) or _base_type(hints[f.name])
        preset = {t: r[f.name] for t, r in PRESETS.items() if f.name in r}
        help_text = HELP.get(f.name, "") + f" (default: {f.default}" + \
            "".join(f"; {t} preset {v}" for t, v in preset.items()) + ")"
        # SUPPRESS: a flag not given is absent from the namespace, so the preset can fill it
        if _base_type(hints[f.name]) is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=tp, default=argparse.SUPPRESS, choices=CHOICES.get(f.name),
                                metavar=None if f.name in CHOICES else f.name.upper(), help=help_text)
    parser.add_argument("--preset", choices=[*PRESETS, "none"], default=None,
                        help="start from this recipe (default: the --task's, none without --task); 'none' = "
                             "TrainConfig's plain defaults; explicit flags override the preset")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its newest good checkpoint up to --steps")
    parser.add_argument("--force", action="store_true",
                        help="with --resume: continue even if the checkpoint was made with other settings "
                             "(seed, lr, batch size, prompts, ...); the new ones apply from the next step")
    parser.epilog = __doc__


def preset_of(args) -> str | None:
    name = getattr(args, "preset", None)
    if name is None:
        name = getattr(args, "task", None)
    return None if name in (None, "none") else name


def config_from_args(args) -> TrainConfig:
    """The preset (``--preset``, default the ``--task``'s), then every flag given explicitly."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    values = {**PRESETS.get(preset_of(args) or "", {}), **given}
    cfg = TrainConfig(**values)
    if cfg.task is None and cfg.reward is None:
        raise ValueError("pass --task {lexical,detox} or --reward module:function")
    if cfg.reward is not None and cfg.prompts is None and cfg.task is None:
        raise ValueError("--reward needs --prompts FILE.jsonl (or --task for its prompts)")
    try:
        cfg.validate()
    except ValueError as exc:
        name = preset_of(args)
        if name is None:
            raise
        from_preset = sorted(set(PRESETS[name]) - set(given))
        named = [k for k in from_preset if k in str(exc)]
        if not named and any(re.search(rf"\b{k}\b", str(exc)) for k in given):
            raise  # about flags given explicitly, not the preset's
        from_preset = named or from_preset
        raise ValueError(f"{exc} (preset {name} set {', '.join(from_preset)}; override them or pass "
                         f"--preset none)") from None
    return cfg


def validate(args) -> None:
    """Before any model is loaded: the config, the reward (imported now: a bad module fails
    here), the task's data (through ipa_fast.embedded) and the base/adapter defaults."""
    from . import loading
    from .rewards import load_reward

    cfg = config_from_args(args)
    args._reward = load_reward(cfg.reward) if cfg.reward else None
    if cfg.task and not cfg.prompts:
        loading.task_data_path(cfg.task, cfg.train_split)
    if cfg.base is None or cfg.adapter is None:
        from ipa_fast import embedded
        if cfg.base is None and cfg.api_base is None:
            embedded.base_path()
        if cfg.adapter is None:
            embedded.adapter_init_path()
    args._config = cfg


def describe_preset(args, cfg: TrainConfig) -> str | None:
    name = preset_of(args)
    if name is None:
        return None
    knobs = ", ".join(f"{k}={getattr(cfg, k)}" + ("" if getattr(cfg, k) == v else f" (preset {v})")
                      for k, v in PRESETS[name].items())
    return f"preset {name} (the shipped {name} adapter's recipe; explicit flags override): {knobs}"


def run(args) -> dict:
    from .trainer import train

    cfg = getattr(args, "_config", None) or config_from_args(args)
    line = describe_preset(args, cfg)
    if line:
        print(line)
    result = train(cfg, resume=args.resume, force=getattr(args, "force", False), reward=getattr(args, "_reward", None))
    from .trainer import summary_lines

    print("\n".join(summary_lines(result)))
    t = result["seconds_per_step"]
    if t:
        print("seconds per step: " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()))
    print(f"adapter: {result['adapter']}\ncheckpoint: {result['checkpoint']}\n"
          f"metrics: {result['metrics']}\nreward curve: {result['reward_curve']}")
    return result
