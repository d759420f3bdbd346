"""The task registry: every built-in task defined once, for the trainer, the CLI, the demo and
the scripts.

A :class:`Task` names its data (``data/tasks/<name>/{train,validation,test}.jsonl`` under
:func:`ipa_fast.embedded.task_data_path`), its prompt style, its training reward, its
evaluation (the headline per-completion score and the evaluation-only metrics beside it) and its
training recipe (the ``ipa-fast train --task <name>`` preset). Functions are named as
``"module:function"`` strings and imported on first use, so that importing the registry costs
nothing and the reward's dependencies load only for the task that needs them.

>>> from ipa_fast import tasks
>>> tasks.names()
('lexical', 'detox', 'open', 'dialogue_safety', 'grounded')
>>> tasks.get("lexical").score_name
'coverage'
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

_REWARDS = "ipa_fast.training.rewards"
_EVAL = "ipa_fast.tasks.metrics"


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    #: "chat": the prompt is one user turn in the base's chat template; "continuation": raw text
    prompt_style: str
    #: the training reward, ``fn(prompts, completions, **fields) -> list[float]`` (higher is better)
    reward: str
    #: the headline evaluation score per completion, ``fn(rows, texts) -> list[float]``
    score: str
    score_name: str
    higher_is_better: bool
    #: evaluation-only metrics, ``fn(rows, texts) -> dict[str, float]`` (at least one scorer
    #: that is never a training reward)
    metrics: str
    #: the metric printed beside the score in summaries (the JSON keeps every metric)
    summary_metric: str = ""
    #: the training preset: TrainConfig fields
    recipe: dict = field(default_factory=dict)
    #: prompt-row fields the reward and the evaluation read
    fields: tuple[str, ...] = ()
    description: str = ""

    def reward_fn(self) -> Callable:
        return resolve(self.reward)

    def score_fn(self, rows: Sequence[dict], texts: Sequence[str]) -> list[float]:
        return [float(s) for s in resolve(self.score)(rows, texts)]

    def metrics_fn(self, rows: Sequence[dict], texts: Sequence[str]) -> dict:
        return dict(resolve(self.metrics)(rows, texts))

    @property
    def score_label(self) -> str:
        return f"{self.score_name} ({'higher' if self.higher_is_better else 'lower'} is better)"


@functools.lru_cache(maxsize=None)
def resolve(spec: str) -> Callable:
    """``"module:function"`` -> the function (imported once)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


# the embedded adapter initialisation shares the base's embedding: every recipe keeps it frozen
_TASKS = (
    Task(
        name="lexical", title="lexical constraints", prompt_style="chat",
        reward=f"{_REWARDS}:lexical_coverage", score=f"{_EVAL}:lexical_score", score_name="coverage",
        higher_is_better=True, metrics=f"{_EVAL}:lexical_metrics", summary_metric="all_concepts",
        fields=("concepts",),
        description="CommonGen-style instruction: one sentence using every listed concept (any inflection)",
        # The shipped lexical adapter's recipe (models/adapters/lexical/MODEL_CARD.md): a residual
        # adapter (policy base + alpha * (adapter - adapter-init): the untrained policy is the base and
        # every parameter gets its full gradient), 30 tailored-NLL warm-start steps on the best of 4
        # base samples of 281 train prompts (data/tasks/lexical/warmstart.jsonl, field "best"), then
        # PPO on those prompts; the shipped alpha is chosen on validation rows (scripts/sweep_alpha.py).
        # Tried before on this base, without a significant gain: the plain product at alpha 0.2-1
        # (tailored-NLL warm starts on the references, PPO at lr 1e-4 and 1e-3: coverage fell or
        # stayed), and a zeroed adapter output (zero_init_output: the zeroed gain scales every
        # gradient below it, so only the gain learned; 120 warm-start steps gave 0.371 -> 0.391 on
        # 200 validation prompts, paired interval [-0.040, +0.079]).
        recipe=dict(algo="ppo", alpha=1.0, residual=True, train_split="warmstart", sft_steps=30, sft_field="best",
                    sft_lr=1e-4, reference="initial", steps=60, batch_size=16, minibatch_size=8, ppo_epochs=2,
                    lr=5e-5, kl_coef=0.05, min_new_tokens=8, eval_every=15, eval_size=48, checkpoint_every=15,
                    freeze_shared_embedding=True),
    ),
    Task(
        name="detox", title="toxicity reduction", prompt_style="continuation",
        reward=f"{_REWARDS}:non_offensive", score=f"{_EVAL}:detox_score", score_name="offensive rate",
        higher_is_better=False, metrics=f"{_EVAL}:detox_metrics", summary_metric="second_score",
        description="continue a prompt without offensive language",
        recipe=dict(algo="ppo", alpha=0.5, reference="initial", lr=1e-4, kl_coef=0.05, repeat_coef=1.0,
                    min_new_tokens=16, batch_size=16, minibatch_size=8, ppo_epochs=2, steps=60, eval_size=64,
                    eval_every=20, checkpoint_every=10, freeze_shared_embedding=True),
    ),
    # The paper's other three tasks (data: scripts/build_paper_tasks.py; data/README.md).
    Task(
        name="open", title="open-ended generation", prompt_style="continuation",
        reward=f"{_REWARDS}_text:open_ended_quality", score=f"{_EVAL}:open_score",
        score_name="quality (fluency x coherence x diversity)", higher_is_better=True,
        metrics=f"{_EVAL}:open_metrics", summary_metric="mauve", fields=("reference",),
        description="continue a corpus opening fluently, on topic and without repeating itself",
        # The lexical recipe's shape: a residual adapter (the untrained policy is the base), 30
        # tailored-NLL warm-start steps on the best of 4 base samples of the 195 train prompts
        # (of a seeded 384) whose best sample reaches reward 0.25 (data/tasks/open/warmstart.jsonl,
        # field "best"; base mean 0.156, best-of-4 0.335), then PPO on those prompts. TRIED, NO GAIN
        # (so no adapter is shipped): 48 validation prompts at alpha 1, quality 0.138 -> 0.105 after
        # the warm start (step 15) -> 0.107 (30) -> 0.187 after 15 PPO steps (45), with distinct-2
        # 0.93 -> 0.81 and MAUVE 0.76 -> 0.44; on 100 validation prompts (scripts/sweep_alpha.py,
        # one seed) 0.149 (base) / 0.142 / 0.115 at alpha 0 / 0.5 / 1, distinct-2 0.914 / 0.858 /
        # 0.798: PPO's gain on its 195 training prompts did not carry over to held-out ones. That run's
        # warm-start targets had lost their leading whitespace (scripts/best_of_n.py stripped every
        # sample, gluing a continuation's first word to the prompt's last). Re-run on the fixed file
        # (continuations as sampled, 0.3 h): 48 validation prompts 0.138 -> 0.109 (step 15) -> 0.130
        # (30) -> 0.101 (45), distinct-2 0.93 -> 0.86, MAUVE 0.76 -> 0.74: the warm start lowers
        # coherence with the prompt (the best-of-4 pick rewards a lucky sample, not a habit the
        # adapter can learn), and 15 PPO steps do not recover it on held-out prompts.
        recipe=dict(algo="ppo", alpha=1.0, residual=True, train_split="warmstart", sft_steps=30, sft_field="best",
                    sft_lr=1e-4, reference="initial", steps=45, batch_size=16, minibatch_size=8, ppo_epochs=2,
                    lr=5e-5, kl_coef=0.05, min_new_tokens=16, eval_every=15, eval_size=48, checkpoint_every=15,
                    freeze_shared_embedding=True),
    ),
    Task(
        name="dialogue_safety", title="dialogue safety control", prompt_style="chat",
        reward=f"{_REWARDS}:safe_enough", score=f"{_EVAL}:detox_score", score_name="unsafe rate",
        higher_is_better=False, metrics=f"{_EVAL}:dialogue_safety_metrics", summary_metric="second_score",
        fields=("context",),
        description="reply to a provocative user turn without offensive language (and without mere refusal)",
        # A residual adapter (the untrained policy is the base), PPO on the train contexts, no warm
        # start; the reward is 1 - P(offensive) capped at 0.9 (training.rewards.safe_enough). TRIED
        # FOUR WAYS, NOT SHIPPED (100 validation contexts, scripts/sweep_alpha.py, one seed; the base:
        # unsafe 11 %, perplexity under the base 12.8, distinct-2 0.910, coherence 0.143):
        # 1. this recipe with the uncapped reward (0.46 h): unsafe 11 / 9 / 1 % at alpha 0 / 0.5 / 1
        #    (alpha 1 paired [-0.165, -0.035]) but safe by degenerating: perplexity 19.3 / 25.3,
        #    distinct-2 0.928 / 0.715, coherence 0.135 / 0.077.
        # 2. a warm start (30 tailored-NLL steps on the safest of 4 base replies of 383 train contexts,
        #    scripts/best_of_n.py under the uncapped reward) then 20 PPO steps at lr 5e-5, KL 0.2
        #    (0.42 h): alpha 1 unsafe 3 % (paired [-0.140, -0.020]), perplexity 27.9, distinct-2 0.958
        #    (short replies); the warm start alone left the 48 watched contexts at 12.5 -> 14.6 %.
        # 3. this recipe (0.49 h): the cap kept the replies on the context (coherence 0.160 / 0.144 at
        #    alpha 0.5 / 1, evasive 1 / 0 %): unsafe 9 / 5 % (alpha 1 paired [-0.127, +0.007]),
        #    word-list rate 4 / 0 % (base 7 %), perplexity 13.8 / 19.7 (1.08x / 1.54x), distinct-2
        #    0.916 / 0.813. Alpha 0.5 keeps fluency without a significant cut, alpha 1 the reverse.
        # 4. this recipe with kl_coef 0.2 (0.17 h on the idle machine): unsafe 10 / 3 % at alpha 0.5 / 1
        #    (alpha 1 paired [-0.152, -0.008]), word-list rate 2 / 0 %, but perplexity 18.0 / 28.8
        #    (1.41x / 2.26x), coherence 0.135 / 0.127: replies shrink to short exclamations ("Don't make
        #    me angry!"). The stronger KL coefficient did not keep fluency.
        recipe=dict(algo="ppo", alpha=1.0, residual=True, reference="initial", steps=30, batch_size=16,
                    minibatch_size=8, ppo_epochs=2, lr=1e-4, kl_coef=0.05, min_new_tokens=8, eval_every=10,
                    eval_size=48, checkpoint_every=10, freeze_shared_embedding=True),
    ),
    Task(
        name="grounded", title="knowledge-grounded dialogue", prompt_style="chat",
        reward=f"{_REWARDS}_text:faithfulness", score=f"{_EVAL}:grounded_score", score_name="faithfulness",
        higher_is_better=True, metrics=f"{_EVAL}:grounded_metrics", summary_metric="unsupported_rate",
        fields=("knowledge", "question"),
        description="answer a question about a knowledge snippet with only what the snippet supports",
        # A residual adapter (the untrained policy is the base), 30 tailored-NLL warm-start steps on
        # the train rows' `reference` (the snippet's gloss restated, scripts/build_paper_tasks.py),
        # then PPO on the faithfulness reward. Tried first: the lexical recipe's warm start on the
        # best of 4 base samples (`scripts/best_of_n.py --task grounded --rows 384 --n 4
        # --min-best-reward 0.4`: 198 rows; base mean 0.241, best-of-4 0.421) then PPO:
        # 48 validation prompts 0.245 -> 0.267 after 45 steps (30 + 15 PPO), unsupported clauses
        # unchanged (0.78 -> 0.79).
        recipe=dict(algo="ppo", alpha=1.0, residual=True, sft_steps=30, sft_field="reference", sft_lr=1e-4,
                    reference="initial", steps=45, batch_size=16, minibatch_size=8, ppo_epochs=2, lr=5e-5,
                    kl_coef=0.05, min_new_tokens=8, eval_every=15, eval_size=48, checkpoint_every=15,
                    freeze_shared_embedding=True),
    ),
)
TASKS: dict[str, Task] = {t.name: t for t in _TASKS}


def names() -> tuple[str, ...]:
    return tuple(TASKS)


def get(name: str) -> Task:
    """The task called ``name``; a one-line ValueError listing the known ones otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}") from None


def recipes() -> dict[str, dict]:
    """Every task's training preset, by name (``ipa-fast train --preset``)."""
    return {t.name: dict(t.recipe) for t in _TASKS}
