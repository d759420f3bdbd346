"""``ipa-fast bench decode``: end-to-end decoding tokens/s on the same prompts, B in {1, 16}.

Rows (one prompt set per run, the same token ids for every method, fixed seeds, top-p 0.9,
top-k off unless ``--top-k``, temperature 1):

(a) ``hf-base``: Hugging Face ``base.generate(do_sample=True, top_p=...)`` of the base alone —
    the baseline every ratio is taken against;
(b) ``tailored``: :class:`ipa_fast.TailoredLM` (base + alpha * adapter: the models' cached forwards,
    their last hidden states mixed and put through the output head they share — once per step —
    when they share one, as the embedded base and its adapters do, then one fused
    :func:`ipa_fast.sample` call per step);
(c) ``hf-processor``: ``base.generate`` with :class:`ipa_fast.decoding.hf.TailoredLogitsProcessor` (the
    adapter stepped inside the processor with its own cache, HF's warpers and draw on the mix);
(d) ``naive``: a loop written the way the official IPA code decodes (``policy.py``): HF forwards
    with cache, eager mix, ``log_softmax`` of the mix, HF warpers, softmax, ``torch.multinomial``,
    ``torch.cat`` of ids / log-probs every step;
(e) ``tailored-compiled`` (with ``--compile``): (b) with ``generate(..., compile=True)``: static KV
    caches and every step after the first as one ``torch.compile`` graph. Its first call per batch
    size compiles the graph; that call is timed apart (``compile_s``: first call minus the median
    of the timed ones) and kept out of tokens/s. ``compiled_vs_eager`` is (b)'s wall time over
    (e)'s, and ``tokens_match`` says whether (e) drew (b)'s tokens in the warm-up (same seed).
    The decode step alone: (b) and (e) are also timed with one new token (prefill and first
    draw only, interleaved with the rest); ``step_s`` = (wall(N) - wall(1)) / (N - 1) and
    ``compiled_vs_eager_step`` is (b)'s ``step_s`` over (e)'s.

Exactly N new tokens per row for every method: EOS (the tokenizer's) is masked for all N steps —
``min_new_tokens=N`` with ``max_new_tokens=N`` in HF ``generate`` and in ``TailoredLM.generate``,
and the same ids set to ``-inf`` before the warpers in the naive loop — and each run checks it got
B x N tokens. Tokens/s is B x N over the wall time of the whole call (prefill included); the
median over ``--repeats`` runs interleaved across methods (a shared machine drifts). "Outside
forwards" is the share of wall time not spent inside the models' ``forward`` (forward hooks):
sampling, masking, cache and mask bookkeeping, Python (and (b)'s one product with the shared head).

Models: the embedded base (``ipa-fast setup``) with the shipped adapter initialisation, or, until
that is shipped, the base's first 4 layers over its tied embedding (``cut_adapter(base, 4)``: the
same shape and cost); ``--tiny``: random-weight GPT-2 configs with GPT-2's vocabulary (50257).
"""
from __future__ import annotations

import time

import torch

from ipa_fast import tasks

METHODS = ("hf-base", "tailored", "hf-processor", "naive")
COMPILED = "tailored-compiled"
LABELS = {"hf-base": "(a) HF generate, base alone", "tailored": "(b) TailoredLM",
          "hf-processor": "(c) HF generate + TailoredLogitsProcessor", "naive": "(d) official-style loop",
          COMPILED: "(e) TailoredLM, compiled step"}
ADAPTER_LAYERS = 4


def add_arguments(p) -> None:
    from ipa_fast.cli.main import nonneg_int, open_unit_float, positive_int

    p.add_argument("--quick", action="store_true", help="fewer tokens and repeats (a smoke run)")
    p.add_argument("--batch", type=positive_int, action="append", default=None,
                   help="batch size (repeatable; default 1 and 16)")
    p.add_argument("--new-tokens", type=positive_int, default=None,
                   help="tokens per row, forced for every method (default 32; quick 8)")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed runs per point, median kept (default 3; quick 1)")
    p.add_argument("--prompts", choices=list(tasks.names()), default="lexical",
                   help="the test prompts of this task, as stored (default lexical: chat template)")
    p.add_argument("--top-p", type=open_unit_float, default=0.9)
    p.add_argument("--top-k", type=nonneg_int, default=0, help="0 = off (default)")
    p.add_argument("--alpha", type=float, default=1.0, help="adapter weight (default 1.0)")
    p.add_argument("--tiny", action="store_true", help="random-weight configs instead of the embedded base")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="an adapter directory instead of the adapter initialisation (e.g. a shipped trained one: "
                        "a residual adapter steps its initial weights too)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--plot", metavar="PNG", default=None, help="also draw tokens/s ratios vs (a) to PNG")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="also time (e): TailoredLM.generate(compile=...) with this torch.compile backend "
                        "(default inductor); compile time reported apart, not in tokens/s")


class ForwardTimer:
    """Accumulates wall time spent inside the models' forwards via forward hooks: each network's
    decoder (``base_model``) and output head, timed apart, so a step that runs the decoders only
    and applies one shared head itself (docs/DESIGN.md §5.8) is timed like one that runs whole
    models (that shared product then counts as outside the forwards)."""

    def __init__(self, *models):
        from ipa_fast.decoding.heads import leaves

        self.total = 0.0
        self.handles = []
        for model in models:
            for leaf in leaves(model):
                parts = [leaf.base_model, leaf.get_output_embeddings()]
                for m in (parts if parts[0] is not leaf and parts[1] is not None else [leaf]):
                    self.handles.append(m.register_forward_pre_hook(self._pre))
                    self.handles.append(m.register_forward_hook(self._post))

    def _pre(self, module, args):
        if not torch.compiler.is_compiling():  # inside a compiled step the forwards are not timed
            module._ipa_t0 = time.perf_counter()

    def _post(self, module, args, output):
        if not torch.compiler.is_compiling():
            self.total += time.perf_counter() - module._ipa_t0

    def remove(self):
        for h in self.handles:
            h.remove()


def bench_models(tiny: bool, adapter_dir: str | None = None):
    """``(base, adapter, tokenizer, description)``. Without ``tiny`` the embedded base must be
    built: FileNotFoundError naming ``ipa-fast setup`` otherwise. ``adapter_dir``: an adapter
    directory loaded as every decoding path loads it (a residual adapter with its initial weights)."""
    if tiny:
        from transformers import GPT2Config, GPT2LMHeadModel

        from ipa_fast.decoding.tokenizer import load_gpt2_tokenizer
        tok = load_gpt2_tokenizer()
        torch.manual_seed(0)
        base = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=256, n_layer=4, n_head=4,
                                          n_positions=256)).eval()
        adapter = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=128, n_layer=2, n_head=2,
                                             n_positions=256)).eval()
        return base, adapter, tok, "random-weight GPT-2 configs, V=50257: base 4x256, adapter 2x128 (--tiny)"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ipa_fast import embedded
    try:
        base_dir = embedded.base_path()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc}; or pass --tiny for random-weight models") from None
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    name = embedded.BASE["name"]
    cfg = base.config
    shape = f"{cfg.num_hidden_layers} layers, d={cfg.hidden_size}, V={cfg.vocab_size}"
    if adapter_dir is not None:
        from ipa_fast.decoding.residual import ResidualAdapter
        from ipa_fast.decoding.tailored import TailoredLM

        adapter = TailoredLM.from_pretrained(base, adapter_dir, tokenizer=tok, dtype="float32").adapter.eval()
        n = (f"{adapter.trained.config.num_hidden_layers} + {adapter.initial.config.num_hidden_layers} layers: "
             "a residual adapter and its initial weights" if isinstance(adapter, ResidualAdapter)
             else f"{adapter.config.num_hidden_layers} layers")
        return base, adapter, tok, f"base: embedded {name} ({shape}, fp32); adapter: {adapter_dir} ({n})"
    try:
        adapter = AutoModelForCausalLM.from_pretrained(str(embedded.adapter_init_path()), dtype=torch.float32).eval()
        what = f"the shipped adapter initialisation ({adapter.config.num_hidden_layers} layers)"
    except FileNotFoundError:
        from ipa_fast.training.distill_adapter import cut_adapter
        adapter = cut_adapter(base, ADAPTER_LAYERS).float().eval()
        what = (f"cut_adapter(base, {ADAPTER_LAYERS}): the base's first {ADAPTER_LAYERS} layers over its tied "
                f"embedding, undistilled (the adapter initialisation is not shipped yet; same shape and cost)")
    return base, adapter, tok, f"base: embedded {name} ({shape}, fp32); adapter: {what}"


def bench_prompts(tok, kind: str, B: int) -> tuple[list[list[int]], str]:
    """The first B test prompts of ``kind`` as token ids, and how they were made."""
    from ipa_fast import embedded

    rows = embedded.read_task(kind, "test")
    if B > len(rows):
        raise ValueError(f"--batch {B} is larger than the {len(rows)} {kind} test prompts")
    texts = [r["prompt"] for r in rows[:B]]
    how = f"{kind} test prompts, as stored: " + ("one user turn in the base's chat template"
                                                  if tasks.get(kind).prompt_style == "chat" else "raw text")
    return [tok(t)["input_ids"] for t in texts], how


def _eos_ids(tok) -> list[int]:
    return [] if tok.eos_token_id is None else [int(tok.eos_token_id)]


@torch.no_grad()
def naive_generate(base, adapter, rows, max_new_tokens, *, pad_id, alpha=1.0, top_k=50, top_p=0.9, seed=0,
                   eos_ids=()):
    """The official code's decoding loop (policy.py), on left-padded rows; ``eos_ids`` are
    masked at every step (exactly ``max_new_tokens`` tokens, like ``min_new_tokens``)."""
    from transformers import LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

    from ipa_fast.decoding.tailored import left_pad

    torch.manual_seed(seed)
    warpers = LogitsProcessorList(([TopKLogitsWarper(top_k)] if top_k else []) + [TopPLogitsWarper(top_p)])
    eos = list(eos_ids)
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
        if eos:
            logits[:, eos] = float("-inf")
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


@torch.no_grad()
def hf_generate(base, rows, max_new_tokens, *, pad_id, eos_ids, top_k=0, top_p=0.9, seed=0, processor=None):
    """``base.generate`` sampling exactly ``max_new_tokens`` per row (EOS masked throughout);
    ``processor`` (a ``TailoredLogitsProcessor``) mixes the adapter in. Returns the new ids."""
    from transformers import LogitsProcessorList

    from ipa_fast.decoding.tailored import left_pad

    ids, mask = left_pad(rows, pad_id, next(base.parameters()).device)
    torch.manual_seed(seed)
    out = base.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=top_k, top_p=top_p,
                        temperature=1.0, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                        eos_token_id=list(eos_ids) or None, pad_token_id=pad_id,
                        logits_processor=LogitsProcessorList([processor]) if processor is not None else None)
    return out[:, ids.shape[1]:]


def method_fns(base, adapter, tok, rows, n_new, *, top_k, top_p, alpha, seed=0, compile=None) -> dict:
    """``{method: fn() -> number of new tokens}`` for the four rows, on the same prompts; with
    ``compile`` (a torch.compile backend) also (e), :data:`COMPILED`."""
    from ipa_fast.decoding.tailored import TailoredLM
    from ipa_fast.decoding.hf import TailoredLogitsProcessor

    lm = TailoredLM(base, adapter, tok, alpha=alpha)
    pad, eos = lm.pad_id, _eos_ids(tok)
    proc = TailoredLogitsProcessor(adapter, alpha=alpha, pad_token_id=pad, vocab_size=lm.V)

    def a():
        return hf_generate(base, rows, n_new, pad_id=pad, eos_ids=eos, top_k=top_k, top_p=top_p, seed=seed).numel()

    def b(compile=False, n_new=n_new):
        out = lm.generate(rows, n_new, min_new_tokens=n_new, eos_token_id=eos, top_k=top_k, top_p=top_p, seed=seed,
                          compile=compile)
        return sum(len(t) for t in out.token_ids)

    def c():
        return hf_generate(base, rows, n_new, pad_id=pad, eos_ids=eos, top_k=top_k, top_p=top_p, seed=seed,
                           processor=proc).numel()

    def d():
        return naive_generate(base, adapter, rows, n_new, pad_id=pad, alpha=alpha, top_k=top_k, top_p=top_p,
                              seed=seed, eos_ids=eos)[1].numel()

    fns = dict(zip(METHODS, (a, b, c, d)))
    if compile:
        fns[COMPILED] = lambda: b(compile)
        fns["tailored" + ONE] = lambda: b(False, 1)  # prefill and the first draw: wall(N) - wall(1) is the steps
        fns[COMPILED + ONE] = lambda: b(compile, 1)
    return fns


ONE = "@1"  # suffix of the one-new-token timings


def compiled_warmup(base, adapter, tok, rows, n_new, *, top_k, top_p, alpha, compile, seed=0) -> dict:
    """(e)'s first call at these rows (it compiles the graph): its wall time, and whether (e)
    drew the same tokens and log-probs as (b) for the same seed."""
    from ipa_fast.decoding.tailored import TailoredLM

    lm = TailoredLM(base, adapter, tok, alpha=alpha)
    kw = dict(min_new_tokens=n_new, eos_token_id=_eos_ids(tok), top_k=top_k, top_p=top_p, seed=seed)
    t0 = time.perf_counter()
    got = lm.generate(rows, n_new, compile=compile, **kw)
    first = time.perf_counter() - t0
    ref = lm.generate(rows, n_new, **kw)
    diff = max((abs(x - y) for g, r in zip(got.logprobs, ref.logprobs) for x, y in zip(g, r)), default=0.0)
    return {"first_call_s": first, "tokens_match": got.token_ids == ref.token_ids, "max_logprob_diff": diff}


def _time_interleaved(fns, timer, repeats, expect):
    """Median (wall, forward) time of each fn, runs interleaved (a shared machine drifts); every
    run must return ``expect`` new tokens (a number, or ``{method: number}``)."""
    runs = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            timer.total = 0.0
            t0 = time.perf_counter()
            n = fn()
            runs[k].append((time.perf_counter() - t0, timer.total))
            want = expect[k] if isinstance(expect, dict) else expect
            if n != want:
                raise RuntimeError(f"{k} produced {n} new tokens, expected {want}")
    return {k: sorted(r)[(len(r) - 1) // 2] for k, r in runs.items()}


def run(args) -> dict:
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)


def _run(args) -> dict:
    n_new = args.new_tokens or (8 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 3)
    batches = args.batch or [1, 16]
    if args.tiny and args.adapter:
        raise ValueError("--adapter goes with the embedded base, not --tiny")
    base, adapter, tok, desc = bench_models(args.tiny, args.adapter)
    knobs = dict(top_k=args.top_k, top_p=args.top_p, alpha=args.alpha)
    compile = getattr(args, "compile", None)
    methods = METHODS + ((COMPILED,) if compile else ())
    timer = ForwardTimer(base, adapter)
    results = []
    t_start = time.perf_counter()
    try:
        for fn in method_fns(base, adapter, tok, bench_prompts(tok, args.prompts, 1)[0], 2, **knobs).values():
            fn()  # warm-up: one prompt, 2 tokens, each method
        for B in batches:
            rows, prompts_desc = bench_prompts(tok, args.prompts, B)
            warm = compiled_warmup(base, adapter, tok, rows, n_new, compile=compile, **knobs) if compile else None
            fns = method_fns(base, adapter, tok, rows, n_new, compile=compile, **knobs)
            times = _time_interleaved(fns, timer, repeats, {k: B if k.endswith(ONE) else B * n_new for k in fns})
            t_ref = times["hf-base"][0]
            r = {"batch": B, "new_tokens": n_new, "prompt_tokens": [len(x) for x in rows]}
            one = {k[:-len(ONE)]: times.pop(k)[0] for k in list(times) if k.endswith(ONE)}
            for k, (wall, fwd) in times.items():
                r[k] = {"tok_s": B * n_new / wall, "ratio_vs_hf_base": t_ref / wall, "seconds": wall,
                        "outside_forward": 1 - fwd / wall}
            if warm:  # the forwards run inside the graph, untimed: no outside-forward share
                r[COMPILED].update(warm, outside_forward=None, compile_s=warm["first_call_s"] - times[COMPILED][0])
                r["compiled_vs_eager"] = times["tailored"][0] / times[COMPILED][0]
                for k in ("tailored", COMPILED):
                    r[k].update(one_token_s=one[k], step_s=(times[k][0] - one[k]) / max(n_new - 1, 1))
                r["compiled_vs_eager_step"] = r["tailored"]["step_s"] / r[COMPILED]["step_s"]
            results.append(r)
    finally:
        timer.remove()
    import ipa_fast
    sampler_backend = next((b for b in ("cpu", "reference") if ipa_fast.backends().get(b) == "ok"), "reference")
    print(f"decode benchmark: {desc}")
    print(f"prompts: {prompts_desc}; top-k {args.top_k}, top-p {args.top_p}, alpha {args.alpha}, "
          f"exactly {n_new} new tokens/row (EOS masked), median of {repeats}, torch threads "
          f"{torch.get_num_threads()}, sampler backend {sampler_backend}")
    print(f"{'B':>3}  {'method':<42}  {'tok/s':>8}  {'vs (a)':>7}  {'outside fwd':>11}")
    for r in results:
        for k in methods:
            m = r[k]
            outside = "-" if m["outside_forward"] is None else f"{100 * m['outside_forward']:.1f}%"
            print(f"{r['batch']:>3}  {LABELS[k]:<42}  {m['tok_s']:>8.1f}  {m['ratio_vs_hf_base']:>6.2f}x  "
                  f"{outside:>11}")
        if COMPILED in r:
            m = r[COMPILED]
            print(f"{r['batch']:>3}  (e) vs (b): {r['compiled_vs_eager']:.2f}x whole call, "
                  f"{r['compiled_vs_eager_step']:.2f}x per decode step ({1e3 * r['tailored']['step_s']:.0f} vs "
                  f"{1e3 * m['step_s']:.0f} ms); compile {m['compile_s']:.1f} s (excluded); same tokens as (b): "
                  f"{m['tokens_match']}")
    out = {"models": desc, "prompts": args.prompts, "prompts_desc": prompts_desc, "top_k": args.top_k,
           "top_p": args.top_p, "alpha": args.alpha, "new_tokens": n_new, "repeats": repeats,
           "stop_rule": "exactly new_tokens per row: EOS masked for all steps (min_new_tokens = max_new_tokens)",
           "torch_threads": torch.get_num_threads(), "sampler_backend": sampler_backend,
           "methods": {k: LABELS[k] for k in methods}, "compile": compile, "wall_s": time.perf_counter() - t_start, "results": results}
    if args.plot:
        plot(out, args.plot)
    return out


def plot(result: dict, path: str) -> None:
    """Grouped bars: each method's tokens/s ratio vs (a), per batch size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    methods = list(result["methods"])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    w = 0.8 / len(methods)
    for j, k in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * w for i in range(len(rows))]
        ys = [r[k]["ratio_vs_hf_base"] for r in rows]
        bars = ax.bar(xs, ys, w, label=LABELS[k])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), [f"B={r['batch']}" for r in rows])
    ax.set_ylabel("tokens/s vs (a)")
    n = result["torch_threads"]
    ax.set_title(f"decode, {result['new_tokens']} new tokens/row, {n} torch thread{'s' * (n != 1)}", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    fig.tight_layout()
    from pathlib import Path
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
