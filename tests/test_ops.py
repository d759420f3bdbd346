"""``ipa_fast.tailored_log_softmax``: values and gradients against the plain torch formula."""
from __future__ import annotations

import pytest
import torch

import ipa_fast
from sampler_cases import random_logits


def formula(base, adapter, alpha, temperature):
    a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1)
    t = torch.as_tensor(temperature, dtype=torch.float64).reshape(-1, 1)
    return torch.log_softmax((base.double() + a * adapter.double()) / t, dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_values_match_the_formula(dtype):
    base = random_logits(5, 301, seed=1, dtype=dtype)
    adapter = random_logits(5, 301, seed=2, dtype=dtype)
    alpha = torch.tensor([0.0, 0.5, 1.0, 2.0, -0.3])
    temperature = torch.tensor([1.0, 0.7, 1.5, 1.0, 0.2])
    out = ipa_fast.tailored_log_softmax(base, adapter, alpha=alpha, temperature=temperature)
    assert out.dtype == torch.float32 and out.shape == (5, 301)
    torch.testing.assert_close(out.double(), formula(base, adapter, alpha, temperature), rtol=0, atol=2e-5)
    alone = ipa_fast.tailored_log_softmax(base, None, temperature=0.5)
    torch.testing.assert_close(alone.double(), torch.log_softmax(base.double() / 0.5, -1), rtol=0, atol=2e-5)


def test_gradient_wrt_adapter_matches_autograd_of_the_formula():
    base = random_logits(4, 97, seed=3)
    adapter = random_logits(4, 97, seed=4).requires_grad_(True)
    adapter64 = adapter.detach().double().requires_grad_(True)
    weights = torch.randn(4, 97, generator=torch.Generator().manual_seed(5))
    alpha, temperature = torch.tensor([0.5, 1.0, 2.0, 0.0]), torch.tensor([1.0, 0.8, 1.3, 1.0])
    (ipa_fast.tailored_log_softmax(base, adapter, alpha=alpha, temperature=temperature) * weights).sum().backward()
    (formula(base, adapter64, alpha, temperature) * weights.double()).sum().backward()
    torch.testing.assert_close(adapter.grad.double(), adapter64.grad, rtol=0, atol=1e-5)
    assert (adapter.grad[3] == 0).all()  # alpha == 0: the adapter has no influence


def test_masked_adapter_with_zero_alpha_and_bad_temperature():
    base = torch.zeros(2, 4)
    adapter = torch.tensor([[float("-inf"), 0.0, 0.0, 0.0]] * 2)
    out = ipa_fast.tailored_log_softmax(base, adapter, alpha=torch.tensor([0.0, 1.0]))
    assert torch.allclose(out[0], torch.full((4,), -torch.log(torch.tensor(4.0))))
    assert out[1, 0] == float("-inf") and not out.isnan().any()
    with pytest.raises(ValueError, match="temperature"):
        ipa_fast.tailored_log_softmax(base, adapter, temperature=0.0)
    with pytest.raises(ValueError, match="adapter"):
        ipa_fast.tailored_log_softmax(base, torch.zeros(2, 5))
