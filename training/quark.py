"""Quark pieces: reward-quantile control tokens on the adapter and the growing data pool.

Quark (Lu et al. 2022), as the official IPA code uses it with the tailored policy:
every sample ever drawn goes into a pool that is never emptied; the pool is sorted by reward
and cut into ``n_quantiles`` equal parts; part ``q`` (0 = best) is tagged with control token
``q``. Training minimises, per response token, the NLL of the tailored policy with the
sample's control token prepended to the *adapter's* input (the base sees the plain prompt),
plus ``kl_coef * KL(pi || pi_ref)`` minus ``entropy_coef * H(pi)``. Rollouts and inference
condition the adapter on the best token.

Control tokens are extra input-only embedding rows of the adapter (ids >= V): the adapter's
output logits are trimmed to the shared vocabulary before mixing, so they are never emitted.
New rows are drawn from N(mean, std) of the existing embedding rows, per dimension, as Quark does.

:class:`Quark` is the algorithm (its settings: :class:`QuarkConfig`); its :meth:`Quark.step`
takes one rollout's samples and rewards, adds them to the pool and makes ``quark_updates``
optimiser steps on pool minibatches.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .algorithm import RLAlgorithm, Updater, config_view, step_seed
from .policy import Policy
from .ppo import make_kl_controller


def add_control_tokens(adapter, n: int, generator: torch.Generator | None = None) -> list[int]:
    """Append ``n`` input embedding rows to ``adapter``; return their ids (best first)."""
    emb = adapter.get_input_embeddings()
    n_in = emb.weight.shape[0]
    adapter.resize_token_embeddings(n_in + n, mean_resizing=False)
    with torch.no_grad():
        weight = adapter.get_input_embeddings().weight
        old = weight[:n_in].float()
        mean, std = old.mean(0), old.std(0)
        new = torch.randn(n, weight.shape[1], generator=generator) * std + mean
        weight[n_in:] = new.to(weight.dtype)
    return list(range(n_in, n_in + n))


class DataPool:
    """Every sample so far with its reward; quantile ``q`` of sample ``i`` by reward rank.

    Entries are plain Python values (a checkpoint stores them as they are).
    """

    def __init__(self, n_quantiles: int):
        if n_quantiles < 1:
            raise ValueError(f"n_quantiles must be >= 1, got {n_quantiles}")
        self.n_quantiles = n_quantiles
        self.prompt_ids: list[list[int]] = []
        self.response_ids: list[list[int]] = []
        self.rewards: list[float] = []
        self.quantiles: list[int] = []

    def __len__(self) -> int:
        return len(self.rewards)

    def add(self, prompt_ids, response_ids, rewards) -> None:
        self.prompt_ids += [list(p) for p in prompt_ids]
        self.response_ids += [list(r) for r in response_ids]
        self.rewards += [float(r) for r in rewards]
        self._requantise()

    def _requantise(self) -> None:
        """Sort by reward (best first, ties by insertion order) into equal-size quantiles."""
        n = len(self.rewards)
        order = sorted(range(n), key=lambda i: (-self.rewards[i], i))
        self.quantiles = [0] * n
        for rank, i in enumerate(order):
            self.quantiles[i] = min(self.n_quantiles - 1, rank * self.n_quantiles // n)

    def sample(self, k: int, generator: torch.Generator) -> list[int]:
        """``k`` pool indices drawn uniformly without replacement (all of them if k >= len)."""
        perm = torch.randperm(len(self), generator=generator).tolist()
        return perm[:k]

    def state_dict(self) -> dict:
        return {"n_quantiles": self.n_quantiles, "prompt_ids": self.prompt_ids,
                "response_ids": self.response_ids, "rewards": self.rewards}

    def load_state_dict(self, state: dict) -> None:
        self.n_quantiles = state["n_quantiles"]
        self.prompt_ids, self.response_ids = state["prompt_ids"], state["response_ids"]
        self.rewards = state["rewards"]
        self._requantise()


@dataclass(frozen=True)
class QuarkConfig:
    """Quark's settings: a view of TrainConfig (``quark_updates`` is ``updates`` here), built by
    :meth:`view`; the defaults are TrainConfig's only."""
    seed: int
    n_quantiles: int
    updates: int  # optimiser steps on pool minibatches per rollout
    minibatch_size: int  # pool samples per optimiser step
    kl_coef: float  # the KL term's coefficient (the controller's start)
    kl_target: float | None
    kl_horizon: float
    entropy_coef: float

    @classmethod
    def view(cls, config) -> "QuarkConfig":
        return config_view(cls, config, "quark_")


class Quark(RLAlgorithm):
    """Quark on a :class:`~ipa_fast.training.policy.Policy` (see the module docstring)."""
    name = "quark"
    kl_key = "quark/kl"  # the KL to the reference its step logs (per token)
    Config = QuarkConfig

    def __init__(self, config: QuarkConfig):
        self.cfg = config
        self.control_ids: list[int] = []
        self.pool = DataPool(config.n_quantiles)
        self.kl_ctl = make_kl_controller(config.kl_coef, config.kl_target, config.kl_horizon)
        self.policy: Policy | None = None
        self.updater: Updater | None = None

    def prepare_adapter(self, adapter) -> list[int]:
        """Add the control tokens to ``adapter``; return the adapter's inference prefix (the
        best token)."""
        gen = torch.Generator().manual_seed(step_seed(self.cfg.seed, 0, 7))
        self.control_ids = add_control_tokens(adapter, self.cfg.n_quantiles, gen)
        return self.control_ids[:1]

    def backward(self, idx: list[int]) -> dict:
        """Accumulate the Quark loss gradient of pool samples ``idx`` (split into
        ``grad_accum`` micro-batches; normalised by the minibatch's token count)."""
        pool = self.pool
        n_tokens = sum(len(pool.response_ids[i]) for i in idx)
        sums = {"loss": 0.0, "nll": 0.0, "kl": 0.0, "entropy": 0.0}
        for micro in self.updater.micro_batches(idx):
            st = self.policy.token_stats([pool.prompt_ids[i] for i in micro],
                                         [[self.control_ids[pool.quantiles[i]]] for i in micro],
                                         [pool.response_ids[i] for i in micro])
            m = st["mask"]
            nll, kl, ent = -(st["logprob"] * m).sum(), (st["kl"] * m).sum(), (st["entropy"] * m).sum()
            loss = (nll + self.kl_ctl.value * kl - self.cfg.entropy_coef * ent) / n_tokens
            loss.backward()
            for k, v in (("loss", loss * n_tokens), ("nll", nll), ("kl", kl), ("entropy", ent)):
                sums[k] += float(v.detach())
        return {k: v / n_tokens for k, v in sums.items()}

    def step(self, step: int, prompt_ids, responses, scores) -> dict:
        """Pool the rollout's samples with their (shaped) scores, then ``updates`` optimiser
        steps on pool minibatches; the mean statistics as ``quark/...``."""
        c = self.cfg
        self.pool.add(prompt_ids, responses, scores)
        stats = []
        for u in range(c.updates):
            g = torch.Generator().manual_seed(step_seed(c.seed, step, 2, u))
            s = self.backward(self.pool.sample(c.minibatch_size, g))
            s["grad_norm"] = self.updater.step()
            stats.append(s)
        mean = {f"quark/{k}": float(np.mean([s[k] for s in stats])) for k in stats[0]}
        self.kl_ctl.update(mean["quark/kl"], c.minibatch_size * c.updates)
        mean["quark/pool_size"] = len(self.pool)
        return mean

    def state_dict(self) -> dict:
        return {"value_head": None, "kl_controller": self.kl_ctl.state_dict(), "pool": self.pool.state_dict(),
                "control_ids": self.control_ids}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.pool.load_state_dict(state["pool"])
        self.control_ids = list(state["control_ids"])
        self.policy.adapter_prefix = self.control_ids[:1]
