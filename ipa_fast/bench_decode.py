"""``ipa-fast bench decode``: TailoredLM tokens/s vs a loop written the way the official IPA code
decodes, on the same models and prompts, B in {1, 16}.

The naive loop (official ``policy.py`` style): HF forward with cache for each model, eager mix
``base + alpha * adapter``, ``log_softmax`` of the mix (the stored log-prob), HF warpers top-k 50
→ top-p, softmax, ``torch.multinomial``, ``torch.cat`` of ids / mask / log-probs each step.
TailoredLM: the same two cached forwards, then one fused ``ipa_fast.sample`` call (same
top-k 50 / top-p) plus the adapter's log-prob of the chosen token.
"Outside forwards" is the share of wall time not spent inside the two models' ``forward``
(measured with forward hooks): sampling, masking and bookkeeping.
Models: the shipped base + adapter when present, else random-weight GPT-2 configs with GPT-2's
vocabulary (50257), where the sampling chain is what the naive loop spends its time on.
"""
from __future__ import annotations

import time

import torch


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="fewer tokens and repeats (a smoke run)")
    p.add_argument("--batch", type=int, action="append", default=None, help="batch sizes (default 1 and 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per row (default 32; quick 8)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per point, median kept (default 3; quick 1)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=50, help="as the official code's hidden default (50)")
    p.add_argument("--tiny", action="store_true", help="use the random-weight configs even if shipped models exist")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


class ForwardTimer:
    """Accumulates wall time spent inside ``model.forward`` via forward hooks."""

    def __init__(self, *models):
        self.total = 0.0
        self.handles = []
        for m in models:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))

    def _pre(self, module, args):
        module._ipa_t0 = time.perf_counter()

    def _post(self, module, args, output):
        self.total += time.perf_counter() - module._ipa_t0

    def remove(self):
        for h in self.handles:
            h.remove()


def bench_models(tiny: bool):
    """``(base, adapter, tokenizer, description)``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if not tiny:
        try:
            from transformers import AutoModelForCausalLM

            from . import embedded
            from .tokenizer import load_gpt2_tokenizer
            base = AutoModelForCausalLM.from_pretrained(str(embedded.base_path())).float().eval()
            adapter = AutoModelForCausalLM.from_pretrained(str(embedded.adapter_init_path())).float().eval()
            return base, adapter, load_gpt2_tokenizer(), "shipped base + adapter"
        except (ImportError, AttributeError, FileNotFoundError, OSError):
            pass
    from .tokenizer import load_gpt2_tokenizer
    tok = load_gpt2_tokenizer()
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=256, n_layer=4, n_head=4, n_positions=256)).eval()
    adapter = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=128, n_layer=2, n_head=2, n_positions=256)).eval()
    return base, adapter, tok, "random-weight GPT-2 configs, V=50257: base 4x256, adapter 2x128"


def bench_prompts(B: int, V: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 25, (B,), generator=g).tolist()
    return [torch.randint(1, V - 1, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def naive_generate(base, adapter, rows, max_new_tokens, *, pad_id, alpha=1.0, top_k=50, top_p=0.9, seed=0):
    """The official code's decoding loop (policy.py), on left-padded rows."""
    from transformers import LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

    from .decoding import left_pad

    torch.manual_seed(seed)
    warpers = LogitsProcessorList([TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)])
    input_ids, mask = left_pad(rows, pad_id, "cpu")
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    # logits_to_keep=1: the official code computes [B, L, V] prefill logits; not doing so here
    # keeps the comparison about the per-step loop (conservative for the speedup).
    out_b = base(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    out_a = adapter(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache_b, cache_a = out_b.cache, out_a.cache
    logits_b, logits_a = out_b.logits[:, -1], out_a.logits[:, -1]
    output_logprob = torch.zeros(len(rows), 0)
    next_pos = mask.sum(1, keepdim=True)
    for _ in range(max_new_tokens):
        logits = logits_b + alpha * logits_a
        log_prob = torch.log_softmax(logits, dim=-1)
        logits = warpers(input_ids, logits)
        probs = torch.softmax(logits, dim=-1)
        next_tokens = torch.multinomial(probs, num_samples=1)
        output_logprob = torch.cat([output_logprob, log_prob.gather(1, next_tokens)], dim=1)
        input_ids = torch.cat([input_ids, next_tokens], dim=1)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        out_b = base(input_ids=next_tokens, attention_mask=mask, position_ids=next_pos, cache=cache_b, use_cache=True)
        out_a = adapter(input_ids=next_tokens, attention_mask=mask, position_ids=next_pos, cache=cache_a, use_cache=True)
        cache_b, cache_a = out_b.cache, out_a.cache
        logits_b, logits_a = out_b.logits[:, -1], out_a.logits[:, -1]
        next_pos = next_pos + 1
    return input_ids, output_logprob


def _time_interleaved(fns, timer, repeats):
    """Median wall time and forward time of each fn, runs interleaved (a shared machine drifts)."""
    runs = [[] for _ in fns]
    for _ in range(repeats):
        for j, fn in enumerate(fns):
            timer.total = 0.0
            t0 = time.perf_counter()
            fn()
            runs[j].append((time.perf_counter() - t0, timer.total))
    return [sorted(r)[(len(r) - 1) // 2] for r in runs]


def run(args) -> dict:
    from .decoding import TailoredLM

    if args.threads:
        torch.set_num_threads(args.threads)
    n_new = args.new_tokens or (8 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 3)
    batches = args.batch or [1, 16]
    base, adapter, tok, desc = bench_models(args.tiny)
    lm = TailoredLM(base, adapter, tok)
    pad = lm.pad_id
    timer = ForwardTimer(base, adapter)
    results = []
    try:
        for B in batches:
            rows = bench_prompts(B, lm.V)
            ours = lambda: lm.generate(rows, n_new, top_k=args.top_k, top_p=args.top_p, seed=0, eos_token_id=[])  # noqa: E731
            naive = lambda: naive_generate(base, adapter, rows, n_new, pad_id=pad, top_k=args.top_k,  # noqa: E731
                                           top_p=args.top_p)
            ours(), naive()  # warm-up
            (t_ours, f_ours), (t_naive, f_naive) = _time_interleaved([ours, naive], timer, repeats)
            r = {"batch": B, "new_tokens": n_new,
                 "tailored_tok_s": B * n_new / t_ours, "naive_tok_s": B * n_new / t_naive,
                 "speedup": t_naive / t_ours,
                 "tailored_outside_forward": 1 - f_ours / t_ours, "naive_outside_forward": 1 - f_naive / t_naive,
                 "tailored_s": t_ours, "naive_s": t_naive}
            results.append(r)
    finally:
        timer.remove()
    import ipa_fast
    sampler_backend = next((b for b in ("cpu", "reference") if ipa_fast.backends().get(b) == "ok"), "reference")
    print(f"decode benchmark: {desc}; top-k {args.top_k}, top-p {args.top_p}, {n_new} new tokens/row, "
          f"median of {repeats}, torch threads {torch.get_num_threads()}, sampler backend {sampler_backend}")
    print(f"{'B':>3}  {'TailoredLM tok/s':>16}  {'naive tok/s':>11}  {'speedup':>7}  "
          f"{'outside fwd (ours)':>18}  {'outside fwd (naive)':>19}")
    for r in results:
        print(f"{r['batch']:>3}  {r['tailored_tok_s']:>16.1f}  {r['naive_tok_s']:>11.1f}  {r['speedup']:>6.2f}x  "
              f"{100 * r['tailored_outside_forward']:>17.1f}%  {100 * r['naive_outside_forward']:>18.1f}%")
    return {"models": desc, "top_k": args.top_k, "top_p": args.top_p, "new_tokens": n_new, "repeats": repeats,
            "torch_threads": torch.get_num_threads(), "sampler_backend": sampler_backend, "results": results}
