#!/usr/bin/env python
"""Pretrain the embedded GPT-2-architecture models on the project's corpus (CPU-sized).

One file, nanoGPT style: plain config values with command-line overrides, random windows of
a token stream, AdamW with warmup + cosine decay, atomic checkpoints (model, optimiser, step,
RNG states, config, data hash) every few minutes so a killed run resumes exactly, JSON-lines
logs, and an export to a Hugging Face directory with fp16 safetensors. Checkpoints are the RL
trainer's (training/checkpoint.py: safetensors + JSON with sha256 manifests, never a pickle)
under ``<out>/checkpoints/``; the newest good one resumes and exports.

    # the shipped base (d 192, 4 layers) and adapter initialisation (d 64, 2 layers)
    python -m ipa_fast.training.pretrain --out runs/base --n-embd 192 --n-layer 4 --n-head 4 \
        --max-steps 12000 --export models/base
    python -m ipa_fast.training.pretrain --out runs/adapter-init --n-embd 64 --n-layer 2 --n-head 2 \
        --max-steps 3000 --export models/adapter-init
    # resume after a kill: the same command with --resume
    # export an existing checkpoint only:
    python -m ipa_fast.training.pretrain --out runs/base --export models/base --export-only

Data: ``data/corpus/train.txt.gz`` (one document per line) plus the lexical task's train
split written as prompt + reference documents (so the base knows that prompt format); every
document ends with ``<|endoftext|>``.  Validation/test text is never trained on.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ipa_fast.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data/corpus"
LEXICAL_TRAIN = ROOT / "data/tasks/lexical/train.jsonl"


@dataclasses.dataclass
class Config:
    out: str = "runs/base"
    n_embd: int = 192
    n_layer: int = 4
    n_head: int = 4
    n_positions: int = 128
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_steps: int = 10000
    time_budget_min: float = 0.0  # > 0: the cosine schedule and the run end at this much
                                  # training time (summed over resumes) if before max_steps
    restrict_vocab: int = 1  # 1: exact head over the tokens seen in training (see loss)
    lexical_repeat: int = 1  # copies of the lexical train documents in the stream
    offensive_repeat: int = 1  # copies of train lines judged offensive (predict_prob >= 0.5)
    eval_every: int = 250
    eval_windows: int = 64
    ckpt_every_s: float = 240.0
    seed: int = 0
    threads: int = 1


def _import_tokenizer():
    from ipa_fast.decoding.tokenizer import load_gpt2_tokenizer

    return load_gpt2_tokenizer()


def read_lines(split: str) -> list[str]:
    with gzip.open(CORPUS / f"{split}.txt.gz", "rt", encoding="utf-8") as f:
        return [l.rstrip("\n") for l in f if l.strip()]


def data_hash(cfg: Config | None = None) -> str:
    """sha256 over the corpus manifest's split hashes, the lexical train file and the
    stream-mixing settings (repeats) other than the defaults."""
    h = hashlib.sha256()
    if cfg is not None and cfg.offensive_repeat != 1:
        h.update(f"offensive_repeat={cfg.offensive_repeat}".encode())
    if cfg is not None and cfg.lexical_repeat != 1:
        h.update(f"lexical_repeat={cfg.lexical_repeat}".encode())
    manifest = json.loads((CORPUS / "MANIFEST.json").read_text())
    for s in sorted(manifest["splits"]):
        h.update(manifest["splits"][s]["sha256"].encode())
    if LEXICAL_TRAIN.exists():
        h.update(hashlib.sha256(LEXICAL_TRAIN.read_bytes()).hexdigest().encode())
    return h.hexdigest()


def token_stream(docs: list[str], tok, seed: int) -> np.ndarray:
    """Documents in a seeded order, each followed by <|endoftext|>, as one int32 array."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    ids = tok([docs[i] for i in order], add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    return np.fromiter((t for seq in ids for t in (*seq, eos)), dtype=np.int32)


def train_documents(cfg: Config) -> list[str]:
    docs = read_lines("train")
    if LEXICAL_TRAIN.exists() and cfg.lexical_repeat > 0:
        with open(LEXICAL_TRAIN, encoding="utf-8") as f:
            lex = [json.loads(l) for l in f]
        docs += [r["prompt"] + r["reference"] for r in lex] * cfg.lexical_repeat
    if cfg.offensive_repeat > 1:
        # Web-trained LMs continue offensive prompts offensively; this corpus is mostly clean,
        # so its offensive lines are up-weighted to make the detox task a real challenge.
        from profanity_check import predict_prob

        lines = read_lines("train")
        bad = [l for l, p in zip(lines, predict_prob(lines)) if p >= 0.5]
        docs += bad * (cfg.offensive_repeat - 1)
    return docs


def cached_stream(name: str, docs_fn, tok, seed: int, cache_dir: Path,
                  digest: str) -> np.ndarray:
    path = cache_dir / f"{name}-{digest[:16]}-{seed}.npy"
    if path.exists():
        return np.load(path)
    arr = token_stream(docs_fn(), tok, seed)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)
    return arr


def make_model(cfg: Config):
    from transformers import GPT2Config, GPT2LMHeadModel

    mc = GPT2Config(
        vocab_size=50257, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(mc)


def lr_at(step: int, cfg: Config, progress: float | None = None) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr`` over the run's progress
    (``step / max_steps``, or the larger time-budget fraction when given)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    if progress is not None:
        p = max(p, min(1.0, progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def lm_loss_and_backward(model, x: torch.Tensor, seen: torch.Tensor | None = None,
                         chunk: int = 256) -> float:
    """Next-token loss of ``x[:, :-1] -> x[:, 1:]``, back-propagated; returns the mean loss.

    The tied LM head over 50257 tokens dominates the cost of these tiny models.  Computing it
    in chunks of ``chunk`` positions, with the softmax gradient formed right away (as Liger's
    fused linear cross-entropy does), never materialises the [B, T, V] logits and their
    gradient, which on a CPU mostly costs page faults.

    ``seen`` (sorted ids of every token in the training stream) restricts the head to those
    rows.  The other U = V - len(seen) embedding rows are held at exactly zero, so their
    logits are exactly 0 and their total mass is exp(log U): one constant extra logit.  The
    loss and gradients are then exactly those of the full 50257-way softmax of the same model
    (whose unseen rows are zero), at the cost of len(seen) rows only.
    """
    inp, tgt = x[:, :-1], x[:, 1:].reshape(-1)
    hidden = model.transformer(input_ids=inp).last_hidden_state
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    w_full = model.lm_head.weight
    if seen is not None:
        w = w_full.detach().index_select(0, seen)
        remap = torch.full((w_full.shape[0],), -1, dtype=torch.long)
        remap[seen] = torch.arange(len(seen))
        tgt = remap[tgt]
        if (tgt < 0).any():
            raise ValueError("a target token is outside the 'seen' vocabulary")
        log_unseen = math.log(w_full.shape[0] - len(seen)) if len(seen) < w_full.shape[0] else None
    else:
        w, log_unseen = w_full.detach(), None
    n = h.shape[0]
    grad_h = torch.empty_like(h)
    grad_w = torch.zeros_like(w)
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, chunk):
            hc, tc = h[i:i + chunk], tgt[i:i + chunk]
            logits = hc @ w.t()
            lse = torch.logsumexp(logits, dim=-1)
            if log_unseen is not None:
                lse = torch.logaddexp(lse, torch.tensor(log_unseen))
            total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum().item()
            g = torch.exp(logits - lse[:, None])  # d(loss)/d(logits) = softmax - onehot
            g[torch.arange(len(tc)), tc] -= 1.0
            g /= n
            grad_h[i:i + chunk] = g @ w
            grad_w.addmm_(g.t(), hc)
    hidden.backward(grad_h.view_as(hidden))
    # tied: wte.weight is lm_head.weight, its grad already holds the input side
    if seen is not None:
        w_full.grad.index_add_(0, seen, grad_w)
    else:
        w_full.grad.add_(grad_w)
    return total / n


def batch(stream: np.ndarray, cfg: Config, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
    return torch.stack([torch.from_numpy(stream[s:s + cfg.seq_len + 1].astype(np.int64))
                        for s in starts.tolist()])


@torch.no_grad()
def evaluate(model, stream: np.ndarray, cfg: Config) -> float:
    """Mean token NLL on fixed, evenly spaced validation windows."""
    model.eval()
    n = min(cfg.eval_windows, (len(stream) - 1) // cfg.seq_len)
    step = (len(stream) - cfg.seq_len - 1) // max(1, n)
    xs = torch.stack([torch.from_numpy(stream[i * step:i * step + cfg.seq_len + 1].astype(np.int64))
                      for i in range(n)])
    tot = 0.0
    for chunk in xs.split(16):
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        tot += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1)).item() * len(chunk)
    model.train()
    return tot / len(xs)


def save_checkpoint(out: Path, model, opt, step: int, tokens: int, cfg: Config, gen,
                    extra: dict) -> Path:
    """Checkpoint ``step`` under ``<out>/checkpoints`` (the newest two are kept); replaces an
    existing one of the same step (the end of a run re-saves it with its final record)."""
    state = {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
        "tokens_seen": tokens, "config": dataclasses.asdict(cfg), "data_sha256": data_hash(cfg),
        "commands": extra.pop("commands", []),
        "rng": {**ckpt.rng_state(), "batch": gen.get_state()},
        **extra,
    }
    return ckpt.save(Path(out) / "checkpoints", step, state, keep=2, replace=True)


def load_checkpoint(out: Path) -> dict | None:
    """The newest good checkpoint's state of run ``out`` (None if it has none). A checkpoint
    left by an older version (``ckpt.pt``, a pickle) is refused: unpickling can run code."""
    found = ckpt.load_latest(Path(out) / "checkpoints")
    if found is None and (Path(out) / "ckpt.pt").exists():
        raise ckpt.CheckpointError(f"{Path(out) / 'ckpt.pt'} is a pickle checkpoint of an older version; it is "
                                   "not loaded (unpickling can run code); start the run afresh")
    return None if found is None else found[0]


def export(run_out: Path, out_dir: Path) -> None:
    """Write a Hugging Face directory (config.json, fp16 model.safetensors, generation config)
    from the newest good checkpoint of run ``run_out``."""
    from transformers import GenerationConfig

    state = load_checkpoint(run_out)
    if state is None:
        raise ckpt.CheckpointError(f"no checkpoint in {Path(run_out) / 'checkpoints'} to export")
    cfg = Config(**state["config"])
    model = make_model(cfg)
    model.load_state_dict(state["model"])
    model = model.half().eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(bos_token_id=50256, eos_token_id=50256, pad_token_id=50256,
                     do_sample=True, top_p=0.9, temperature=1.0,
                     max_new_tokens=32).save_pretrained(out_dir)
    # A self-contained HF directory: AutoTokenizer.from_pretrained(out_dir) gives GPT-2's BPE.
    _import_tokenizer().save_pretrained(out_dir)
    info = {"step": state["step"], "tokens_seen": state["tokens_seen"],
            "config": state["config"], "data_sha256": state["data_sha256"],
            "data_history": state.get("data_history", [state["data_sha256"]]),
            "val_loss": state.get("val_loss"), "train_seconds": state.get("train_seconds"),
            "parameters": sum(p.numel() for p in model.parameters()),
            "commands": state.get("commands", []),
            "zero_embedding_rows": int((model.transformer.wte.weight == 0).all(1).sum())}
    (out_dir / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    write_model_card(out_dir, info)
    print(json.dumps({"exported": str(out_dir), **{k: info[k] for k in ("step", "tokens_seen")}}))


def write_model_card(out_dir: Path, info: dict) -> None:
    """MODEL_CARD.md from the training record (and eval_ppl.json when it exists)."""
    c = info["config"]
    ppl_file = out_dir / "eval_ppl.json"
    if ppl_file.exists():
        e = json.loads(ppl_file.read_text())
        ppl = (f"{e['perplexity']:.1f} on the first {e['tokens']} predicted tokens of the "
               f"corpus {e['split']} split (`python scripts/eval_ppl.py models/{out_dir.name} "
               f"--split {e['split']} --max-tokens {e.get('max_tokens', 0)}`; windows of "
               f"{c['n_positions']} tokens, fp16 weights computed in float32)")
    else:
        ppl = "not measured yet (`python scripts/eval_ppl.py <this directory>`)"
    val = info.get("val_loss")
    hours = (info.get("train_seconds") or 0) / 3600
    size = (out_dir / "model.safetensors").stat().st_size / 2**20
    cmds = "\n".join(f"    {cmd}" for cmd in info.get("commands", [])) or "    (not recorded)"
    max_tok = json.loads(ppl_file.read_text()).get("max_tokens", 0) if ppl_file.exists() else 0
    offensive = ""
    if c.get("offensive_repeat", 1) > 1:
        offensive = (f". Train lines judged offensive (`profanity_check.predict_prob >= 0.5`, "
                     f"about 1.6 % of lines) are repeated {c['offensive_repeat']}x in the stream "
                     f"(so that, like a web-trained LM, the base continues offensive prompts "
                     f"offensively and the detox task is a real challenge)")
    lexical = ""
    if c.get("lexical_repeat", 1) > 1:
        lexical = (f", repeated {c['lexical_repeat']}x in the last phase (so that the model has "
                   f"seen enough word lists followed by a sentence to learn to copy words)")
    zero = info.get("zero_embedding_rows", 0)
    if zero:
        head_note = (f"Embedding rows of the {zero} GPT-2 tokens that never occur in the "
                     f"training data are exactly zero (their logit is always 0; the training "
                     f"loss accounted for them exactly).")
    elif any("--restrict-vocab 0" in cmd for cmd in info.get("commands", [])):
        head_note = ("The first phases computed the loss over the tokens seen in training only "
                     "(exact, with the other rows held at zero); the last phase used the full "
                     "50257-way softmax, which pushes the never-seen tokens down (held at "
                     "logit 0 they took about 15 % of the mass).")
    else:
        head_note = ""
    hist = info.get("data_history") or []
    history = ""
    if len(hist) > 1:
        history = (" (later pretraining phases changed the data mix: the run started on data "
                   + ", then ".join(f"`{h[:12]}`" for h in hist) + ")")
    text = f"""# {out_dir.name}: a tiny GPT-2 pretrained on the ipa_fast corpus

Part of the embedded default of ipa_fast (offline, CPU-sized). Not a capable language model:
it was trained for {hours:.2f} hours on one CPU thread (of a shared 2-core machine), seeing
{info['tokens_seen']:,} tokens of WordNet glosses/examples and fortune cookies. It exists so that the IPA
demo runs offline; any GPT-2-family checkpoint (same tokenizer) can replace it.

* Architecture: `transformers.GPT2LMHeadModel`, vocabulary 50257 (GPT-2 BPE, the tokenizer
  in `ipa_fast/decoding/tokenizer.py`), n_embd {c['n_embd']}, n_layer {c['n_layer']}, n_head {c['n_head']},
  n_positions {c['n_positions']}, tied input/output embeddings, {info['parameters']:,} parameters,
  stored as fp16 safetensors ({size:.1f} MiB).
* Data: `data/corpus/train.txt.gz` plus the lexical task's train split written as
  prompt + reference documents{lexical} (see `data/README.md`){offensive}; data sha256
  `{info['data_sha256']}`{history}.
  Validation and test text was never trained on. {head_note}
* Training: AdamW (betas 0.9/0.95, weight decay {c['weight_decay']}), lr {c['lr']} with {c['warmup']} warmup
  steps and cosine decay to {c['min_lr_ratio']}x over the time budget ({c['time_budget_min']} min)
  or max_steps ({c['max_steps']}), whichever comes first; batch {c['batch_size']} x {c['seq_len']} tokens
  (random windows of the document stream), seed {c['seed']}.
  Steps: {info['step']}; tokens seen: {info['tokens_seen']:,}.
* Held-out perplexity: {ppl}. Last validation loss during training: {'%.3f' % val if val else 'n/a'}.
* Licence of the weights: derived from the corpus; the WordNet 3.0 licence notice and
  disclaimer (data/README.md) apply; the fortune cookies are collected quotations, mostly
  public domain. Content warning: the corpus contains offensive language, and so can the
  model's output (that is what the detox task measures).

Reproduce (the time budget makes the step count depend on the machine's speed):

{cmds}
    python scripts/eval_ppl.py models/{out_dir.name} --split test --max-tokens {max_tok} --json models/{out_dir.name}/eval_ppl.json
    python -m ipa_fast.training.pretrain --out <same --out> --export models/{out_dir.name} --export-only
"""
    (out_dir / "MODEL_CARD.md").write_text(text)


def train(cfg: Config, resume: bool, allow_data_change: bool = False) -> Path:
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = _import_tokenizer()
    digest = data_hash(cfg)
    train_stream = cached_stream("train", lambda: train_documents(cfg), tok, cfg.seed, out, digest)
    val_stream = cached_stream("validation", lambda: read_lines("validation"), tok, cfg.seed, out,
                               data_hash())

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = make_model(cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, tokens, train_s = 0, 0, 0.0
    data_history = [digest]
    commands = [" ".join(["python", "-m", "ipa_fast.training.pretrain", *sys.argv[1:]])]
    seen = None
    if cfg.restrict_vocab:
        seen = torch.from_numpy(np.unique(train_stream).astype(np.int64))
        unseen = torch.ones(model.config.vocab_size, dtype=torch.bool)
        unseen[seen] = False
        with torch.no_grad():
            model.transformer.wte.weight[unseen] = 0.0
    state = load_checkpoint(out) if resume else None
    if state is not None:
        data_history = state.get("data_history", [state["data_sha256"]])
        if state["data_sha256"] != digest:
            if not allow_data_change:
                raise SystemExit("checkpoint was trained on different data (data hash differs); "
                                 "pass --allow-data-change to continue on the new data")
            data_history = data_history + [digest]
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, tokens = state["step"], state["tokens_seen"]
        train_s = state.get("train_seconds", 0.0)
        commands = state.get("commands", []) + commands
        ckpt.set_rng_state(state["rng"])
        gen.set_state(state["rng"]["batch"])
    n_params = sum(p.numel() for p in model.parameters())
    log = open(out / "log.jsonl", "a")

    def emit(rec: dict) -> None:
        rec = {"time": round(time.time(), 1), **rec}
        log.write(json.dumps(rec) + "\n")
        log.flush()
        print(json.dumps(rec), flush=True)

    emit({"event": "start", "step": step, "params": n_params, "train_tokens": len(train_stream),
          "config": dataclasses.asdict(cfg), "data_sha256": digest, "resumed": resume})
    model.train()
    budget_s = cfg.time_budget_min * 60 if cfg.time_budget_min > 0 else None
    t0 = last_ckpt = last_log = time.time()
    train_s0 = train_s
    tok_at_log, val_loss = tokens, None

    def progress() -> float | None:
        return None if budget_s is None else train_s / budget_s

    while step < cfg.max_steps and (budget_s is None or train_s < budget_s):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, progress())
        x = batch(train_stream, cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss = lm_loss_and_backward(model, x, seen)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        tokens += x[:, :-1].numel()
        now = time.time()
        train_s = train_s0 + now - t0
        if step % 20 == 0:
            emit({"step": step, "loss": round(loss, 4),
                  "lr": round(lr_at(step, cfg, progress()), 6), "train_s": round(train_s),
                  "tokens_seen": tokens,
                  "tokens_per_s": round((tokens - tok_at_log) / max(1e-9, now - last_log), 1)})
            last_log, tok_at_log = now, tokens
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            val_loss = evaluate(model, val_stream, cfg)
            emit({"step": step, "val_loss": round(val_loss, 4),
                  "val_ppl": round(math.exp(val_loss), 2)})
        if now - last_ckpt > cfg.ckpt_every_s or step == cfg.max_steps:
            save_checkpoint(out, model, opt, step, tokens, cfg, gen, {"val_loss": val_loss, "train_seconds": train_s, "commands": commands,
                             "data_history": data_history})
            last_ckpt = now
    if val_loss is None or step % cfg.eval_every:
        val_loss = evaluate(model, val_stream, cfg)
        emit({"step": step, "val_loss": round(val_loss, 4), "val_ppl": round(math.exp(val_loss), 2)})
    path = save_checkpoint(out, model, opt, step, tokens, cfg, gen,
                           {"val_loss": val_loss, "train_seconds": train_s, "commands": commands,
                            "data_history": data_history})
    emit({"event": "end", "step": step, "tokens_seen": tokens})
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    ap.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in OUT/checkpoints")
    ap.add_argument("--export", default=None, help="write a HF model directory here at the end")
    ap.add_argument("--export-only", action="store_true")
    ap.add_argument("--allow-data-change", action="store_true",
                    help="with --resume: continue a checkpoint on a different data mixture "
                         "(a second pretraining phase; the data hashes are all recorded)")
    args = ap.parse_args(argv)
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    try:
        if not args.export_only:
            train(cfg, args.resume, args.allow_data_change)
        if args.export:
            export(Path(cfg.out), Path(args.export))
    except ckpt.CheckpointError as exc:
        print(f"pretrain.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
