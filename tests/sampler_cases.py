"""Shared helpers and the backend axis of the sampler suite (reference, cpu, the Triton
interpreter, the CUDA kernel emulated on CPU, and real triton / cuda on a GPU).

A backend joins the suite by being listed in ``BACKENDS`` (with a ``Backend`` in ``_SPECS``):
every test parametrised with ``backend_params()`` then runs on it, through ``Backend.sample`` /
``Backend.sample_experts`` (``ipa_fast.sample`` / ``sample_experts`` with that backend, inputs
moved to its device, outputs back on the CPU). ``backend_params()`` skips, with the reason, a
backend that cannot run here and marks the emulated ones (one Python program or a team of CPU
threads per row: ~0.1 s a row) ``slow`` unless the test says it is cheap there. Oracles here are
independent of ipa_fast's own code: transformers' warpers for kept sets, float64 softmax for
probabilities.
"""
from __future__ import annotations

import importlib
import math
import os
import sys
import threading

import pytest
import torch
from hypothesis import strategies as st
from transformers import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import ipa_fast

BACKENDS = ["reference", "cpu", "triton-interpret", "cuda-emulated", "triton", "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


class Backend(str):
    """One entry of the backend axis: the ``backend=`` name ipa_fast dispatches to (so it can be
    passed as ``backend=`` where the inputs are on the CPU), with ``name`` (the test id),
    ``device``, ``emulated`` (a CPU emulation of a GPU kernel, slow per row: tests size their
    batches with :meth:`rows`) and ``gpu``."""

    def __new__(cls, name: str, kernel: str, *, device: str = "cpu", emulated: bool = False, gpu: bool = False):
        self = super().__new__(cls, kernel)
        self.name, self.kernel, self.device, self.emulated, self.gpu = name, kernel, device, emulated, gpu
        return self

    def __repr__(self):
        return f"Backend({self.name!r})"

    @property
    def draws(self) -> int:
        return 120 if self.emulated else 100_000

    def rows(self, full: int, small: int = 4) -> int:
        """``full`` rows, or ``small`` (<= 4 by default) on an emulated backend."""
        return small if self.emulated else full

    def _prepare(self):
        if self.name == "cuda-emulated":
            return _registered_emulated_cuda()
        if self.name == "triton-interpret":
            _enable_triton_interpreter()
        import contextlib
        return contextlib.nullcontext()

    def _to(self, x):
        if isinstance(x, torch.Tensor):
            return x if x.is_meta else x.to(self.device)
        if isinstance(x, (list, tuple)):
            return type(x)(self._to(v) for v in x)
        return x

    def _call(self, fn, args, kw):
        kw = dict(kw)
        kw["backend"] = str(kw.get("backend", self.kernel))
        args = [self._to(a) for a in args]
        kw = {k: v if k == "generator" else self._to(v) for k, v in kw.items()}
        with self._prepare():
            out = fn(*args, **kw)
        return type(out)(*(t.cpu() for t in (out.tokens, out.logprobs, out.filtered_logprobs, out.valid)))

    def sample(self, *args, **kw):
        """``ipa_fast.sample`` on this backend (``backend=`` in ``kw`` overrides the name)."""
        return self._call(ipa_fast.sample, args, kw)

    def sample_experts(self, *args, **kw):
        return self._call(ipa_fast.sample_experts, args, kw)


_SPECS = {
    "reference": Backend("reference", "reference"),
    "cpu": Backend("cpu", "cpu"),
    "triton-interpret": Backend("triton-interpret", "triton", emulated=True),
    "cuda-emulated": Backend("cuda-emulated", "cuda-emulated", emulated=True),
    "triton": Backend("triton", "triton", device="cuda", gpu=True),
    "cuda": Backend("cuda", "cuda", device="cuda", gpu=True),
}


def backend_status(name: str) -> str:
    """"ok" or why backend ``name`` of the suite cannot run in this process."""
    if name == "triton-interpret":
        if torch.cuda.is_available():   # the interpreter switch is process-wide; the GPU runs real triton
            return "a CUDA device is present: the real triton backend runs instead"
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            return ("triton was imported before TRITON_INTERPRET=1 could be set: "
                    "tests/test_sampler_triton.py::test_interpreter_suite_in_subprocess runs these")
        os.environ["TRITON_INTERPRET"] = "1"   # before triton's first import (its jit reads it then)
        return "ok"
    if name == "cuda-emulated":
        import shutil
        if shutil.which("g++") is None and shutil.which("c++") is None:
            return "no C++ compiler for the CUDA-kernel emulation"
        return "ok"
    if _SPECS[name].gpu and not torch.cuda.is_available():
        return "no CUDA device (benchmarks/gpu_check.sh runs the GPU backends)"
    return ipa_fast.backends().get(name, "unknown backend")


def backend_params(names=None, *, cheap: bool = False):
    """``pytest.param(Backend)`` per backend of ``names`` (default: all of ``BACKENDS``), skipped
    with the reason where unavailable; real GPU backends carry the ``gpu`` marker, emulated ones
    ``slow`` unless ``cheap`` (the test costs a few seconds there at most)."""
    names = list(names or BACKENDS)
    # the interpreter's status first: ipa_fast.backends() imports triton (and then it is too late)
    status = {name: backend_status(name) for name in sorted(names, key=lambda n: n != "triton-interpret")}
    out = []
    for name in names:
        spec = _SPECS[name]
        reason = status[name]
        marks = [] if reason == "ok" else [pytest.mark.skip(reason=f"backend {name}: {reason}")]
        if spec.gpu:
            marks.append(pytest.mark.gpu)
        if spec.emulated and not cheap:
            marks.append(pytest.mark.slow)
        out.append(pytest.param(spec, marks=marks, id=name))
    return out


# ---------------------------------------------------------------- the emulated backends

_emulated_cuda = []


def _registered_emulated_cuda():
    """A context in which ``backend="cuda-emulated"`` dispatches to csrc/cuda/sampler.cu built for
    CPU threads (tests/cuda_emulation.py); outside it ``ipa_fast.backends()`` is untouched."""
    import contextlib

    from cuda_emulation import EmulatedCudaBackend, emulated_cuda_module
    from ipa_fast.ops import dispatch

    if not _emulated_cuda:
        _emulated_cuda.append(EmulatedCudaBackend(emulated_cuda_module()))

    @contextlib.contextmanager
    def ctx():
        dispatch._LOADERS["cuda-emulated"] = lambda: _emulated_cuda[0]
        try:
            yield
        finally:
            dispatch._LOADERS.pop("cuda-emulated", None)
    return ctx()


def _enable_triton_interpreter():
    """Once: the Triton kernels reloaded under ``TRITON_INTERPRET=1`` (set by
    :func:`backend_status` before triton's import) and the interpreter sped up."""
    from ipa_fast.ops import dispatch
    from triton.runtime import interpreter as interp

    if getattr(interp, "_ipa_fast_patched", False):
        return
    assert os.environ.get("TRITON_INTERPRET") == "1"
    _speed_up_interpreter(interp)
    for name in ("ipa_fast.kernels.sampler_triton", "ipa_fast.kernels.log_softmax_triton"):
        if name in sys.modules:   # imported (compiled flavour) before the variable was set
            importlib.reload(sys.modules[name])
    dispatch._load.cache_clear()


def _speed_up_interpreter(interp):
    """The interpreter re-patches triton.language on every device-function call (~ms each); patching
    a module's globals once per launch is equivalent and makes the interpreter several times faster."""
    state = threading.local()
    orig_patch, orig_call = interp._patch_lang, interp.GridExecutor.__call__

    def patch_lang(fn):
        done = getattr(state, "done", None)
        if done is not None and id(fn.__globals__) in done:
            return interp._LangPatchScope()
        scope = orig_patch(fn)
        if done is not None:
            done.add(id(fn.__globals__))
        return scope

    def call(self, *args, **kwargs):
        state.done = set()
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            state.done = None

    interp._patch_lang = patch_lang
    interp.GridExecutor.__call__ = call
    interp._ipa_fast_patched = True


# ---------------------------------------------------------------- inputs and oracles

def random_logits(batch: int, vocab: int, *, seed: int = 0, scale: float = 2.0, dtype=torch.float32,
                  masked: float = 0.0) -> torch.Tensor:
    """Gaussian logits times ``scale``; a fraction ``masked`` of entries set to -inf (never a whole row)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, vocab, generator=g) * scale
    if masked > 0:
        drop = torch.rand(batch, vocab, generator=g) < masked
        drop[:, 0] = False
        x = x.masked_fill(drop, float("-inf"))
    return x.to(dtype)


def random_params(batch: int, vocab: int, *, seed: int = 0) -> dict:
    """Per-row parameters mixing every filter on and off (T > 0)."""
    g = torch.Generator().manual_seed(seed + 1)
    r = torch.rand(batch, 6, generator=g)
    top_k = torch.where(r[:, 0] < 0.5, torch.zeros(batch), 1 + (r[:, 1] * min(vocab, 64)).floor()).long()
    top_p = torch.where(r[:, 2] < 0.3, torch.ones(batch), 0.05 + 0.9 * r[:, 3])
    min_p = torch.where(r[:, 4] < 0.6, torch.zeros(batch), 0.3 * r[:, 5])
    temperature = 0.5 + torch.rand(batch, generator=g)
    a = torch.rand(batch, generator=g)
    alpha = torch.where(a < 0.1, torch.zeros(batch), a * 1.5)  # >= 0: a masked (-inf) adapter stays -inf
    return dict(top_k=top_k, top_p=top_p.float(), min_p=min_p.float(), temperature=temperature.float(),
                alpha=alpha.float())


def mixed(base, adapter, alpha, temperature) -> torch.Tensor:
    """float32 ``(base + alpha * adapter) / T`` per row, as docs/DESIGN.md §2.4 states it (alpha == 0 drops the adapter)."""
    z = base.float()
    if adapter is not None:
        a = torch.as_tensor(alpha, dtype=torch.float32).reshape(-1, 1).expand(z.shape[0], 1)
        z = z + torch.where(a == 0, torch.zeros(()), a * adapter.float())
    t = torch.as_tensor(temperature, dtype=torch.float32).reshape(-1, 1)
    return z / t


def _row_param(value, row):
    return value[row].item() if isinstance(value, torch.Tensor) else value


def hf_kept_mask(z: torch.Tensor, top_k, top_p, min_p) -> torch.Tensor:
    """[B, V] bool: what transformers' TopK -> TopP -> MinP warper chain keeps, row by row."""
    B, V = z.shape
    keep = torch.zeros(B, V, dtype=torch.bool)
    for row in range(B):
        s = z[row:row + 1].clone()
        k, p, mp = int(_row_param(top_k, row)), float(_row_param(top_p, row)), float(_row_param(min_p, row))
        if k > 0:
            s = TopKLogitsWarper(top_k=k)(None, s)
        if p < 1.0:
            s = TopPLogitsWarper(top_p=p)(None, s)
        if mp > 0.0:
            s = MinPLogitsWarper(min_p=mp)(None, s)
        keep[row] = s[0] > float("-inf")
    return keep


def boundary_near_tie(z: torch.Tensor, top_k, top_p, min_p, tol: float = 1e-6) -> torch.Tensor:
    """[B] bool: rows whose kept set is decided by a tie or a near-tie (docs/DESIGN.md §2.5): at the top-p
    boundary (equal values there, or an exclusive mass within ``tol`` of p), or a token whose
    pi / max pi is within a relative 1e-5 of min_p. Such rows may differ from HF legitimately."""
    B, V = z.shape
    out = torch.zeros(B, dtype=torch.bool)
    zd = z.double()
    for row in range(B):
        k, p, mp = int(_row_param(top_k, row)), float(_row_param(top_p, row)), float(_row_param(min_p, row))
        v, _ = torch.sort(zd[row], descending=True)
        if 0 < k < V:
            v = v[v >= v[k - 1]]
        w = torch.exp(v - v[0])
        if p < 1.0:
            probs = w / w.sum()
            excl = torch.cumsum(probs, 0) - probs
            last = int((excl < p).sum()) - 1
            if bool(((excl - p).abs() < tol).any()):
                out[row] = True
            elif last + 1 < len(v) and v[last] == v[last + 1]:
                out[row] = True
        if mp > 0.0 and bool(((w - mp).abs() <= 1e-5 * mp).any()):
            out[row] = True
    return out


def filtered_probs(z_row: torch.Tensor, keep_row: torch.Tensor) -> torch.Tensor:
    """float64 probabilities of the filtered, renormalised distribution of one row."""
    zd = z_row.double()
    w = torch.exp(zd - zd.max()) * keep_row
    return w / w.sum()


def log_softmax64(z: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(z.double(), dim=-1)


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square p-value of observed ``counts`` against ``probs`` (zero-prob cells must be
    empty). Cells expected fewer than 5 times are pooled into one (the chi-square approximation
    needs it at small draw counts; at 1e5 draws nothing is pooled)."""
    from scipy.stats import chisquare

    support = probs > 0
    assert int(counts[~support].sum()) == 0, "a token outside the kept set was drawn"
    n = counts.sum().item()
    obs, exp = counts[support].double(), probs[support].double() * n
    small = exp < 5
    if small.any() and not small.all():
        obs = torch.cat([obs[~small], obs[small].sum().reshape(1)])
        exp = torch.cat([exp[~small], exp[small].sum().reshape(1)])
    if obs.numel() < 2:
        return 1.0
    return float(chisquare(obs.numpy(), exp.numpy() * (obs.sum() / exp.sum()).item()).pvalue)


@st.composite
def cases(draw):
    """(B, V, dtype, scale, masked, with adapter, data seed, sample kwargs): random shapes (odd V,
    chunk edges), dtypes, masks and every parameter, for the property tests."""
    B = draw(st.integers(1, 4))
    V = draw(st.one_of(st.integers(1, 70), st.sampled_from([255, 256, 257, 2047, 2048, 2049, 4111])))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    scale = draw(st.sampled_from([0.01, 1.0, 5.0, 30.0]))
    masked = draw(st.sampled_from([0.0, 0.3, 0.95]))
    adapter = draw(st.booleans())
    kw = dict(
        alpha=draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
        temperature=draw(st.sampled_from([0.0, 0.05, 0.7, 1.0, 3.0])),
        top_k=draw(st.sampled_from([0, 1, 2, 3, 17, 1000])),
        top_p=draw(st.sampled_from([1.0, 0.999, 0.9, 0.5, 0.01])),
        min_p=draw(st.sampled_from([0.0, 0.01, 0.5, 1.0])),
        seed=draw(st.integers(0, 2**64 - 1)) - 2**63,
        offset=draw(st.integers(0, 2**40)),
    )
    return B, V, dtype, scale, masked, adapter, draw(st.integers(0, 10**6)), kw


def ulps(a: float, b: float) -> float:
    return abs(a - b) / max(math.ulp(abs(b)), 1e-45)


