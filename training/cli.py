"""``ipa-fast train`` (and ``python training/train.py``): RL training of an adapter.

    ipa-fast train --task lexical --algo quark --steps 200 --out runs/lex
    ipa-fast train --reward my_rewards:polite --prompts prompts.jsonl --algo ppo --steps 100 --out runs/polite
    ipa-fast train --task lexical --algo quark --sft-steps 300 --sft-lr 1e-3 --steps 400 --out runs/lex
    ipa-fast train ... --resume          # continue a killed run in --out up to --steps

Every :class:`~ipa_fast.training.TrainConfig` field is a flag (``--batch-size``, ``--kl-coef``,
...). Models default to the shipped base and adapter once they exist, and until then to a
seeded tiny GPT-2 pair over the GPT-2 tokenizer (random weights: the run exercises the
machinery but the text is noise).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from .trainer import TrainConfig

HELP = {
    "algo": "quark (reward-quantile control tokens, the official IPA recipe) or ppo",
    "out": "run directory: metrics.jsonl, reward_curve.png, samples.txt, checkpoints/, adapter/",
    "steps": "the run's total number of steps; --resume continues up to it",
    "task": "built-in task: lexical (concept coverage) or detox (1 - offensive probability); "
            "uses data/tasks/<task>/{train,validation}.jsonl and the task's reward",
    "reward": "custom reward 'module:function' or 'file.py:function': "
              "fn(prompts, completions, **fields) -> list[float]",
    "prompts": "JSON lines {\"prompt\": ..., <field>: ...}; extra fields go to the reward by name",
    "eval_prompts": "held-out JSON lines (default: the task's validation split, else the last "
                    "--eval-size rows of --prompts)",
    "base": "base model (HF directory or hub name). Default: the shipped base once it exists, "
            "else a seeded tiny random GPT-2 over the GPT-2 tokenizer",
    "adapter": "initial adapter (HF directory or hub name). Default: the shipped adapter "
               "initialisation once it exists, else a seeded tiny random GPT-2",
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
    "backend": "sampler backend for rollouts (auto, reference, cpu, triton, cuda)",
    "reward_timeout": "seconds one reward call may take before the run stops with an error (the last "
                      "checkpoint stays intact); 0 = no limit",
}
CHOICES = {"sft_target": ["tailored", "adapter"], "algo": ["quark", "ppo"], "task": ["lexical", "detox"], "reference": ["initial", "base"],
           "lr_schedule": ["constant", "linear"]}


def _base_type(tp):
    """``int | None`` -> int; the plain type otherwise."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_arguments(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(hints[f.name])
        help_text = HELP.get(f.name, "") + f" (default: {f.default})"
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=tp, default=f.default, choices=CHOICES.get(f.name),
                                metavar=None if f.name in CHOICES else f.name.upper(), help=help_text)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its newest good checkpoint up to --steps")
    parser.add_argument("--force", action="store_true",
                        help="with --resume: continue even if the checkpoint was made with other settings "
                             "(seed, lr, batch size, prompts, ...); the new ones apply from the next step")
    parser.epilog = __doc__


def config_from_args(args) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**values)
    if cfg.task is None and cfg.reward is None:
        raise ValueError("pass --task {lexical,detox} or --reward module:function")
    if cfg.reward is not None and cfg.prompts is None and cfg.task is None:
        raise ValueError("--reward needs --prompts FILE.jsonl (or --task for its prompts)")
    cfg.validate()
    return cfg


def run(args) -> dict:
    from .trainer import train

    cfg = config_from_args(args)
    result = train(cfg, resume=args.resume, force=args.force)
    fe, ie = result["final_eval"], result["initial_eval"]
    print(f"{cfg.algo}: {result['steps']} steps; held-out reward {ie['reward']:.4f} -> {fe['reward']:.4f}")
    t = result["seconds_per_step"]
    if t:
        print("seconds per step: " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()))
    print(f"adapter: {result['adapter']}\ncheckpoint: {result['checkpoint']}\n"
          f"metrics: {result['metrics']}\nreward curve: {result['reward_curve']}")
    return result
