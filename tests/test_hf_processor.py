"""TailoredLogitsProcessor inside HF ``model.generate()``: its mixed logits equal a no-cache
recomputation of ``tailored_log_softmax`` on left-padded batches (so HF's warpers and draw
sample from the tailored policy), and greedy decoding agrees with TailoredLM token for token."""
import pytest
import torch
from transformers import LogitsProcessorList

from ipa_fast import tailored_log_softmax
from ipa_fast.decoding.tailored import TailoredLM
from ipa_fast.decoding.hf import TailoredLogitsProcessor
from tiny_models import control_token_ids, make_tiny_pair

PROMPTS = ["the cat", "a dog runs in the park with", "Hello"]


pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(TailoredLogitsProcessor):
    def __call__(self, input_ids, scores):
        out = super().__call__(input_ids, scores)
        self.calls.append((input_ids.clone(), out.clone()))
        return out


def _gen_kwargs(tok):
    return dict(pad_token_id=tok.pad_token_id, eos_token_id=None, max_new_tokens=6)


def test_processor_logits_equal_tailored_log_softmax_recomputed():
    base, adapter, tok = make_tiny_pair(seed=0, n_control_tokens=2)
    ctrl = control_token_ids(tok)
    proc = Recorder(adapter, alpha=0.6, pad_token_id=tok.pad_token_id, adapter_prefix=[ctrl[0]],
                    vocab_size=tok.vocab_size)
    proc.calls = []
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    base.generate(**enc, do_sample=True, top_p=0.9, logits_processor=LogitsProcessorList([proc]),
                  **_gen_kwargs(tok))
    assert len(proc.calls) == 6
    V = tok.vocab_size
    with torch.no_grad():
        for input_ids, mixed in proc.calls:
            for r in range(len(PROMPTS)):
                n_pad = int((enc["attention_mask"][r] == 0).sum())
                ids = input_ids[r][n_pad:].tolist()
                zb = base(torch.tensor([ids])).logits[:, -1, :V]
                za = adapter(torch.tensor([[ctrl[0]] + ids])).logits[:, -1, :V]
                expected = tailored_log_softmax(zb, za, alpha=0.6)
                got = torch.log_softmax(mixed[r:r + 1, :V].float(), -1)
                torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_processor_greedy_matches_tailored_lm_and_resets_between_calls():
    base, adapter, tok = make_tiny_pair(seed=1)
    proc = TailoredLogitsProcessor(adapter, alpha=1.0, pad_token_id=tok.pad_token_id)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    ref = TailoredLM(base, adapter, tok).generate(PROMPTS, 6, temperature=0.0, eos_token_id=[])
    for _ in range(2):  # the second generate() call must reset the adapter cache
        out = base.generate(**enc, do_sample=False, logits_processor=LogitsProcessorList([proc]),
                            **_gen_kwargs(tok))
        assert out[:, enc["input_ids"].shape[1]:].tolist() == ref.token_ids


def test_alpha_zero_leaves_scores_alone():
    base, adapter, tok = make_tiny_pair(seed=2)
    proc = TailoredLogitsProcessor(adapter, alpha=0.0, pad_token_id=tok.pad_token_id)
    ids = tok(["the cat"], return_tensors="pt")["input_ids"]
    scores = torch.randn(1, len(tok))
    torch.testing.assert_close(proc(ids, scores), scores)
