"""PPO pieces: value head, KL controllers, reward shaping, GAE, the clipped losses.

Shapes: per-token tensors are ``[B, R]`` (R = longest response in the batch) with a
``mask`` ``[B, R]`` marking real response tokens; masked positions never contribute.
The per-token reward is ``-kl_coef * KL_t`` at every token (KL_t is the exact full-vocabulary
KL(pi || pi_ref) of that position, from ``tailored_token_stats``, so it is never negative)
plus the sequence's score at its last token (Ziegler et al. 2019; TRL's legacy PPO).
"""
from __future__ import annotations

import torch
from torch import nn


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
