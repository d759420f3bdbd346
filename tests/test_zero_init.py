"""TrainConfig.zero_init_output: the adapter's logits start at exactly 0, so the untrained product of
experts is the base itself, and every adapter parameter still learns."""
import pytest
import torch

from ipa_fast.decoding.tailored import TailoredLM
from ipa_fast.training.policy import zero_output
from tiny_models import make_tiny_pair


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_zeroed_adapter_leaves_the_base_unchanged(arch):
    base, adapter, tok = make_tiny_pair(seed=3, base_arch=arch, adapter_arch=arch)
    zero_output(adapter)
    ids = torch.tensor([[5, 17, 42, 9]])
    assert torch.count_nonzero(adapter(input_ids=ids).logits) == 0
    lm = TailoredLM(base, adapter, tok, alpha=1.0)
    prompt = ["hello there"]
    completion = [tok("general kenobi")["input_ids"]]
    tailored = lm.score(prompt, completion).logprobs[0]
    ref = torch.log_softmax(base(input_ids=torch.tensor([lm.encode(prompt)[0] + completion[0]])).logits[0].double(), -1)
    n = len(lm.encode(prompt)[0])
    expected = [float(ref[n - 1 + i, t]) for i, t in enumerate(completion[0])]
    assert [float(x) for x in tailored] == pytest.approx(expected, abs=1e-5)


def test_every_parameter_learns_after_the_first_step():
    _, adapter, _ = make_tiny_pair(seed=4, base_arch="llama", adapter_arch="llama")
    zero_output(adapter)
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    ids = torch.tensor([[5, 17, 42, 9, 11]])
    for _ in range(2):
        opt.zero_grad()
        logits = adapter(input_ids=ids[:, :-1]).logits
        torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]).backward()
        opt.step()
    grads = {n: p.grad for n, p in adapter.named_parameters()}
    assert all(g is not None and torch.count_nonzero(g) > 0 for n, g in grads.items() if "layers.0" in n)


def test_a_norm_that_cannot_be_zeroed_is_refused():
    from transformers import Gemma3TextConfig, Gemma3ForCausalLM

    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    model = Gemma3ForCausalLM(cfg).eval()  # its RMSNorm scales by (1 + gain)
    with pytest.raises(ValueError, match="does not zero its logits"):
        zero_output(model)
