"""Loads the compiled extension ``ramda_kernels._C`` (bitsandbytes ``cextension`` pattern).

Importing this module never fails: ``EXT`` is the module or ``None`` and
``IMPORT_ERROR`` keeps the reason, which the ``cpu`` and ``cuda`` backends
report from ``why_unavailable`` (and the registry raises when one of them is
asked for by name). On success the four ops are available as
``torch.ops.ramda_kernels.{ramda_, rmda_, proxadamw_, proxsgd_}`` with fake
(meta) kernels registered, so they trace under ``torch.compile``.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import List, Optional

import torch

EXT = None
IMPORT_ERROR: Optional[BaseException] = None

try:
    # import_module, not ``from ramda_kernels import _C``: while the package is
    # still initializing, the latter reports a missing module as a circular import
    EXT = importlib.import_module("ramda_kernels._C")
except Exception as e:  # ImportError, or an undefined symbol / ABI mismatch
    IMPORT_ERROR = e


def build_note() -> Optional[str]:
    """What the build recorded about skipping CUDA or failing (ramda_kernels/_build_info.json)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_build_info.json")
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info.get("error") or info.get("cuda_skipped")


def unavailable_reason() -> Optional[str]:
    """Why the extension cannot be used (``None`` when it can); fixed at import."""
    return _UNAVAILABLE


def _unavailable_reason() -> Optional[str]:
    # computed once: every step resolves its backend, and a traced (compiled)
    # step cannot read the build note's file
    if EXT is not None:
        return None
    note = build_note()
    missing = (isinstance(IMPORT_ERROR, ModuleNotFoundError)
               and IMPORT_ERROR.name == "ramda_kernels._C")
    if missing:
        msg = "not built: there is no compiled ramda_kernels._C next to ramda_kernels/__init__.py"
    else:
        msg = f"not loadable: ramda_kernels._C failed to import ({type(IMPORT_ERROR).__name__}: {IMPORT_ERROR})"
    if note:
        msg += f"; build note: {note}"
    return msg + ". Build it with `pip install --no-build-isolation -e .`"


_UNAVAILABLE = _unavailable_reason()


def with_cuda() -> bool:
    return EXT is not None and bool(EXT.with_cuda())


if EXT is not None:
    ops = torch.ops.ramda_kernels
    for _name in ("ramda_", "rmda_", "proxadamw_", "proxsgd_"):
        # The ops only mutate their inputs and return nothing: the fake kernel has nothing to do.
        torch.library.register_fake(f"ramda_kernels::{_name}")(lambda *args, **kwargs: None)

    @torch.library.register_fake("ramda_kernels::finite_flags")
    def _finite_flags_fake(tensors):
        return torch.empty(len(tensors), dtype=torch.bool)


#: dtypes the extension's NaN/Inf screen reads.
_SCREEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _screens(g: torch.Tensor) -> bool:
    """Can the extension's screen read this gradient? Plain dense CPU tensors only:
    a DTensor's screen must agree on every rank, which the reference's sum (a
    collective) does and a look at the local shard does not."""
    return (type(g) is torch.Tensor and g.device.type == "cpu" and g.layout == torch.strided
            and g.dtype in _SCREEN_DTYPES and (g.is_contiguous() or is_dense(g)))  # the C check first: a hot path


def finite_flags(grads: List[torch.Tensor]) -> torch.Tensor:
    """``ramda_ref.optim._finite_flags`` in one pass of the C++ extension for the
    gradients it reads (`_screens`), the reference's screen (a sum per tensor,
    and an exact test where the sum overflows) for the others.

    On ResNet-50's gradients (25.5M fp32 elements, 161 tensors, one thread) the
    reference's screen took about 10 ms of a 120 ms RAMDA step: a Python-level
    sum and a host read per tensor. The op reads every gradient once, in
    chunks spread over the threads, and tests exactly (x * 0 is NaN only for
    NaN and Inf).
    """
    if EXT is None:
        return _ref_finite_flags(grads)
    fast = [i for i, g in enumerate(grads) if _screens(g)]
    if len(fast) == len(grads):
        return torch.ops.ramda_kernels.finite_flags(grads)
    if not fast:
        return _ref_finite_flags(grads)
    flags = torch.empty(len(grads), dtype=torch.bool)
    flags[fast] = torch.ops.ramda_kernels.finite_flags([grads[i] for i in fast])
    taken = set(fast)
    rest = [i for i in range(len(grads)) if i not in taken]
    flags[rest] = _ref_finite_flags([grads[i] for i in rest]).cpu()
    return flags


# ---------------------------------------------------------------------------
# The four functionals on top of the ops, shared by the ``cpu`` and ``cuda``
# backends (the op dispatches on the tensors' device). Each computes its
# optimizer's named step scalars once (``ramda_ref.definitions``) and hands
# them to the op by name; what the op does not take goes to the reference in
# the same call (NOTE: [Fused-backend fallbacks] in ``_rules.py``; the op
# reads neither non-dense parameters nor more than 8 dimensions). The op
# returns nothing: the fused path does not report per-group solver iteration
# counts, so its entries are ``None``.
# ---------------------------------------------------------------------------

import functools  # noqa: E402
from typing import Callable, Dict  # noqa: E402

from ramda_ref import definitions as _D  # noqa: E402
from ramda_ref import functional as _ref  # noqa: E402
from ramda_ref.optim import _finite_flags as _ref_finite_flags  # noqa: E402

from ..layout import is_dense  # noqa: E402
from ._rules import Capabilities, own_dtype_flags, tensor_problem, whole_call_to_reference  # noqa: E402

#: what the C++ ops read (csrc/bindings.cpp, csrc/ramda_args.h kMaxDims)
CAPABILITIES = Capabilities(max_dims=8)


def _op_arguments(op_name: str) -> List[str]:
    """The op's non-tensor-list argument names, from its schema."""
    schema = getattr(torch.ops.ramda_kernels, op_name).default._schema
    return [a.name for a in schema.arguments if not str(a.type).startswith("List[Tensor]")]


def _op_value(name: str, value):
    if name in ("dims", "view"):
        if value is None:
            return None
        return [int(value)] if isinstance(value, int) else [int(v) for v in value]
    return value


def _capturable_on_host(step_fn: Callable, d: "_D.Definition", params, grads, lists, step, alpha,
                        capturable: bool, found_inf, grad_scale, hp) -> List:
    """A capturable call (conventions of ``ramda_ref.functional``) on CPU tensors.

    The op takes its step scalars from the host, and on the CPU reading the
    counters, ``found_inf`` and ``grad_scale`` waits for nothing: a skipped
    call returns before anything is written, the gradients are divided by the
    scale as the non-capturable optimizer divides them, and the tensors that
    took the same number of steps run as one plain call. So a capturable step
    on this backend equals its plain step bit for bit. CUDA tensors are
    refused: there the reads would synchronize (``backends.CAPTURABLE_BACKENDS``
    leaves the cuda backend out).
    """
    uses_alpha = "alpha" in d.counters
    _ref._capture(capturable, len(params), step, alpha if uses_alpha else None, found_inf,
                  grad_scale, hp["regularizer"], hp.get("solver", "exact"), hp.get("pg_stop", "inexact"))
    devices = {t.device.type for t in (*params, found_inf, grad_scale) if t is not None}
    if devices - {"cpu"}:
        raise ValueError(f"{d.name}: a capturable call of the extension backends takes CPU tensors "
                         f"only (got {sorted(devices)}); on CUDA use backend='triton' or 'auto'")
    out: List = [None] * len(params)
    if not params or (found_inf is not None and bool(found_inf)):
        return out
    if grad_scale is not None:
        grads = list(torch._foreach_div(grads, grad_scale))
    buckets: Dict[tuple, List[int]] = {}
    alphas = [float(a) for a in alpha] if uses_alpha else [None] * len(params)
    for i, (t, a) in enumerate(zip(step, alphas)):
        buckets.setdefault((int(t), a), []).append(i)
    for (t, a), idx in buckets.items():
        sub = [[x[i] for i in idx] if len(x) else [] for x in (params, grads, *lists)]
        for i, r in zip(idx, step_fn(*sub, step=t, alpha=a, **hp)):
            out[i] = r
    return out


def _functional(d: "_D.Definition") -> Callable:
    """Functional ``d.name`` of the extension backends (signature of the reference's)."""
    reference = getattr(_ref, d.name)
    op_name = f"{d.name}_"
    names: List[str] = []

    @functools.wraps(reference)
    def step_fn(params, grads, *lists, step, alpha=None, capturable=False, found_inf=None,
                grad_scale=None, **hp):
        if capturable or found_inf is not None or grad_scale is not None:
            return _capturable_on_host(step_fn, d, params, grads, lists, step, alpha, capturable,
                                       found_inf, grad_scale, hp)
        call_kwargs: Dict = dict(hp, step=step)
        if "alpha" in d.counters:
            call_kwargs["alpha"] = alpha
        if not (isinstance(step, int) and step >= 1):
            raise ValueError(f"{d.name}: step must be an integer >= 1 (the step being taken), "
                             f"got {step!r}")
        scalars = d.scalars(step, alpha, hp)
        threshold = scalars[d.threshold]
        if whole_call_to_reference(hp["regularizer"], hp.get("solver", "exact"),
                                   hp.get("pg_stop", "inexact"), threshold):
            return reference(params, grads, *lists, **call_kwargs)
        # an optional list passed empty or left out (sigmas: no warm start) is absent,
        # as in the reference; the op takes every list
        lists = tuple(lists) + ((),) * (len(d.state) - len(lists))
        present = [k in d.state_keys(hp) and not (k in d.optional_state and len(lists[j]) == 0)
                   for j, k in enumerate(d.state)]
        own = own_dtype_flags(d, [k for k, on in zip(d.state, present) if on])
        fast, slow = [], []
        for i, (p, g) in enumerate(zip(params, grads)):
            states = [lst[i] for lst, on in zip(lists, present) if on]
            (slow if tensor_problem(p, g, states, CAPABILITIES, own_dtype=own) else fast).append(i)
        if not names:
            names.extend(_op_arguments(op_name))
        values = dict(hp, **scalars)
        if threshold == 0:  # nothing is regularized: the op's elementwise path
            values["regularizer"] = "none"
        op_kwargs = {n: _op_value(n, values[n]) for n in names}
        out: List = [None] * len(params)
        for idx, run in ((fast, lambda *a: getattr(torch.ops.ramda_kernels, op_name)(*a, **op_kwargs)),
                         (slow, lambda *a: reference(*a, **call_kwargs))):
            if not idx:
                continue
            sub = [[x[i] for i in idx] for x in (params, grads)]
            sub += [[lst[i] for i in idx] if on else [] for lst, on in zip(lists, present)]
            res = run(*sub)
            if res is not None:
                for i, r in zip(idx, res):
                    out[i] = r
        return out

    return step_fn


ramda = _functional(_D.RAMDA)
rmda = _functional(_D.RMDA)
proxadamw = _functional(_D.PROXADAMW)
proxsgd = _functional(_D.PROXSGD)
