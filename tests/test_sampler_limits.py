"""Parameter limits of ``ipa_fast.sample`` and the companion ops (docs/DESIGN.md §2.3): every
out-of-range value raises ``ValueError`` naming the parameter, at the documented limit, on every
backend; ``validate=False`` turns the same values into invalid rows instead; wrong types raise
``TypeError`` naming the parameter."""
from __future__ import annotations

import math

import pytest
import torch

import ipa_fast
from ipa_fast.ops import dispatch
from ipa_fast.ops import reference
from sampler_cases import backend_params

pytestmark = pytest.mark.usefixtures("one_thread")

B, V = 3, 7
TINY = 2.0 ** -126                      # float32's smallest normal number
F32_MAX = float(torch.finfo(torch.float32).max)
NAN, INF = float("nan"), float("inf")


def logits(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g), torch.randn(B, V, generator=g)


def f64(*values):
    return torch.tensor(values, dtype=torch.float64)


def row_of(value, bad):
    """A [B] float64 tensor of ``value`` with ``bad`` in row 1."""
    return f64(value, bad, value)


OUT_OF_RANGE = [  # (parameter, bad value); each also tried as row 1 of a float64 [B] tensor
    ("alpha", NAN), ("alpha", INF), ("alpha", -INF), ("alpha", 1e300), ("alpha", -3.5e38),
    ("temperature", -1.0), ("temperature", NAN), ("temperature", INF), ("temperature", 1e300),
    ("temperature", 1e-300), ("temperature", 1e-39), ("temperature", TINY / 2), ("temperature", -0.0 - 1e-45),
    ("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.0 + 1e-9), ("top_p", NAN), ("top_p", INF),
    ("min_p", -1e-9), ("min_p", 1.5), ("min_p", NAN), ("min_p", -INF),
]
IN_RANGE = [  # accepted at the documented limits
    ("alpha", F32_MAX), ("alpha", -F32_MAX), ("alpha", 0.0),
    ("temperature", 0.0), ("temperature", TINY), ("temperature", F32_MAX),
    ("top_p", 1.0), ("top_p", 1e-300), ("top_p", 5e-324),
    ("min_p", 0.0), ("min_p", 1.0),
]


@pytest.mark.parametrize("backend", backend_params(cheap=True))
@pytest.mark.parametrize("name,bad", OUT_OF_RANGE)
def test_out_of_range_raises_naming_the_parameter(backend, name, bad):
    base, adapter = logits()
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        backend.sample(base, adapter, seed=0, **{name: bad})
    with pytest.raises(ValueError, match=rf"^{name} must be .*\(row 1\)"):   # checked before float32 rounding
        backend.sample(base, adapter, seed=0, **{name: row_of(0.5, bad)})


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name,bad", OUT_OF_RANGE)
def test_validate_false_makes_out_of_range_rows_invalid(backend, name, bad):
    base, adapter = logits()
    out = backend.sample(base, adapter, seed=0, validate=False, **{name: row_of(0.5, bad)})
    assert out.valid.tolist() == [True, False, True]
    assert out.tokens[1].item() == 0 and math.isnan(out.logprobs[1].item())
    out = backend.sample(base, adapter, seed=0, validate=False, **{name: bad})
    assert not out.valid.any()
    as_f32 = row_of(0.5, bad).float()
    if not reference.RANGES[name].ok(as_f32[1]):   # still out of range in float32 (1e-300 is not: it is 0)
        out = backend.sample(base, adapter, seed=0, validate=False, **{name: as_f32})
        assert out.valid.tolist() == [True, False, True]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name,value", IN_RANGE)
def test_limits_themselves_are_accepted(backend, name, value):
    base, adapter = torch.zeros(B, V), torch.zeros(B, V)   # no overflow at any alpha or T
    base[:, 2] = 1.0
    for v in (value, torch.full((B,), value, dtype=torch.float64)):
        out = backend.sample(base, adapter, seed=0, **{name: v})
        assert out.valid.all()


@pytest.mark.parametrize("backend", backend_params())
def test_tiny_top_p_keeps_the_top_token(backend):
    base, adapter = logits(1)
    for p in (1e-300, f64(1e-300, 1e-40, 5e-324)):
        out = backend.sample(base, adapter, top_p=p, seed=0)
        assert torch.equal(out.tokens, (base + adapter).argmax(1))


@pytest.mark.parametrize("backend", backend_params())
def test_tiny_temperature_that_overflows_is_an_invalid_row_not_greedy(backend):
    base = torch.tensor([[1e30, 0.0, -1.0]])
    with pytest.raises(ValueError, match="logits row 0 is invalid.*temperature"):
        backend.sample(base, temperature=1e-20, seed=0)
    out = backend.sample(base, temperature=TINY, seed=0, validate=False)
    assert not out.valid.item()
    out = backend.sample(torch.tensor([[1.0, 3.0, 2.0]]), temperature=TINY, seed=0)
    assert out.tokens.item() == 1 and out.valid.item()   # finite after division: the top token


@pytest.mark.parametrize("backend", backend_params())
def test_top_k(backend):
    base, adapter = logits()
    off = backend.sample(base, adapter, seed=4)
    for k in (V, 2**63 - 1, 2**63, 2**200, torch.tensor([2**63 - 1] * B)):   # k >= V keeps every token
        assert torch.equal(backend.sample(base, adapter, seed=4, top_k=k).tokens, off.tokens)
    with pytest.raises(ValueError, match="^top_k must be >= 0"):
        backend.sample(base, seed=0, top_k=-1)
    with pytest.raises(ValueError, match=r"^top_k must be >= 0.*\(row 2\)"):
        backend.sample(base, seed=0, top_k=torch.tensor([1, 2, -3]))
    for bad in (2.0, 1.5, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2**64 - 1] * B, dtype=torch.uint64)):
        with pytest.raises(TypeError, match="top_k"):
            backend.sample(base, seed=0, top_k=bad)


@pytest.mark.parametrize("backend", backend_params(cheap=True))
@pytest.mark.parametrize("name", ["alpha", "temperature", "top_k", "top_p", "min_p", "seed", "offset"])
def test_types_and_shapes_name_the_parameter(backend, name):
    base, adapter = logits()
    kw = dict(seed=0)
    for bad in (torch.ones(B, dtype=torch.bool), True, "1", None if name not in ("seed",) else [1, 2, 3],
                torch.ones(B, dtype=torch.complex64)):
        if bad is None:
            continue
        with pytest.raises(TypeError, match=name):
            backend.sample(base, adapter, **{**kw, name: bad})
    for shape in ((B - 1,), (B + 1,), (B, 1), (1, B)):
        value = torch.ones(shape, dtype=torch.int64 if name in ("top_k", "seed", "offset") else torch.float32)
        with pytest.raises(ValueError, match=rf"^{name} must be a scalar or a \[B\] = \[{B}\] tensor"):
            backend.sample(base, adapter, **{**kw, name: value})


@pytest.mark.parametrize("backend", backend_params())
def test_seed_limits(backend):
    base, adapter = logits()
    for bad in (2**64, -(2**63) - 1, 2**100):
        with pytest.raises(ValueError, match="^seed must be"):
            backend.sample(base, adapter, seed=bad)
        with pytest.raises(ValueError, match="^seed must be"):   # no uint64 form: validate=False too
            backend.sample(base, adapter, seed=bad, validate=False)
    with pytest.raises(TypeError, match="seed"):
        backend.sample(base, adapter, seed=torch.zeros(B))
    # an int64 and its uint64 bit pattern are one seed; row r gets seed + r modulo 2**64
    a = backend.sample(base, adapter, seed=2**64 - 1)
    b = backend.sample(base, adapter, seed=-1)
    c = backend.sample(base, adapter, seed=torch.tensor([-1, 0, 1]))
    d = backend.sample(base, adapter, seed=torch.tensor([2**64 - 1, 0, 1], dtype=torch.uint64))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens, c.tokens) and torch.equal(a.tokens, d.tokens)


@pytest.mark.parametrize("backend", backend_params())
def test_offset_limits(backend):
    base, adapter = logits()
    for bad in (-1, 2**64, -(2**63)):
        with pytest.raises(ValueError, match=r"^offset must be an int in \[0, 2\*\*64\)"):
            backend.sample(base, adapter, seed=0, offset=bad)
    with pytest.raises(TypeError, match="offset"):
        backend.sample(base, adapter, seed=0, offset=1.0)
    # offsets are uint64: 2**63 and above work, and an int64 tensor carries them as bit patterns
    for off in (2**63, 2**64 - 1):
        a = backend.sample(base, adapter, seed=7, offset=off)
        bits = off - 2**64
        b = backend.sample(base, adapter, seed=7, offset=torch.full((B,), bits))
        assert torch.equal(a.tokens, b.tokens) and a.valid.all()
    # ... and the reference stream agrees
    from ipa_fast.ops import rng
    u = rng.uniform(torch.tensor([7]), torch.tensor([2**63 - 2**64]))
    from ipa_fast import _C
    assert u.item() == _C.philox_uniform(7, 2**63)


def test_resolve_checks_like_sample():
    """``dispatch.resolve`` returns the backend behind sample's checks (validate=False), so a
    direct call cannot hand a kernel the wrong dtype or an unrepresentable value."""
    base, adapter = logits()
    for name in ("reference", "cpu"):
        if ipa_fast.backends()[name] != "ok":
            continue
        impl = dispatch.resolve(name, base)
        want = ipa_fast.sample(base, adapter, alpha=0.5, temperature=0.8, top_p=0.9, seed=3, backend=name)
        got = impl(base, adapter, alpha=f64(0.5, 0.5, 0.5), temperature=0.8, top_p=0.9, seed=3)
        assert torch.equal(got[0], want.tokens)
        tokens, _, _, valid = impl(base, adapter, temperature=row_of(1.0, 1e-300), alpha=row_of(1.0, 1e300), seed=3)
        assert valid.tolist() == [True, False, True]
        with pytest.raises(ValueError, match="alpha"):
            impl(base, adapter, alpha=torch.ones(B + 1), seed=0)
        with pytest.raises(TypeError, match="logits"):
            impl(base.double(), None, seed=0)
        with pytest.raises(TypeError, match="top_k"):
            impl(base, None, top_k=torch.ones(B), seed=0)


def test_reference_row_validity_uses_the_one_table():
    z = torch.zeros(5, V)
    t = torch.tensor([0.0, TINY, 1e-40, INF, -1.0])   # float32: 1e-40 is subnormal
    one = torch.ones(5)
    ok = reference.row_validity(z, t, torch.zeros(5, dtype=torch.int64), one, 0 * one)
    assert ok.tolist() == [True, True, False, False, False]
    assert ok.tolist() == reference.RANGES["temperature"].ok(t).tolist()


# ---------------------------------------------------------------- companion ops

OP_BAD = [("alpha", NAN), ("alpha", INF), ("alpha", 1e300), ("temperature", 0.0), ("temperature", -1.0),
          ("temperature", NAN), ("temperature", INF), ("temperature", 1e-300), ("temperature", 1e-39)]


def _ops():
    base, adapter = logits()
    targets = torch.tensor([0, 3, V - 1])
    return {
        "tailored_log_softmax": lambda **kw: ipa_fast.tailored_log_softmax(base, adapter, **kw),
        "tailored_token_stats": lambda **kw: ipa_fast.tailored_token_stats(base, adapter, targets, **kw),
    }


@pytest.mark.parametrize("op", ["tailored_log_softmax", "tailored_token_stats"])
@pytest.mark.parametrize("name,bad", OP_BAD)
def test_ops_out_of_range_raise_naming_the_parameter(op, name, bad):
    fn = _ops()[op]
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        fn(**{name: bad})
    with pytest.raises(ValueError, match=rf"^{name} must be .*\(row 1\)"):
        fn(**{name: row_of(0.5, bad)})


@pytest.mark.parametrize("op", ["tailored_log_softmax", "tailored_token_stats"])
def test_ops_limits_types_and_shapes(op):
    fn = _ops()[op]
    for kw in (dict(temperature=TINY), dict(temperature=F32_MAX), dict(alpha=-F32_MAX), dict(alpha=0.0)):
        fn(**kw)
    for name in ("alpha", "temperature"):
        with pytest.raises(TypeError, match=name):
            fn(**{name: torch.ones(B, dtype=torch.bool)})
        with pytest.raises(TypeError, match=name):
            fn(**{name: "1"})
        with pytest.raises(ValueError, match=rf"^{name} must be a scalar or a \[B\]"):
            fn(**{name: torch.ones(B + 1)})


def test_token_stats_targets_and_chunk_rows():
    base, adapter = logits()
    with pytest.raises(ValueError, match=rf"^targets must be in \[0, {V}\).*\(row 1\)"):
        ipa_fast.tailored_token_stats(base, adapter, torch.tensor([0, V, 1]))
    with pytest.raises(ValueError, match="^targets must be in"):
        ipa_fast.tailored_token_stats(base, adapter, torch.tensor([0, -1, 1]))
    with pytest.raises(TypeError, match="targets"):
        ipa_fast.tailored_token_stats(base, adapter, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="chunk_rows"):
        ipa_fast.tailored_token_stats(base, adapter, torch.tensor([0, 1, 1]), chunk_rows=0)
    with pytest.raises(TypeError, match="chunk_rows"):
        ipa_fast.tailored_token_stats(base, adapter, torch.tensor([0, 1, 1]), chunk_rows=1.5)


def test_philox_known_answers_at_the_uint32_limits():
    """Random123's known-answer vectors (docs/DESIGN.md §3.3), at 0 and at all-ones words."""
    from ipa_fast.ops import rng

    def words(ctr, key):
        t = lambda v: torch.tensor([v], dtype=torch.int64)
        return [int(x) for x in rng.philox4x32_10(tuple(map(t, ctr)), tuple(map(t, key)))]

    assert words((0, 0, 0, 0), (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    m = 0xFFFFFFFF
    assert words((m, m, m, m), (m, m)) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert rng.uniform(torch.tensor([0]), torch.tensor([0])).item() == 0.39904647084896455
