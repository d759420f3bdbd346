"""The sampler as a registered op (``torch.ops.ipa_fast.sample_experts``): the public functions
give the tokens they gave before the op existed, torch.library.opcheck passes on CPU (reference
and C++ backends), torch.compile(fullgraph=True) keeps the sampler in one graph, and a row-strided
``[:, :V]`` slice reaches the C++ kernel without a copy."""
import pytest
import torch

import ipa_fast
from ipa_fast.ops import reference
from ipa_fast.ops import sampling

from sampler_cases import backend_params, random_logits, random_params

B, V = 6, 700


def golden_inputs():
    base = random_logits(B, V + 13, seed=101, dtype=torch.bfloat16)[:, :V]   # row-strided
    adapter = random_logits(B, V, seed=102, masked=0.05)
    third = random_logits(B, V, seed=103, dtype=torch.float16)
    p = random_params(B, V, seed=104)
    return base, adapter, third, p.pop("alpha"), p


# Tokens recorded from the backend calls as they were before the op was registered (both backends
# agreed); the op path must keep every one of them.
GOLDEN = {
    "mix": [641, 395, 186, 433, 135, 312],
    "base_alone": [288, 577, 154, 27, 351, 37],
    "experts": [641, 47, 240, 27, 162, 451],
    "greedy": [641, 395, 154, 374, 135, 312],
}
GOLDEN_EXPERTS_LOGPROBS = [-1.3657, -2.353, -4.4934, -0.8971, -1.7046, -1.491]


@pytest.mark.parametrize("backend", backend_params(["reference", "cpu"]))
def test_public_functions_keep_their_tokens(backend):
    base, adapter, third, alpha, p = golden_inputs()
    got = {
        "mix": ipa_fast.sample(base, adapter, alpha=alpha, seed=2024, offset=17, backend=backend, **p),
        "base_alone": ipa_fast.sample(base, None, temperature=0.7, top_k=50, seed=2**63 + 5, offset=2**40,
                                      backend=backend),
        "experts": ipa_fast.sample_experts([base, adapter, third], [1.0, 0.6, -0.3], seed=99, offset=3,
                                           backend=backend, **p),
        "greedy": ipa_fast.sample(base, adapter, alpha=0.5, temperature=0.0, seed=1, backend=backend),
    }
    assert {k: v.tokens.tolist() for k, v in got.items()} == GOLDEN
    assert got["experts"].logprobs.tolist() == pytest.approx(GOLDEN_EXPERTS_LOGPROBS, abs=1e-4)
    # ... and equal the reference implementation called directly on the kernel-form inputs
    seed = torch.arange(B, dtype=torch.int64) + 2024
    kp = {k: sampling.param_tensor(k, v, B, "cpu", validate=True) for k, v in p.items()}
    ref = reference.sample(base, adapter, alpha.float(), seed=seed, offset=torch.full((B,), 17), **kp)
    assert torch.equal(got["mix"].tokens, ref[0])
    torch.testing.assert_close(got["mix"].logprobs, ref[1], rtol=1e-5, atol=1e-5)
    for out in got.values():
        assert not out.logprobs.requires_grad


def test_outputs_never_require_grad():
    base = random_logits(2, 50, seed=1).requires_grad_(True)
    out = ipa_fast.sample(base, base * 2, alpha=0.5, seed=0, backend="reference")
    assert not any(t.requires_grad for t in (out.tokens, out.logprobs, out.filtered_logprobs, out.valid))


# ---------------------------------------------------------------- opcheck

def op_args(unit_first: bool, backend: str):
    base, adapter, third, alpha, p = golden_inputs()
    if unit_first:
        base, adapter, prm = sampling.prepare(base, adapter, alpha=alpha, seed=5, generator=None, offset=3,
                                              validate=False, **p)
        experts, weights = [base, adapter], prm.pop("alpha")
    else:
        experts, weights, prm = sampling.prepare_experts([base, adapter, third], [1.0, 0.6, -0.3], seed=5,
                                                         generator=None, offset=3, validate=False, **p)
    return (experts, weights, prm["temperature"], prm["top_k"], prm["top_p"], prm["min_p"], prm["seed"],
            prm["offset"], unit_first, backend)


@pytest.mark.parametrize("backend", backend_params(["reference", "cpu"]))
@pytest.mark.parametrize("unit_first", [True, False], ids=["sample", "sample_experts"])
def test_opcheck_sampler(backend, unit_first):
    args = op_args(unit_first, backend)
    # autograd registration is checked with an input that requires grad (the op has no gradient)
    args[0][1].requires_grad_(True)
    torch.library.opcheck(torch.ops.ipa_fast.sample_experts.default, args)


def test_opcheck_check_rows():
    tokens, valid = torch.tensor([3, 0]), torch.tensor([True, True])
    outputs = [tokens, torch.tensor([-1.0, -2.0]), torch.tensor([-0.5, -1.0]), valid]
    top_k = torch.tensor([1, 2])
    torch.library.opcheck(torch.ops.ipa_fast.check_rows.default,
                          (outputs, [top_k], [top_k >= 0], ["top_k"], ["a rule"], valid, "mix"))
    weights = torch.tensor([[1.0, 0.5], [1.0, 0.25]], requires_grad=True)   # carried with its gradient
    torch.library.opcheck(torch.ops.ipa_fast.check_rows.default,
                          ([weights], [weights], [weights.isfinite()], ["weights"], ["finite"], None, ""))
    bad = torch.tensor([1, -1])
    with pytest.raises(ValueError, match=r"top_k must be >= 0 \(a rule\), got -1 \(row 1\)"):
        torch.ops.ipa_fast.check_rows(outputs, [bad], [bad >= 0], ["top_k"], [">= 0 (a rule)"], valid, "mix")
    with pytest.raises(ValueError, match=r"logits row 1 is invalid: the mix / temperature"):
        torch.ops.ipa_fast.check_rows(outputs, [], [], [], [], torch.tensor([True, False]), "the mix")


# ---------------------------------------------------------------- row strides

def test_strided_rows_reach_the_cpu_kernel_without_a_copy(monkeypatch):
    pytest.importorskip("ipa_fast._C")
    from ipa_fast import _C

    seen = []
    raw = _C._sample_experts

    def probe(ptrs, dtypes, strides, *rest):
        seen.append((list(ptrs), list(strides)))
        return raw(ptrs, dtypes, strides, *rest)

    monkeypatch.setattr(_C, "_sample_experts", probe)
    pad = 29
    wide = [random_logits(B, V + pad, seed=60 + k) for k in range(3)]
    sliced = [x[:, :V] for x in wide]
    kw = dict(temperature=0.9, top_p=0.8, seed=12, offset=4)
    two = ipa_fast.sample(sliced[0], sliced[1], alpha=0.7, backend="cpu", **kw)
    assert seen[-1] == ([x.data_ptr() for x in wide[:2]], [V + pad] * 2)   # the original storage
    many = ipa_fast.sample_experts(sliced, [1.0, 0.7, -0.2], backend="cpu", **kw)
    assert seen[-1] == ([x.data_ptr() for x in wide], [V + pad] * 3)
    # the same tokens as the contiguous copies, on this backend and on the reference
    dense = [x.contiguous() for x in sliced]
    for backend in ("cpu", "reference"):
        assert torch.equal(two.tokens, ipa_fast.sample(dense[0], dense[1], alpha=0.7, backend=backend, **kw).tokens)
        assert torch.equal(many.tokens,
                           ipa_fast.sample_experts(dense, [1.0, 0.7, -0.2], backend=backend, **kw).tokens)


@pytest.mark.parametrize("backend", backend_params(["reference", "cpu"]))
def test_non_adjacent_columns_are_copied(backend):
    # a [B, V] view whose columns are not adjacent (stride(1) != 1): copied, same tokens
    x = random_logits(V, B, seed=7).t()
    assert x.stride(1) != 1
    a = random_logits(B, V, seed=8)
    got = ipa_fast.sample(x, a, alpha=0.4, seed=3, backend=backend)
    assert torch.equal(got.tokens, ipa_fast.sample(x.contiguous(), a, alpha=0.4, seed=3, backend=backend).tokens)


def test_cuda_two_expert_entry_reads_strided_rows_emulated():
    """csrc/cuda/sampler.cu's two-expert entry (row strides per input) built for CPU threads."""
    from cuda_emulation import emulated_cuda_module

    mod = emulated_cuda_module()
    base = random_logits(B, V + 11, seed=21)[:, :V]
    adapter = random_logits(B, V + 3, seed=22)[:, :V]
    base_, adapter_, prm = sampling.prepare(base, adapter, alpha=0.6, temperature=0.8, top_k=40, top_p=0.9,
                                            min_p=0.0, seed=8, generator=None, offset=2, validate=False)
    assert base_.data_ptr() == base.data_ptr() and adapter_.data_ptr() == adapter.data_ptr()
    out = (torch.empty(B, dtype=torch.int64), torch.empty(B), torch.empty(B), torch.empty(B, dtype=torch.bool))
    n_f32, n_i32 = mod.workspace_size(B, V)
    ws_f32, ws_i32 = torch.empty(n_f32), torch.empty(n_i32, dtype=torch.int32)
    mod._sample(0, B, V, base.data_ptr(), base.stride(0), adapter.data_ptr(), adapter.stride(0),
                *(prm[k].data_ptr() for k in ("alpha", "temperature", "top_k", "top_p", "min_p", "seed", "offset")),
                *(t.data_ptr() for t in out), 0, ws_f32.data_ptr(), ws_i32.data_ptr())
    ref = reference.sample(base.contiguous(), adapter.contiguous(), **prm)
    assert torch.equal(out[3], ref[3]) and torch.equal(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=2e-5)


# ---------------------------------------------------------------- torch.compile

def test_compiled_caller_keeps_one_graph_and_the_tokens(one_thread):
    """fullgraph=True fails on any graph break: the checks, the op and validate=True's raise all
    stay inside one compiled graph."""
    pad = 17
    wide, adapter = random_logits(B, V + pad, seed=31), random_logits(B, V, seed=32)

    def step(logits, adapter, top_k, seed):
        z = logits[:, :V]      # the decode loop's slice of a padded vocabulary
        a = ipa_fast.sample(z, adapter, alpha=0.5, temperature=0.9, top_k=top_k, top_p=0.95, seed=seed, offset=5)
        b = ipa_fast.sample_experts([z, adapter], [1.0, -0.25], top_k=top_k, seed=seed, offset=6)
        return a.tokens, a.logprobs, b.tokens

    compiled = torch.compile(step, fullgraph=True)
    top_k, seed = torch.full((B,), 30), torch.arange(B, dtype=torch.int64) + 40
    got, eager = compiled(wide, adapter, top_k, seed), step(wide, adapter, top_k, seed)
    assert torch.equal(got[0], eager[0]) and torch.equal(got[2], eager[2])
    torch.testing.assert_close(got[1], eager[1], rtol=0, atol=0)
    # validate=True still raises naming the parameter, then the invalid row, from the compiled graph
    with pytest.raises(ValueError, match=r"top_k must be >= 0.*got -1 \(row 2\)"):
        compiled(wide, adapter, torch.tensor([3, 3, -1, 3, 3, 3]), seed)
    nan = wide.clone()
    nan[4, 7] = float("nan")
    with pytest.raises(ValueError, match="logits row 4 is invalid"):
        compiled(nan, adapter, top_k, seed)


# ---------------------------------------------------------------- eager fast paths

def test_eager_calls_the_implementation_directly_and_modes_still_see_the_op(monkeypatch):
    """Plain eager tensors skip torch.library's dispatch (same outputs); under a dispatch mode, or
    with an input that requires grad, the call goes through the registered op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    direct = []
    impl = sampling._sample_op
    monkeypatch.setattr(sampling, "_sample_op", lambda *a: direct.append(a[-1]) or impl(*a))
    base, adapter, third, alpha, p = golden_inputs()

    def call(backend, experts=(base, adapter, third)):
        return ipa_fast.sample_experts(list(experts), [1.0, 0.6, -0.3], seed=99, offset=3, backend=backend, **p)

    for backend in ("cpu", "reference"):
        eager = call(backend)
        assert direct == [backend] and eager.tokens.tolist() == GOLDEN["experts"]
        direct.clear()
        mode = Record()
        with mode:
            traced = call(backend)
        assert direct == [] and "ipa_fast.sample_experts.default" in mode.ops
        for a, b in zip((eager.tokens, eager.logprobs, eager.filtered_logprobs, eager.valid),
                        (traced.tokens, traced.logprobs, traced.filtered_logprobs, traced.valid)):
            assert torch.equal(a, b)
    graded = call("reference", (base, adapter.clone().requires_grad_(True), third))
    assert direct == [] and torch.equal(graded.tokens, eager.tokens) and not graded.logprobs.requires_grad


def test_reused_parameter_tensors_keep_every_check():
    """Number parameters' tensors are reused between calls: keyed by type and validate, so a
    cached value never skips a check, and bounded."""
    base = random_logits(2, 50, seed=4)
    ipa_fast.sample(base, top_k=1, seed=0)
    with pytest.raises(TypeError, match="top_k must be a number"):
        ipa_fast.sample(base, top_k=True, seed=0)
    bad = ipa_fast.sample(base, top_p=1.5, seed=0, validate=False)   # the invalid marker, cached
    assert not bad.valid.any()
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        ipa_fast.sample(base, top_p=1.5, seed=0)
    with pytest.raises(ValueError, match="weights must be finite"):
        ipa_fast.sample_experts([base], [float("inf")], seed=0)
    # the same draws as freshly built tensors (reference backend, on its own kernel-form inputs)
    for seed in (0, 2**64 - 1, -5):
        got = ipa_fast.sample(base, temperature=0.8, top_k=5, seed=seed, offset=7)
        again = ipa_fast.sample(base, temperature=0.8, top_k=5, seed=seed, offset=7)
        _, _, prm = sampling.prepare(base, None, alpha=1.0, temperature=0.8, top_k=5, top_p=1.0, min_p=0.0,
                                     seed=seed, generator=None, offset=7, validate=True)
        ref = reference.sample(base, None, **prm)
        assert torch.equal(got.tokens, ref[0]) and torch.equal(again.tokens, ref[0])
    for t in range(sampling._REUSED_MAX + 20):
        ipa_fast.sample(base, temperature=0.5 + t / 1000, seed=t)
    assert len(sampling._REUSED) <= sampling._REUSED_MAX


# ---------------------------------------------------------------- the training op

def stats_args(N=5, Vs=90):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(N, Vs, generator=g)
    adapter = torch.randn(N, Vs, generator=g).to(torch.bfloat16).requires_grad_(True)
    extra = torch.randn(N, Vs, generator=g).requires_grad_(True)
    targets = torch.randint(0, Vs, (N,), generator=g)
    return base, adapter, extra, targets


def test_opcheck_token_stats():
    base, adapter, extra, targets = stats_args()
    N = base.shape[0]
    w = torch.tensor([[1.0, 0.5, -0.2]]).expand(N, 3).contiguous()
    t = torch.full((N, 1), 0.9)
    ref_w = torch.ones(N, 1)
    torch.library.opcheck(torch.ops.ipa_fast.experts_token_stats.default,
                          (targets, w, t, ref_w, 2, [base, adapter, extra], [base]))
    entropy, kl = torch.rand(N), torch.rand(N)
    grads = [torch.randn(N), None, torch.randn(N)]
    torch.library.opcheck(torch.ops.ipa_fast.experts_token_stats_backward.default,
                          (targets, w, t, ref_w, 2, [base, adapter.detach(), extra.detach()], [base], entropy, kl,
                           *grads, [False, True, True]))


def test_compiled_training_loss_keeps_one_graph_and_its_gradients():
    base, adapter, extra, targets = stats_args()

    def loss(adapter, extra, targets):
        lp, ent, kl = ipa_fast.experts_token_stats([base, adapter, extra], [1.0, 0.5, -0.2], targets,
                                                   temperature=0.9, chunk_rows=2)
        return (lp + 0.1 * ent - 0.05 * kl).sum()

    eager = loss(adapter, extra, targets)
    g_eager = torch.autograd.grad(eager, [adapter, extra])
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(adapter, extra, targets)
    g_got = torch.autograd.grad(got, [adapter, extra])
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    for a, b in zip(g_got, g_eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the targets' range check still raises, before any row is read
    with pytest.raises(ValueError, match=r"targets must be in \[0, 90\)"):
        compiled(adapter, extra, torch.tensor([0, 1, 90, 2, 3]))


def test_compiled_log_softmax_keeps_the_weights_gradient():
    """The companion ops are plain torch operations; their tensor checks are the one op, which
    passes the checked weights through with their gradient."""
    experts = [random_logits(3, 40, seed=50 + k) for k in range(2)]

    def f(w):
        return ipa_fast.experts_log_softmax(experts, w, temperature=0.8)[:, 3].sum()

    w = torch.tensor([1.0, 0.5], requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(torch.autograd.grad(compiled(w), w)[0], torch.autograd.grad(f(w), w)[0])
    with pytest.raises(ValueError, match=r"weights must be finite.*got nan \(row 0, expert 1\)"):
        compiled(torch.tensor([1.0, float("nan")], requires_grad=True))
