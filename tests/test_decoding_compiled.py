"""``TailoredLM.generate(compile=...)``: the compiled decode step (static KV caches, every step after
the first as one torch.compile graph) draws the eager path's tokens for the same seed, compiles one
graph for all the steps of a call and for a later call of the same shapes, and refuses what it
cannot compile with a one-line error.

The fast tests compile with a counting backend that runs the captured graph eagerly (dynamo's
tracing, guards and fullgraph checks without inductor's code generation); the inductor test is slow.
"""
import pytest
import torch

from ipa_fast.decoding.tailored import TailoredLM
from tiny_models import make_tiny_model, make_tiny_pair

PROMPTS = ["the cat", "a dog runs in the park", "Hello"]


class Counting:
    """A torch.compile backend that counts the graphs it is handed and runs them as captured."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_same(eager, compiled):
    assert compiled.token_ids == eager.token_ids
    assert compiled.finish_reasons == eager.finish_reasons
    assert (compiled.adapter_logprobs is None) == (eager.adapter_logprobs is None)
    for name in ("logprobs",) + (("adapter_logprobs",) if eager.adapter_logprobs is not None else ()):
        for e, c in zip(getattr(eager, name), getattr(compiled, name)):
            torch.testing.assert_close(torch.tensor(c), torch.tensor(e), rtol=0, atol=1e-5)


CASES = {
    # Llama base and adapter: top-p, EOS masked for the first 5 tokens, then free to end rows
    "llama": (dict(base_arch="llama", adapter_arch="llama"), {}, dict(top_p=0.9, min_new_tokens=5)),
    # GPT-2 base, Llama adapter with a prefix, a third GPT-2 expert with a negative weight, a sparse
    # base, per-row lengths, a stop string, bad words and a repetition penalty
    "experts": (dict(base_arch="gpt2", adapter_arch="llama"), dict(base_top_k=40),
                dict(top_k=20, temperature=0.8, max_new_tokens=[9, 4, 7], stop="the", repetition_penalty=1.3,
                     bad_words_ids=[[5], [3, 4]])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_step_draws_the_eager_tokens_with_one_graph(one_thread, fresh_dynamo, case):
    pair_kw, lm_kw, gen_kw = CASES[case]
    base, adapter, tok = make_tiny_pair(seed=5, **pair_kw)
    if case == "experts":
        third = make_tiny_model("gpt2", len(tok), 9, n_layer=1)
        lm = TailoredLM(base, tokenizer=tok, experts=[adapter, third], weights=[0.7, -0.3],
                        prefixes=[[7, 8], None], **lm_kw)
    else:
        lm = TailoredLM(base, adapter, tok, alpha=0.6, **lm_kw)
    gen_kw = dict(gen_kw)
    n_new = gen_kw.pop("max_new_tokens", 9)
    backend = Counting()
    gen_kw["output_adapter_logprobs"] = True  # the adapter's log-prob of each token is in the graph too
    eager = lm.generate(PROMPTS, n_new, seed=11, **gen_kw)
    compiled = lm.generate(PROMPTS, n_new, seed=11, compile=backend, **gen_kw)
    assert_same(eager, compiled)
    assert max(len(t) for t in compiled.token_ids) >= 4  # several compiled steps ran ...
    assert backend.graphs == 1  # ... all in one graph
    # another call of the same batch size and cache width (other prompts, seed, top-p): no new graph
    other = ["we play music", "birds sing", PROMPTS[1]]  # the same longest prompt: the same cache width
    gen_kw["top_p"] = 0.8
    assert_same(lm.generate(other, n_new, seed=12, **gen_kw),
                lm.generate(other, n_new, seed=12, compile=backend, **gen_kw))
    assert backend.graphs == 1


def test_compiled_step_with_the_experts_alone(one_thread, fresh_dynamo):
    """base_weight=0: the base is not run, its forward is not in the graph."""
    base, adapter, tok = make_tiny_pair(seed=6, base_arch="llama", adapter_arch="llama")
    calls = []
    h = base.register_forward_pre_hook(lambda *a: calls.append(1))
    lm = TailoredLM(base, adapter, tok, alpha=1.0)
    try:
        assert_same(lm.generate(PROMPTS, 6, seed=2, base_weight=0),
                    lm.generate(PROMPTS, 6, seed=2, base_weight=0, compile=Counting()))
    finally:
        h.remove()
    assert not calls


class ServedModel:
    """A cached-LM protocol object (as an API base is): prefill/step, no forward to trace."""
    vocab_size = 10_000

    def prefill(self, rows, max_new_tokens):
        return torch.zeros((len(rows), self.vocab_size))

    def step(self, tokens):
        return torch.zeros((tokens.shape[0], self.vocab_size))


def test_what_cannot_compile_is_refused_in_one_line(one_thread):
    base, adapter, tok = make_tiny_pair(seed=1)
    lm = TailoredLM(base, tokenizer=tok, experts=[adapter, ServedModel()], weights=[1.0, 0.5])
    with pytest.raises(ValueError, match=r"^compile=True: experts\[1\] is a ServedModel, not a local Hugging Face "
                                         r"model.*pass compile=False$") as exc:
        lm.generate(PROMPTS, 3, seed=0, compile=True)
    assert "\n" not in str(exc.value)
    assert lm.generate(PROMPTS, 3, seed=0).token_ids  # the eager path still decodes it

    adapter._can_compile_fullgraph = False  # a model that declares no torch.compile support
    lm = TailoredLM(base, adapter, tok)
    with pytest.raises(ValueError, match=r"^compile='inductor': the adapter \(GPT2LMHeadModel\) does not support "
                                         r"torch.compile"):
        lm.generate(PROMPTS, 3, seed=0, compile="inductor")
    for bad in (1, "", 0.5):
        with pytest.raises(TypeError, match="compile must be True, False or a torch.compile backend"):
            lm.generate(PROMPTS, 3, seed=0, compile=bad)


def test_a_graph_break_is_one_line_naming_compile_false(one_thread, fresh_dynamo):
    base, adapter, tok = make_tiny_pair(seed=2, base_arch="llama", adapter_arch="llama")

    def breaks(module, args):
        torch._dynamo.graph_break()

    h = adapter.register_forward_pre_hook(breaks)
    try:
        with pytest.raises(RuntimeError, match=r"^compile: the decode step could not be compiled as one graph "
                                               r"\(.*\); pass compile=False$") as exc:
            TailoredLM(base, adapter, tok).generate(PROMPTS, 3, seed=0, compile=Counting())
    finally:
        h.remove()
    assert "\n" not in str(exc.value)


@pytest.mark.slow
def test_inductor_compiled_step_draws_the_eager_tokens(one_thread, fresh_dynamo):
    """The default backend (inductor, C++ code generation, frozen weights): the same tokens as
    eager, also after the adapter's weights change in place."""
    base, adapter, tok = make_tiny_pair(seed=5, base_arch="llama", adapter_arch="llama")
    lm = TailoredLM(base, adapter, tok, alpha=0.6)
    kw = dict(seed=4, top_p=0.9, min_new_tokens=4)
    assert_same(lm.generate(PROMPTS, 8, **kw), lm.generate(PROMPTS, 8, compile=True, **kw))
    with torch.no_grad():  # an in-place update (an optimizer step): the frozen graph must not serve stale weights
        adapter.get_output_embeddings().weight.mul_(-1.5)
    assert_same(lm.generate(PROMPTS, 8, **kw), lm.generate(PROMPTS, 8, compile=True, **kw))
