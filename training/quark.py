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
"""
from __future__ import annotations

import torch


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
