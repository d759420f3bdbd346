"""K experts in tailored decoding: ``TailoredLM(base, experts=[...], weights=[...])`` and its
presets (IPA, composition, DExperts, proxy-tuning), checked against a reference loop.

The reference loop (:func:`reference_decode`) is independent of ``TailoredLM``: one row at a
time, a full no-cache forward of every model at every step, the mix by hand with
:func:`ipa_fast.ops.reference.mix_experts`, masks and repetition penalty by hand, and the reference
sampler with the decoding RNG convention (row r's seed; offset = the unpadded position of the
token being drawn). Cached decoding and the full forward sum in different orders (float32), so
a draw may differ where u lands within rounding of a CDF boundary; with these seeds it does not.
Log-probs agree within 1e-4 absolute.
"""
import pytest
import torch

import ipa_fast
from ipa_fast.ops import reference
from ipa_fast.decoding.tailored import TailoredLM
from tiny_models import make_tiny_model, make_tiny_pair, make_tiny_tokenizer

PROMPTS = ["the cat", "a dog runs in the park with", "Hello"]

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# The reference loop

def _last_logits(model, ids, V):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[:, -1, :V]


def reference_decode(base, experts, weights, tok, prompts, n, *, seed, prefixes=None, base_weight=1.0,
                     base_top_k=None, min_new_tokens=0, bad_words_ids=(), repetition_penalty=1.0,
                     eos_token_id=None, **knobs):
    """``(token_ids, logprobs)`` per prompt: z = base_weight * base + sum_k w_k * expert_k, mixed
    by :func:`ipa_fast.ops.reference.mix_experts`; ``weights`` [K] or one list per row."""
    V = len(tok)
    prefixes = prefixes or [[] for _ in experts]
    eos = [] if eos_token_id is None else [eos_token_id]
    ids_out, lps_out = [], []
    for r, prompt in enumerate(prompts):
        row_w = weights[r] if isinstance(weights[0], (list, tuple)) else weights
        row_knobs = {k: (v[r] if isinstance(v, (list, tuple)) else v) for k, v in knobs.items()}
        ids = tok(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        P = len(ids)
        toks, lps = [], []
        for t in range(n):
            zs, w = [], []
            if base_weight != 0:
                zb = _last_logits(base, ids, V)
                if base_top_k:  # the sparse base: its top-k log-probs, -inf elsewhere
                    lp = torch.log_softmax(zb, -1)
                    vals, top = lp.topk(base_top_k, -1)
                    zb = torch.full_like(lp, float("-inf")).scatter_(1, top, vals)
                zs.append(zb), w.append(base_weight)
            for model, pre, wk in zip(experts, prefixes, row_w):
                zs.append(_last_logits(model, pre + ids, V)), w.append(wk)
            z = reference.mix_experts(zs, torch.tensor([w], dtype=torch.float32))
            if repetition_penalty != 1.0:
                seen = torch.zeros(V, dtype=torch.bool)
                seen[ids] = True
                z = torch.where(seen, torch.where(z > 0, z / repetition_penalty, z * repetition_penalty), z)
            for word in bad_words_ids:
                if ids[len(ids) - len(word) + 1:] == word[:-1] or len(word) == 1:
                    z[0, word[-1]] = float("-inf")
            if t < min_new_tokens:
                z[0, eos] = float("-inf")
            s = ipa_fast.sample(z, None, seed=seed[r], offset=P + t, backend="reference", **row_knobs)
            tok_t = int(s.tokens)
            toks.append(tok_t), lps.append(float(s.logprobs))
            ids.append(tok_t)
            if tok_t in eos:
                break
        ids_out.append(toks), lps_out.append(lps)
    return ids_out, lps_out


def assert_matches(out, ref_ids, ref_lps):
    assert out.token_ids == ref_ids
    for got, want in zip(out.logprobs, ref_lps):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def trio():
    """(base, [adapter, expert 2, expert 3], tok): three tiny experts over the pair's tokenizer."""
    base, adapter, tok = make_tiny_pair(seed=0)
    V = len(tok)
    return base, [adapter, make_tiny_model("llama", V, 21, n_layer=1), make_tiny_model("gpt2", V, 22, n_layer=1)], tok


# ---------------------------------------------------------------------------------------------
# The classic constructor: today's tokens, recorded before experts became the unit

CLASSIC = {  # name: (constructor kwargs, generate kwargs); the tiny models are peaked: T >= 2 mixes
    "top_p": (dict(alpha=0.7), dict(temperature=3.0, top_p=0.9, seed=5)),
    "per_row": (dict(alpha=1.0), dict(alpha=[0.3, 1.0, 2.0], temperature=4.0, top_k=20, min_p=0.05,
                                      seed=[1, 2, 3])),
    "masks": (dict(alpha=0.5), dict(min_new_tokens=4, bad_words_ids=[[10], [40, 41]], temperature=3.0,
                                    top_p=0.95, seed=7)),
    "penalty": (dict(alpha=0.5), dict(repetition_penalty=1.3, temperature=2.0, top_p=0.95, seed=2)),
    "base_weight_0": (dict(alpha=1.0), dict(base_weight=0.0, top_p=0.9, seed=3)),
    "base_weight_half": (dict(alpha=1.5), dict(base_weight=0.5, seed=4, temperature=[0.0, 3.0, 2.0])),
    "sparse_base": (dict(alpha=0.7, base_top_k=5), dict(temperature=3.0, seed=6)),
}
RECORDED = {  # generated by the two-expert code path before K experts (commit 3a86b77), default backend
    "base_weight_0": [[73, 280, 187, 271, 277, 11, 45, 153, 100, 100], [279, 68, 50, 287, 16, 279, 279, 32, 106, 279],
                      [160, 160, 318, 243, 81, 81, 12, 3, 54, 220]],
    "base_weight_half": [[278, 278, 278, 278, 278, 278, 278, 278, 278, 278],
                         [135, 95, 287, 136, 268, 56, 300, 307, 307, 93], [222, 186, 157, 192, 31, 247, 237, 237, 60, 67]],
    "masks": [[121, 94, 109, 254, 86, 3, 167, 240, 258, 100], [28, 223, 13, 301, 61, 65, 213, 138, 77, 211],
              [277, 59, 262, 317, 74, 54, 74, 97, 199, 66]],
    "penalty": [[58, 48, 302, 4, 86, 190, 200, 218, 122, 84], [21, 67, 302, 318, 10, 50, 194, 30, 162, 172],
                [226, 88, 181, 60, 267, 31, 190, 213, 141, 310]],
    "per_row": [[255, 77, 46, 107, 107, 288, 64, 64, 169, 106], [32, 99, 209, 76, 76, 117, 117, 195, 188, 304],
                [289, 289, 289, 289, 79, 79, 97, 97, 97, 97]],
    "sparse_base": [[278, 278, 278, 278, 278, 61, 121, 121, 208, 52], [72, 35, 72, 72, 72, 72, 72, 72, 72, 72],
                    [135, 132, 132, 132, 233, 233, 233, 233, 233, 233]],
    "top_p": [[214, 218, 176, 318, 209, 71, 96, 22, 8, 135], [16, 314, 62, 210, 100, 287, 6, 87, 90, 219],
              [82, 95, 249, 91, 4, 173, 237, 250, 110, 0]],
}


def classic_run(pair, name, n=10):
    base, adapter, tok = pair
    ctor, gen = CLASSIC[name]
    lm = TailoredLM(base, adapter, tok, **ctor)
    eos = gen.pop("eos_token_id", tok.eos_token_id if "min_new_tokens" in gen else [])
    return lm, lm.generate(PROMPTS, n, eos_token_id=eos, **gen)


@pytest.mark.parametrize("name", sorted(CLASSIC))
def test_classic_constructor_matches_reference_loop(pair, name):
    base, adapter, tok = pair
    ctor, gen = dict(CLASSIC[name][0]), dict(CLASSIC[name][1])
    lm, out = classic_run(pair, name)
    seed = gen.pop("seed")
    seeds = seed if isinstance(seed, list) else [seed + r for r in range(len(PROMPTS))]
    alpha = gen.pop("alpha", ctor["alpha"])
    weights = [[a] for a in alpha] if isinstance(alpha, list) else [alpha]
    ref_ids, ref_lps = reference_decode(
        base, [adapter], weights, tok, PROMPTS, 10, seed=seeds, base_top_k=ctor.get("base_top_k"),
        eos_token_id=tok.eos_token_id if "min_new_tokens" in gen else None, **gen)
    assert_matches(out, ref_ids, ref_lps)
    assert out.token_ids == RECORDED[name]  # the tokens the classic constructor gave before K experts


def test_one_expert_equals_the_classic_constructor(pair):
    """K = 2 through experts=[adapter], weights=[alpha] (and the ipa preset): the classic
    constructor's tokens and log-probs, bit for bit."""
    base, adapter, tok = pair
    for name in sorted(CLASSIC):
        ctor, gen = dict(CLASSIC[name][0]), dict(CLASSIC[name][1])
        alpha = ctor.pop("alpha")
        if isinstance(gen.get("alpha"), list):
            gen["weights"] = [gen.pop("alpha")]  # one entry per expert, here one value per prompt
        eos = tok.eos_token_id if "min_new_tokens" in gen else []
        _, classic = classic_run(pair, name)
        for lm in (TailoredLM(base, experts=[adapter], weights=[alpha], tokenizer=tok, **ctor),
                   TailoredLM.ipa(base, adapter, tok, alpha=alpha, **ctor)):
            out = lm.generate(PROMPTS, 10, eos_token_id=eos, **gen)
            assert out.token_ids == RECORDED[name] == classic.token_ids, name
            assert out.logprobs == classic.logprobs and out.adapter_logprobs == classic.adapter_logprobs, name


# ---------------------------------------------------------------------------------------------
# K experts == the reference loop

COMPOSED = {  # name: (number of experts, weights, prefixes, generate kwargs)
    "compose": (2, [0.6, 0.8], [None, "note:"], dict(temperature=2.5, top_p=0.9, seed=11)),
    "per_row": (3, [[1.0, 0.5, -0.3], [0.2, 1.5, 0.0], [0.7, -0.5, 0.9]], [[5], None, "note:"],
                dict(temperature=3.0, top_k=30, seed=[4, 5, 6])),
    "masks": (2, [0.5, 0.5], [None, None], dict(min_new_tokens=3, bad_words_ids=[[10], [40, 41]],
                                                 temperature=3.0, seed=8)),
    "masks_penalty": (2, [0.5, -0.4], [None, None], dict(min_new_tokens=3, bad_words_ids=[[10]],
                                                          repetition_penalty=1.2, temperature=2.5, seed=9)),
    "experts_alone": (2, [1.0, 0.5], [None, "note:"], dict(base_weight=0.0, temperature=2.0, min_p=0.02, seed=12)),
}


@pytest.mark.parametrize("name", sorted(COMPOSED))
def test_k_experts_match_reference_loop(trio, name):
    base, models, tok = trio
    K, weights, prefixes, gen = COMPOSED[name]
    gen = dict(gen)
    per_row = isinstance(weights[0], list)
    lm = TailoredLM(base, experts=models[:K], weights=[1.0] * K if per_row else weights, prefixes=prefixes,
                    tokenizer=tok)
    eos = tok.eos_token_id if "min_new_tokens" in gen else None
    call = dict(weights=torch.tensor(weights)) if per_row else {}  # a [B, K] tensor: per-row weights
    out = lm.generate(PROMPTS, 10, eos_token_id=[] if eos is None else eos, output_adapter_logprobs=True, **call, **gen)
    seed = gen.pop("seed")
    seeds = seed if isinstance(seed, list) else [seed + r for r in range(len(PROMPTS))]
    ids = [lm._prefix_ids(p, k) for k, p in enumerate(prefixes)]
    ref_ids, ref_lps = reference_decode(base, models[:K], weights, tok, PROMPTS, 10, seed=seeds, prefixes=ids,
                                        eos_token_id=eos, **gen)
    assert_matches(out, ref_ids, ref_lps)
    assert len({tuple(r) for r in out.token_ids}) == 3 and len(set(out.token_ids[0])) > 3  # not degenerate
    # the adapter (the first expert) reports its own log-softmax at T = 1, with its own prefix
    sc = lm.score(PROMPTS, out.token_ids, **call)
    for r in range(3):
        torch.testing.assert_close(torch.tensor(out.adapter_logprobs[r]), sc.adapter_logprobs[r], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# Presets: the formulas, checked against hand-mixed logits

def _full(model, ids, V):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, :, :V].double()


@pytest.mark.parametrize("preset", ["dexperts", "proxy_tuning", "compose"])
def test_presets_are_their_formulas(trio, preset):
    base, (m1, m2, m3), tok = trio
    V = len(tok)
    if preset == "dexperts":
        lm, formula = TailoredLM.dexperts(base, m1, m2, tok, alpha=1.7), lambda b, e: b + 1.7 * (e[0] - e[1])
    elif preset == "proxy_tuning":
        lm, formula = TailoredLM.proxy_tuning(base, m1, m3, tok), lambda b, e: b + (e[0] - e[2])
    else:
        lm = TailoredLM.compose(base, [m1, m2, m3], tok, weights=[0.5, 0.25, -0.75])
        formula = lambda b, e: b + 0.5 * e[0] + 0.25 * e[1] - 0.75 * e[2]  # noqa: E731
    prompt = tok("the quick brown")["input_ids"]
    # greedy decoding follows the argmax of the hand-mixed logits
    out = lm.generate([prompt], 6, temperature=0.0, eos_token_id=[])
    ids = list(prompt)
    for t in out.token_ids[0]:
        z = formula(_full(base, ids, V)[-1], [_full(m, ids, V)[-1] for m in (m1, m2, m3)])
        assert int(z.argmax()) == t
        ids.append(t)
    # score(): the log-softmax of the hand-mixed logits at T = 0.8, every position
    completion = out.token_ids[0]
    sc = lm.score([prompt], [completion], temperature=0.8)
    full = prompt + completion
    z = formula(_full(base, full, V), [_full(m, full, V) for m in (m1, m2, m3)])
    want = torch.log_softmax(z / 0.8, -1)[len(prompt) - 1:-1].gather(1, torch.tensor(completion).view(-1, 1))
    torch.testing.assert_close(sc.logprobs[0].double(), want.view(-1), atol=1e-4, rtol=0)


def test_preset_weights(trio):
    base, (m1, m2, m3), tok = trio
    assert TailoredLM.dexperts(base, m1, m2, tok, alpha=2.0).weights == [2.0, -2.0]
    assert TailoredLM.proxy_tuning(base, m1, m2, tok).weights == [1.0, -1.0]
    lm = TailoredLM.compose(base, [m1, m2], tok, weights=[0.3, 0.4], prefixes=[None, [7]])
    assert lm.weights == [0.3, 0.4] and lm.prefixes == [[], [7]] and lm.alpha is None and lm.adapter is m1


# ---------------------------------------------------------------------------------------------
# score() of K experts

def test_score_is_log_softmax_of_the_mix(trio):
    base, models, tok = trio
    V = len(tok)
    lm = TailoredLM(base, experts=models, weights=[0.8, -0.2, 0.4], prefixes=[None, "note:", [3, 4]],
                    tokenizer=tok)
    w = torch.tensor([[0.8, -0.2, 0.4], [0.0, 1.0, 0.5], [1.2, 0.3, -0.6]])
    gen = lm.generate(PROMPTS, 6, weights=w, temperature=2.0, seed=3, eos_token_id=[])
    sc = lm.score(PROMPTS, gen.token_ids, weights=w, temperature=2.0)
    for r, p in enumerate(PROMPTS):
        prompt, comp = tok(p)["input_ids"], gen.token_ids[r]
        full = prompt + comp
        z = _full(base, full, V) + sum(w[r, k].double() * _full(m, pre + full, V)[len(pre):]
                                       for k, (m, pre) in enumerate(zip(models, lm.prefixes)))
        want = torch.log_softmax(z / 2.0, -1)[len(prompt) - 1:-1].gather(1, torch.tensor(comp).view(-1, 1)).view(-1)
        torch.testing.assert_close(sc.logprobs[r].double(), want, atol=1e-4, rtol=0)
        # cached decoding reports the same log pi
        torch.testing.assert_close(torch.tensor(gen.logprobs[r]), sc.logprobs[r].detach(), atol=1e-4, rtol=0)
    assert sc.logprobs[0].requires_grad  # the experts get gradients


# ---------------------------------------------------------------------------------------------
# Cached-LM experts: an API base, an API expert

def test_api_base_and_api_expert(trio):
    from ipa_fast.decoding.api_base import APIBase
    from ipa_fast.decoding.tailored import CachedLM, SparseBase
    from ipa_fast.decoding.serve import CompletionServer

    base, (m1, m2, m3), tok = trio
    V, k = len(tok), 8
    kw = dict(temperature=2.0, seed=[1, 2, 3], eos_token_id=[])
    with CompletionServer(base, tok, max_logprobs=k) as server:
        api = APIBase(server.url, tok, top_logprobs=k, timeout=30)
        # proxy-tuning of a base served over HTTP == the in-process sparse base
        a = TailoredLM.proxy_tuning(api, m1, m2, tok).generate(PROMPTS, 4, **kw)
        b = TailoredLM.proxy_tuning(base, m1, m2, tok, base_top_k=k).generate(PROMPTS, 4, **kw)
        assert a.token_ids == b.token_ids
        # the served model as an expert (weight >= 0) == a SparseBase expert in process
        c = TailoredLM(m3, experts=[m1, api], weights=[0.5, 0.7], tokenizer=tok).generate(PROMPTS, 4, **kw)
        sparse = SparseBase(CachedLM(base, tok.pad_token_id), k, V)
        d = TailoredLM(m3, experts=[m1, sparse], weights=[0.5, 0.7], tokenizer=tok).generate(PROMPTS, 4, **kw)
        assert c.token_ids == d.token_ids
        for r in range(3):
            torch.testing.assert_close(torch.tensor(c.logprobs[r]), torch.tensor(d.logprobs[r]), atol=1e-4, rtol=0)
        with pytest.raises(ValueError, match=r"experts\[1\] is an API model .* weight >= 0"):
            TailoredLM(m3, experts=[m1, api], weights=[0.5, -0.7], tokenizer=tok)


# ---------------------------------------------------------------------------------------------
# Loading several adapters

def test_from_pretrained_composes_saved_adapters(trio, tmp_path):
    from ipa_fast.decoding.tailored import save_adapter

    base, (m1, m2, _), tok = trio
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    note = tok("note:", add_special_tokens=False)["input_ids"]
    save_adapter(tmp_path / "a1", m1, tok, alpha=0.6, base=str(tmp_path / "base"))
    save_adapter(tmp_path / "a2", m2, tok, alpha=-0.3, adapter_prefix=note, base="elsewhere")
    lm = TailoredLM.from_pretrained(tmp_path / "base", [tmp_path / "a1", tmp_path / "a2"])
    assert lm.weights == [0.6, -0.3] and lm.prefixes == [[], note]
    assert [m["alpha"] for m in lm.metadata["adapters"]] == [0.6, -0.3]
    assert len(lm.metadata["warnings"]) == 1 and "a2" in lm.metadata["warnings"][0]
    want = TailoredLM.compose(base, [m1, m2], tok, weights=[0.6, -0.3], prefixes=[None, note])
    kw = dict(temperature=2.0, seed=4, eos_token_id=[])
    assert lm.generate(PROMPTS, 5, **kw).token_ids == want.generate(PROMPTS, 5, **kw).token_ids
    # given weights win, None entries keep the saved ones
    again = TailoredLM.from_pretrained(tmp_path / "base", [tmp_path / "a1", tmp_path / "a2"], alpha=[None, 0.9])
    assert again.weights == [0.6, 0.9]
    with pytest.raises(ValueError, match="one entry per adapter"):
        TailoredLM.from_pretrained(tmp_path / "base", [tmp_path / "a1", tmp_path / "a2"], alpha=0.5)


def test_from_pretrained_composes_an_adapter_with_its_own_added_tokens(trio, tmp_path):
    """A Quark adapter's tokenizer adds control tokens (ids >= V) that another adapter's lacks:
    they still compose, each checked against its own tokenizer, each reading its own prefix."""
    import copy

    from ipa_fast.decoding.tailored import save_adapter

    base, (m1, m2, _), tok = trio
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    tok_q, m1q = copy.deepcopy(tok), copy.deepcopy(m1)
    tok_q.add_tokens(["<|ctrl_0|>", "<|ctrl_1|>"], special_tokens=True)
    m1q.resize_token_embeddings(len(tok_q))
    ctrl = tok_q.convert_tokens_to_ids(["<|ctrl_1|>"])
    save_adapter(tmp_path / "q", m1q, tok_q, alpha=0.6, adapter_prefix=ctrl, base=str(tmp_path / "base"),
                 vocab_size=len(tok))
    save_adapter(tmp_path / "plain", m2, tok, alpha=0.4, base=str(tmp_path / "base"))
    for order in (["q", "plain"], ["plain", "q"]):
        lm = TailoredLM.from_pretrained(tmp_path / "base", [tmp_path / d for d in order])
        got = dict(zip(order, lm.prefixes))
        assert got == {"q": ctrl, "plain": []}
        models = {"q": m1q, "plain": m2}
        want = TailoredLM.compose(base, [models[d] for d in order], tok, weights=[{"q": 0.6, "plain": 0.4}[d] for d in order],
                                  prefixes=[got[d] for d in order])
        kw = dict(temperature=2.0, seed=4, eos_token_id=[])
        assert lm.generate(PROMPTS, 5, **kw).token_ids == want.generate(PROMPTS, 5, **kw).token_ids


# ---------------------------------------------------------------------------------------------
# Bad input: one-line errors naming the problem

def _one_line_error(exc_type, fn, match):
    with pytest.raises(exc_type, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def test_bad_inputs(trio):
    base, (m1, m2, m3), tok = trio
    V = len(tok)
    E = ValueError
    _one_line_error(E, lambda: TailoredLM(base, experts=[], tokenizer=tok), "experts is empty")
    _one_line_error(E, lambda: TailoredLM(base, experts=[m1, m2], weights=[1.0], tokenizer=tok),
                    r"weights must be a list with one entry per expert: 2 experts, got 1")
    _one_line_error(E, lambda: TailoredLM(base, experts=[m1], prefixes=[None, None], tokenizer=tok),
                    r"prefixes must be a list with one entry per expert: 1 experts, got 2")
    _one_line_error(E, lambda: TailoredLM(base, m1, tok, experts=[m2]), "not both")
    _one_line_error(E, lambda: TailoredLM(base, experts=[m1], weights=[float("nan")], tokenizer=tok),
                    "alpha must be finite")  # a single expert's weight is its alpha
    _one_line_error(E, lambda: TailoredLM(base, experts=[m1, m2], weights=[1.0, float("inf")], tokenizer=tok),
                    r"weights\[1\] must be finite")
    _one_line_error(E, lambda: TailoredLM.dexperts(base, m1, m2, tok, alpha=float("nan")), "alpha must be finite")
    _one_line_error(TypeError, lambda: TailoredLM(base, experts=[m1, "m2"], tokenizer=tok),
                    r"experts\[1\] must be a Hugging Face causal LM")
    small = make_tiny_model("gpt2", V - 40, 5, n_layer=1)
    _one_line_error(E, lambda: TailoredLM(base, experts=[m1, small], tokenizer=tok),
                    r"vocabulary mismatch: .* experts\[1\] %d" % (V - 40))
    _one_line_error(E, lambda: TailoredLM(base, experts=[m1, m2], prefixes=[None, [V + 5]], tokenizer=tok),
                    r"prefixes\[1\] ids must be in \[0, %d\)" % V)
    lm = TailoredLM(base, experts=[m1, m2], weights=[0.5, 0.5], tokenizer=tok)
    _one_line_error(E, lambda: lm.generate(PROMPTS, 2, alpha=0.3), "alpha= is the weight of a single adapter")
    _one_line_error(E, lambda: lm.generate(PROMPTS, 2, weights=[0.3]), "one entry per expert: 2 experts, got 1")
    _one_line_error(E, lambda: lm.generate(PROMPTS, 2, weights=torch.ones(2, 2)), r"weights must be \[B, K\]")
    _one_line_error(E, lambda: lm.generate(PROMPTS, 2, weights=[[1.0, 2.0], 0.5]),
                    r"weights\[0\] has 2 entries for 3 prompts")
    _one_line_error(E, lambda: lm.generate(PROMPTS, 2, weights=[float("nan"), 0.5]), "weights must be finite")
    _one_line_error(E, lambda: lm.save_adapter("/nonexistent/x"), "save_adapter saves a single adapter")
    with pytest.raises(ValueError, match="alpha is the weight of a single adapter"):
        lm.alpha = 2.0


# ---------------------------------------------------------------------------------------------
# ipa-fast generate --adapter DIR:WEIGHT (repeatable)

@pytest.fixture(scope="module")
def saved(trio, tmp_path_factory):
    from ipa_fast.decoding.tailored import save_adapter

    d = tmp_path_factory.mktemp("experts")
    base, (m1, m2, _), tok = trio
    base.save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    save_adapter(d / "a1", m1, tok, alpha=0.6)
    save_adapter(d / "a2", m2, tok, alpha=0.2, adapter_prefix=[7])
    return d


def _cli(argv, capsys):
    from ipa_fast.cli.main import main

    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_composes_adapters(trio, saved, capsys):
    import json

    base, (m1, m2, _), tok = trio
    common = ["generate", "--base", str(saved / "base"), "--prompt", "the cat", "--prompt", "Hello",
              "--max-new-tokens", "5", "--temperature", "2", "--seed", "3", "--json", str(saved / "g.json")]
    rc, out, err = _cli([*common, "--adapter", f"{saved / 'a1'}:0.5", "--adapter", f"{saved / 'a2'}:-0.25"], capsys)
    assert rc == 0, err
    res = json.loads((saved / "g.json").read_text())
    assert res["weights"] == [0.5, -0.25] and res["prefixes"] == [[], [7]] and res["alpha"] is None
    assert "(0.5)" in out and "(-0.25)" in out
    lm = TailoredLM.compose(base, [m1, m2], tok, weights=[0.5, -0.25], prefixes=[None, [7]])
    want = lm.generate(["the cat", "Hello"], 5, temperature=2.0, top_p=0.9, seed=3)
    assert [r["token_ids"] for r in res["results"]] == want.token_ids
    # weights left out: each adapter's saved alpha
    assert _cli([*common, "--adapter", str(saved / "a1"), "--adapter", str(saved / "a2")], capsys)[0] == 0
    assert json.loads((saved / "g.json").read_text())["weights"] == [0.6, 0.2]
    # one adapter with its weight is --alpha
    assert _cli([*common, "--adapter", f"{saved / 'a1'}:0.25"], capsys)[0] == 0
    assert json.loads((saved / "g.json").read_text())["alpha"] == 0.25


@pytest.mark.parametrize("flags, needle", [
    (["--adapter", "{a1}:nan"], "finite nonzero number, got 'nan'"),
    (["--adapter", "{a1}:0"], "finite nonzero number, got '0'"),
    (["--adapter", "./no/such:0.5"], "adapter not found: ./no/such"),
    (["--adapter", "{a1}", "--adapter", "{a2}", "--alpha", "0.5"], "--alpha sets a single adapter's weight"),
    (["--adapter", "{a1}", "--adapter", "{a2}", "--adapter-prefix", "5"], "--adapter-prefix applies to a single"),
    (["--adapter", "{a1}:0.3", "--alpha", "0.5"], "weight is given twice"),
])
def test_cli_bad_compositions(saved, capsys, flags, needle):
    flags = [f.format(a1=saved / "a1", a2=saved / "a2") for f in flags]
    rc, _, err = _cli(["generate", "--base", str(saved / "base"), "--prompt", "x", *flags], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err
