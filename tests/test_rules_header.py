"""csrc/rules.h, the rules the C++ CPU and CUDA kernels share (dtype codes, accepted parameter
values, the token of an invalid row), against their one Python definition: the dtype maps of
ipa_fast/ops/cpu_backend.py and ipa_fast/ops/cuda_backend.py, ipa_fast.ops.reference.RANGES and the
reference sampler. The header is read as text (every ``constexpr`` line), so a value changed on
one side only fails here; no native build is needed."""
from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import torch

from ipa_fast.ops import reference

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "csrc" / "rules.h"

_CONSTEXPR = re.compile(r"^\s*constexpr\s+(int|int64_t|float|double)\s+(k\w+)\s*=\s*([^;]+);", re.M)
# (parameter, constant, side) of every bound params_ok checks
BOUNDS = [("temperature", "kTemperatureMin", "lower"), ("top_k", "kTopKMin", "lower"),
          ("top_p", "kTopPMin", "lower"), ("top_p", "kTopPMax", "upper"),
          ("min_p", "kMinPMin", "lower"), ("min_p", "kMinPMax", "upper")]
DTYPES = {"kFloat32": "float32", "kFloat16": "float16", "kBFloat16": "bfloat16"}


def header_constants() -> dict:
    text = RULES.read_text()
    out = {}
    for ctype, name, value in _CONSTEXPR.findall(text):
        value = value.strip()
        out[name] = int(value, 0) if ctype in ("int", "int64_t") else float(value.rstrip("fF"))
    assert len(out) == len(re.findall(r"^\s*constexpr\s", text, re.M)), "a constexpr line the regex missed"
    return out


def params_ok_comparisons() -> dict:
    """{constant: (parameter, operator)} of the comparisons in rules.h's params_ok."""
    body = re.search(r"bool params_ok\([^)]*\)\s*\{(.*?)\}", RULES.read_text(), re.S).group(1)
    return {c: (p, op) for p, op, c in re.findall(r"(\w+)\s*(>=|<=|>|<)\s*(k\w+)", body)}


def python_dtype_codes(module: str) -> dict:
    """The module-level {torch.<dtype>: code} dict of ipa_fast/<module>.py, read with ast (the
    module itself imports its native extension, which may not be built here)."""
    tree = ast.parse((ROOT / "ipa_fast" / "ops" / f"{module}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            keys = node.value.keys
            if keys and all(isinstance(k, ast.Attribute) and getattr(k.value, "id", None) == "torch" for k in keys):
                return {k.attr: ast.literal_eval(v) for k, v in zip(keys, node.value.values)}
    raise AssertionError(f"no dtype code map in ipa_fast/ops/{module}.py")


def _cmp(x, op, c) -> bool:
    return {">=": x >= c, ">": x > c, "<=": x <= c, "<": x < c}[op]


def _step(name: str, c, up: bool):
    if reference.RANGES[name].integer:
        return c + 1 if up else c - 1
    return math.nextafter(c, math.inf if up else -math.inf)


def _sample(x, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    B = x.shape[0]
    full = lambda v, dt: torch.full((B,), v, dtype=dt)  # noqa: E731
    return reference.sample(x, None, full(0.0, torch.float32), full(temperature, torch.float32),
                            full(top_k, torch.int64), full(top_p, torch.float32), full(min_p, torch.float32),
                            full(3, torch.int64), full(5, torch.int64))


def test_every_constant_is_checked():
    checked = set(DTYPES) | {c for _, c, _ in BOUNDS} | {"kGreedyLogprobTemperature", "kInvalidToken"}
    assert set(header_constants()) == checked


def test_dtype_codes_match_the_python_maps():
    h = header_constants()
    for module in ("cpu_backend", "cuda_backend"):
        codes = python_dtype_codes(module)
        assert {name: codes[dt] for name, dt in DTYPES.items()} == {name: h[name] for name in DTYPES}, module
        assert set(codes) == set(DTYPES.values()), module


def test_parameter_bounds_match_reference_ranges():
    h, comparisons = header_constants(), params_ok_comparisons()
    assert set(comparisons) == {c for _, c, _ in BOUNDS}
    for name, const, side in BOUNDS:
        c, (param, op) = h[const], comparisons[const]
        assert param == name, (const, param)
        assert op[0] == (">" if side == "lower" else "<"), (const, op)
        ok = reference.RANGES[name].ok
        inclusive = op.endswith("=")
        outward = _step(name, c, up=side == "upper")
        inward = _step(name, c, up=side == "lower")
        if inclusive:   # c itself accepted, the next value outward not
            assert ok(c) and not ok(outward), (const, c)
        else:           # c rejected, the next value inward accepted
            assert not ok(c) and ok(inward), (const, c)


def test_invalid_markers_fail_the_header_rules():
    h, comparisons = header_constants(), params_ok_comparisons()
    for name in ("temperature", "top_k", "top_p", "min_p"):
        marker = reference.RANGES[name].invalid
        passes = all(_cmp(marker, op, h[c]) for c, (p, op) in comparisons.items() if p == name)
        assert not passes, name


def test_off_values_greedy_and_invalid_token_match_the_reference():
    h = header_constants()
    x = torch.tensor([[0.5, 2.0, -1.0, 1.0, 0.25]])
    # the minima of top_k / min_p and the maximum of top_p keep every token
    keep = reference.kept_mask(x, torch.tensor([h["kTopKMin"]]), torch.tensor([h["kTopPMax"]]),
                               torch.tensor([h["kMinPMin"]]))
    assert keep.all()
    # the lowest temperature is greedy: argmax, logprobs at kGreedyLogprobTemperature, filtered 0
    tokens, logprobs, filtered, valid = _sample(x, temperature=h["kTemperatureMin"])
    assert valid.item() and tokens.item() == 1 and filtered.item() == 0.0
    expected = torch.log_softmax((x / h["kGreedyLogprobTemperature"]).double(), dim=1)[0, 1].float()
    assert logprobs.item() == expected.item()
    # an invalid row's token
    tokens, logprobs, _, valid = _sample(x, temperature=reference.RANGES["temperature"].invalid)
    assert not valid.item() and math.isnan(logprobs.item())
    assert tokens.item() == h["kInvalidToken"]
