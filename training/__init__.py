"""RL training of the policy adapter (docs/DESIGN.md §4): Quark and PPO through the tailored policy.

    from ipa_fast.training import TrainConfig, train
    summary = train(TrainConfig(algo="ppo", task="detox", steps=100, out="runs/detox"))

Modules: ``trainer`` (TrainConfig and the loop), ``policy`` (the frozen base, the trained adapter
and any frozen experts, and their teacher-forced forward), the algorithms ``sft`` (supervised warm
start), ``quark`` (control tokens, data pool, the Quark step) and ``ppo`` (value head, GAE,
losses, KL controllers, the PPO step), ``algorithm`` (what they share: the optimiser, seeds, the
protocol the loop calls), ``rewards`` (plain-callable rewards), ``checkpoint`` (atomic,
exact-resume checkpoints), ``loading`` (models, frozen experts, prompts), ``cli`` / ``train.py``
(command line), ``bench`` (``ipa-fast bench train``).
"""
from .trainer import TrainConfig, Trainer, train

__all__ = ["TrainConfig", "Trainer", "train"]
