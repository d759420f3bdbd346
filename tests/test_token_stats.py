"""tailored_token_stats (the chunked RL loss op) vs the plain PyTorch formula.

Tolerances: float32 inputs -> values and gradients within 1e-5 absolute of the plain
formula (both compute in float32; only summation order differs). bfloat16 inputs -> values
within 1e-4 (both upcast the same bf16 numbers to float32), gradients, which are returned
in bfloat16, within one bf16 rounding (rtol 1/128) plus 1e-4 absolute.
"""
import pytest
import torch

from ipa_fast.ops.token_stats import tailored_token_stats, tailored_token_stats_reference

TOL = {torch.float32: dict(val=1e-5, grad_atol=1e-5, grad_rtol=1e-5),
       torch.bfloat16: dict(val=1e-4, grad_atol=1e-4, grad_rtol=1 / 128)}


def make(N, V, dtype, seed=0, masked=True):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(N, V, generator=g) * 3).to(dtype)
    adapter = torch.randn(N, V, generator=g).to(dtype).requires_grad_(True)
    ref = torch.randn(N, V, generator=g).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    if masked:  # -inf logits (masked tokens) are legal
        base[0, : V // 2] = float("-inf")
        base[1, 3] = float("-inf")
        targets[0] = V - 1
    return base, adapter, ref, targets


def run_both(base, adapter, ref, targets, chunk_rows=None, **kw):
    w = torch.randn(3, base.shape[0], generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for fn, extra in ((tailored_token_stats, dict(chunk_rows=chunk_rows)), (tailored_token_stats_reference, {})):
        o = fn(base, adapter, targets, ref_adapter=ref, **kw, **extra)
        loss = sum((w[i] * o[i]).sum() for i in range(3))
        (g,) = torch.autograd.grad(loss, adapter)
        outs.append(o)
        grads.append(g)
    return outs, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("kw", [dict(), dict(alpha=0.5, temperature=0.7), "per_row"])
def test_matches_plain_formula(dtype, with_ref, kw):
    N, V = 29, 257  # odd shapes; chunk of 8 rows -> a ragged last chunk
    base, adapter, ref, targets = make(N, V, dtype)
    if kw == "per_row":
        alpha = torch.rand(N) * 2
        alpha[::5] = 0.0  # alpha == 0 rows ignore the adapter (and get zero gradient)
        kw = dict(alpha=alpha, temperature=torch.rand(N) + 0.5)
    (o1, o2), (g1, g2) = run_both(base, adapter, ref if with_ref else None, targets, chunk_rows=8, **kw)
    tol = TOL[dtype]
    for x, y in zip(o1, o2):
        assert x.dtype == torch.float32 and x.shape == (N,)
        torch.testing.assert_close(x, y, atol=tol["val"], rtol=0)
    assert g1.dtype == dtype and torch.isfinite(g1).all()
    torch.testing.assert_close(g1.float(), g2.float(), atol=tol["grad_atol"], rtol=tol["grad_rtol"])
    if isinstance(kw.get("alpha"), torch.Tensor):
        assert (g1[::5] == 0).all()


def test_zero_kl_and_known_values():
    base, adapter, _, targets = make(6, 50, torch.float32, masked=False)
    lp, h, kl = tailored_token_stats(base, adapter, targets, ref_adapter=adapter.detach().clone())
    assert kl.abs().max() < 1e-6
    logp = torch.log_softmax(base + adapter.detach(), -1)
    torch.testing.assert_close(lp, logp.gather(1, targets[:, None])[:, 0])
    torch.testing.assert_close(h, -(logp.exp() * logp).sum(-1))
    # ref=None: the reference is the base alone
    _, _, kl0 = tailored_token_stats(base, adapter, targets)
    lb = torch.log_softmax(base, -1)
    torch.testing.assert_close(kl0, (logp.exp() * (logp - lb)).sum(-1), atol=1e-5, rtol=1e-5)


def test_chunking_does_not_change_results():
    base, adapter, ref, targets = make(20, 97, torch.float32)
    ref_out = None
    for c in (1, 3, 20, 1000):
        o = tailored_token_stats(base, adapter, targets, ref_adapter=ref, chunk_rows=c)
        (g,) = torch.autograd.grad(o[0].sum() + o[1].sum() - o[2].sum(), adapter)
        if ref_out is None:
            ref_out = (o, g)
        else:
            for x, y in zip(o, ref_out[0]):
                torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
            torch.testing.assert_close(g, ref_out[1], atol=1e-6, rtol=0)


def test_only_some_outputs_used():
    base, adapter, ref, targets = make(9, 33, torch.float32)
    (g1,) = torch.autograd.grad(tailored_token_stats(base, adapter, targets, ref_adapter=ref)[2].sum(), adapter)
    (g2,) = torch.autograd.grad(tailored_token_stats_reference(base, adapter, targets, ref_adapter=ref)[2].sum(), adapter)
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)


def test_no_gradient_to_base_or_reference():
    base, adapter, ref, targets = make(4, 20, torch.float32, masked=False)
    base.requires_grad_(True)
    ref.requires_grad_(True)
    lp, _, _ = tailored_token_stats(base, adapter, targets, ref_adapter=ref)
    lp.sum().backward()
    assert base.grad is None and ref.grad is None and adapter.grad is not None


@pytest.mark.parametrize("bad, err, msg", [
    (dict(targets=torch.tensor([0, 1, 2])), ValueError, "targets"),
    (dict(targets=torch.tensor([0.0, 1.0, 2.0, 3.0])), TypeError, "targets"),
    (dict(targets=torch.tensor([0, 1, 2, 20])), ValueError, "targets"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(adapter=torch.randn(4, 21)), ValueError, "adapter"),
    (dict(ref_adapter=torch.randn(3, 20)), ValueError, "ref_adapter"),
    (dict(base=torch.randn(4, 20, 1)), ValueError, "base"),
    (dict(alpha=torch.ones(3)), ValueError, "alpha"),
])
def test_bad_input(bad, err, msg):
    args = dict(base=torch.randn(4, 20), adapter=torch.randn(4, 20), targets=torch.tensor([0, 1, 2, 3]))
    kw = {k: v for k, v in bad.items() if k not in args}
    args.update({k: v for k, v in bad.items() if k in args})
    with pytest.raises(err, match=msg):
        tailored_token_stats(args["base"], args["adapter"], args["targets"], **kw)
