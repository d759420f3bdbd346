"""PPO pieces: value head, KL controllers, reward shaping, GAE, the clipped losses.

Shapes: per-token tensors are ``[B, R]`` (R = longest response in the batch) with a
``mask`` ``[B, R]`` marking real response tokens; masked positions never contribute.
The per-token reward is ``-kl_coef * KL_t`` at every token (KL_t is the exact full-vocabulary
KL(pi || pi_ref) of that position, from ``tailored_token_stats``, so it is never negative)
plus the sequence's score at its last token (Ziegler et al. 2019; TRL's legacy PPO).

:class:`PPO` is the algorithm (its settings: :class:`PPOConfig`); its :meth:`PPO.step` takes
one rollout's samples and scores and runs ``ppo_epochs`` epochs of clipped updates on them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .algorithm import RLAlgorithm, Updater, config_view, step_seed
from .policy import Policy


class ValueHead(nn.Module):
    """A scalar value per position from the adapter's last hidden state."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.summary.weight, std=0.02)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.float()).squeeze(-1)


class FixedKLController:
    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): ``coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon``."""

    def __init__(self, coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target}, {horizon}")
        super().__init__(coef)
        self.target, self.horizon = float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def make_kl_controller(coef: float, target: float | None, horizon: float) -> FixedKLController:
    """The adaptive controller when ``target`` is set, else the fixed coefficient."""
    return AdaptiveKLController(coef, target, horizon) if target else FixedKLController(coef)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def shape_scores(scores: torch.Tensor, whiten: bool, clip: float | None) -> torch.Tensor:
    """Batch-whiten (optional) then clip (optional) the sequence scores ``[B]``."""
    scores = scores.float()
    if whiten and scores.numel() > 1:
        scores = (scores - scores.mean()) / (scores.std(unbiased=False) + 1e-8)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """``-kl_coef * KL_t`` per token plus the score at each row's last response token."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rows = torch.arange(len(scores))
    rewards[rows, last] += scores * (mask.sum(1) > 0)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over right-padded ``[B, R]`` tensors.

    Returns ``(advantages, returns)``; the value after the last real token is 0 (episode end).
    """
    B, R = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype)
    next_value = torch.zeros(B, dtype=rewards.dtype)
    for t in reversed(range(R)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = torch.where(m > 0, delta + gamma * lam * last, last)
        adv[:, t] = last * m
        next_value = torch.where(m > 0, values[:, t], next_value)
    return adv, adv + values * mask


def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange: float, normaliser: float):
    """Clipped surrogate, summed over tokens and divided by ``normaliser`` (the number of
    tokens in the whole minibatch, so accumulated micro-batches add up to the minibatch)."""
    ratio = torch.exp(logprobs - old_logprobs)
    loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    stats = {"clipfrac": ((ratio - 1).abs() > cliprange).float(), "ratio": ratio,
             "approx_kl": 0.5 * (logprobs - old_logprobs) ** 2}
    return (loss * mask).sum() / normaliser, {k: (v * mask).sum().item() for k, v in stats.items()}


def value_loss(values, old_values, returns, mask, cliprange_value: float, normaliser: float):
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    loss = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    clipfrac = ((values - clipped).abs() > 0).float()
    return (loss * mask).sum() / normaliser, {"value_clipfrac": (clipfrac * mask).sum().item()}


@dataclass(frozen=True)
class PPOConfig:
    """PPO's settings: a view of TrainConfig (``ppo_epochs`` is ``epochs`` here), built by
    :meth:`view`; the defaults are TrainConfig's only."""
    seed: int
    epochs: int
    minibatch_size: int
    cliprange: float
    cliprange_value: float
    vf_coef: float
    gamma: float
    lam: float
    whiten_scores: bool
    score_clip: float | None
    early_stop_kl: float | None
    kl_coef: float
    kl_target: float | None
    kl_horizon: float

    @classmethod
    def view(cls, config) -> "PPOConfig":
        return config_view(cls, config, "ppo_")


class PPO(RLAlgorithm):
    """PPO on a :class:`~ipa_fast.training.policy.Policy`, with a value head on the adapter's
    last hidden state."""
    name = "ppo"
    kl_key = "ppo/kl_seq"  # the KL to the reference its step logs (per sequence)
    Config = PPOConfig

    def __init__(self, config: PPOConfig):
        self.cfg = config
        self.kl_ctl = make_kl_controller(config.kl_coef, config.kl_target, config.kl_horizon)
        self.value_head: ValueHead | None = None
        self.policy: Policy | None = None
        self.updater: Updater | None = None

    def attach(self, policy: Policy, updater: Updater) -> list[torch.nn.Parameter]:
        """Train ``policy`` with ``updater``; create the value head (seeded from the config's
        seed) and return its parameters, which the optimiser trains with the adapter's."""
        self.policy, self.updater = policy, updater
        hidden = policy.adapter.get_input_embeddings().weight.shape[1]
        torch.manual_seed(step_seed(self.cfg.seed, 0, 8))
        self.value_head = ValueHead(hidden).to(next(policy.adapter.parameters()).device)
        return list(self.value_head.parameters())

    def prepare(self, prompt_ids, responses, scores) -> dict:
        """Old log-probs, values, per-token rewards, advantages and returns of a rollout."""
        c = self.cfg
        prefixes = [self.policy.adapter_prefix] * len(responses)
        with torch.no_grad():
            old = self.policy.token_stats(prompt_ids, prefixes, responses, value_head=self.value_head)
        m = old["mask"]
        shaped = shape_scores(torch.tensor(scores), c.whiten_scores, c.score_clip)
        rewards = token_rewards(shaped, old["kl"], m, self.kl_ctl.value)
        adv, returns = gae(rewards, old["values"], m, c.gamma, c.lam)
        adv = masked_whiten(adv, m) * m
        return {"prompt_ids": prompt_ids, "prefixes": prefixes, "responses": responses, "mask": m,
                "old_logprob": old["logprob"], "old_values": old["values"], "kl": old["kl"],
                "entropy": old["entropy"], "advantages": adv, "returns": returns}

    def backward(self, data: dict, idx: list[int]) -> dict:
        """Accumulate the PPO loss gradient of rollout rows ``idx`` (``grad_accum``
        micro-batches; normalised by the minibatch's token count)."""
        c = self.cfg
        n_tokens = float(data["mask"][idx].sum())
        sums: dict[str, float] = {}
        for micro in self.updater.micro_batches(idx):
            st = self.policy.token_stats([data["prompt_ids"][i] for i in micro], [data["prefixes"][i] for i in micro],
                                         [data["responses"][i] for i in micro], value_head=self.value_head)
            R = st["mask"].shape[1]
            sel = lambda k: data[k][micro][:, :R]  # noqa: E731 - rows padded to the rollout's width
            m = st["mask"]
            pl, ps = policy_loss(st["logprob"], sel("old_logprob"), sel("advantages"), m, c.cliprange, n_tokens)
            vl, vs = value_loss(st["values"], sel("old_values"), sel("returns"), m, c.cliprange_value, n_tokens)
            (pl + c.vf_coef * vl).backward()
            for k, v in {"policy_loss": float(pl.detach()) * n_tokens, "value_loss": float(vl.detach()) * n_tokens,
                         **ps, **vs}.items():
                sums[k] = sums.get(k, 0.0) + v
        return {k: v / n_tokens for k, v in sums.items()}

    def step(self, step: int, prompt_ids, responses, scores) -> dict:
        """``epochs`` epochs of shuffled minibatch updates on one rollout (stopping early when
        the approximate KL(old || new) exceeds 1.5 x ``early_stop_kl``); statistics as ``ppo/...``."""
        c = self.cfg
        data = self.prepare(prompt_ids, responses, scores)
        B = len(responses)
        stats, stopped = [], False
        for epoch in range(c.epochs):
            g = torch.Generator().manual_seed(step_seed(c.seed, step, 3, epoch))
            perm = torch.randperm(B, generator=g).tolist()
            for s in range(0, B - c.minibatch_size + 1, c.minibatch_size):
                st = self.backward(data, perm[s:s + c.minibatch_size])
                st["grad_norm"] = self.updater.step()
                stats.append(st)
                if c.early_stop_kl is not None and st["approx_kl"] > 1.5 * c.early_stop_kl:
                    stopped = True
                    break
            if stopped:
                break
        m = data["mask"]
        seq_kl = float((data["kl"] * m).sum(1).mean())
        out = {f"ppo/{k}": float(np.mean([s[k] for s in stats])) for k in stats[0]}
        out.update({"ppo/ratio_first": stats[0]["ratio"], "ppo/early_stopped": stopped,
                    "ppo/updates": len(stats), "ppo/kl_seq": seq_kl,
                    "ppo/entropy": float(masked_mean(data["entropy"], m)),
                    "ppo/returns_mean": float(masked_mean(data["returns"], m))})
        self.kl_ctl.update(seq_kl, B)
        return out

    def state_dict(self) -> dict:
        return {"value_head": self.value_head.state_dict(), "kl_controller": self.kl_ctl.state_dict(),
                "pool": None, "control_ids": []}

    def load_state_dict(self, state: dict) -> None:
        self.value_head.load_state_dict(state["value_head"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
