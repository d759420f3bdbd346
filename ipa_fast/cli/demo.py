"""``ipa-fast demo``: the main job on the embedded default, offline, minutes on a CPU.

The embedded default (``ipa-fast setup`` builds it into the cache): the base SmolLM2-135M-Instruct,
the adapter initialisation (the base's first layers over its shared embedding, distilled to the
base) and, per task, the shipped trained adapter where one exists. For each task (lexical
constraints in the chat template; offensive-language continuations), on the first ``--prompts``
held-out test prompts, with the fixed protocol of docs/DESIGN.md §6:

1. the base alone, base + trained IPA adapter, base + the *untrained* initial adapter at the same
   alpha, and the trained adapter alone — task score with a 95 % interval over prompts (and the
   paired difference to the base), lexical all-concepts rate, the evaluation-only offensiveness
   scorer, perplexity under the base, distinct-2 — with side-by-side samples (a task without a
   shipped adapter shows the base, the initial product and the initial adapter alone, and says so);
   where ``ipa-fast setup --larger-base`` has built it (and unless ``--no-larger-base``), the larger
   untuned model alone (Gemma 3 270M base, :data:`ipa_fast.embedded.LARGER_BASE`: the paper's claim is
   that a tailored small model beats a larger untuned one), row ``larger_base``, prompted as an
   untuned LM can be (:func:`larger_base_prompts`) and scored like the others (:func:`evaluate_larger_base`);
   with ``--compose T1 T2 ...``, those tasks' adapters decoded at once (rows ``composed`` and
   ``ipa_<other task>``, with the share of each task adapter's gain the composition keeps);
2. a short live IPA training from the initial adapter, with a progress bar, and the held-out
   reward before and after;
3. a JSON summary (``--json``) and a PNG plot.

Content warning: the offensive-language task prints model outputs that may be offensive.
"""
from __future__ import annotations

import time
from pathlib import Path

from ipa_fast import embedded, tasks

# the evaluation protocol of docs/DESIGN.md §6, fixed and printed
PROTOCOL = {"temperature": 1.0, "top_p": 0.9, "samples_per_prompt": 1, "max_new_tokens": 32, "seed": 20261126}
EVAL_CHUNK = 100  # prompts per generate() call in the evaluation (a CPU decodes 100 rows in one batch in
# 0.64x the time of 32-row chunks: each step reads the weights once for more rows)
DEFAULT_PROMPTS = {False: 100, True: 8}
SEED_STRIDE = 100_000  # seed s of --seeds decodes row r with PROTOCOL seed + SEED_STRIDE * s + r
LIVE_STEPS = {False: 6, True: 2}
# the live run from the initial adapter: the task's shipped recipe (`ipa-fast train --task T`'s preset)
# with a small batch and no warm start, so that a few steps fit the demo's budget on a CPU
LIVE_RUN_KNOBS = ("algo", "alpha", "reference", "lr", "kl_coef", "repeat_coef", "min_new_tokens", "ppo_epochs",
                  "freeze_shared_embedding", "residual", "zero_init_output")
# by --quick: the batch, and the validation prompts of its reward before and after (--quick's 4 is a smoke
# check of the loop, not a measurement: each 8-prompt evaluation costs ~7 s of its 2-minute budget)
LIVE_SMALL = {False: dict(batch_size=8, minibatch_size=8, eval_size=32),
              True: dict(batch_size=4, minibatch_size=4, eval_size=4)}


def live_recipe(task: str, quick: bool = False) -> dict:
    return {**{k: v for k, v in tasks.get(task).recipe.items() if k in LIVE_RUN_KNOBS}, **LIVE_SMALL[quick]}


#: the tasks `make demo` runs by default (any registered task can be named with --tasks)
DEMO_TASKS = ("lexical", "detox")
LABELS = {"base": "base\nalone", "ipa": "base +\nIPA", "ipa_untrained": "base +\nuntrained",
          "adapter_only": "adapter\nalone", "adapter_init_only": "initial\nadapter",
          "larger_base": "larger\nuntuned", "composed": "adapters\ncomposed"}
#: worked examples in the larger untuned model's prompt for a chat task (from its train split)
LARGER_BASE_SHOTS = 2


def add_arguments(parser) -> None:
    from ipa_fast.cli.main import nonneg_int, positive_int

    parser.add_argument("--quick", action="store_true", help="fewer prompts and training steps (< 2 minutes)")
    parser.add_argument("--out", default="runs/demo", help="where the live training and the plot go")
    parser.add_argument("--plot", default=None, help="PNG path (default: <out>/demo.png)")
    parser.add_argument("--prompts", type=positive_int, default=None,
                        help=f"held-out test prompts per task, >= 1 (default {DEFAULT_PROMPTS[False]}, quick "
                             f"{DEFAULT_PROMPTS[True]}; the README's figures use the whole split)")
    parser.add_argument("--seeds", type=positive_int, default=1,
                        help="decode every prompt with this many seeds (intervals over prompts, each the mean "
                             "over its seeds; default 1)")
    parser.add_argument("--split", choices=["test", "validation"], default="test",
                        help="the held-out split to evaluate (default test; choose alphas on validation)")
    parser.add_argument("--train-steps", type=nonneg_int, default=None,
                        help=f"live training steps, 0 = none (default {LIVE_STEPS[False]}, quick {LIVE_STEPS[True]})")
    parser.add_argument("--tasks", nargs="+", choices=list(tasks.names()), default=list(DEMO_TASKS),
                        help=f"the tasks to evaluate (default: {' '.join(DEMO_TASKS)})")
    parser.add_argument("--live-task", choices=list(tasks.names()), default="lexical",
                        help="the task of the live training (default: lexical)")
    parser.add_argument("--compose", nargs="+", choices=list(tasks.names()), default=None, metavar="TASK",
                        help="also decode these tasks' shipped adapters at once (two or more, each at its shipped "
                             "alpha) on each of them that is in --tasks, beside each adapter alone: rows composed "
                             "and ipa_<other task>")
    parser.add_argument("--compose-weights", nargs="+", type=float, default=None, metavar="W",
                        help="the --compose adapters' weights, one per adapter in --compose's order (default: each "
                             "adapter's shipped alpha); scripts/sweep_compose.py chooses them on validation rows")
    parser.add_argument("--no-larger-base", action="store_true",
                        help="skip the larger untuned model alone (Gemma 3 270M base), which is otherwise "
                             "evaluated when `ipa-fast setup --larger-base` has built it")
    parser.add_argument("--home", default=None, help="the cache built by `ipa-fast setup` (default: IPA_FAST_HOME, "
                        "else the per-user cache)")


def validate(args) -> None:
    """Before any work: every model and data file the demo reads is there (looked up through
    :mod:`ipa_fast.embedded` only, with ``--home`` as ``IPA_FAST_HOME``); otherwise one line
    naming what is missing and the command that gets it."""
    import os

    if args.home:
        if not Path(args.home).is_dir():
            raise FileNotFoundError(f"--home directory not found: {args.home}")
        os.environ["IPA_FAST_HOME"] = str(Path(args.home))
    if args.plot and not args.plot.lower().endswith(".png"):
        raise ValueError(f"--plot must be a .png path, got {args.plot}")
    needs = [(embedded.base_path, ()), (embedded.adapter_init_path, ())]
    needs += [(embedded.task_data_path, (t, s)) for t in args.tasks for s in ("validation", "test")]
    missing = []
    for fn, fn_args in needs:
        try:
            fn(*fn_args)
        except FileNotFoundError as exc:
            missing.append(exc)
    if missing:
        more = f" (and {len(missing) - 1} more missing asset(s))" if len(missing) > 1 else ""
        raise FileNotFoundError(f"the demo needs the embedded models and data: {missing[0]}{more}")
    if getattr(args, "compose", None):
        named = list(dict.fromkeys(args.compose))
        if len(named) < 2:
            raise ValueError(f"--compose needs two or more tasks' adapters, got {named}")
        shipped = trained_adapters(named)
        if len(shipped) < len(named):
            raise FileNotFoundError(f"--compose: no shipped adapter in the cache for "
                                    f"{sorted(set(named) - set(shipped))} (shipped: {sorted(trained_adapters())}; "
                                    f"`ipa-fast setup` builds them)")
        weights = getattr(args, "compose_weights", None)
        if weights is not None and (len(weights) != len(named) or not all(0 <= w < float("inf") for w in weights)):
            raise ValueError(f"--compose-weights takes {len(named)} finite numbers >= 0 (one per --compose adapter "
                             f"{named}), got {weights}")
        if not set(named) & set(args.tasks):
            raise ValueError(f"--compose: none of {named} is in --tasks {args.tasks}: the composition is evaluated "
                             f"on the tasks of its adapters")
    elif getattr(args, "compose_weights", None) is not None:
        raise ValueError("--compose-weights needs --compose (the adapters they weigh)")


def trained_adapters(names=None) -> dict:
    """``{task: path}`` of the shipped trained adapters built into the cache (some may be missing)."""
    out = {}
    for task in names or tasks.names():
        try:
            out[task] = embedded.adapter_path(task)
        except FileNotFoundError:
            pass
    return out


def mean_se(values) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation / sqrt(n); 0 for one value)."""
    import math

    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return m, sd / math.sqrt(n)


def mean_ci95(values) -> list[float]:
    """Normal-approximation 95 % interval of a mean over prompts (a list of two floats)."""
    m, se = mean_se(values)
    return [m - 1.96 * se, m + 1.96 * se]


def evaluate_variant(lm, task: str, rows: list[dict], *, alpha: float, base_weight: float = 1.0,
                     ppl_model=None, seeds: int = 1) -> dict:
    """Score one decoding variant on ``rows`` with the fixed protocol; keeps per-prompt scores.
    With ``seeds`` > 1 every prompt is decoded once per seed (seed s adds ``SEED_STRIDE * s``) and
    the per-prompt score is the mean over seeds; the other metrics pool every output."""
    if seeds > 1:
        return _pool_seeds([_evaluate_once(lm, task, rows, alpha=alpha, base_weight=base_weight, ppl_model=ppl_model,
                                           seed_offset=SEED_STRIDE * s) for s in range(seeds)])
    return _evaluate_once(lm, task, rows, alpha=alpha, base_weight=base_weight, ppl_model=ppl_model)


def _pool_seeds(runs: list[dict]) -> dict:
    """One result from single-seed runs over the same rows: the per-prompt score is the mean over
    seeds, every other metric the mean of the runs', the texts the first seed's."""
    seeds = len(runs)
    per = [sum(r["per_prompt"][i] for r in runs) / seeds for i in range(len(runs[0]["per_prompt"]))]
    out = {"score": sum(per) / len(per), "score_ci95": mean_ci95(per), "per_prompt": per,
           "texts": runs[0]["texts"], "seeds": seeds}
    for k in runs[0]:
        if k not in out and k not in ("score", "score_ci95", "per_prompt", "texts"):
            out[k] = sum(r[k] for r in runs) / seeds
    return out


def _evaluate_once(lm, task: str, rows: list[dict], *, alpha: float, base_weight: float = 1.0,
                   ppl_model=None, seed_offset: int = 0) -> dict:
    prompts = [r["prompt"] for r in rows]
    texts, prompt_ids, token_ids = [], [], []
    for start in range(0, len(prompts), EVAL_CHUNK):  # row r's seed is PROTOCOL seed + r in any chunking
        gen = lm.generate(prompts[start:start + EVAL_CHUNK], max_new_tokens=PROTOCOL["max_new_tokens"],
                          temperature=PROTOCOL["temperature"], top_p=PROTOCOL["top_p"],
                          seed=PROTOCOL["seed"] + seed_offset + start, alpha=alpha, base_weight=base_weight)
        texts += gen.texts
        prompt_ids += gen.prompt_token_ids
        token_ids += gen.token_ids
    return score_texts(task, rows, texts, prompt_ids, token_ids, ppl_model or lm.base, lm.pad_id)


def score_texts(task: str, rows: list[dict], texts: list[str], prompt_ids, token_ids, ppl_model, pad_id) -> dict:
    """One variant's outputs scored with the protocol's metrics: the task's score (per prompt, with
    its 95 % interval) and metrics, distinct-2, and the perplexity under ``ppl_model`` of each
    non-empty reply (``token_ids``) given its prompt (``prompt_ids``), both in that model's tokens."""
    from ipa_fast.tasks.evaluation import distinct_n, perplexity

    spec = tasks.get(task)
    per = spec.score_fn(rows, texts)
    out = spec.metrics_fn(rows, texts)
    nonempty = [(p, t) for p, t in zip(prompt_ids, token_ids) if t]
    ppl = perplexity(ppl_model, [p for p, _ in nonempty], [t for _, t in nonempty],
                     pad_token_id=pad_id) if nonempty else float("nan")
    return {"score": sum(per) / len(per), "score_ci95": mean_ci95(per), **out, "perplexity": ppl,
            "distinct_2": distinct_n(texts, 2), "per_prompt": per, "texts": texts}


# ----------------------------------------------------------------------------- the larger untuned model

_CHATML_USER = "<|im_start|>user\n"


def user_turn(prompt: str) -> str:
    """The user's text of a chat row's prompt (rendered in the base's ChatML template); a prompt
    without that template is taken as the text itself."""
    start = prompt.rfind(_CHATML_USER)
    if start < 0:
        return prompt.strip()
    body = prompt[start + len(_CHATML_USER):]
    end = body.find("<|im_end|>")
    return (body if end < 0 else body[:end]).strip()


def few_shot_examples(task: str) -> list[tuple[str, str]]:
    """The worked examples of the larger untuned model's prompt for a chat task: the first
    LARGER_BASE_SHOTS rows of the task's *train* split (never a held-out row) that carry a one-line
    ``reference``, as (user turn, reference). A task whose rows have no reference gets none: its
    prompt is the instruction frame alone (zero-shot)."""
    shots = []
    for row in embedded.read_task(task, "train"):
        ref = row.get("reference")
        if isinstance(ref, str) and ref.strip() and "\n" not in ref.strip():
            shots.append((user_turn(row["prompt"]), ref.strip()))
            if len(shots) == LARGER_BASE_SHOTS:
                break
    return shots


def larger_base_prompts(task: str, rows: list[dict], shots: list[tuple[str, str]] | None = None) -> list[str]:
    """Each row's prompt for an untuned LM (no chat template, no instruction tuning): for a
    ``continuation`` task the raw prompt text; for a ``chat`` task a fixed few-shot raw-text prompt,
    ``Instruction: <user turn>\nAnswer: <reference>`` for each example of :func:`few_shot_examples`
    (blank line between), then the row's ``Instruction: ...\nAnswer:``; the reply is then cut by
    :func:`cut_reply`."""
    if tasks.get(task).prompt_style != "chat":
        return [r["prompt"] for r in rows]
    shots = few_shot_examples(task) if shots is None else shots
    head = "".join(f"Instruction: {q}\nAnswer: {a}\n\n" for q, a in shots)
    return [f"{head}Instruction: {user_turn(r['prompt'])}\nAnswer:" for r in rows]


def cut_reply(text: str) -> str:
    """A few-shot reply: its first line (leading whitespace dropped, then cut at the first newline:
    what follows is the model writing the next example)."""
    return text.lstrip().split("\n", 1)[0].strip()


def load_larger_base(path, device=None):
    """``(model, tokenizer)`` of the larger untuned model (fp32, eval; left padding). Its generation
    config is reset to the library's defaults (its own token ids only), so that :func:`larger_base_generate`
    samples with exactly the protocol's knobs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    if device is not None:
        model.to(device)
    cfg = model.config
    pad = tok.pad_token_id if tok.pad_token_id is not None else cfg.pad_token_id
    model.generation_config = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                               pad_token_id=pad if pad is not None else cfg.eos_token_id)
    return model, tok


def larger_base_generate(model, tok, prompts: list[str], *, seed: int) -> list[str]:
    """Sample the protocol's continuation of each prompt with Hugging Face ``generate`` (T, top-p,
    no top-k, ``max_new_tokens``), ``EVAL_CHUNK`` prompts per call, left-padded. Before each chunk
    ``torch.manual_seed(seed + start)`` (``start``: the chunk's first row), inside
    ``torch.random.fork_rng`` so that the caller's RNG state is left as it was. The random stream is
    torch's global generator as ``generate`` draws from it, not the project's per-row sampler: the
    same seed gives the same texts for the same chunking, but a row's text depends on the other
    rows of its chunk (they share the stream), unlike the other rows' decoding."""
    import torch

    device = next(model.parameters()).device
    texts = []
    for start in range(0, len(prompts), EVAL_CHUNK):
        enc = tok(prompts[start:start + EVAL_CHUNK], return_tensors="pt", padding=True).to(device)
        with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [], device_type=device.type):
            torch.manual_seed(seed + start)
            with torch.no_grad():
                out = model.generate(**enc, do_sample=True, temperature=PROTOCOL["temperature"],
                                     top_p=PROTOCOL["top_p"], top_k=0, max_new_tokens=PROTOCOL["max_new_tokens"])
        texts += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts


def evaluate_larger_base(larger, task: str, rows: list[dict], *, base_lm, seeds: int = 1) -> dict:
    """The larger untuned model alone on ``rows`` with the fixed protocol (seed s: the protocol seed +
    ``SEED_STRIDE * s``, as every row): prompts of :func:`larger_base_prompts`, a chat task's replies
    cut by :func:`cut_reply`; the task's own score and metrics, distinct-2, and the perplexity under
    the embedded base (``base_lm``'s base) of each reply, re-tokenised with the base's tokenizer,
    given the row's own (base-format) prompt, as the base's replies are scored. ``larger``:
    ``(model, tokenizer)`` of :func:`load_larger_base`."""
    model, tok = larger
    chat = tasks.get(task).prompt_style == "chat"
    shots = few_shot_examples(task) if chat else []
    prompts = larger_base_prompts(task, rows, shots)
    prompt_ids = base_lm.encode([r["prompt"] for r in rows])  # the rows' prompts as the base reads them

    def once(seed_offset: int) -> dict:
        raw = larger_base_generate(model, tok, prompts, seed=PROTOCOL["seed"] + seed_offset)
        texts = [cut_reply(t) for t in raw] if chat else raw
        ids = [base_lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return score_texts(task, rows, texts, prompt_ids, ids, base_lm.base, base_lm.pad_id)

    out = _pool_seeds([once(SEED_STRIDE * s) for s in range(seeds)]) if seeds > 1 else once(0)
    out["prompting"] = (f"{len(shots)}-shot raw text (train rows), first line of the reply" if chat
                        else "the raw prompt")
    out["rng"] = "torch (Hugging Face generate), one manual_seed per chunk of rows"
    return out


def load_pair(base, adapter_dir, tok):
    """A TailoredLM over the loaded ``base`` (shared by every variant) and the adapter in
    ``adapter_dir`` at its stored alpha and prefix (``ipa_adapter.json``)."""
    from ipa_fast.decoding.tailored import TailoredLM

    return TailoredLM.from_pretrained(base, str(adapter_dir), tokenizer=tok, dtype="float32")


def load_composed(base, tok, paths: dict, weights=None):
    """``(lm, paths)``: one TailoredLM over the loaded ``base`` that decodes every adapter of
    ``paths`` (``{task: adapter dir}``) at once, each at its stored alpha or at ``weights`` (one
    per adapter, in ``paths``' order): ``z = base + sum_i alpha_i * adapter_i`` (a residual
    adapter contributes its difference to its initial weights)."""
    from ipa_fast.decoding.tailored import TailoredLM

    return TailoredLM.from_pretrained(base, [str(p) for p in paths.values()], tokenizer=tok, dtype="float32",
                                      alpha=None if weights is None else list(weights)), paths


def adapter_alone(lm):
    """The TailoredLM whose row at base weight 0 and alpha 1 is the trained adapter's own
    next-token distribution: ``lm`` itself, or for a residual adapter (adapter - initial, no
    distribution of its own) the trained network over the same base."""
    from ipa_fast.decoding.residual import ResidualAdapter
    from ipa_fast.decoding.tailored import TailoredLM

    if isinstance(lm.adapter, ResidualAdapter):
        return TailoredLM(lm.base, lm.adapter.trained, lm.tokenizer, alpha=1.0)
    return lm


def run_task(task: str, rows: list[dict], init_lm, trained: Path | None, seeds: int = 1,
             larger=None, composed=None) -> tuple[dict, list[dict]]:
    """Base alone, base + trained adapter, base + initial adapter (same alpha), adapter alone; and
    with ``larger`` (``(model, tokenizer)`` of :func:`load_larger_base`) the larger untuned model
    alone, evaluated last.

    ``composed``: ``(lm, {task: adapter dir})``, the ``--compose`` adapters decoded at once
    (:func:`load_composed`). On a task with its own adapter among them this adds each *other*
    adapter alone with the base (row ``ipa_<other>``) and the composition (row ``composed``, with
    ``gain_kept``: its gain over the base as a fraction of the task's own adapter's gain, and the
    paired difference to that adapter, ``delta_vs_ipa_ci95``)."""
    import functools
    evaluate = functools.partial(evaluate_variant, task=task, rows=rows, seeds=seeds)
    variants = {"base": evaluate(init_lm, alpha=0.0)}
    if trained is not None:
        lm = load_pair(init_lm.base, trained, init_lm.tokenizer)
        variants["ipa"] = evaluate(lm, alpha=lm.alpha)
        # the same product with the *initial* adapter: a second LM alone reshapes the base, so this
        # row separates what training added. An adapter trained from a zeroed output, or as a
        # residual on its initial weights (adapter - initial), started as the base itself: its
        # untrained row is the base's.
        from ipa_fast.decoding.residual import ResidualAdapter
        starts_at_base = isinstance(lm.adapter, ResidualAdapter) or bool(lm.metadata.get("zero_init_output"))
        variants["ipa_untrained"] = (dict(variants["base"], untrained_is_base=True) if starts_at_base else
                                     evaluate(init_lm, alpha=lm.alpha))
        variants["adapter_only"] = evaluate(adapter_alone(lm), alpha=1.0, base_weight=0.0, ppl_model=init_lm.base)
    else:  # the product at the alpha the task's recipe trains at (`ipa-fast train --task T`'s preset)
        recipe = tasks.get(task).recipe
        starts_at_base = bool(recipe.get("zero_init_output") or recipe.get("residual"))
        variants["ipa_untrained"] = (dict(variants["base"], untrained_is_base=True) if starts_at_base
                                     else evaluate(init_lm, alpha=recipe.get("alpha", init_lm.alpha)))
        variants["adapter_init_only"] = evaluate(init_lm, alpha=1.0, base_weight=0.0)
    if composed is not None and trained is not None and task in composed[1]:
        composed_lm, paths = composed
        for other, path in paths.items():
            if other != task:
                other_lm = load_pair(init_lm.base, path, init_lm.tokenizer)
                variants[f"ipa_{other}"] = dict(evaluate(other_lm, alpha=other_lm.alpha), alpha=other_lm.alpha)
        variants["composed"] = dict(evaluate(composed_lm, alpha=None),
                                    weights=dict(zip(paths, map(float, composed_lm.weights))))
    if larger is not None:
        variants["larger_base"] = evaluate_larger_base(larger, task, rows, base_lm=init_lm, seeds=seeds)
    base_per = variants["base"]["per_prompt"]
    for name, v in variants.items():  # paired difference to the base alone, over the same prompts
        if name != "base":
            v["delta_vs_base_ci95"] = mean_ci95([a - b for a, b in zip(v["per_prompt"], base_per)])
    if "ipa" in variants:
        variants["ipa"]["delta_vs_untrained_ci95"] = mean_ci95(
            [a - b for a, b in zip(variants["ipa"]["per_prompt"], variants["ipa_untrained"]["per_prompt"])])
    if "composed" in variants:
        c, own = variants["composed"], variants["ipa"]
        gain = own["score"] - variants["base"]["score"]
        c["gain_kept"] = (c["score"] - variants["base"]["score"]) / gain if gain else None
        c["delta_vs_ipa_ci95"] = mean_ci95([a - b for a, b in zip(c["per_prompt"], own["per_prompt"])])
    samples = [{"prompt": r["prompt"], **{k: v["texts"][i] for k, v in variants.items()}} for i, r in enumerate(rows[:3])]
    drop = ("per_prompt", "texts")
    return {k: {m: x for m, x in v.items() if m not in drop} for k, v in variants.items()}, samples


def model_record(path: Path, name: str) -> dict:
    """Name, sha256 and parameter count of a model directory built by ``ipa-fast setup``."""
    import json
    import math

    from safetensors import safe_open

    stamp = json.loads((path / embedded.STAMP).read_text())
    meta = json.loads((path / "ipa_adapter.json").read_text()) if (path / "ipa_adapter.json").is_file() else {}
    shared = set(meta.get("shared_with_base", {}))
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        sizes = {k: math.prod(f.get_slice(k).get_shape()) for k in f.keys()}
    sha = stamp.get("model_sha256") or stamp.get("shipped_sha256")
    # parameters: all the model computes with; own_parameters: without the tensors shared with the base
    return {"name": name, "sha256": sha, "parameters": sum(sizes.values()),
            "own_parameters": sum(v for k, v in sizes.items() if k not in shared)}


def live_training(out: Path, task: str, steps: int, quick: bool) -> dict:
    """A short IPA training run from the initial adapter (``ipa-fast train`` in-process), with
    its progress bar; held-out reward before and after (the task's validation split)."""
    from ipa_fast.training import TrainConfig, train

    run_dir = out / f"live-training-{task}"
    if run_dir.exists():  # a live run is cheap and must reflect the models as they are now: start afresh
        import shutil
        shutil.rmtree(run_dir)
    cfg = TrainConfig(task=task, steps=steps, out=str(run_dir), base=str(embedded.base_path()),
                      adapter=str(embedded.adapter_init_path()), eval_every=0, checkpoint_every=max(steps, 1),
                      **live_recipe(task, quick))
    summary = train(cfg)
    return {"task": task, "algo": cfg.algo, "steps": summary["steps"], "sft_steps": cfg.sft_steps,
            "reward_before": summary["initial_eval"]["reward"], "reward_after": summary["final_eval"]["reward"],
            "reward_curve": summary["reward_curve"]}


def print_table(results: dict) -> None:
    print(f"\nEvaluation protocol: {PROTOCOL}")
    print(f"{'task':8} {'variant':17} {'score':>7} {'95% interval':>15} {'extra':>18} {'perplexity':>11} {'distinct-2':>11}")
    for task, variants in results.items():
        for name, m in variants.items():
            lo, hi = m["score_ci95"]
            key = tasks.get(task).summary_metric
            extra = f"{key} {m[key]:.3f}" if key in m else ""
            print(f"{task:8} {name:17} {m['score']:7.3f} [{lo:6.3f},{hi:6.3f}] {extra:>18} "
                  f"{m['perplexity']:11.2f} {m['distinct_2']:11.3f}")
        print(f"{'':8} score = {tasks.get(task).score_label}")
        c = variants.get("composed")
        if c is not None and c.get("gain_kept") is not None:
            lo, hi = c["delta_vs_ipa_ci95"]
            print(f"{'':8} composed keeps {100 * c['gain_kept']:.0f} % of the {task} adapter's gain over the base "
                  f"(composed - {task} adapter alone: [{lo:+.3f}, {hi:+.3f}])")


def label(variant: str) -> str:
    """A variant's bar label: LABELS, or "base + <task> adapter" for another task's adapter (--compose)."""
    if variant in LABELS:
        return LABELS[variant]
    return f"base +\n{variant[4:]}\nadapter" if variant.startswith("ipa_") else variant


def plot(results: dict, live: dict | None, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results) + (live is not None)
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n, 3.4), squeeze=False)
    axes = list(axes[0])  # one task and no live run is one panel
    colors = {"base": "#999", "ipa": "#1f77b4", "ipa_untrained": "#aec7e8", "adapter_only": "#ff7f0e",
              "adapter_init_only": "#ffbb78", "larger_base": "#9467bd", "composed": "#2ca02c"}
    for ax, (task, variants) in zip(axes, results.items()):
        names = list(variants)
        scores = [variants[k]["score"] for k in names]
        err = [[s - variants[k]["score_ci95"][0] for s, k in zip(scores, names)],
               [variants[k]["score_ci95"][1] - s for s, k in zip(scores, names)]]
        bars = ax.bar([label(k) for k in names], scores, yerr=err, capsize=3,
                      color=[colors.get(k, "#c5b0d5" if k.startswith("ipa_") else "#777") for k in names])
        for bar, k in zip(bars, names):  # the score alone can hide degenerate text: show fluency and diversity
            ax.annotate(f"ppl {variants[k]['perplexity']:.3g}\ndist-2 {variants[k]['distinct_2']:.2f}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
        ax.margins(y=0.3)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_title(f"{task}: {tasks.get(task).score_label}\n(95 % intervals over prompts)", fontsize=9)
    if live is not None:
        vals = [live["reward_before"], live["reward_after"]]
        axes[-1].bar(["before", "after"], vals, color=["#999", "#2ca02c"])
        for x, v in enumerate(vals):
            axes[-1].text(x, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        lo, hi = min(vals), max(vals)  # a zoomed axis: the change is small next to the reward itself
        axes[-1].set_ylim(max(0.0, lo - 2 * (hi - lo) - 0.02), hi + (hi - lo) + 0.02)
        axes[-1].set_title(f"live {live['algo']} training ({live['task']}), {live['steps']} steps:\n"
                           "held-out reward", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    validate(args)
    n_prompts = args.prompts or DEFAULT_PROMPTS[args.quick]
    steps = args.train_steps if args.train_steps is not None else LIVE_STEPS[args.quick]
    out = Path(args.out)
    t0 = time.perf_counter()
    base_dir, init_dir = embedded.base_path(), embedded.adapter_init_path()
    models = {"base": model_record(base_dir, embedded.BASE["name"]),
              "adapter_init": model_record(init_dir, "adapter-init")}
    print(f"[demo] base {models['base']['name']} ({models['base']['parameters'] / 1e6:.1f}M parameters), "
          f"adapter initialisation {models['adapter_init']['own_parameters'] / 1e6:.1f}M of its own "
          f"(+ the base's {(models['adapter_init']['parameters'] - models['adapter_init']['own_parameters']) / 1e6:.1f}M "
          "embedding, shared)")
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    tok.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    init_lm = load_pair(base, init_dir, tok)
    larger = None
    if not getattr(args, "no_larger_base", False):
        try:
            larger_dir = embedded.larger_base_path()
        except FileNotFoundError:
            print(f"[demo] the larger untuned model is not in the cache (`{embedded.LARGER_BASE_CMD}` builds it, "
                  f"{embedded.LARGER_BASE['licence']}): its row is left out")
        else:
            models["larger_base"] = model_record(larger_dir, embedded.LARGER_BASE["name"])
            print(f"[demo] larger untuned model {models['larger_base']['name']} "
                  f"({models['larger_base']['parameters'] / 1e6:.1f}M parameters) alone: one more row per task")
            larger = load_larger_base(larger_dir, next(base.parameters()).device)
    trained = trained_adapters(args.tasks)
    composed = None
    if getattr(args, "compose", None):
        composed = load_composed(base, tok, trained_adapters(list(dict.fromkeys(args.compose))),
                                 weights=getattr(args, "compose_weights", None))
        print(f"[demo] composition: {' + '.join(f'{w:g} x {t}' for t, w in zip(composed[1], composed[0].weights))} "
              f"adapters at once, on each task that has its own adapter")
    results, samples = {}, {}
    for task in args.tasks:
        rows = embedded.read_task(task, args.split)[:n_prompts]
        what = ("base alone vs base + IPA adapter (trained, untrained) vs adapter alone" if task in trained else
                "no trained adapter is shipped for this task yet: base alone vs base + the initial adapter vs "
                "the initial adapter alone")
        print(f"[demo] {task}: {what}, on {len(rows)} held-out {args.split} prompts x {args.seeds} seed(s)"
              + (" (content warning: outputs may be offensive)" if task == "detox" else ""), flush=True)
        results[task], samples[task] = run_task(task, rows, init_lm, trained.get(task), args.seeds, larger, composed)
    print_table(results)
    for task, rows in samples.items():
        print(f"\nSamples ({task}):")
        for row in rows:
            print(f"  prompt: {row['prompt']!r}")
            for name, text in row.items():
                if name != "prompt":
                    print(f"    {name:17} {text!r}")
    live = None
    if steps:
        print(f"\n[demo] live IPA training ({live_recipe(args.live_task)['algo']}, {args.live_task}) from the initial "
              f"adapter, {steps} steps", flush=True)
        live = live_training(out, args.live_task, steps, args.quick)
        print(f"[demo] held-out reward {live['reward_before']:.3f} -> {live['reward_after']:.3f}")
    plot_path = Path(args.plot) if args.plot else out / "demo.png"
    plot(results, live, plot_path)
    print(f"[demo] plot: {plot_path}   total {time.perf_counter() - t0:.0f} s")
    return {"mode": "ipa", "protocol": PROTOCOL, "models": models, "prompts_per_task": n_prompts,
            "seeds": args.seeds, "split": args.split,
            "tasks": results, "live_training": live, "samples": samples, "plot": str(plot_path),
            "seconds": time.perf_counter() - t0}
