"""Distil an adapter initialisation from the base: its first layers over its frozen embeddings.

The adapter is the base's first ``--layers`` decoder layers, its final norm and its tied
embedding / output head. Cut straight from the base, such an early exit is not a language model
(on the project's corpus its NLL is ~20 nats, worse than uniform); this script trains the layers
and the norm — never the embedding, which stays the base's and is shared by hash — to match the
base's next-token distribution (forward KL over the full vocabulary, every position) on a mix of
corpus documents and task prompts. The result is a real LM over the base's tokenizer that is
small enough to train with RL on a CPU.

    python training/distill_adapter.py --base BASE_DIR --out runs/adapter-init-distil \
        --layers 4 --steps 600 --batch-size 16 --seq-len 64

Writes ``<out>/adapter`` (a plain Hugging Face directory, embedding included) and
``<out>/metrics.jsonl``; resumes from ``<out>/state`` (parameters and step; the optimizer's
moments are restarted on resume, which this warm-up tolerates). Then ship it:

    python training/distill_adapter.py --base BASE_DIR --out runs/adapter-init-distil --ship models/adapter-init

writes fp16 layers without the shared embedding (named by hash in ``ipa_adapter.json``; ``ipa-fast
setup`` puts it back) and a model card with the command and the distillation curve.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def cut_adapter(base, layers: int):
    """The base's first ``layers`` layers + final norm + tied head, as a new CausalLM."""
    from transformers import AutoModelForCausalLM

    if not 1 <= layers <= base.config.num_hidden_layers:
        raise ValueError(f"--layers must be in [1, {base.config.num_hidden_layers}], got {layers}")
    cfg = copy.deepcopy(base.config)
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:layers]
    adapter = AutoModelForCausalLM.from_config(cfg)
    missing = adapter.load_state_dict(base.state_dict(), strict=False).missing_keys
    if missing:
        raise RuntimeError(f"cannot cut the adapter from the base: missing {missing[:3]}")
    return adapter


def training_texts(tok, seed: int) -> list[str]:
    """Corpus documents, lexical instructions in the chat template, detox continuation prompts."""
    from ipa_fast import embedded

    rng = random.Random(seed)
    docs = [d for d in embedded.read_corpus("train") if len(d) > 40]
    lex = embedded.read_task("lexical", "train")
    det = embedded.read_task("detox", "train")
    chat = []
    for row in lex:
        msgs = [{"role": "user", "content": embedded.lexical_instruction(row["concepts"])},
                {"role": "assistant", "content": row.get("reference", "")}]
        chat.append(tok.apply_chat_template(msgs, tokenize=False))
    texts = rng.sample(docs, min(len(docs), 40000)) + rng.sample(chat, min(len(chat), 15000)) + \
        [r["prompt"] for r in det]
    rng.shuffle(texts)
    return texts


def ship(out: Path, dest: Path, base_dir: str, argv: list[str]) -> Path:
    """``<out>/adapter`` -> ``dest``: fp16 layers + norm, the base's embedding named by hash."""
    import shutil

    from transformers import AutoModelForCausalLM

    from ipa_fast import embedded

    if (out / "adapter/config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(out / "adapter", dtype=torch.float32)
    else:  # a run stopped early: its last saved state over the base's cut
        from safetensors.torch import load_file

        step = json.loads((out / "state/step.json").read_text())["step"]
        layers = 1 + max(int(k.split(".")[2]) for k in load_file(out / "state/adapter.safetensors")
                         if k.startswith("model.layers."))
        model = cut_adapter(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), layers)
        model.load_state_dict(load_file(out / "state/adapter.safetensors"), strict=False)
        log_all = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log_all if r["step"] <= step))
    fp32_embedding = model.get_input_embeddings().weight.detach().clone()
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.half().save_pretrained(tmp, safe_serialization=True)
    for f in tmp.iterdir():
        if f.name not in ("model.safetensors", "config.json", "generation_config.json"):
            f.unlink()
    shared = embedded.strip_shared_embedding(tmp / "model.safetensors", base_dir, fp32_embedding)
    if not shared:
        raise SystemExit("the adapter's embedding is not the base's: nothing to share")
    by_step = {}  # a resumed run logs the steps after its last save again: keep the last record of each
    for x in (out / "metrics.jsonl").read_text().splitlines():
        if x.strip():
            r = json.loads(x)
            by_step[r["step"]] = r
    log = [by_step[k] for k in sorted(by_step)]
    n_layers = model.config.num_hidden_layers
    trained = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    meta = {"format": "ipa_fast.adapter", "version": 1, "alpha": 1.0, "adapter_prefix": [],
            "adapter_prefix_tokens": [], "control_tokens": [], "vocab_size": model.config.vocab_size,
            "base": embedded.BASE["name"], "shared_with_base": shared,
            "distilled": {"layers": n_layers, "steps": log[-1]["step"] if log else 0}}
    (tmp / "ipa_adapter.json").write_text(json.dumps(meta, indent=2) + "\n")
    every = max(1, len(log) // 12)
    rows = "\n".join(f"| {r['step']} | {r['kl']:.3f} | {r['nll']:.3f} |" for r in log[::every] + log[-1:])
    size = (tmp / "model.safetensors").stat().st_size
    (tmp / "model.safetensors").chmod(0o644)
    recorded = (out / "commands.txt").read_text().splitlines() if (out / "commands.txt").is_file() else []
    commands = "\n".join("    " + c.replace(str(base_dir), "BASE_DIR") for c in
                         recorded + ["python training/distill_adapter.py " + " ".join(argv)])
    (tmp / "MODEL_CARD.md").write_text(f"""# adapter-init: the adapter initialisation of the embedded default

The first {n_layers} decoder layers and the final norm of the embedded base
({embedded.BASE['name']}), over the base's own (frozen, tied) embedding, distilled to the base's
next-token distribution (forward KL, full vocabulary, every position) on corpus documents,
lexical instructions in the chat template and detox continuation prompts. Cut straight from the
base such an early exit is not a language model (KL to the base ~16 nats); distillation makes it
one. {trained:,} trained parameters, fp16 safetensors ({size / 2**20:.1f} MiB, without the
embedding, which `ipa-fast setup` takes from the base after checking its sha256
`{shared[embedded.SHARED_EMBEDDING]}`).

Commands (run from the repository root, BASE_DIR being the base `ipa-fast setup` built; a later
line resumed the run from its last saved state with a new schedule):

{commands}

Distillation curve (per-token KL(base || adapter) and NLL of the batch's text, nats):

| step | KL | NLL |
|---|---|---|
{rows}
""")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)
    embedded.write_models_manifest(dest.parent)
    return dest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--ship", default=None, metavar="DEST",
                   help="ship <out>/adapter to DEST (e.g. models/adapter-init) instead of training")
    args = p.parse_args(argv)
    if args.ship:
        import sys
        ship(Path(args.out), Path(args.ship), args.base, [a for a in (argv or sys.argv[1:])])
        print(f"wrote {args.ship}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(args.out)
    (out / "state").mkdir(parents=True, exist_ok=True)
    import shlex
    import sys
    with open(out / "commands.txt", "a") as f:  # every invocation, for the model card
        f.write("python training/distill_adapter.py " + shlex.join(argv if argv is not None else sys.argv[1:]) + "\n")
    tok = AutoTokenizer.from_pretrained(args.base)
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
    for prm in base.parameters():
        prm.requires_grad_(False)
    adapter = cut_adapter(base, args.layers)
    emb = adapter.get_input_embeddings().weight
    trainable = [(n, q) for n, q in adapter.named_parameters() if q.data_ptr() != emb.data_ptr()]
    emb.requires_grad_(False)
    step = 0
    state_file, step_file = out / "state/adapter.safetensors", out / "state/step.json"
    if state_file.exists() and step_file.exists():
        missing = adapter.load_state_dict(load_file(state_file), strict=False)
        step = json.loads(step_file.read_text())["step"]
        print(f"resumed at step {step}", flush=True)
    params = [q for _, q in trainable]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
    texts = training_texts(tok, args.seed)
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    adapter.train()
    log = open(out / "metrics.jsonl", "a")
    while step < args.steps:
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        i0 = (step * args.batch_size) % len(texts)
        batch = texts[i0:i0 + args.batch_size]
        enc = tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=args.seq_len)
        t0 = time.time()
        with torch.no_grad():
            target = torch.log_softmax(base(**enc).logits.float(), -1)
        logits = adapter(**enc).logits.float()
        mask = enc.attention_mask.bool()
        lq = torch.log_softmax(logits, -1)
        kl = (target.exp() * (target - lq)).sum(-1)[mask].mean()
        nll = -(lq[:, :-1].gather(-1, enc.input_ids[:, 1:, None])[..., 0][mask[:, 1:]]).mean()
        opt.zero_grad(set_to_none=True)
        kl.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        rec = {"step": step, "kl": round(kl.item(), 4), "nll": round(nll.item(), 4), "lr": lr,
               "seconds": round(time.time() - t0, 2)}
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if step % 10 == 0 or step == 1:
            print(rec, flush=True)
        if step % args.save_every == 0 or step == args.steps:
            sd = {n: q.detach().contiguous() for n, q in trainable}
            save_file(sd, str(state_file) + ".tmp")
            os.replace(str(state_file) + ".tmp", state_file)
            step_file.write_text(json.dumps({"step": step}))
    adapter.eval()
    adapter.save_pretrained(out / "adapter")
    tok.save_pretrained(out / "adapter")
    print(f"wrote {out / 'adapter'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
