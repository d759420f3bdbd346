"""K experts as the unit: the mix rule and the K-expert ops (log-softmax, token stats).

The mix rule has one definition, :func:`ipa_fast.ops.reference.mix_experts`. The sampler's
K-expert cases (every backend against the reference, strided rows, -inf and zero weights, bad
input, the chi-square test of the draws for K = 1, 2, 3) are in tests/test_sampler_semantics.py.
"""
import pytest
import torch

import ipa_fast
from ipa_fast.ops import reference
from ipa_fast.ops.token_stats import experts_token_stats_reference

from sampler_cases import random_logits


def experts_for(K, B, V, *, seed=0, dtypes=None, masked=0.0):
    dtypes = dtypes or [torch.float32] * K
    return [random_logits(B, V, seed=seed + 31 * k, scale=2.0, dtype=dtypes[k], masked=masked if k else 0.0)
            for k in range(K)]


def test_mix_rule_is_the_old_mix():
    base, adapter = experts_for(2, 4, 100, seed=3, masked=0.1)
    alpha = torch.tensor([0.0, 0.5, -1.0, 2.0])
    z = reference.mix_experts([base, adapter], reference.full_weights(alpha.unsqueeze(1), True))
    old = base + torch.where(alpha.unsqueeze(1) == 0, torch.zeros(()), alpha.unsqueeze(1) * adapter)
    assert torch.equal(z, old)


# ---------------------------------------------------------------- K-expert ops

def test_experts_log_softmax_and_gradients():
    B, V = 5, 40
    experts = [x.requires_grad_() for x in experts_for(3, B, V, seed=2)]
    w = torch.tensor([1.0, 0.0, -0.7])
    out = ipa_fast.experts_log_softmax(experts, w, temperature=0.8)
    ref = torch.log_softmax((experts[0] - 0.7 * experts[2]) / 0.8, dim=-1)
    torch.testing.assert_close(out, ref)
    g = torch.randn(B, V)
    grads = torch.autograd.grad((out * g).sum(), experts)
    gz = torch.autograd.grad((ref * g).sum(), experts[0], retain_graph=True)[0]
    torch.testing.assert_close(grads[0], gz)
    assert torch.equal(grads[1], torch.zeros_like(grads[1]))
    torch.testing.assert_close(grads[2], -0.7 * gz)
    # the two-expert op is its K = 2 case
    a = ipa_fast.tailored_log_softmax(experts[0], experts[1], alpha=0.3, temperature=0.8)
    b = ipa_fast.experts_log_softmax(experts[:2], [1.0, 0.3], temperature=0.8)
    assert torch.equal(a, b)
    # equals the sampler's logprobs
    s = ipa_fast.sample_experts([x.detach() for x in experts], w, temperature=0.8, seed=1)
    torch.testing.assert_close(s.logprobs, out.detach().gather(1, s.tokens.unsqueeze(1)).squeeze(1))


@pytest.mark.parametrize("with_ref", [False, True])
def test_experts_token_stats_matches_formula(with_ref):
    N, V = 12, 64
    base, a1, a2, r1 = experts_for(4, N, V, seed=5, masked=0.0)
    a1.requires_grad_()
    a2.requires_grad_()
    w = torch.rand(N, 3) + 0.2
    w[:3, 2] = 0.0
    targets = torch.randint(0, V, (N,))
    kw = dict(temperature=0.9)
    if with_ref:
        kw.update(ref_experts=[base, r1], ref_weights=[1.0, 0.5])
    got = ipa_fast.experts_token_stats([base, a1, a2], w, targets, chunk_rows=5, **kw)
    ref = experts_token_stats_reference([base, a1, a2], w, targets, **kw)
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    coef = torch.randn(3, N)
    loss_g = sum((c * x).sum() for c, x in zip(coef, got))
    loss_r = sum((c * x).sum() for c, x in zip(coef, ref))
    g = torch.autograd.grad(loss_g, [a1, a2])
    r = torch.autograd.grad(loss_r, [a1, a2])
    for x, y in zip(g, r):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    assert torch.equal(g[1][:3], torch.zeros_like(g[1][:3]))


def test_token_stats_two_expert_api_is_the_k2_case():
    N, V = 6, 30
    base, adapter = experts_for(2, N, V, seed=8)
    adapter.requires_grad_()
    targets = torch.randint(0, V, (N,))
    a = ipa_fast.tailored_token_stats(base, adapter, targets, alpha=0.4)
    b = ipa_fast.experts_token_stats([base, adapter], [1.0, 0.4], targets)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="weights"):
        ipa_fast.experts_token_stats([base, adapter], [1.0], targets)
