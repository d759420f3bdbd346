#!/usr/bin/env python
"""Ship a trained adapter: ``ipa-fast train``'s run directory -> ``models/adapters/<task>``.

    python scripts/export_adapter.py runs/adapter-detox --task detox

Writes the adapter in fp16 safetensors (with its tokenizer files and ``ipa_adapter.json``),
a ``MODEL_CARD.md`` holding the exact ``ipa-fast train`` command (rebuilt from the run's
``config.json``), the held-out evaluations of ``metrics.jsonl``, the reward curve, and then
refreshes ``models/MANIFEST.json`` (sha256 and size of every shipped weight file).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

from ipa_fast import tasks

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
LIMIT_MIB = 30


def train_command(config: dict) -> str:
    """The ``ipa-fast train`` command line that reproduces a run (flags that differ from the defaults)."""
    from ipa_fast.training import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    parts = ["ipa-fast train"]
    for name, value in config.items():
        if name in defaults and value != defaults[name] and name != "progress":
            parts.append(f"--{name.replace('_', '-')} {value}")
    return " ".join(parts)


def shipped_name(path: str | None, task: str) -> str | None:
    """``data/tasks/<task>/<file>`` when ``path`` holds exactly a shipped task file's bytes."""
    from ipa_fast import embedded

    if not path or not Path(path).is_file():
        return None
    sha = embedded.sha256_file(path)
    for f in sorted((ROOT / "data/tasks" / task).glob("*.jsonl")):
        if embedded.sha256_file(f) == sha:
            return f.relative_to(ROOT).as_posix()
    return None


def data_labels(config: dict, task: str) -> tuple[str, str]:
    """What a run trained and evaluated on, in the card's words (shipped files by their repository path)."""
    prompts = config.get("prompts")
    n_eval = config["eval_size"]
    if not prompts:
        split = config.get("train_split", "train")
        return (f"`data/tasks/{task}/{split}.jsonl`", f"the first {n_eval} rows of `data/tasks/{task}/validation.jsonl`"
                if not config.get("eval_prompts") else f"the first {n_eval} rows of `{config['eval_prompts']}`")
    name = shipped_name(prompts, task) or Path(prompts).name
    held = (f"the first {n_eval} rows of `{shipped_name(config['eval_prompts'], task) or config['eval_prompts']}`"
            if config.get("eval_prompts") else f"the last {n_eval} rows of `{name}`, held out of training")
    return f"`{name}`", held


def write_manifest() -> dict:
    from ipa_fast import embedded

    return embedded.write_models_manifest(MODELS)


def export(run: Path, task: str, dest: Path, note: str | None = None, alpha: float | None = None,
           adapter: Path | None = None, command: str | None = None) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    if alpha is not None and not alpha > 0:
        raise SystemExit(f"--alpha must be > 0, got {alpha}")
    src = adapter or run / "adapter"
    if not (src / "ipa_adapter.json").is_file():
        raise SystemExit(f"{src} holds no ipa_adapter.json: not an adapter directory")
    config = json.loads((run / "config.json").read_text())
    log = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    at = json.loads((src / "ipa_adapter.json").read_text()).get("steps")
    if at is not None:  # an adapter saved at an earlier step of the run: its log up to that step
        log = [r for r in log if r["step"] <= at]
    evals = [r for r in log if r["type"] == "eval"]
    config["steps"] = max(r["step"] for r in log)  # what was run (a resume may have passed another --steps)
    if not evals:
        raise SystemExit(f"{run}/metrics.jsonl holds no evaluation: is the run finished?")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    from ipa_fast import embedded

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    fp32_embedding = model.get_input_embeddings().weight.detach().clone()
    model.half().save_pretrained(tmp, safe_serialization=True)
    shared = embedded.strip_shared_embedding(tmp / "model.safetensors", config.get("base"), fp32_embedding)
    (tmp / "model.safetensors").chmod(0o644)
    # an adapter sharing the base's embedding has the base's tokenizer (ipa_adapter.json's
    # tokenizer_hash is checked when it loads): `ipa-fast setup` copies the base's files in
    tokenizer_files = () if shared else ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    for name in (*tokenizer_files, "ipa_adapter.json"):
        if (src / name).exists():
            shutil.copy(src / name, tmp / name)
    meta = json.loads((tmp / "ipa_adapter.json").read_text())
    meta["base"] = embedded.BASE["name"]
    residual = meta.get("residual_of")
    if shared:  # the embedding table is the base's: named by hash, rebuilt by `ipa-fast setup`
        meta["shared_with_base"] = shared
    trained_alpha = meta["alpha"]
    if alpha is not None:  # the deployment strength of the adapter, chosen on validation data
        meta["alpha"] = alpha
    (tmp / "ipa_adapter.json").write_text(json.dumps(meta, indent=2) + "\n")
    # the curve of what was shipped: the run's log up to the adapter's step
    from ipa_fast.training.trainer import plot_reward_curve

    (tmp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    plot_reward_curve(tmp / "metrics.jsonl", tmp / "reward_curve.png")
    (tmp / "metrics.jsonl").unlink()
    size = (tmp / "model.safetensors").stat().st_size
    if size > LIMIT_MIB * 2**20:
        raise SystemExit(f"{tmp}/model.safetensors is {size / 2**20:.1f} MiB > {LIMIT_MIB} MiB")
    n_params = sum(p.numel() for p in model.parameters())
    sft = config.get("sft_steps", 0)
    rl_steps = config["steps"] - sft
    train_lines = [r for r in log if r["type"] == "train"]
    secs = sum(r["time/step"] for r in log if r["type"] in ("train", "sft"))
    sft_what = ("NLL of the adapter alone" if config.get("sft_target") == "adapter" else "tailored NLL")
    sft_rows = config.get("sft_batch_size") or config["batch_size"]
    rows = "\n".join(
        f"| {r['step']} | {r['reward']:.4f} | "
        + ", ".join(f"{k} {v:.4f}" for k, v in r.items() if k not in ("type", "step", "reward", "time/eval")) + " |"
        for r in evals)
    train_data, eval_data = data_labels(config, task)
    own = (f", {n_params - model.get_input_embeddings().weight.numel():,} of them its own "
           "beside the shared embedding" if shared else "")
    quark = (f"; input embedding rows >= {meta.get('vocab_size', model.config.vocab_size)} are Quark's reward-quantile "
             "control tokens, never emitted" if meta.get("control_tokens") else "")
    prefix_line = (f"the adapter reads `{meta['adapter_prefix_tokens']}` before the prompt "
                   if meta.get("adapter_prefix_tokens") else "no control prefix ")
    initial = "`models/adapter-init`" if residual and residual.get("embedded") else "weights it started from"
    residual_line = (f"\n* Residual: the adapter's logits are its own minus those of the untrained {initial}\n"
                     "  (named by sha256 under `residual_of` in ipa_adapter.json, loaded with it), so the untrained\n"
                     "  policy is the base itself and training moves it from there." if residual else "")
    card = f"""# adapters/{task}: an IPA policy adapter for the {task} task

Trained with `ipa-fast train` ({config['algo']}) on top of the frozen embedded base
({embedded.BASE['name']}), from `models/adapter-init`; part of ipa_fast's embedded default
(`ipa-fast demo` evaluates it on the held-out test split). `ipa-fast setup` assembles it into the
cache; load it with

    from ipa_fast import TailoredLM, embedded
    lm = TailoredLM.from_pretrained(str(embedded.base_path()), str(embedded.adapter_path("{task}")))

* Architecture: `transformers.{type(model).__name__}` ({n_params:,} parameters{own}{quark}), fp16 safetensors
  ({size / 2**20:.1f} MiB{', without the embedding it shares with the base, named by sha256 in ipa_adapter.json' if shared else ''}),
  sha256 `{embedded.sha256_file(tmp / 'model.safetensors')}`.
* Tailored policy: softmax(base + {meta['alpha']} x {'(adapter - adapter-init)' if residual else 'adapter'}){
    '' if meta['alpha'] == trained_alpha else f" (trained at alpha {trained_alpha}; the shipped alpha was chosen on validation rows, see the status below)"}; the adapter reads
  {prefix_line}(`ipa_adapter.json`).{residual_line}
* Training: {sft} supervised warm-start steps ({sft_what} of the `{config.get('sft_field', 'reference')}` field of
  the training rows, {sft_rows} rows a step) then {rl_steps} {config['algo']} steps; reward `{config.get('reward') or config['task']}`
  on {train_data}, evaluated on {eval_data} (T=1, top_p={config['eval_top_p']}, {config['eval_max_new_tokens']} new tokens,
  fixed seeds); {len(train_lines) + sft} steps took {secs / 3600:.2f} hours on a shared 2-core CPU.

Command (run from the repository root):

    {command or train_command(config)}
    python scripts/export_adapter.py {run.relative_to(ROOT) if run.is_relative_to(ROOT) else 'RUN'} --task {task}{f' --alpha {alpha}' if alpha is not None else ''}

Held-out evaluations during training (`reward_curve.png`):

| step | reward | other metrics |
|---|---|---|
{rows}

{("**Status.** " + note + chr(10) + chr(10)) if note else ""}Test-split numbers (base alone vs base + this adapter vs the adapter alone) are the demo's:
`ipa-fast demo --tasks {task} --json runs/demo/demo.json`, reported in the repository README.

Licence: derived from the embedded corpus (see `data/README.md`); content warning as for
the base: outputs can be offensive.
"""
    (tmp / "MODEL_CARD.md").write_text(card)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)
    write_manifest()
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="an `ipa-fast train --out` directory holding adapter/")
    ap.add_argument("--task", required=True, choices=list(tasks.names()))
    ap.add_argument("--dest", type=Path, default=None, help="default: models/adapters/<task>")
    ap.add_argument("--alpha", type=float, default=None,
                    help="the shipped alpha (ipa_adapter.json), e.g. chosen on validation rows; default: the trained one")
    ap.add_argument("--note", default=None, help="a status paragraph for the model card (what the adapter does and does not do)")
    ap.add_argument("--adapter", type=Path, default=None,
                    help="the adapter directory to ship (default: RUN/adapter), e.g. one saved at an earlier step")
    ap.add_argument("--command", default=None,
                    help="the training command for the card (default: rebuilt from RUN/config.json)")
    args = ap.parse_args(argv)
    dest = export(args.run.resolve(), args.task, args.dest or MODELS / "adapters" / args.task, args.note,
                  args.alpha, args.adapter.resolve() if args.adapter else None, args.command)
    print(f"wrote {dest} and models/MANIFEST.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
