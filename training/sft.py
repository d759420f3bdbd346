"""Supervised warm start: the first ``sft_steps`` steps of a run minimise the NLL of each prompt
row's target text (its ``sft_field``, tokenised, plus EOS).

Two targets (``sft_target``): ``"tailored"``, the NLL of the whole product of experts (the
adapter learns a residual on the base and the frozen experts; the adapter sees its inference
prefix), and ``"adapter"``, the adapter's own NLL with no other forward (teaches a small adapter
a skill the base lacks, e.g. copying prompt words, at a fraction of the cost). After the warm
start the run's loop makes the warm-started adapter the KL reference, as RLHF's reference is its
SFT model.
"""
from __future__ import annotations

from dataclasses import dataclass

from .algorithm import Updater, config_view
from .policy import Policy


@dataclass(frozen=True)
class SFTConfig:
    """The warm start's settings: a view of TrainConfig's ``sft_*`` fields, built by :meth:`view`;
    the defaults are TrainConfig's only."""
    steps: int
    field: str
    target: str
    max_new_tokens: int  # targets are cut to max_new_tokens - 1 tokens, then EOS

    @classmethod
    def view(cls, config) -> "SFTConfig":
        return config_view(cls, config, "sft_")


class WarmStart:
    """Supervised steps on the policy's adapter; :meth:`step` is one optimiser step."""

    def __init__(self, config: SFTConfig, policy: Policy, updater: Updater):
        self.cfg, self.policy, self.updater = config, policy, updater

    def targets(self, rows: list[dict]) -> list[list[int]]:
        """The warm-start target of each row: its ``field`` text, tokenised, plus EOS."""
        name = self.cfg.field
        missing = [i for i, r in enumerate(rows) if not isinstance(r.get(name), str) or not r[name]]
        if missing:
            raise ValueError(f"sft_steps needs a non-empty {name!r} text in every training prompt row; "
                             f"row {missing[0]} has none: {rows[missing[0]]!r}")
        tok = self.policy.tokenizer
        return [tok(r[name], add_special_tokens=False)["input_ids"][: self.cfg.max_new_tokens - 1]
                + [tok.eos_token_id] for r in rows]

    def step(self, step: int, rows: list[dict]) -> dict:
        """One optimiser step on the NLL of the rows' targets (``grad_accum`` micro-batches)
        under the tailored policy, or under the adapter alone with ``target="adapter"``."""
        policy = self.policy
        policy.adapter.eval()
        prompt_ids = policy.encode([r["prompt"] for r in rows])
        targets = self.targets(rows)
        n_tokens = sum(len(t) for t in targets)
        nll_sum = 0.0
        for micro in self.updater.micro_batches(list(range(len(rows)))):
            args = ([prompt_ids[i] for i in micro], [policy.adapter_prefix] * len(micro), [targets[i] for i in micro])
            if self.cfg.target == "adapter":
                nll = policy.adapter_nll(*args)
            else:
                st = policy.token_stats(*args, kl=False, eos_mask=False)
                nll = -(st["logprob"] * st["mask"]).sum()
            (nll / n_tokens).backward()
            nll_sum += float(nll.detach())
        return {"sft/nll": nll_sum / n_tokens, "sft/grad_norm": self.updater.step()}
