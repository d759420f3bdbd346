"""What every training algorithm shares: its settings as a view of the flat config, seeds,
micro-batches, one clipped AdamW step, the learning-rate schedule, and the protocol the training
loop calls (:class:`RLAlgorithm`).

One :class:`Updater` per run holds AdamW over the trained parameters (the adapter's, then PPO's
value head) and its LambdaLR schedule; the supervised warm start and the RL algorithm both step
it, so a run that warm-starts then switches to RL keeps one optimiser state (and one checkpoint
layout: ``optimizer`` and ``scheduler``).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch


def config_view(cls, config, prefix: str = ""):
    """``cls`` (the dataclass of one algorithm's settings) filled from the flat ``config``
    (:class:`~ipa_fast.training.TrainConfig`, the one the user sets): field ``x`` reads
    ``config.<prefix>x`` where that exists, else ``config.x``."""
    return cls(**{f.name: getattr(config, prefix + f.name) if hasattr(config, prefix + f.name)
                  else getattr(config, f.name) for f in dataclasses.fields(cls)})


def step_seed(*parts: int) -> int:
    """A 62-bit seed from integers (config seed, step, purpose, ...), stable across runs."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]) >> 2


def micro_batches(idx: list[int], grad_accum: int) -> list[list[int]]:
    """``idx`` cut into ``grad_accum`` consecutive micro-batches (the last may be shorter)."""
    size = max(1, math.ceil(len(idx) / grad_accum))
    return [idx[i:i + size] for i in range(0, len(idx), size)]


class Updater:
    """AdamW + LambdaLR over the trained parameters, gradient accumulation and clipping.

    ``config`` is the run's :class:`~ipa_fast.training.TrainConfig` (lr, adam_eps, weight_decay,
    max_grad_norm, grad_accum, warmup_steps, lr_schedule, steps, and sft_steps / sft_lr for the
    warm start's learning rate). :meth:`build` creates the optimiser once the parameters exist.
    """

    def __init__(self, config):
        self.cfg = config
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None

    def build(self, params: list[torch.nn.Parameter]) -> None:
        c = self.cfg
        self.optimizer = torch.optim.AdamW(params, lr=c.lr, eps=c.adam_eps, weight_decay=c.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)

    def lr_factor(self, step: int) -> float:
        """The learning rate of optimiser step ``step + 1`` over ``lr`` (LambdaLR's step k is the
        (k+1)-th optimiser step): ``sft_lr / lr`` during the warm start, then warm-up x decay."""
        c = self.cfg
        if step < c.sft_steps:
            return (c.sft_lr or c.lr) / c.lr
        warm = min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps else 1.0
        decay = max(0.0, 1.0 - step / max(1, c.steps)) if c.lr_schedule == "linear" else 1.0
        return warm * decay

    def micro_batches(self, idx: list[int]) -> list[list[int]]:
        return micro_batches(idx, self.cfg.grad_accum)

    def step(self) -> float:
        """Clip the accumulated gradient (``max_grad_norm``, 0 = no clipping), step, zero it;
        return the gradient norm before clipping."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def last_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def follow_config(self) -> None:
        """After a forced resume: the optimiser and schedule follow this run's settings (the
        checkpoint's would otherwise stay in force)."""
        c = self.cfg
        for g in self.optimizer.param_groups:
            g.update(initial_lr=c.lr, eps=c.adam_eps, weight_decay=c.weight_decay)
        self.scheduler.base_lrs = [c.lr] * len(self.optimizer.param_groups)
        factor = self.lr_factor(self.scheduler.last_epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = c.lr * factor
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]


class RLAlgorithm:
    """The protocol between the training loop and an RL algorithm (Quark, PPO).

    The loop builds it from its settings (``Algo(Algo.Config.view(train_config))``), then calls
    :meth:`prepare_adapter` on the adapter before the policy exists (Quark adds its control
    tokens there), :meth:`attach` once the policy and the updater exist (PPO creates its value
    head; the returned parameters join the optimiser after the adapter's), :meth:`step` once per
    rollout, and :meth:`state_dict` / :meth:`load_state_dict` for checkpoints (their keys are
    the checkpoint's: ``value_head``, ``kl_controller``, ``pool``, ``control_ids``). ``kl_ctl``
    is the KL coefficient's controller, ``kl_key`` the per-step KL its records carry.
    """
    name = ""
    kl_key = ""

    def prepare_adapter(self, adapter) -> list[int]:
        """Change ``adapter`` before the policy is built; return its inference prefix."""
        return []

    def attach(self, policy, updater: Updater) -> list[torch.nn.Parameter]:
        """Train ``policy`` with ``updater``; return the parameters this algorithm adds."""
        self.policy, self.updater = policy, updater
        return []

    def step(self, step: int, prompt_ids, responses, scores) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def follow_config(self) -> None:
        """After a forced resume: a fixed KL coefficient follows this run's setting."""
        if not self.cfg.kl_target:
            self.kl_ctl.value = float(self.cfg.kl_coef)
