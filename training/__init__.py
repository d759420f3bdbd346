"""RL training of the policy adapter (docs/DESIGN.md §4): Quark and PPO through the tailored policy.

    from ipa_fast.training import TrainConfig, train
    summary = train(TrainConfig(algo="ppo", task="detox", steps=100, out="runs/detox"))

Modules: ``trainer`` (the loop), ``quark`` (control tokens, data pool), ``ppo`` (value head,
GAE, losses, KL controllers), ``rewards`` (plain-callable rewards), ``checkpoint`` (atomic,
exact-resume checkpoints), ``loading`` (models, prompts), ``cli`` / ``train.py`` (command line),
``bench`` (``ipa-fast bench train``).
"""
from .trainer import TrainConfig, Trainer, train

__all__ = ["TrainConfig", "Trainer", "train"]
