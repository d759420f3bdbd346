"""K experts as the sampler's unit: ``ipa_fast.sample_experts`` and the K-expert ops.

The mix rule has one definition, :func:`ipa_fast.ops.reference.mix_experts`; every fast path is
checked against the reference here (the Triton interpreter cases live in
tests/test_sampler_triton.py, which owns the interpreter switch).
"""
import pytest
import torch

import ipa_fast
from ipa_fast.ops import reference
from ipa_fast.ops.token_stats import experts_token_stats_reference

from sampler_cases import (backend_params, chi_square_pvalue, filtered_probs, hf_kept_mask, random_logits,
                           random_params)

ALPHA_CHI2 = 1e-4


def experts_for(K, B, V, *, seed=0, dtypes=None, masked=0.0):
    dtypes = dtypes or [torch.float32] * K
    return [random_logits(B, V, seed=seed + 31 * k, scale=2.0, dtype=dtypes[k], masked=masked if k else 0.0)
            for k in range(K)]


def row_weights(B, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(B, K, generator=g) * 1.5
    w[:, 0] = 1.0
    w[torch.rand(B, K, generator=g) < 0.1] = 0.0   # some experts ignored in some rows
    return w


def filter_params(B, V, seed=0):
    p = random_params(B, V, seed=seed)
    p.pop("alpha")
    return p


# ---------------------------------------------------------------- fast paths == reference

@pytest.mark.parametrize("backend", backend_params(["cpu"]))
@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_fast_path_matches_reference(backend, K):
    B, V = 64, 3000
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32][:K]
    experts = experts_for(K, B, V, seed=K, dtypes=dtypes, masked=0.05)
    w = row_weights(B, K, seed=K)
    p = filter_params(B, V, seed=K)
    ref = ipa_fast.sample_experts(experts, w, seed=11, offset=3, backend="reference", **p)
    got = ipa_fast.sample_experts(experts, w, seed=11, offset=3, backend=backend, **p)
    assert got.valid.all() and ref.valid.all()
    same = (got.tokens == ref.tokens).float().mean().item()
    assert same >= 0.999, same
    ok = got.tokens == ref.tokens
    torch.testing.assert_close(got.logprobs[ok], ref.logprobs[ok], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params(["cpu"]))
def test_strided_rows_read_in_place(backend):
    B, V = 8, 1000
    wide = [random_logits(B, V + 37, seed=k) for k in range(3)]
    sliced = [x[:, :V] for x in wide]
    assert not sliced[0].is_contiguous()
    kw = dict(weights=[1.0, 0.5, -0.25], temperature=0.9, top_p=0.9, seed=4)
    got = ipa_fast.sample_experts(sliced, backend=backend, **kw)
    ref = ipa_fast.sample_experts([x.contiguous() for x in sliced], backend="reference", **kw)
    assert torch.equal(got.tokens, ref.tokens)
    # the two-expert entry reads strided rows too
    a = ipa_fast.sample(sliced[0], sliced[1], alpha=0.5, seed=4, backend=backend)
    b = ipa_fast.sample(sliced[0].contiguous(), sliced[1].contiguous(), alpha=0.5, seed=4, backend=backend)
    assert torch.equal(a.tokens, b.tokens)


# ---------------------------------------------------------------- K = 2 is the old sample

@pytest.mark.parametrize("backend", backend_params(["reference", "cpu"]))
def test_two_experts_equal_sample(backend):
    B, V = 48, 2000
    base, adapter = experts_for(2, B, V, seed=7)
    p = random_params(B, V, seed=7)
    alpha = p.pop("alpha")
    old = ipa_fast.sample(base, adapter, alpha=alpha, seed=5, offset=9, backend=backend, **p)
    w = torch.stack([torch.ones(B), alpha], dim=1)
    new = ipa_fast.sample_experts([base, adapter], w, seed=5, offset=9, backend=backend, **p)
    assert torch.equal(old.tokens, new.tokens)
    assert torch.equal(old.logprobs, new.logprobs)
    assert torch.equal(old.filtered_logprobs, new.filtered_logprobs)
    one = ipa_fast.sample(base, seed=5, backend=backend, **p)
    assert torch.equal(one.tokens, ipa_fast.sample_experts([base], [1.0], seed=5, backend=backend, **p).tokens)


def test_mix_rule_is_the_old_mix():
    base, adapter = experts_for(2, 4, 100, seed=3, masked=0.1)
    alpha = torch.tensor([0.0, 0.5, -1.0, 2.0])
    z = reference.mix_experts([base, adapter], reference.full_weights(alpha.unsqueeze(1), True))
    old = base + torch.where(alpha.unsqueeze(1) == 0, torch.zeros(()), alpha.unsqueeze(1) * adapter)
    assert torch.equal(z, old)


# ---------------------------------------------------------------- semantics: chi-square, K = 3

@pytest.mark.parametrize("backend", backend_params(["reference", "cpu"]))
@pytest.mark.parametrize("case", [dict(), dict(top_k=5, temperature=0.8), dict(top_p=0.8, min_p=0.05)])
def test_three_experts_draw_softmax_of_weighted_sum(backend, case):
    V, N = 12, 100_000
    experts = [random_logits(1, V, seed=300 + k, scale=1.0) for k in range(3)]
    weights = [1.0, 0.6, -0.4]
    kw = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    kw.update(case)
    out = ipa_fast.sample_experts([x.expand(N, V) for x in experts], weights, seed=77, backend=backend, **kw)
    # the oracle: float64 weighted sum, then transformers' warpers and a float64 softmax
    z = sum(w * x.double() for w, x in zip(weights, experts)) / kw["temperature"]
    keep = hf_kept_mask(z.float(), kw["top_k"], kw["top_p"], kw["min_p"])[0]
    probs = filtered_probs(z[0].float(), keep)
    counts = torch.bincount(out.tokens, minlength=V)
    assert chi_square_pvalue(counts, probs) > ALPHA_CHI2


# ---------------------------------------------------------------- -inf and zero weights

@pytest.mark.parametrize("backend", backend_params(["reference", "cpu"]))
def test_inf_rules(backend):
    V = 50
    e0, e1, e2 = experts_for(3, 4, V, seed=9)
    e1 = e1.clone()
    e1[:, 10] = float("-inf")
    e1[0] = float("nan")
    w = torch.tensor([[1.0, 0.0, 0.5],     # weight 0: expert 1 ignored, even its NaN row
                      [1.0, 0.5, 0.5],     # positive weight: token 10 masked
                      [1.0, -0.5, 0.5],    # negative weight * -inf = +inf: the row is invalid
                      [0.0, 0.0, 0.0]])    # every weight 0: z = 0, uniform
    out = ipa_fast.sample_experts([e0, e1, e2], w, seed=4, validate=False, backend=backend)
    assert out.valid.tolist() == [True, True, False, True]
    ref = ipa_fast.sample_experts([e0, e1, e2], w, seed=4, validate=False, backend="reference")
    full = ipa_fast.sample_experts([e0, e1, e2], w, seed=4, validate=False, backend=backend)
    assert torch.equal(full.tokens, ref.tokens)
    assert full.tokens[2].item() == 0 and torch.isnan(full.logprobs[2])
    # row 1 never draws token 10; row 3 is uniform
    many = ipa_fast.sample_experts([e0[1:2].expand(2000, V), e1[1:2].expand(2000, V),
                                    e2[1:2].expand(2000, V)], [1.0, 0.5, 0.5], seed=1, backend=backend)
    assert not (many.tokens == 10).any()
    torch.testing.assert_close(full.logprobs[3], torch.tensor(-torch.log(torch.tensor(float(V))).item()))
    with pytest.raises(ValueError, match="invalid"):
        ipa_fast.sample_experts([e0, e1, e2], w, seed=4, backend=backend)
    z = reference.mix_experts([e0, e1, e2], w)
    assert torch.equal(z[0], e0[0] + 0.5 * e2[0])


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("bad, match, exc", [
    (dict(experts=[torch.zeros(2, 5), torch.zeros(2, 6)]), r"experts\[1\] shape", ValueError),
    (dict(experts=[torch.zeros(2, 5), torch.zeros(3, 5)]), r"experts\[1\] shape", ValueError),
    (dict(experts=[]), "experts must hold at least one", ValueError),
    (dict(experts=torch.zeros(2, 2, 5)), "experts must be a list", TypeError),
    (dict(weights=[1.0, 2.0]), "weights must have K = 3", ValueError),
    (dict(weights=torch.ones(4)), "weights must be K = 3", ValueError),
    (dict(weights=torch.ones(3, 3)), "weights must be K = 3", ValueError),
    (dict(weights=[1.0, float("nan"), 0.5]), "weights must be finite", ValueError),
    (dict(weights=torch.tensor([[1.0, 0.5, float("nan")], [1.0, 0.5, 0.5]])), "weights must be finite", ValueError),
    (dict(weights=[1.0, float("inf"), 0.5]), "weights must be finite", ValueError),
    (dict(weights=torch.tensor([1.0, 1e300, 0.5], dtype=torch.float64)), "weights must be finite", ValueError),
    (dict(weights="1,2,3"), "weights must be a list", TypeError),
])
@pytest.mark.parametrize("backend", backend_params(["reference", "cpu"]))
def test_bad_inputs_name_the_parameter(bad, match, exc, backend):
    args = dict(experts=[torch.zeros(2, 5)] * 3, weights=[1.0, 0.5, 0.5])
    args.update(bad)
    with pytest.raises(exc, match=match):
        ipa_fast.sample_experts(args["experts"], args["weights"], seed=0, backend=backend)


def test_nan_weight_without_validation_is_an_invalid_row():
    x = [torch.zeros(2, 5)] * 2
    w = torch.tensor([[1.0, float("nan")], [1.0, 0.5]])
    for backend in ("reference", "cpu"):
        out = ipa_fast.sample_experts(x, w, seed=0, validate=False, backend=backend)
        assert out.valid.tolist() == [False, True]


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


# ---------------------------------------------------------------- the CUDA kernel, emulated on CPU

def _emulated_cuda():
    """csrc/cuda/sampler.cu built as C++ with -DIPA_FAST_CPU_EMULATION (csrc/cuda/cpu_emulation.h)."""
    from cuda_emulation import emulated_cuda_module

    return emulated_cuda_module()


def test_cuda_kernel_experts_emulated():
    mod = _emulated_cuda()
    B, V = 6, 1500
    experts = [random_logits(B, V + 5 * k, seed=40 + k)[:, :V] for k in range(3)]
    w = row_weights(B, 3, seed=2)
    w[0, 0] = 0.0
    p = filter_params(B, V, seed=3)
    from ipa_fast.ops.sampling import param_tensor
    prm = {k: param_tensor(k, v, B, "cpu", validate=True) for k, v in p.items()}
    prm["seed"] = torch.arange(B, dtype=torch.int64) + 9
    prm["offset"] = torch.zeros(B, dtype=torch.int64)
    out = (torch.empty(B, dtype=torch.int64), torch.empty(B), torch.empty(B), torch.empty(B, dtype=torch.bool))
    n_f32, n_i32 = mod.workspace_size(B, V)
    ws_f32, ws_i32 = torch.empty(n_f32), torch.empty(n_i32, dtype=torch.int32)
    mod._sample_experts(0, B, V, [x.data_ptr() for x in experts], [x.stride(0) for x in experts], w.data_ptr(), 3,
                        *(prm[k].data_ptr() for k in ("temperature", "top_k", "top_p", "min_p", "seed", "offset")),
                        *(t.data_ptr() for t in out), 0, ws_f32.data_ptr(), ws_i32.data_ptr())
    ref = reference.sample_experts(experts, w, **prm)
    assert torch.equal(out[3], ref[3])
    assert torch.equal(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1], atol=2e-5, rtol=1e-5)
