"""The training loop for the adapter: a supervised warm start, then Quark or PPO, through the
tailored policy.

    from ipa_fast.training import TrainConfig, train
    result = train(TrainConfig(algo="quark", task="lexical", steps=200, out="runs/lex"))

Three parts (docs/DESIGN.md §4.2):

- **the policy** (:mod:`.policy`): the frozen base, the trained adapter and any other frozen
  experts (``frozen_adapters``), pi = softmax((base + alpha * adapter + sum_j w_j * frozen_j) / T),
  and its teacher-forced forward (:meth:`Policy.token_stats`: every model over left-padded prompt
  + response with position ids from the attention mask, logits trimmed to V, then
  :func:`ipa_fast.ops.token_stats.experts_token_stats` for log pi, H(pi) and KL(pi || pi_ref)).
  PPO's old log-probs come from the same function, so the ratio is exactly 1 before the first
  update; with the initial adapter as reference, KL is exactly 0.
- **the algorithms**, each with its settings (a view of :class:`TrainConfig`) and a step on a
  batch: the supervised warm start (:mod:`.sft`), Quark (:mod:`.quark`), PPO (:mod:`.ppo`);
  what they share (one optimiser, seeds, the protocol) is :mod:`.algorithm`.
- **the loop** (here, :class:`Trainer`): one step = prompts -> rollout -> reward -> the
  algorithm's update (or a warm-start step); evaluation, logging, checkpoints and resume.
  The rollout is ``TailoredLM.generate`` sampling pi (the adapter sees its own prefix, Quark's
  best reward token; the frozen experts theirs; the base the plain prompt), seeded from
  (config seed, step, row) so a resumed run draws the same samples. The reward is the plain
  callable, checked (one finite float per completion) and given ``reward_timeout`` seconds (it
  runs in a worker thread); a failure or a timeout keeps a checkpoint of the last completed
  step, then stops the run with the reward's message.

Models stay in eval mode (dropout off) throughout; the base and the frozen experts never get
gradients; only the adapter (and PPO's value head) are in the optimiser. Every step appends a
JSON line to ``<out>/metrics.jsonl``; evaluation every ``eval_every`` steps (docs/DESIGN.md §6
decoding: T = 1, top_p = 0.9, 32 new tokens, fixed seeds) appends to it, prints a sample table
and redraws ``<out>/reward_curve.png``; checkpoints go to ``<out>/checkpoints`` (see
checkpoint.py) and the final adapter to ``<out>/adapter`` (loadable with
``TailoredLM.from_pretrained``; its ipa_adapter.json names the frozen experts it was trained
with, to compose it with them).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ipa_fast import tasks
from ipa_fast.decoding.api_base import APIBase
from ipa_fast.decoding.tailored import save_adapter

from . import checkpoint as ckpt
from .algorithm import Updater, step_seed
from .policy import FrozenExpert, Policy, freeze_embedding_rows, zero_output  # noqa: F401 - importable here too
from .ppo import PPO
from .quark import Quark
from .rewards import RewardError, call_reward, reward_name
from .sft import SFTConfig, WarmStart

TIME_KEYS = ("time/rollout", "time/reward", "time/update", "time/eval", "time/step")
# settings a resumed run may change freely; any other difference needs force=True (--force)
RESUME_MAY_CHANGE = frozenset({"out", "steps", "progress", "checkpoint_every", "keep_checkpoints",
                               "reward_timeout", "sample_rows"})
# settings that shape the saved state itself: never changed on resume
RESUME_NEVER_CHANGES = frozenset({"algo", "n_quantiles"})


@dataclass
class TrainConfig:
    """Every knob of a run, as plain values (saved in each checkpoint and in ``<out>/config.json``)."""
    algo: str = "quark"                 # "quark" | "ppo"
    out: str = "runs/train"
    steps: int = 100                    # the run's total number of steps (resume continues to it)
    seed: int = 0
    # data and models (paths are recorded; the Python API may also pass objects to train())
    task: str | None = None             # a registered task (ipa_fast.tasks): built-in data + reward
    reward: str | None = None           # "module:function" or "file.py:function"
    prompts: str | None = None          # JSON lines {"prompt": ..., <fields>...}
    train_split: str = "train"          # with task and no prompts: the task's training file, "train"
                                        # or "warmstart" (lexical's best-of-4 rows, field "best")
    eval_prompts: str | None = None     # held-out JSON lines (default: the task's validation split,
                                        # else the last eval_size rows of --prompts)
    base: str | None = None
    adapter: str | None = None
    # a served base instead of --base (ipa_fast.decoding.api_base.APIBase): its URL, the top-K
    # log-probs asked per position (the sparse base, docs/DESIGN.md §2.10), its dialect (None:
    # detected) and the deadline of one call in seconds; the tokenizer comes from the adapter
    api_base: str | None = None
    api_top_k: int = 20
    api_dialect: str | None = None
    api_timeout: float = 60.0
    # a server that keys its log-probs by token text (llama-cpp-python): "error" fails on a key that
    # several ids print as (e.g. "" for EOS and partial bytes), "drop" leaves those ids out of the top-K
    api_ambiguous: str = "error"
    # other adapters in the product, frozen while this one trains: "DIR" or "DIR:WEIGHT" (weight
    # default: the adapter's saved alpha in its ipa_adapter.json, else 1); rollouts, the scored
    # policy, its KL reference and evaluation all include them
    frozen_adapters: list[str] = field(default_factory=list)
    # the tailored policy and rollouts
    alpha: float = 1.0
    temperature: float = 1.0
    top_k: int = 0                      # rollouts sample pi unfiltered by default: filtering makes
    top_p: float = 1.0                  # the sampling distribution differ from the scored one
    max_new_tokens: int = 32
    min_new_tokens: int = 0             # EOS is masked before this many tokens in rollouts and in
                                        # the scored policy (the official IPA code uses 16), so a
                                        # policy cannot earn its reward by stopping early;
                                        # evaluation keeps the protocol (no mask)
    backend: str = "auto"               # ipa_fast.sample backend for rollouts
    reference: str = "initial"          # KL reference: "initial" (base x frozen initial adapter) | "base"
    # optimisation
    batch_size: int = 16                # prompts per rollout
    minibatch_size: int = 8             # samples per optimiser step
    grad_accum: int = 1                 # micro-batches per minibatch (minibatch_size % grad_accum == 0)
    lr: float = 1e-4
    warmup_steps: int = 0
    lr_schedule: str = "constant"       # "constant" | "linear" (linear decay to 0 at `steps`)
    adam_eps: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0          # 0 = no clipping
    kl_coef: float = 0.05               # PPO: per-token KL penalty; Quark: KL term of the loss
    kl_target: float | None = None      # adaptive KL controller target (None = fixed kl_coef)
    kl_horizon: float = 10000.0
    # supervised warm start (0 = none): the first sft_steps steps minimise the tailored NLL of
    # each prompt's `sft_field` text (+ EOS) through the product of experts, the adapter seeing
    # its inference prefix (Quark: the best reward token); the KL reference is then the
    # warm-started adapter, as RLHF's reference is its SFT model
    sft_steps: int = 0
    sft_field: str = "reference"
    sft_lr: float | None = None         # default: lr
    sft_batch_size: int | None = None   # rows per warm-start step (default: batch_size)
    # "tailored": the NLL of the product of experts (the adapter learns a residual on the base);
    # "adapter": the adapter's own NLL, no base forward (teaches a small adapter a skill the base
    # lacks, e.g. copying prompt words, at a fraction of the cost; RL then runs on the product)
    sft_target: str = "tailored"
    # keep the adapter's first V embedding rows (the tied input embedding / output head it shares
    # with the base, e.g. an adapter cut from the base's first layers) fixed; rows >= V (Quark's
    # control tokens) still train. Such an adapter ships without the shared table.
    freeze_shared_embedding: bool = False
    # start the adapter's output at zero (its final norm's gain, and bias if any, set to 0 before
    # training, like LoRA's zero B): the untrained product of experts is then exactly the base, and
    # training learns a residual from there instead of first undoing a weak adapter's own logits
    zero_init_output: bool = False
    # train the adapter as a residual on its initial weights: the policy is base + alpha * (adapter -
    # initial adapter) (the initial adapter a frozen expert of weight -alpha), so the untrained
    # product is the base exactly and every parameter gets its full gradient from the first step
    # (with zero_init_output only the zeroed gain does, then gradients scale with it); the saved
    # ipa_adapter.json names the initial adapter (residual_of) and loading puts it back
    residual: bool = False
    # Quark
    n_quantiles: int = 5
    entropy_coef: float = 0.0
    quark_updates: int = 1              # optimiser steps on pool batches per rollout
    # PPO
    ppo_epochs: int = 4
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_scores: bool = True
    score_clip: float | None = None
    # reward shaping against degenerate loops (training only; evaluation reports the plain
    # reward): a sample's training score is reward - repeat_coef x the fraction of its token
    # bigrams that repeat an earlier bigram of the same sample. Reverse KL is mode-seeking: a
    # policy that loops on the reference's most likely phrase pays little KL, and a weak base
    # makes that loop cheap; this term prices it.
    repeat_coef: float = 0.0
    early_stop_kl: float | None = 1.0   # stop the PPO epochs when approx KL(old||new) > 1.5 x this
    # bookkeeping
    eval_every: int = 10                # 0 = only before and after training
    eval_size: int = 32
    eval_max_new_tokens: int = 32
    eval_top_p: float = 0.9
    eval_seed: int = 1234
    checkpoint_every: int = 10
    keep_checkpoints: int = 3
    sample_rows: int = 4                # rows in the printed sample table
    progress: bool = True
    reward_timeout: float | None = 600.0  # seconds one reward call may take; longer stops the run
                                          # (0 or None: no limit, the reward runs in the calling thread)

    def validate(self) -> None:
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)
        need(self.algo in ("quark", "ppo"), f"algo must be 'quark' or 'ppo', got {self.algo!r}")
        need(self.api_base is None or self.base is None,
             "api_base and base are mutually exclusive (--api-base, --base): with --api-base the base is the served model")
        need(self.api_base is None or (isinstance(self.api_base, str) and self.api_base.startswith(("http://", "https://"))),
             f"api_base must be an http(s) URL, got {self.api_base!r}")
        need(isinstance(self.api_top_k, int) and self.api_top_k >= 1, f"api_top_k must be an int >= 1, got {self.api_top_k!r}")
        from ipa_fast.decoding.api_base import AMBIGUOUS, DIALECTS
        need(self.api_dialect is None or self.api_dialect in DIALECTS,
             f"api_dialect must be one of {', '.join(DIALECTS)}, got {self.api_dialect!r}")
        need(self.api_timeout > 0, f"api_timeout must be > 0 seconds, got {self.api_timeout}")
        need(self.api_ambiguous in AMBIGUOUS, f"api_ambiguous must be 'error' or 'drop', got {self.api_ambiguous!r}")
        need(self.reference in ("initial", "base"), f"reference must be 'initial' or 'base', got {self.reference!r}")
        need(self.lr_schedule in ("constant", "linear"), f"lr_schedule must be 'constant' or 'linear', got {self.lr_schedule!r}")
        if self.task is not None:
            tasks.get(self.task)  # one line naming the known tasks otherwise
        from ipa_fast.embedded import TRAIN_FILES
        need(self.train_split in TRAIN_FILES,
             f"train_split must be one of {', '.join(TRAIN_FILES)} (held-out splits are never trained on), "
             f"got {self.train_split!r}")
        need(isinstance(self.steps, int) and self.steps >= 0, f"steps must be an int >= 0, got {self.steps!r}")
        for name in ("batch_size", "minibatch_size", "grad_accum", "max_new_tokens", "n_quantiles",
                     "quark_updates", "ppo_epochs", "eval_size", "eval_max_new_tokens", "keep_checkpoints",
                     "checkpoint_every"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.minibatch_size % self.grad_accum == 0,
             f"minibatch_size ({self.minibatch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        need(self.algo != "ppo" or self.minibatch_size <= self.batch_size,
             f"PPO minibatch_size ({self.minibatch_size}) must be <= batch_size ({self.batch_size})")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(isinstance(self.min_new_tokens, int) and 0 <= self.min_new_tokens <= self.max_new_tokens,
             f"min_new_tokens must be an int in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens!r}")
        need(isinstance(self.sft_steps, int) and 0 <= self.sft_steps <= self.steps,
             f"sft_steps must be an int in [0, steps={self.steps}], got {self.sft_steps!r}")
        need(self.sft_lr is None or self.sft_lr > 0, f"sft_lr must be > 0, got {self.sft_lr}")
        need(self.sft_batch_size is None or (isinstance(self.sft_batch_size, int) and self.sft_batch_size > 0),
             f"sft_batch_size must be a positive int, got {self.sft_batch_size!r}")
        need(self.sft_target in ("tailored", "adapter"),
             f"sft_target must be 'tailored' or 'adapter', got {self.sft_target!r}")
        need(not (self.residual and self.zero_init_output),
             "residual and zero_init_output are two ways to start from the base alone: choose one")
        need(not (self.residual and self.algo == "quark"),
             "residual needs algo 'ppo' (Quark's control tokens are rows the initial adapter does not have)")
        need(self.temperature > 0, f"temperature must be > 0 for training, got {self.temperature}")
        need(0 < self.top_p <= 1 and 0 < self.eval_top_p <= 1, "top_p and eval_top_p must be in (0, 1]")
        need(self.kl_coef >= 0 and self.entropy_coef >= 0, "kl_coef and entropy_coef must be >= 0")
        need(self.repeat_coef >= 0, f"repeat_coef must be >= 0, got {self.repeat_coef}")
        need(self.kl_target is None or self.kl_target > 0, f"kl_target must be > 0, got {self.kl_target}")
        need(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}")
        need(self.reward_timeout is None or self.reward_timeout >= 0,
             f"reward_timeout must be >= 0 seconds (0 = no limit), got {self.reward_timeout}")
        need(isinstance(self.frozen_adapters, (list, tuple)) and all(isinstance(x, str) for x in self.frozen_adapters),
             f"frozen_adapters must be a list of 'DIR' or 'DIR:WEIGHT' strings, got {self.frozen_adapters!r}")
        from .loading import parse_frozen_adapter
        for i, text in enumerate(self.frozen_adapters):
            parse_frozen_adapter(text, f"frozen_adapters[{i}]")


ALGORITHMS = {A.name: A for A in (Quark, PPO)}


class Trainer:
    """One run: the policy (:class:`~ipa_fast.training.policy.Policy`), the supervised warm start
    (:class:`~ipa_fast.training.sft.WarmStart`), the RL algorithm (:class:`~ipa_fast.training.quark.Quark`
    or :class:`~ipa_fast.training.ppo.PPO`), one optimiser (:class:`~ipa_fast.training.algorithm.Updater`)
    and the loop around them; :meth:`fit` runs it to ``config.steps``.

    ``frozen_experts``: the other frozen experts of the product (a list of
    :class:`~ipa_fast.training.policy.FrozenExpert`); default: loaded from
    ``config.frozen_adapters``.
    """

    def __init__(self, config: TrainConfig, base, adapter, tokenizer, reward: Callable,
                 train_rows: list[dict], eval_rows: list[dict], frozen_experts: list[FrozenExpert] | None = None):
        config.validate()
        if not train_rows:
            raise ValueError("no training prompts")
        if config.freeze_shared_embedding and config.weight_decay:
            raise ValueError("freeze_shared_embedding needs weight_decay 0 (decay would move the shared rows)")
        self.cfg, self.reward, self.tokenizer = config, reward, tokenizer
        self.train_rows, self.eval_rows = train_rows, eval_rows
        self.out = Path(config.out)
        if frozen_experts is None:
            from .loading import load_frozen_experts
            device = next((adapter if isinstance(base, APIBase) else base).parameters()).device
            frozen_experts = load_frozen_experts(config.frozen_adapters, tokenizer, device)
        # residual_of: what the saved ipa_adapter.json names as the initial weights
        self.residual_expert, self.residual_of = None, None
        if config.residual:  # the initial adapter, frozen, at -alpha (before any training changes it)
            from ipa_fast.decoding.residual import residual_record
            # the initial adapter's directory and hashes; an adapter passed as a model has none
            # (then the saved adapter cannot be loaded back as a residual, and says so when tried)
            self.residual_of = (residual_record(config.adapter) if config.adapter and Path(str(config.adapter)).is_dir()
                                else {"name": None, "embedded": False, "sha256": {}})
            self.residual_expert = FrozenExpert(model=copy.deepcopy(adapter).eval(), weight=-config.alpha,
                                                name=self.residual_of["name"] or "", sha256=self.residual_of["sha256"])
            frozen_experts = list(frozen_experts) + [self.residual_expert]
        algo = ALGORITHMS[config.algo]
        self.rl = algo(algo.Config.view(config))
        prefix = self.rl.prepare_adapter(adapter.eval())  # Quark: its control tokens, before the policy exists
        self.policy = Policy(base, adapter, tokenizer, alpha=config.alpha, temperature=config.temperature,
                             min_new_tokens=config.min_new_tokens, frozen=frozen_experts, reference=config.reference,
                             adapter_prefix=prefix, zero_init_output=config.zero_init_output,
                             freeze_shared_embedding=config.freeze_shared_embedding)
        self.updater = Updater(config)
        extra = self.rl.attach(self.policy, self.updater)  # PPO: its value head
        self.updater.build(self.policy.trainable_parameters() + extra)
        self.warm_start = WarmStart(SFTConfig.view(config), self.policy, self.updater)
        self.step = 0
        self.initial_eval: dict | None = None
        self.last_eval: dict | None = None
        self.last_samples: list[dict] = []
        self._base_emb_sha: str | None = None  # the base's embedding, hashed once (checkpoints name it)

    # ------------------------------------------------------------------------------------
    # the parts, under the names the loop's callers (tests, scripts) use

    base = property(lambda self: self.policy.base)
    adapter = property(lambda self: self.policy.adapter)
    ref_adapter = property(lambda self: self.policy.ref_adapter)
    lm = property(lambda self: self.policy.lm)
    V = property(lambda self: self.policy.V)
    pad_id = property(lambda self: self.policy.pad_id)
    optimizer = property(lambda self: self.updater.optimizer)
    scheduler = property(lambda self: self.updater.scheduler)
    kl_ctl = property(lambda self: self.rl.kl_ctl)
    control_ids = property(lambda self: getattr(self.rl, "control_ids", []))
    pool = property(lambda self: getattr(self.rl, "pool", None))
    value_head = property(lambda self: getattr(self.rl, "value_head", None))

    @property
    def inference_prefix(self) -> list[int]:
        """What the adapter sees before every prompt at rollout and inference time."""
        return self.policy.adapter_prefix

    def token_stats(self, prompt_ids, prefixes, responses, values: bool = False, kl: bool = True,
                    eos_mask: bool = True) -> dict:
        """:meth:`Policy.token_stats <ipa_fast.training.policy.Policy.token_stats>`, with the
        value head's ``values`` when ``values``."""
        return self.policy.token_stats(prompt_ids, prefixes, responses, value_head=self.value_head if values else None,
                                       kl=kl, eos_mask=eos_mask)

    def sft_targets(self, rows: list[dict]) -> list[list[int]]:
        return self.warm_start.targets(rows)

    def sft_step(self, step: int, rows: list[dict]) -> dict:
        return self.warm_start.step(step, rows)

    def quark_backward(self, idx: list[int]) -> dict:
        return self.rl.backward(idx)

    def quark_update(self, step: int, prompt_ids, responses, scores) -> dict:
        return self.rl.step(step, prompt_ids, responses, scores)

    def ppo_prepare(self, prompt_ids, responses, scores) -> dict:
        return self.rl.prepare(prompt_ids, responses, scores)

    def ppo_backward(self, data: dict, idx: list[int]) -> dict:
        return self.rl.backward(data, idx)

    def ppo_update(self, step: int, prompt_ids, responses, scores) -> dict:
        return self.rl.step(step, prompt_ids, responses, scores)

    # ------------------------------------------------------------------------------------
    # prompts, rollouts, rewards

    def _prompt_batch(self, step: int) -> list[int]:
        g = np.random.default_rng(step_seed(self.cfg.seed, step, 1))
        n = len(self.train_rows)
        k = (self.cfg.sft_batch_size or self.cfg.batch_size) if step <= self.cfg.sft_steps else self.cfg.batch_size
        return g.choice(n, size=k, replace=k > n).tolist()

    def rollout(self, rows: list[dict], seed: int, *, max_new_tokens=None, top_k=None, top_p=None, temperature=None,
                min_new_tokens=None):
        c = self.cfg
        return self.policy.generate([r["prompt"] for r in rows], max_new_tokens or c.max_new_tokens,
                                    temperature=c.temperature if temperature is None else temperature,
                                    top_k=c.top_k if top_k is None else top_k,
                                    top_p=c.top_p if top_p is None else top_p,
                                    seed=[step_seed(seed, i) for i in range(len(rows))],
                                    min_new_tokens=c.min_new_tokens if min_new_tokens is None else min_new_tokens,
                                    backend=c.backend)

    def score(self, rows: list[dict], gen) -> list[float]:
        """The reward of a generation; the prompt file's extra fields and ``completion_ids``
        (the generated token ids, as TRL passes them) go to rewards that accept them."""
        fields = {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"}
        fields["completion_ids"] = gen.token_ids
        return call_with_deadline(call_reward, (self.reward, [r["prompt"] for r in rows], gen.texts, fields),
                                  self.cfg.reward_timeout, f"reward {reward_name(self.reward)}")

    # ------------------------------------------------------------------------------------
    # one step, evaluation, checkpoints

    def train_step(self) -> dict:
        step = self.step + 1
        c = self.cfg
        t0 = time.perf_counter()
        rows = [self.train_rows[i] for i in self._prompt_batch(step)]
        if step <= c.sft_steps:
            stats = self.sft_step(step, rows)
            self.updater.scheduler.step()
            self.step = step
            return {"type": "sft", "step": step, "lr": self.updater.last_lr(), **stats,
                    "time/step": time.perf_counter() - t0}
        if c.sft_steps and step == c.sft_steps + 1:
            # the first RL step: the warm-started adapter becomes the KL reference (here rather
            # than at the end of the last warm-start step, so a run resumed with a smaller
            # --sft-steps still gets it)
            self.policy.reset_reference()
        rng = ckpt.rng_state()  # as at the end of the last step: a failure checkpoints that
        gen = self.rollout(rows, step_seed(c.seed, step, 0))
        t1 = time.perf_counter()
        try:
            scores = self.score(rows, gen)
        except RewardError as exc:
            path = self.save_checkpoint(rng=rng)
            raise RewardError(f"{exc} (at step {step}; checkpoint of step {self.step} saved to {path})") from exc
        shaped = scores
        if c.repeat_coef:
            shaped = [s - c.repeat_coef * repeated_bigram_fraction(ids) for s, ids in zip(scores, gen.token_ids)]
        t2 = time.perf_counter()
        # the algorithm's step, looked up under its name here (quark_update / ppo_update), so a
        # wrapper set on this instance sees every call
        update = getattr(self, f"{self.rl.name}_update")
        stats = update(step, gen.prompt_token_ids, gen.token_ids, shaped)
        self.updater.scheduler.step()
        self.step = step
        t3 = time.perf_counter()
        lens = [len(t) for t in gen.token_ids]
        return {"type": "train", "step": step, "reward": float(np.mean(scores)),
                "reward_std": float(np.std(scores)), "response_len": float(np.mean(lens)),
                "kl_coef": self.rl.kl_ctl.value, "lr": self.updater.last_lr(),
                **({"score_shaped": float(np.mean(shaped))} if c.repeat_coef else {}), **stats,
                "time/rollout": t1 - t0, "time/reward": t2 - t1, "time/update": t3 - t2, "time/step": t3 - t0}

    def evaluate(self) -> dict:
        c = self.cfg
        rows = self.eval_rows or self.train_rows[: c.eval_size]
        t0 = time.perf_counter()
        rng = ckpt.rng_state()
        with torch.no_grad():
            gen = self.rollout(rows, c.eval_seed, max_new_tokens=c.eval_max_new_tokens, top_k=0,
                               top_p=c.eval_top_p, temperature=1.0, min_new_tokens=0)
        try:
            scores = self.score(rows, gen)
        except RewardError as exc:
            path = self.save_checkpoint(rng=rng) if self.initial_eval is not None else None
            raise RewardError(f"{exc} (in evaluation at step {self.step}"
                              + (f"; checkpoint saved to {path})" if path else ")")) from exc
        rec = {"type": "eval", "step": self.step, "reward": float(np.mean(scores)),
               **extra_eval_metrics(c.task, rows, gen.texts), "time/eval": time.perf_counter() - t0}
        self.last_eval = rec
        self.last_samples = [{"prompt": r["prompt"], "completion": t, "reward": s}
                             for r, t, s in zip(rows, gen.texts, scores)][: c.sample_rows]
        return rec

    def state_dict(self, rng: dict | None = None) -> dict:
        """Everything a resumed run needs (``rng``: the global RNG states to record, default now):
        the adapter and its reference, the algorithm's state (``value_head``, ``kl_controller``,
        ``pool``, ``control_ids``), the optimiser and schedule, the RNG states and the evaluations."""
        policy = self.policy
        refs = self._reference_rows()
        packed = {name: None if m is None else ckpt.pack_module_state(m.state_dict(), refs.get(id(m)))
                  for name, m in (("adapter", policy.adapter), ("ref_adapter", policy.ref_adapter))}
        # the base's table is named only when rows were taken from it (then a resume needs that table)
        uses_base = any(p and p["rows_from_reference"] for p in packed.values())
        return {"step": self.step, "config": dataclasses.asdict(self.cfg), "data": self.data_fingerprint(),
                "reference_rows_sha256": self._base_embedding_sha256() if uses_base else None,
                **packed,
                **self.rl.state_dict(),
                "optimizer": ckpt.pack_optimizer_state(self.updater.optimizer.state_dict()),
                "scheduler": self.updater.scheduler.state_dict(),
                "rng": rng or ckpt.rng_state(),
                "initial_eval": self.initial_eval, "last_eval": self.last_eval, "last_samples": self.last_samples}

    def load_state_dict(self, state: dict) -> None:
        policy = self.policy
        refs = self._reference_rows()
        want = state.get("reference_rows_sha256")
        if want is not None and (not refs or self._base_embedding_sha256() != want):
            raise ckpt.CheckpointError("the checkpoint takes the adapter's shared embedding rows from a base "
                                       "embedding that this run's base does not have (another base?)")
        policy.adapter.load_state_dict(ckpt.unpack_module_state(state["adapter"], refs.get(id(policy.adapter))))
        if policy.ref_adapter is not None and state["ref_adapter"] is not None:
            policy.ref_adapter.load_state_dict(
                ckpt.unpack_module_state(state["ref_adapter"], refs.get(id(policy.ref_adapter))))
        self.rl.load_state_dict(state)
        self.updater.optimizer.load_state_dict(ckpt.unpack_optimizer_state(state["optimizer"]))
        self.updater.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.initial_eval, self.last_eval = state["initial_eval"], state["last_eval"]
        self.last_samples = state["last_samples"]

    def _reference_rows(self) -> dict:
        """Per network of the checkpoint (by ``id``): ``{its embedding's state-dict name: the base's
        embedding table}``, so that rows equal to the base's (a shared, frozen embedding) are not
        written (see :func:`~ipa_fast.training.checkpoint.pack_module_state`); empty for a served base."""
        if self.policy.api_base or self.policy.base.get_input_embeddings() is None:
            return {}
        table = self.policy.base.get_input_embeddings().weight.detach()
        out = {}
        for model in (self.policy.adapter, self.policy.ref_adapter):
            emb = None if model is None else model.get_input_embeddings()
            name = None if emb is None else next(
                (n for n, p in model.named_parameters(remove_duplicate=False) if p is emb.weight), None)
            if name is not None:
                out[id(model)] = {name: table}
        return out

    def _base_embedding_sha256(self) -> str:
        if self._base_emb_sha is None:
            from ipa_fast.embedded import tensor_sha256
            self._base_emb_sha = tensor_sha256(self.policy.base.get_input_embeddings().weight)
        return self._base_emb_sha

    def data_fingerprint(self) -> dict:
        """sha256 of the training and evaluation prompt rows and, when there are any, of the
        frozen experts' records (names, weights, prefixes, weight files' sha256): a resumed run
        must see the same."""
        def digest(rows):
            return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
        out = {"train_prompts": digest(self.train_rows), "eval_prompts": digest(self.eval_rows)}
        if self.policy.frozen:
            out["frozen_experts"] = digest(self.frozen_records())
        return out

    def frozen_records(self) -> list[dict]:
        """The frozen experts this adapter is trained with (see :meth:`FrozenExpert.record`)."""
        return [e.record() for e in self.policy.frozen if e is not self.residual_expert]

    def save_checkpoint(self, rng: dict | None = None) -> Path:
        """Checkpoint the current step (an existing good checkpoint of this step is kept)."""
        return ckpt.save(self.out / "checkpoints", self.step, self.state_dict(rng), keep=self.cfg.keep_checkpoints)

    def run_changes(self, state: dict) -> list[tuple[str, object, object]]:
        """``(name, checkpoint's value, this run's value)`` of every setting that defines the run
        and differs from the checkpoint's (the fields of RESUME_MAY_CHANGE may differ)."""
        saved = state.get("config", {})
        changes = []
        for f in dataclasses.fields(self.cfg):
            if f.name in RESUME_MAY_CHANGE:
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            old, new = saved.get(f.name, default), getattr(self.cfg, f.name)
            if old != new:
                changes.append((f.name, old, new))
        data = state.get("data", {})
        for k, v in self.data_fingerprint().items():
            if data.get(k) != v:
                changes.append((k, _Digest(data.get(k) or "none"), _Digest(v)))
        return changes

    def resume(self, force: bool = False) -> bool:
        """Load the newest good checkpoint under ``<out>``; drop log lines written after it.

        Refuses (ValueError naming the fields) a checkpoint made with other settings unless
        ``force``; raises :class:`~ipa_fast.training.checkpoint.CheckpointError` when
        checkpoints exist but none is readable. Returns False when there is none at all.
        """
        root = self.out / "checkpoints"
        found = ckpt.load_latest(root)
        if found is None:
            if root.exists():
                ckpt.log.warning(f"no checkpoint in {root}: starting from step 0")
            return False
        state, path = found
        changes = self.run_changes(state)
        fixed = [name for name, _, _ in changes if name in RESUME_NEVER_CHANGES]
        what = ", ".join(f"{name} {old!r} -> {new!r}" for name, old, new in changes)
        if fixed:
            raise ValueError(f"cannot resume {self.out}: {path.name} was made with other settings ({what}); "
                             f"{', '.join(fixed)} cannot change within a run, even with --force")
        if changes and not force:
            raise ValueError(f"cannot resume {self.out}: {path.name} was made with other settings ({what}); "
                             "pass --force to continue with the new ones")
        self.load_state_dict(state)
        if changes:
            self._apply_forced_settings()
            ckpt.log.warning(f"resuming {path} with changed settings: {what}")
        ckpt.trim_jsonl_log(self.out / "metrics.jsonl", self.step)
        ckpt.trim_text_log(self.out / "samples.txt", self.step)
        return True

    def _apply_forced_settings(self) -> None:
        """After a forced resume: the optimiser, schedule and fixed KL coefficient follow this
        run's settings (the checkpoint's would otherwise stay in force)."""
        self.updater.follow_config()
        self.rl.follow_config()

    def save_final_adapter(self) -> Path:
        c = self.cfg
        tok = self.tokenizer
        names = []
        if self.control_ids and self.control_ids[0] == len(tok):
            tok = copy.deepcopy(tok)
            names = [f"<|quark_q{i}|>" for i in range(len(self.control_ids))]
            tok.add_special_tokens({"additional_special_tokens": names})
        # frozen_experts: what to compose this adapter with (their names, weights, prefixes and
        # weight files' sha256); empty when it was trained alone with the base
        return save_adapter(self.out / "adapter", self.adapter, tok, alpha=c.alpha,
                            adapter_prefix=self.inference_prefix, vocab_size=self.V, base=c.api_base or c.base,
                            reference_policy=c.reference, control_tokens=names,
                            extra={"algo": c.algo, "steps": self.step, "quark_control_ids": self.control_ids,
                                   "frozen_experts": self.frozen_records(),
                                   # a residual adapter: its logits are its own minus these initial weights'
                                   **({"residual_of": self.residual_of} if c.residual else {}),
                                   # a served base: what it was trained against (URL, top-K, dialect,
                                   # what was done with ambiguous text keys)
                                   **({"api_base": {"url": c.api_base, "top_k": c.api_top_k,
                                                    "dialect": self.policy.base.dialect,
                                                    "ambiguous": c.api_ambiguous}} if c.api_base else {}),
                                   # its untrained product was the base itself (the demo's untrained row)
                                   "zero_init_output": c.zero_init_output})

    # ------------------------------------------------------------------------------------

    def _log(self, rec: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def fit(self, resume: bool = False, force: bool = False) -> dict:
        """Run (or continue, with ``resume``) to ``config.steps``; return the summary dict.
        ``force`` resumes even when the checkpoint was made with other settings."""
        from tqdm.auto import tqdm

        c = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        resumed = self.resume(force=force) if resume else False
        if not resumed:
            for name in ("metrics.jsonl", "samples.txt"):
                (self.out / name).unlink(missing_ok=True)
        ckpt.write_atomic(self.out / "config.json", json.dumps(dataclasses.asdict(c), indent=2) + "\n")
        if self.initial_eval is None:
            self.initial_eval = self.evaluate()
            self._log(self.initial_eval)
            self._report_eval()
            self.save_checkpoint()
        bar = tqdm(total=c.steps, initial=min(self.step, c.steps), desc=f"{c.algo} train",
                   disable=not c.progress, dynamic_ncols=True)
        while self.step < c.steps:
            rec = self.train_step()
            self._log(rec)
            bar.update(1)
            if rec["type"] == "sft":
                bar.set_postfix(sft_nll=f"{rec['sft/nll']:.3f}", step=f"{rec['time/step']:.2f}s")
            else:
                bar.set_postfix(reward=f"{rec['reward']:.3f}", kl_coef=f"{rec['kl_coef']:.3g}",
                                rollout=f"{rec['time/rollout']:.2f}s", update=f"{rec['time/update']:.2f}s")
            if c.eval_every and self.step % c.eval_every == 0 and self.step < c.steps:
                self._log(self.evaluate())
                self._report_eval()
            if self.step % c.checkpoint_every == 0 and self.step < c.steps:
                self.save_checkpoint()
        bar.close()
        if self.last_eval is None or self.last_eval["step"] != self.step:
            self._log(self.evaluate())
            self._report_eval()
        path = self.save_checkpoint()
        adapter_dir = self.save_final_adapter()
        return self.summary(path, adapter_dir)

    def _report_eval(self) -> None:
        from tqdm.auto import tqdm

        rec = self.last_eval
        plot_reward_curve(self.out / "metrics.jsonl", self.out / "reward_curve.png")
        lines = [f"eval @ step {rec['step']}: reward {rec['reward']:.4f}"]
        for s in self.last_samples:
            lines.append(f"  {s['reward']:7.3f} | {_short(s['prompt'])} -> {_short(s['completion'])}")
        if self.cfg.progress:
            tqdm.write("\n".join(lines))
        with open(self.out / "samples.txt", "a") as f:
            f.write("\n".join(lines) + "\n")

    def summary(self, checkpoint_dir: Path, adapter_dir: Path) -> dict:
        log = [json.loads(ln) for ln in (self.out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        train = [r for r in log if r["type"] == "train"]
        phases = {k.split("/")[1]: float(np.mean([r[k] for r in train])) for k in
                  ("time/rollout", "time/reward", "time/update", "time/step")} if train else {}
        return {"steps": self.step, "algo": self.cfg.algo, "reward_fn": reward_name(self.reward),
                "base": self.cfg.api_base or self.cfg.base, "adapter_init": self.cfg.adapter, "frozen_experts": self.frozen_records(),
                "initial_eval": self.initial_eval, "final_eval": self.last_eval,
                "checkpoint": str(checkpoint_dir), "adapter": str(adapter_dir),
                "metrics": str(self.out / "metrics.jsonl"), "reward_curve": str(self.out / "reward_curve.png"),
                "seconds_per_step": phases, "samples": self.last_samples,
                **diversity_and_kl(self.initial_eval, self.last_eval, train)}


# the end-of-run summary warns when held-out distinct-2 falls by more than this (relative):
# a reward that rises while the text collapses into loops is the reward hack to catch first
DIVERSITY_DROP_WARN = 0.20
KL_KEYS = tuple(A.kl_key for A in ALGORITHMS.values())  # the KL to the reference each algorithm logs per step


def train_kl(rec: dict) -> tuple[str, float] | None:
    """``(key, value)`` of the KL a train record logs (PPO: per sequence; Quark: per token)."""
    for k in KL_KEYS:
        if k in rec:
            return k, float(rec[k])
    return None


def diversity_and_kl(initial: dict | None, final: dict | None, train: list[dict], last: int = 5) -> dict:
    """Held-out distinct-2 before / after, the KL to the reference over the last ``last`` RL
    steps, and a warning when distinct-2 fell by more than DIVERSITY_DROP_WARN (relative)."""
    d0 = (initial or {}).get("distinct_2")
    d1 = (final or {}).get("distinct_2")
    kls = [kv for kv in (train_kl(r) for r in train[-last:]) if kv]
    kl = {"key": kls[0][0], "mean_last_steps": float(np.mean([v for _, v in kls])), "steps": len(kls)} if kls else None
    warning = None
    if d0 and d1 is not None and d1 < (1 - DIVERSITY_DROP_WARN) * d0:
        warning = (f"diversity collapsed: held-out distinct-2 {d0:.3f} -> {d1:.3f} "
                   f"({(d1 - d0) / d0:+.0%}); the reward may come from repetitive text — read samples.txt, "
                   f"raise --kl-coef or --repeat-coef, or lower --alpha")
    return {"distinct_2": {"initial": d0, "final": d1}, "kl": kl, "diversity_warning": warning}


def summary_lines(result: dict) -> list[str]:
    """The end-of-run lines: held-out reward with distinct-2 and KL beside it, and the
    diversity warning when there is one."""
    ie, fe = result["initial_eval"], result["final_eval"]
    d, kl = result.get("distinct_2") or {}, result.get("kl")
    line = f"{result['algo']}: {result['steps']} steps; held-out reward {ie['reward']:.4f} -> {fe['reward']:.4f}"
    if d.get("initial") is not None and d.get("final") is not None:
        line += f"; distinct-2 {d['initial']:.3f} -> {d['final']:.3f}"
    if kl:
        line += f"; KL to reference {kl['mean_last_steps']:.4g} ({kl['key']}, mean of the last {kl['steps']} steps)"
    lines = [line]
    if result.get("diversity_warning"):
        lines.append("warning: " + result["diversity_warning"])
    return lines


class _Digest(str):
    """A sha256 that prints as ``sha256 <first 12 hex digits>`` in error messages."""

    def __repr__(self) -> str:
        return f"sha256 {self[:12]}"


def call_with_deadline(fn: Callable, args: tuple, timeout: float | None, what: str):
    """``fn(*args)``, raising RewardError if it has not returned after ``timeout`` seconds.

    The call runs in a daemon thread (Python cannot stop a thread: a call that hangs is left
    behind, and does not keep the process from exiting); ``timeout`` 0 or None calls ``fn``
    in this thread with no limit. Exceptions from ``fn`` are re-raised here.
    """
    if not timeout:
        return fn(*args)
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=target, name="ipa-fast-reward", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise RewardError(f"{what} did not return within {timeout:g} s (reward_timeout, --reward-timeout)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _short(text: str, n: int = 60) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= n else text[: n - 1] + "…"


def repeated_bigram_fraction(ids) -> float:
    """Fraction of a token sequence's bigrams that already occurred earlier in it (0 for a
    sequence without repeats or shorter than 3 tokens; -> 1 for a loop)."""
    ids = [int(t) for t in ids]
    seen, repeats = set(), 0
    for bigram in zip(ids, ids[1:]):
        repeats += bigram in seen
        seen.add(bigram)
    return repeats / max(1, len(ids) - 1)


def extra_eval_metrics(task: str | None, rows: list[dict], texts: list[str]) -> dict:
    """docs/DESIGN.md §6 metrics beside the reward: distinct-2 (any task) and the task's own
    evaluation-only metrics (its registry entry's ``metrics``)."""
    from ipa_fast.tasks.evaluation import distinct_n

    out = {"distinct_2": distinct_n(texts, 2)}
    if task is not None:
        out.update(tasks.get(task).metrics_fn(rows, texts))
    return out


def plot_reward_curve(metrics_path: Path, png_path: Path) -> None:
    """One PNG, three panels over steps: train reward and held-out reward; held-out distinct-2
    (diversity: a reward bought with loops shows here); the KL to the reference per RL step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = [json.loads(ln) for ln in Path(metrics_path).read_text().splitlines() if ln.strip()]
    train = [(r["step"], r["reward"]) for r in log if r["type"] == "train"]
    ev = [(r["step"], r["reward"]) for r in log if r["type"] == "eval"]
    dist = [(r["step"], r["distinct_2"]) for r in log if r["type"] == "eval" and "distinct_2" in r]
    kls = [(r["step"], kv) for r in log if r["type"] == "train" for kv in [train_kl(r)] if kv]
    fig, (ax, ax_d, ax_k) = plt.subplots(1, 3, figsize=(13, 3.5))
    if train:
        ax.plot(*zip(*train), label="train (rollout) reward", alpha=0.6)
    if ev:
        ax.plot(*zip(*ev), "o-", label="held-out reward")
    ax.set_ylabel("mean reward")
    ax.set_title("reward", fontsize=10)
    ax.legend(fontsize=8)
    if dist:
        ax_d.plot(*zip(*dist), "o-", color="#2ca02c")
        d0 = dist[0][1]
        ax_d.axhline((1 - DIVERSITY_DROP_WARN) * d0, color="#d62728", ls="--", lw=1,
                     label=f"-{DIVERSITY_DROP_WARN:.0%} of the initial (warning)")
        ax_d.legend(fontsize=8)
    ax_d.set_title("held-out distinct-2 (diversity)", fontsize=10)
    if kls:
        ax_k.plot([s for s, _ in kls], [v for _, (_, v) in kls], color="#9467bd")
        ax_k.set_title(f"KL to the reference ({kls[-1][1][0]})", fontsize=10)
    else:
        ax_k.set_title("KL to the reference (no RL steps yet)", fontsize=10)
    for a in (ax, ax_d, ax_k):
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png_path)


def _as_rows(prompts) -> list[dict]:
    return [p if isinstance(p, dict) else {"prompt": p} for p in prompts]


def train(config: TrainConfig, *, reward: Callable | None = None, train_prompts=None, eval_prompts=None,
          base=None, adapter=None, tokenizer=None, resume: bool = False, force: bool = False,
          frozen_experts: list[FrozenExpert] | None = None) -> dict:
    """Train an adapter; return the run summary (``steps``, ``initial_eval``, ``final_eval``,
    ``checkpoint``, ``adapter``, timings, ...).

    Anything not passed comes from ``config``: the reward from ``config.reward`` or the task's
    built-in, prompts from ``config.prompts`` / the task's data (lists of strings or of dicts
    with ``"prompt"`` are accepted here), models from ``config.base`` / ``config.adapter`` or
    the defaults (see :mod:`ipa_fast.training.loading`), frozen experts from
    ``config.frozen_adapters`` unless ``frozen_experts`` (a list of
    :class:`~ipa_fast.training.policy.FrozenExpert`) is given. ``resume`` continues the run in
    ``config.out`` from its newest good checkpoint up to ``config.steps``; it refuses a
    checkpoint made with other settings (see :data:`RESUME_MAY_CHANGE`) unless ``force``.
    """
    from . import loading
    from .rewards import load_reward

    config.validate()
    if resume:  # an unusable run directory fails here, before any model is loaded
        ckpt.newest_good(Path(config.out) / "checkpoints")
    if reward is None:
        if config.reward:
            reward = load_reward(config.reward)
        elif config.task:
            reward = tasks.get(config.task).reward_fn()
        else:
            raise ValueError("no reward: pass --task {lexical,detox} or --reward module:function")
    if not callable(reward):
        raise TypeError(f"reward must be callable, got {type(reward).__name__}")
    if train_prompts is None:
        if config.prompts:
            train_prompts = loading.read_prompts(config.prompts)
        elif config.task:
            train_prompts = loading.read_prompts(loading.task_data_path(config.task, config.train_split))
        else:
            raise ValueError("no prompts: pass --prompts FILE.jsonl (or --task)")
        if eval_prompts is None and config.eval_prompts:
            eval_prompts = loading.read_prompts(config.eval_prompts)
        elif eval_prompts is None and config.task and not config.prompts:
            path = loading.task_data_path(config.task, "validation")
            if path.is_file():
                eval_prompts = loading.read_prompts(path)
    train_rows = _as_rows(train_prompts)
    if eval_prompts is None:  # hold out the last eval_size rows (at most a fifth of the file)
        n_eval = min(config.eval_size, len(train_rows) // 5)
        eval_rows = train_rows[len(train_rows) - n_eval:] if n_eval else []
        train_rows = train_rows[: len(train_rows) - n_eval]
    else:
        eval_rows = _as_rows(eval_prompts)
    eval_rows = eval_rows[: config.eval_size]
    if config.api_base and base is None:  # a served base: the adapter and the tokenizer are local
        adapter_name = None
        if tokenizer is None or adapter is None:
            adapter_name, tok = loading.adapter_tokenizer(config.adapter)
            tokenizer = tokenizer or tok
        # the server first: a wrong URL or tokenizer fails before any model is loaded
        base = loading.connect_api_base(config.api_base, tokenizer, top_k=config.api_top_k,
                                        dialect=config.api_dialect, timeout=config.api_timeout,
                                        ambiguous=config.api_ambiguous)
        if adapter is None:
            adapter = loading.load_adapter(adapter_name)
            config = dataclasses.replace(config, adapter=adapter_name)
    if base is None or adapter is None:
        if (base is None) != (adapter is None):
            raise ValueError("pass both base and adapter models, or neither")
        base, adapter, tok, base_name, adapter_name = loading.load_models(config.base, config.adapter)
        tokenizer = tokenizer or tok
        config = dataclasses.replace(config, base=base_name, adapter=adapter_name)
    if tokenizer is None:
        raise ValueError("pass tokenizer= with model objects")
    out = Path(config.out)
    if not resume and ckpt.checkpoint_dirs(out / "checkpoints"):
        raise ValueError(f"{out} already holds checkpoints: pass --resume to continue that run, "
                         "or choose another --out")
    trainer = Trainer(config, base, adapter, tokenizer, reward, train_rows, eval_rows, frozen_experts)
    return trainer.fit(resume=resume, force=force)
