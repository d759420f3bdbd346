"""``ipa_fast.sample``: argument checking, normalisation to per-row tensors, backend dispatch.

The semantics live in :mod:`ipa_fast.ops.reference` (and in prose in docs/DESIGN.md §2); the
parameters' accepted values are :data:`ipa_fast.ops.reference.RANGES`, checked here for the sampler
and the companion ops. Backends receive every parameter as a ``[B]`` tensor on the logits'
device (float32 alpha / temperature / top_p / min_p, int64 top_k / seed / offset) and return
``(tokens, logprobs, filtered_logprobs, valid)``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from ipa_fast.ops import dispatch as _dispatch
from ipa_fast.ops import reference
from ipa_fast.ops.reference import RANGES
from ipa_fast.ops.rng import as_int64_u64, draw_seeds

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class SampleOutput:
    tokens: torch.Tensor             # [B] int64
    logprobs: torch.Tensor           # [B] float32, log pi(token), unfiltered, at this T
    filtered_logprobs: torch.Tensor  # [B] float32, log-prob under the filtered, renormalised pi
    valid: torch.Tensor              # [B] bool


def check_logits(name: str, x: torch.Tensor, like: torch.Tensor | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, V], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have B >= 1 and V >= 1, got shape {tuple(x.shape)}")
    if like is not None:
        if x.shape != like.shape:
            raise ValueError(f"{name} shape {tuple(x.shape)} does not match logits shape {tuple(like.shape)}")
        if x.device != like.device:
            raise ValueError(f"{name} is on {x.device} but logits are on {like.device}")


def _as_float(value) -> float:
    """A real number as a float; a Python int too large for a float is +-inf (out of range)."""
    try:
        return float(value)
    except OverflowError:
        return float("inf") if value > 0 else float("-inf")


def param_tensor(name: str, value, batch: int, device, *, validate: bool, pending: list | None = None,
                 ranges: dict = RANGES) -> torch.Tensor:
    """A parameter (a Python number or a [B] tensor) -> its ``[B]`` kernel form on ``device``:
    float32 for real parameters, int64 for ``top_k`` / ``seed`` / ``offset``.

    The accepted values are ``ranges[name]`` (:data:`ipa_fast.ops.reference.RANGES`). A Python number
    outside them raises ``ValueError`` naming ``name`` when ``validate`` (and always for ``seed`` /
    ``offset``: such an int has no uint64 form); otherwise it becomes the range's invalid marker,
    which every backend reports as an invalid row. Tensor values are never read here (no host
    sync): out-of-range entries become invalid markers, and with ``validate`` the ``[B]`` bool
    "in range" tensor is appended to ``pending`` for :func:`raise_pending`.
    Types and shapes are checked always: bool, complex or (for integer parameters) floating
    tensors and non-numbers raise ``TypeError``; a tensor that is not a scalar or ``[B]`` raises
    ``ValueError``.
    """
    r = ranges[name]
    device = torch.device(device)
    dtype = torch.int64 if r.integer else torch.float32
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number or a [B] tensor of numbers, got a {value.dtype} tensor")
        if r.integer and value.is_floating_point():
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        if name == "top_k" and value.dtype == torch.uint64:
            raise TypeError("top_k must be a signed integer tensor (int64 or narrower), got torch.uint64")
        if value.dim() == 0:
            value = value.reshape(1).expand(batch)
        if value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(f"{name} must be a scalar or a [B] = [{batch}] tensor, got shape {tuple(value.shape)}")
        # float64 is checked before rounding to float32 (1e-300 must not become 0, 1e300 not inf)
        work = torch.int64 if r.integer else (torch.float64 if value.dtype == torch.float64 else torch.float32)
        v = value.to(device=device, dtype=work, non_blocking=device.type == "cuda")
        if r.per_row:
            ok = r.ok(v)
            if validate and pending is not None:
                pending.append((name, value, ok, r.rule))
            # Out-of-range values become the invalid marker. Not needed where the kernels already
            # flag every out-of-range value of the kernel dtype: negative top_k, and float32 alpha
            # (NaN / inf poison z) and min_p (range-checked per row).
            if not (r.integer or (work == torch.float32 and name in ("alpha", "min_p"))):
                v = torch.where(ok, reference.kernel_value(name, v), torch.full((), r.invalid, dtype=work, device=device))
        return v.to(dtype).contiguous()
    return torch.full((batch,), number_value(name, value, validate=validate, ranges=ranges), dtype=dtype,
                      device=device)


def number_value(name: str, value, *, validate: bool, ranges: dict = RANGES):
    """A Python number parameter's kernel form as a Python number (the scalar case of
    :func:`param_tensor`; no tensor is made, so nothing here reaches the device or a traced graph):
    ``TypeError`` for a non-number, ``ValueError`` when out of range and ``validate`` (always for
    ``seed`` / ``offset``), else the range's invalid marker; ``seed`` / ``offset`` as the int64 with
    the uint64's bits."""
    r = ranges[name]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or a [B] tensor, got {type(value).__name__}")
    if r.integer and not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    v = int(value) if r.integer else _as_float(value)
    if not r.ok(v):
        if validate or not r.per_row:
            raise ValueError(f"{name} must be {r.rule}, got {value!r}")
        v = r.invalid
    else:
        v = reference.kernel_value(name, v)
    if name in ("seed", "offset"):
        v = as_int64_u64(v)
    return v


def raise_pending(pending: list, valid: torch.Tensor | None = None, mix: str = "(logits + alpha * adapter_logits)") -> None:
    """One host sync for every tensor parameter check in ``pending`` (and for ``valid``, the
    kernel's row flags, when given): ``ValueError`` naming the first parameter out of range, else
    the first invalid row. Nothing is synchronised when there is nothing to check."""
    flags = [ok.all() for _, _, ok, _ in pending]
    if valid is not None:
        flags.append(valid.all())
    if not flags:
        return
    good = torch.stack(flags).tolist() if len(flags) > 1 else [bool(flags[0])]
    for (name, value, ok, rule), fine in zip(pending, good):
        if not fine:
            where = (~ok).nonzero()[0].tolist()
            bad = value.expand(ok.shape)[tuple(where)].item()
            at = f"row {where[0]}" if len(where) == 1 else f"row {where[0]}, expert {where[1]}"
            raise ValueError(f"{name} must be {rule}, got {bad} ({at})")
    if valid is not None and not good[-1]:
        row = int((~valid).nonzero()[0, 0])
        raise ValueError(
            f"logits row {row} is invalid: {mix} / temperature holds NaN "
            f"or +inf (a tiny temperature or a huge weight can overflow float32; -inf times a negative "
            f"weight is +inf), or every token is -inf")


def seeds_for(seed, generator, batch: int, device, *, validate: bool = True, reuse: bool = False) -> torch.Tensor:
    """``[B]`` int64 per-row seeds (uint64 bit patterns): ``seed + row`` for an int seed (modulo
    2**64), the tensor's values for a tensor, or drawn from ``generator`` (torch's default
    generator when None). ``reuse``: an int seed's tensor may be one kept from an earlier call
    (see :func:`prepare`)."""
    if reuse and seed is not None and generator is None and isinstance(seed, numbers.Integral) \
            and not isinstance(seed, bool):
        return _reused(("seed", type(seed), seed, batch, device, validate),
                       lambda: seeds_for(seed, None, batch, device, validate=validate))
    if seed is not None and generator is not None:
        raise TypeError("pass either seed or generator, not both")
    if seed is None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return draw_seeds(batch, generator).to(device)
    if isinstance(seed, torch.Tensor):
        return param_tensor("seed", seed, batch, device, validate=validate)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or a [B] int64 tensor, got {type(seed).__name__}")
    base = number_value("seed", seed, validate=validate)
    rows = torch.arange(batch, dtype=torch.int64, device=device)
    return rows + base  # int64 addition wraps modulo 2**64, as uint64 seeds do


_SAMPLER_PARAMS = ("alpha", "temperature", "top_k", "top_p", "min_p")

# The [B] tensors of Python-number parameters, kept between calls of sample / sample_experts (a
# decode loop passes the same numbers every step; building them costs about as much as a B = 1
# draw). Only those calls reuse them, outside tracing, and hand them to the op alone: no backend
# writes to its inputs. The key holds the value with its type (True is not 1), B, the device and
# validate (an out-of-range number is a marker without validate, an error with it); 0.0 and -0.0
# share one, as every backend reads them alike.
_REUSED: dict = {}
_REUSED_MAX = 512


def _reused(key, make) -> torch.Tensor:
    t = _REUSED.get(key)
    if t is None:
        with torch.inference_mode(False):  # an inference tensor could not serve later autograd calls
            t = make()
        if len(_REUSED) >= _REUSED_MAX:
            _REUSED.clear()
        _REUSED[key] = t
    return t


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, torch.Tensor))


def _param(name: str, value, batch: int, device, *, validate: bool, pending, reuse: bool) -> torch.Tensor:
    """:func:`param_tensor`, from :data:`_REUSED` when ``reuse`` and ``value`` is a number."""
    if reuse and _is_number(value):
        return _reused((name, type(value), value, batch, device, validate),
                       lambda: param_tensor(name, value, batch, device, validate=validate))
    return param_tensor(name, value, batch, device, validate=validate, pending=pending)


def prepare(logits, adapter_logits, *, alpha, temperature, top_k, top_p, min_p, seed, generator, offset,
            validate: bool, pending: list | None = None, reuse: bool = False):
    """Check and normalise :func:`sample`'s arguments: ``(logits, adapter_logits, params)`` with
    every parameter a contiguous ``[B]`` tensor on the logits' device, as backends take them.
    Nothing here synchronises with the device; tensor range checks go to ``pending``.
    ``reuse=True`` (what :func:`sample` passes outside tracing): the tensors of Python-number
    parameters may be shared with earlier calls, so they must only be read."""
    check_logits("logits", logits)
    if adapter_logits is not None:
        check_logits("adapter_logits", adapter_logits, like=logits)
    B, dev = logits.shape[0], logits.device
    raw = dict(alpha=alpha, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    params = {name: _param(name, raw[name], B, dev, validate=validate, pending=pending, reuse=reuse)
              for name in _SAMPLER_PARAMS}
    params["seed"] = seeds_for(seed, generator, B, dev, validate=validate, reuse=reuse)
    params["offset"] = _param("offset", offset, B, dev, validate=validate, pending=None, reuse=reuse)
    return unit_columns(logits), None if adapter_logits is None else unit_columns(adapter_logits), params


def unit_columns(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its columns are adjacent (any row stride: a ``[:, :V]`` slice is read in
    place, the kernels take each expert's row stride), else a contiguous copy."""
    return x if x.shape[1] == 1 or x.stride(1) == 1 else x.contiguous()


def check_experts(experts) -> list:
    """The experts of :func:`sample_experts` / the K-expert ops as a list of K >= 1 ``[B, V]``
    tensors of one shape and device (``ValueError`` / ``TypeError`` naming ``experts[k]``)."""
    if isinstance(experts, torch.Tensor) or not isinstance(experts, (list, tuple)):
        raise TypeError(f"experts must be a list or tuple of [B, V] tensors, got {type(experts).__name__}")
    if len(experts) == 0:
        raise ValueError("experts must hold at least one [B, V] logits tensor, got none")
    check_logits("experts[0]", experts[0])
    for k, x in enumerate(experts[1:], 1):
        check_logits(f"experts[{k}]", x, like=experts[0])
    return list(experts)


def weights_tensor(weights, num_experts: int, batch: int, device, *, validate: bool,
                   pending: list | None = None, reuse: bool = False) -> torch.Tensor:
    """The experts' weights as the kernels take them: float32 ``[B, K]``, contiguous.

    ``weights``: K numbers (or K scalars / ``[B]`` tensors, one per expert), a ``[K]`` tensor
    (the same for every row) or a ``[B, K]`` tensor. Each must be
    ``RANGES["weights"]`` (finite, ``|w| <= 3.4028235e38``): a Python number outside raises
    ``ValueError`` when ``validate``, else becomes NaN (an invalid row); tensor values go to
    ``pending`` as :func:`param_tensor` does. A wrong count or shape raises ``ValueError``
    naming ``weights``. ``reuse``: K numbers' tensor may be one kept from an earlier call (see
    :func:`prepare`)."""
    if reuse and isinstance(weights, (list, tuple)) and all(_is_number(x) for x in weights):
        return _reused(("weights", tuple((type(x), x) for x in weights), num_experts, batch, device, validate),
                       lambda: weights_tensor(weights, num_experts, batch, device, validate=validate))
    K, r = num_experts, RANGES["weights"]
    device = torch.device(device)
    if isinstance(weights, torch.Tensor):
        if weights.dtype == torch.bool or weights.is_complex():
            raise TypeError(f"weights must be a real tensor, got {weights.dtype}")
        if weights.dim() == 1 and weights.shape[0] == K:
            w = weights.reshape(1, K).expand(batch, K)
        elif weights.dim() == 2 and tuple(weights.shape) == (batch, K):
            w = weights
        else:
            raise ValueError(f"weights must be K = {K} numbers (one per expert), a [K] = [{K}] tensor or a "
                             f"[B, K] = [{batch}, {K}] tensor, got shape {tuple(weights.shape)}")
        work = torch.float64 if w.dtype == torch.float64 else torch.float32
        v = w.to(device=device, dtype=work, non_blocking=device.type == "cuda")
        ok = r.ok(v)
        if validate and pending is not None:
            pending.append(("weights", v, ok, r.rule))
        if work == torch.float64:  # a value beyond float32 must not round onto a finite weight
            v = torch.where(ok, v, torch.full((), float("nan"), dtype=work, device=device))
        return v.to(torch.float32).contiguous()
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights must be a list of K numbers or a [K] / [B, K] tensor, got {type(weights).__name__}")
    if len(weights) != K:
        raise ValueError(f"weights must have K = {K} entries (one per expert), got {len(weights)}")
    if all(isinstance(x, numbers.Real) and not isinstance(x, (bool, torch.Tensor)) for x in weights):
        vals = []
        for x in weights:
            v = _as_float(x)
            if not r.ok(v):
                if validate:
                    raise ValueError(f"weights must be {r.rule}, got {x!r}")
                v = float("nan")
            vals.append(v)
        return torch.tensor(vals, dtype=torch.float32, device=device).expand(batch, K).contiguous()
    cols = [param_tensor("weights", x, batch, device, validate=validate, pending=pending) for x in weights]
    return torch.stack(cols, dim=1).contiguous()


def prepare_experts(experts, weights, *, temperature, top_k, top_p, min_p, seed, generator, offset,
                    validate: bool, pending: list | None = None, reuse: bool = False):
    """:func:`prepare` for :func:`sample_experts`: ``(experts, weights [B, K] float32, params)``."""
    experts = check_experts(experts)
    B, dev = experts[0].shape[0], experts[0].device
    w = weights_tensor(weights, len(experts), B, dev, validate=validate, pending=pending, reuse=reuse)
    raw = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    params = {name: _param(name, raw[name], B, dev, validate=validate, pending=pending, reuse=reuse)
              for name in raw}
    params["seed"] = seeds_for(seed, generator, B, dev, validate=validate, reuse=reuse)
    params["offset"] = _param("offset", offset, B, dev, validate=validate, pending=None, reuse=reuse)
    return [unit_columns(x) for x in experts], w, params


# ---------------------------------------------------------------- the registered op
#
# ``torch.ops.ipa_fast.sample_experts`` is the one entry into the backends: opaque to
# torch.compile (a fake implementation gives its output shapes, so a compiled caller keeps one
# graph) and checkable with torch.library.opcheck. It trusts its inputs — the kernel form that
# :func:`prepare` / :func:`prepare_experts` make — so :func:`sample` and :func:`sample_experts`
# are its checking wrappers (docs/DESIGN.md §2.11).

_LIB = torch.library.Library("ipa_fast", "DEF")  # the namespace (ipa_fast.ops.token_stats adds its ops to it)
_LIB.define(
    "sample_experts(Tensor[] experts, Tensor weights, Tensor temperature, Tensor top_k, Tensor top_p, "
    "Tensor min_p, Tensor seed, Tensor offset, bool unit_first, str backend) -> (Tensor, Tensor, Tensor, Tensor)")
_LIB.define("check_rows(Tensor[] carry, Tensor[] values, Tensor[] oks, str[] names, str[] rules, Tensor? valid, "
            "str mix) -> Tensor[]")


def _sample_op(experts, weights, temperature, top_k, top_p, min_p, seed, offset, unit_first, backend):
    """``(tokens, logprobs, filtered_logprobs, valid)`` from backend ``backend`` ("auto" picks by
    device). ``unit_first``: ``experts`` is ``[base]`` or ``[base, adapter]`` and ``weights`` the
    ``[B]`` alpha (expert 0 has weight 1: the kernels' two-expert entry); else ``weights`` is the
    ``[B, K]`` float32 weights. Parameters: contiguous ``[B]`` tensors of the kernel dtype."""
    impl = _dispatch.backend_module(backend, experts[0])
    params = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, offset=offset)
    if unit_first:
        return impl.sample(experts[0], experts[1] if len(experts) > 1 else None, alpha=weights, **params)
    return impl.sample_experts(experts, weights, **params)


def _sample_op_fake(experts, weights, temperature, top_k, top_p, min_p, seed, offset, unit_first, backend):
    B, dev = experts[0].shape[0], experts[0].device
    return (torch.empty(B, dtype=torch.int64, device=dev), torch.empty(B, dtype=torch.float32, device=dev),
            torch.empty(B, dtype=torch.float32, device=dev), torch.empty(B, dtype=torch.bool, device=dev))


def _check_rows_op(carry, values, oks, names, rules, valid, mix):
    """:func:`raise_pending` as an op (see :func:`check_pending`): the host sync and the
    ``ValueError`` happen inside it, out of the traced graph; ``carry`` comes back as copies."""
    raise_pending(list(zip(names, values, oks, rules)), valid, mix)
    return [x.clone() for x in carry]


def _check_rows_fake(carry, values, oks, names, rules, valid, mix):
    return [torch.empty_like(x) for x in carry]


def _no_gradient(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _check_rows_backward(ctx, grads):
    """``carry`` passes through unchanged: its gradient is the outputs' (e.g. learnable weights)."""
    return list(grads), [None] * ctx.n_values, [None] * ctx.n_values, None, None, None, None


def _check_rows_setup(ctx, inputs, output):
    ctx.n_values = len(inputs[1])


# One kernel for every device (the backends choose by device) and its fake (shapes only) for
# tracing. Autograd: a draw has no gradient (the sampler's outputs never require grad); the check
# is the identity on what it carries.
for _name, _impl, _fake in (("sample_experts", _sample_op, _sample_op_fake),
                            ("check_rows", _check_rows_op, _check_rows_fake)):
    _LIB.impl(_name, _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"ipa_fast::{_name}", _fake, lib=_LIB)
torch.library.register_autograd("ipa_fast::sample_experts", lambda ctx, *grads: None, setup_context=_no_gradient,
                                lib=_LIB)
torch.library.register_autograd("ipa_fast::check_rows", _check_rows_backward, setup_context=_check_rows_setup,
                                lib=_LIB)


def _modes_probe():
    """A function telling whether a torch function / dispatch mode or a functorch transform is
    active (each would see the op), or None where this torch lacks one of the probes."""
    try:
        function_mode = torch._C._is_torch_function_mode_enabled
        dispatch_modes = torch._C._len_torch_dispatch_stack
        transforms = torch._C._are_functorch_transforms_active
    except AttributeError:
        return None
    return lambda: function_mode() or dispatch_modes() > 0 or transforms()


_MODES_ACTIVE = _modes_probe()


def _plain_eager(tensors) -> bool:
    """True when calling the registered op would only call its implementation: nothing traces
    (torch.compile, export, make_fx), no mode or transform is active, and every input is a plain
    tensor that needs no gradient (the op's autograd rule would only detach the outputs)."""
    if _MODES_ACTIVE is None or torch.compiler.is_compiling() or _MODES_ACTIVE():
        return False
    for t in tensors:
        if type(t) is not torch.Tensor or t.requires_grad:
            return False
    return True


def _run_op(experts, weights, params, *, unit_first: bool, backend, pending, mix: str) -> SampleOutput:
    """The registered op on checked inputs, then :func:`raise_pending` when ``pending`` is a list
    (``validate=True``), through :func:`check_pending`. In plain eager mode (:func:`_plain_eager`)
    the op's implementation is called directly: torch.library's dispatch costs about as much as
    a B = 1 draw and would change nothing there."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    args = (experts, weights, params["temperature"], params["top_k"], params["top_p"], params["min_p"],
            params["seed"], params["offset"], unit_first, backend)
    if _plain_eager([*experts, weights, *params.values()]):
        out = _sample_op(*args)
    else:
        out = torch.ops.ipa_fast.sample_experts(*args)
    if pending is not None:
        out = check_pending(pending, out, valid=out[3], mix=mix)
    return SampleOutput(*out)


def check_pending(pending: list, carry, *, valid: torch.Tensor | None = None,
                  mix: str = "(logits + alpha * adapter_logits)"):
    """:func:`raise_pending`, also inside a torch.compile graph; returns ``carry`` (a sequence of
    tensors). In eager mode it calls :func:`raise_pending` and returns ``carry`` itself. Traced,
    it becomes the op ``ipa_fast::check_rows``, which returns copies of ``carry``: whatever uses
    them depends on the check, so the compiler can neither drop it nor move it after their use
    (the sampler carries its outputs; the training op its targets, checked before they index)."""
    if not torch.compiler.is_compiling():
        raise_pending(pending, valid, mix)
        return carry
    if not pending and valid is None:
        return carry
    return torch.ops.ipa_fast.check_rows(list(carry), [p[1] for p in pending], [p[2] for p in pending],
                                         [p[0] for p in pending], [p[3] for p in pending], valid, mix)


def sample_experts(experts, weights, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=None,
                   generator=None, offset=0, validate=True, backend="auto") -> SampleOutput:
    """Mix K experts, filter and draw one token per row from ``softmax((sum_k w_k * l_k) / T)``.

    ``experts``: a list of K >= 1 logits tensors ``[B, V]`` (float32 / float16 / bfloat16, one
    shape and device; dtypes may differ). Rows may be strided (a ``[:, :V]`` slice is read in
    place). ``weights``: K numbers, a ``[K]`` tensor, or a ``[B, K]`` tensor of per-row weights.

    The mix (:func:`ipa_fast.ops.reference.mix_experts`, docs/DESIGN.md §2.4) is float32, summed left
    to right: a weight of 0 ignores its expert (even at -inf or NaN); -inf with a positive weight
    masks the token; -inf with a negative weight is +inf, which makes the row invalid (token 0,
    ``valid = False``; ``ValueError`` when ``validate``): an expert with a negative weight must be
    finite wherever the row is to be sampled. Everything after the mix — temperature, top-k,
    top-p, min-p, the draw, the RNG stream, ``validate`` and ``backend`` — is exactly
    :func:`sample`'s, and ``sample(base, adapter, alpha=a)`` equals
    ``sample_experts([base, adapter], [1.0, a])`` token for token, log-prob for log-prob.

    Bad inputs raise naming the parameter: a mismatched expert shape / device (``experts[k]``),
    a wrong number or shape of weights, NaN / infinite weights (``weights``).
    """
    pending = [] if validate else None
    experts, w, params = prepare_experts(
        experts, weights, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
        generator=generator, offset=offset, validate=validate, pending=pending,
        reuse=not torch.compiler.is_compiling())
    return _run_op(experts, w, params, unit_first=False, backend=backend, pending=pending,
                   mix="sum_k weights[k] * experts[k]")


def sample(logits, adapter_logits=None, *, alpha=1.0, temperature=1.0, top_k=0, top_p=1.0,
           min_p=0.0, seed=None, generator=None, offset=0, validate=True, backend="auto") -> SampleOutput:
    """Mix, filter and draw one token per row from ``softmax((logits + alpha * adapter_logits) / T)``.

    ``logits``, ``adapter_logits``: ``[B, V]`` float32 / float16 / bfloat16 on one device (other
    ranks, shapes, devices or dtypes raise). Arithmetic is float32 or wider whatever the input
    dtype. ``adapter_logits=None``: a plain sampler over ``logits``.

    ``alpha``, ``temperature``, ``top_k``, ``top_p``, ``min_p``: a Python number or a ``[B]``
    tensor (one value per row; moved to the logits' device). Accepted values — outside them
    ``ValueError`` names the parameter:

    - ``alpha``: finite, ``|alpha| <= 3.4028235e38``; ``alpha == 0`` ignores the adapter (no
      ``0 * -inf`` NaN).
    - ``temperature``: ``0`` (greedy) or in ``[1.1754944e-38, 3.4028235e38]`` (float32's smallest
      normal and largest finite numbers). ``T == 0``: the argmax of ``logits + alpha *
      adapter_logits``, lowest index on ties; ``logprobs`` are then at T = 1 and
      ``filtered_logprobs`` 0. A row that a tiny T overflows to +inf is invalid (see below).
    - ``top_k``: an int ``>= 0``; 0 = off, ``k >= V`` keeps every token; keeps every token whose
      value is >= the k-th largest (ties at the k-th value are all kept).
    - ``top_p``: in ``(0, 1]``, 1 = off; over the top-k survivors, renormalised, keeps token i iff
      the mass of tokens strictly more probable than i is < p (the top token is always kept; tied
      tokens are kept or dropped together).
    - ``min_p``: in ``[0, 1]``, 0 = off; keeps tokens with ``pi_i >= min_p * max pi``.

    Filters apply in that order, as Hugging Face's ``TopK`` / ``TopP`` / ``MinP`` warpers do.
    The draw is exact: with the row's uniform ``u``, the token is the smallest index whose
    inclusive cumulative kept mass (index order) exceeds ``u`` times the total kept mass.

    Randomness (RNG stream version :data:`ipa_fast.RNG_STREAM_VERSION`): a row's ``u`` comes from
    Philox-4x32-10 with key ``(lo32(seed), hi32(seed))`` and counter ``(lo32(offset),
    hi32(offset), 0, 0)``: from its first two output words, ``u = ((x0 << 21 | x1 >> 11) + 0.5) *
    2**-53`` (see :mod:`ipa_fast.ops.rng`). ``seed``: an int in ``[-2**63, 2**64)`` (row r gets ``seed + r`` modulo
    2**64) or a ``[B]`` integer tensor (int64 values are read as uint64 bit patterns).
    ``offset``: the caller's step key, an int in ``[0, 2**64)`` or a ``[B]`` integer tensor (read
    the same way); :class:`ipa_fast.TailoredLM` passes each row's unpadded position. With
    ``seed=None``, ``generator`` (or torch's default generator) draws the row seeds; ``seed`` and
    ``generator`` together raise ``TypeError``. A row's token depends only on its own logits,
    parameters, seed and offset: never on the batch, the thread count or (up to rounding at a
    CDF boundary) the backend.

    Returns :class:`SampleOutput`: ``tokens`` [B] int64, ``logprobs`` [B] float32 (log pi(token),
    unfiltered, at this T), ``filtered_logprobs`` [B] float32 (under the filtered, renormalised
    pi), ``valid`` [B] bool.

    ``validate=True``: any out-of-range parameter, or any invalid row — NaN or +inf in the mixed
    and tempered logits, or every token -inf — raises ``ValueError`` (one host sync in all).
    ``validate=False`` never synchronises (CUDA-graph capture): types and shapes are still checked,
    but out-of-range values and bad rows only give those rows token 0, NaN log-probs and
    ``valid = False``.

    ``backend``: ``"auto"`` (the fastest available for the device), ``"reference"``, ``"cpu"``,
    ``"triton"`` or ``"cuda"``; :func:`ipa_fast.backends` says which work here. See
    docs/DESIGN.md §2 and §3 for the full statement.
    """
    pending = [] if validate else None
    logits, adapter_logits, params = prepare(
        logits, adapter_logits, alpha=alpha, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        seed=seed, generator=generator, offset=offset, validate=validate, pending=pending,
        reuse=not torch.compiler.is_compiling())
    alpha = params.pop("alpha")
    experts = [logits] if adapter_logits is None else [logits, adapter_logits]
    return _run_op(experts, alpha, params, unit_first=True, backend=backend, pending=pending,
                   mix="(logits + alpha * adapter_logits)")
