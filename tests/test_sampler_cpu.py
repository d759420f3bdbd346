"""What is particular to the C++ CPU kernel: agreement with the reference at full vocabulary sizes
(several chunks), thread invariance, its exp, the scalar and AVX2 builds. The cases every backend
shares (ties, the property test against the reference, ...) are in tests/test_sampler_semantics.py."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import ipa_fast
from sampler_cases import cases, random_logits, random_params

if ipa_fast.backends()["cpu"] != "ok":
    pytest.skip(f"backend cpu: {ipa_fast.backends()['cpu']}", allow_module_level=True)

from ipa_fast import _C
from ipa_fast.ops import cpu_backend  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def both(base, adapter=None, **kw):
    return (ipa_fast.sample(base, adapter, backend="reference", **kw),
            ipa_fast.sample(base, adapter, backend="cpu", **kw))


def assert_agree(ref, cpu, min_rate=0.999, atol=2e-5):
    assert torch.equal(ref.valid, cpu.valid)
    rate = (ref.tokens == cpu.tokens).double().mean().item()
    assert rate >= min_rate, f"token agreement {rate:.5f}"
    same = (ref.tokens == cpu.tokens) & ref.valid
    torch.testing.assert_close(cpu.logprobs[same], ref.logprobs[same], rtol=0, atol=atol)
    torch.testing.assert_close(cpu.filtered_logprobs[same], ref.filtered_logprobs[same], rtol=0, atol=atol)


@pytest.mark.parametrize("vocab,batch,scale", [(300, 3000, 2.0), (5000, 200, 1.0), (50257, 12, 3.0)])
def test_agrees_with_reference_on_random_inputs(vocab, batch, scale):
    base = random_logits(batch, vocab, seed=vocab, scale=scale, masked=0.01)
    adapter = random_logits(batch, vocab, seed=vocab + 1, scale=scale)
    prm = random_params(batch, vocab, seed=vocab)
    prm["temperature"][::17] = 0.0  # a few greedy rows
    assert_agree(*both(base, adapter, seed=42, offset=3, **prm))


@pytest.mark.parametrize("kw", [
    dict(top_p=0.9), dict(top_p=0.999), dict(top_k=50, top_p=0.9), dict(top_k=300), dict(min_p=0.02),
    dict(top_p=0.6, min_p=0.3), dict(), dict(top_k=20, min_p=0.5, temperature=0.3),
])
@pytest.mark.parametrize("scale", [0.5, 4.0])  # flat rows (many candidates) and peaked rows (few)
def test_agrees_on_every_path(kw, scale):
    B, V = 16, 20000
    base = random_logits(B, V, seed=5, scale=scale)
    adapter = random_logits(B, V, seed=6, scale=scale)
    assert_agree(*both(base, adapter, alpha=0.7, seed=9, **kw), min_rate=15 / 16)


def test_batch_and_thread_invariance():
    """A row's token and log-probs never depend on the batch or the number of threads."""
    B, V = 6, 50257  # several chunks; B < threads splits a row's vocabulary across the team
    base = random_logits(B, V, seed=1, scale=1.5)
    adapter = random_logits(B, V, seed=2, scale=1.5)
    kw = dict(alpha=0.5, top_p=torch.tensor([1.0, 0.9, 0.5, 0.95, 1.0, 0.8]),
              top_k=torch.tensor([0, 0, 40, 0, 5, 0]), seed=torch.tensor([5, 6, 7, 8, 9, 10]), offset=12)
    outs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        outs.append(ipa_fast.sample(base, adapter, backend="cpu", **kw))
        for r in range(B):  # the row alone
            one = ipa_fast.sample(base[r:r + 1], adapter[r:r + 1], backend="cpu", alpha=0.5,
                                  top_p=kw["top_p"][r:r + 1], top_k=kw["top_k"][r:r + 1],
                                  seed=kw["seed"][r:r + 1], offset=12)
            outs.append(("row", r, one))
        sub = ipa_fast.sample(base[1:4], adapter[1:4], backend="cpu", alpha=0.5, top_p=kw["top_p"][1:4],
                              top_k=kw["top_k"][1:4], seed=kw["seed"][1:4], offset=12)
        outs.append(("sub", 1, sub))
    full = outs[0]
    for o in outs[1:]:
        if isinstance(o, tuple):
            _, r0, got = o
            n = got.tokens.shape[0]
            assert torch.equal(got.tokens, full.tokens[r0:r0 + n])
            assert torch.equal(got.logprobs, full.logprobs[r0:r0 + n])
            assert torch.equal(got.filtered_logprobs, full.filtered_logprobs[r0:r0 + n])
        else:
            assert torch.equal(o.tokens, full.tokens) and torch.equal(o.logprobs, full.logprobs)


def test_all_dtypes_agree_with_reference():
    B, V = 64, 3001
    for dt in (torch.float16, torch.bfloat16):
        base = random_logits(B, V, seed=3, dtype=dt, masked=0.05)
        adapter = random_logits(B, V, seed=4, dtype=dt)
        prm = random_params(B, V, seed=3)
        assert_agree(*both(base, adapter, seed=1, **prm), min_rate=63 / 64)
        assert_agree(*both(base, adapter.float(), seed=1, **prm), min_rate=63 / 64)


def test_exp_is_accurate():
    xs = torch.linspace(-86.9, 0.0, 20001).tolist() + [0.0, -1e-30, -0.5, -1.0]
    worst = max(abs(_C.exp_nonpositive(x) - math.exp(x)) / math.exp(x) for x in xs)
    assert worst < 3e-7  # ~2.5 float32 ulp
    assert _C.exp_nonpositive(0.0) == 1.0 and _C.exp_nonpositive(float("-inf")) == 0.0


def test_read_pass_reads_everything():
    x = torch.ones(3, 5000)
    assert cpu_backend.read_pass(x, x) == pytest.approx(30000.0)
    assert cpu_backend.read_pass(x.half()) == pytest.approx(15000.0)


# ---------------------------------------------------------------- the scalar and AVX2 builds

def with_isa(isa: str, fn):
    """``fn()`` on the kernel build ``isa`` ("scalar" or "avx2"), then the build chosen at load again."""
    previous = _C._set_isa(isa)
    try:
        return fn()
    finally:
        _C._set_isa(previous)


needs_avx2 = pytest.mark.skipif("avx2" not in _C._isas(), reason="this CPU lacks AVX2 / FMA / F16C")


def assert_same_bits(a, b):
    assert torch.equal(a.valid, b.valid) and torch.equal(a.tokens, b.tokens)
    for x, y in ((a.logprobs, b.logprobs), (a.filtered_logprobs, b.filtered_logprobs)):
        assert torch.equal(x.isnan(), y.isnan()) and torch.equal(x[~x.isnan()], y[~y.isnan()])


def test_isa_choice():
    """The build in use is the fastest this CPU runs; an unknown or unsupported build is refused."""
    assert _C._isas()[0] == "scalar" and _C._isa() == _C._isas()[-1]
    with pytest.raises(ValueError, match="'avx512' is not a build this CPU runs"):
        _C._set_isa("avx512")
    assert with_isa("scalar", _C._isa) == "scalar" and _C._isa() == _C._isas()[-1]


@needs_avx2
@pytest.mark.parametrize("threads", [1, 3])  # 3: B < threads splits each row's chunks across the team
def test_scalar_and_avx2_builds_agree_bit_for_bit(threads):
    """Every path (the mix of 1-3 experts of each dtype with tails, each filter, greedy, invalid
    rows): the portable scalar build gives the AVX2 build's tokens and log-prob bits."""
    torch.set_num_threads(threads)
    B, V = 2, 50257  # several chunks and a tail that is not a multiple of 8
    experts = [random_logits(B, V, seed=70, scale=3.0, masked=0.02),
               random_logits(B, V, seed=71, scale=2.0, dtype=torch.float16),
               random_logits(B, V, seed=72, scale=2.0, dtype=torch.bfloat16)]
    bad = experts[0].clone()
    bad[1, 777] = float("nan")
    calls = [lambda kw=kw: ipa_fast.sample_experts(experts[:k], [1.0, -0.4, 0.7][:k], seed=3, offset=9,
                                                   backend="cpu", validate=False, **kw)
             for k in (1, 2, 3)
             for kw in (dict(), dict(top_p=0.9), dict(top_p=0.999), dict(top_k=50), dict(top_k=50, top_p=0.8),
                        dict(top_k=3000), dict(min_p=0.05), dict(top_p=0.7, min_p=0.2), dict(temperature=0.0),
                        dict(temperature=0.3, top_k=7, min_p=0.5))]
    calls.append(lambda: ipa_fast.sample(bad, experts[1], alpha=0.5, top_p=0.9, seed=1, backend="cpu", validate=False))
    for call in calls:
        assert_same_bits(with_isa("scalar", call), with_isa("avx2", call))


@needs_avx2
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_property_scalar_equals_avx2(case):
    B, V, dtype, scale, masked, with_adapter, data_seed, kw = case
    base = random_logits(B, V, seed=data_seed, scale=scale, dtype=dtype, masked=masked)
    adapter = random_logits(B, V, seed=data_seed + 1, scale=scale, dtype=dtype) if with_adapter else None
    call = lambda: ipa_fast.sample(base, adapter, backend="cpu", validate=False, **kw)  # noqa: E731
    assert_same_bits(with_isa("scalar", call), with_isa("avx2", call))


@needs_avx2
def test_read_pass_builds_agree():
    x = random_logits(3, 5001, seed=5)
    assert with_isa("scalar", lambda: cpu_backend.read_pass(x, x.half())) == \
        with_isa("avx2", lambda: cpu_backend.read_pass(x, x.half()))
