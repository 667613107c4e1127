"""Loads the compiled extension ``ramda_kernels._C`` (bitsandbytes ``cextension`` pattern).

Importing this module never fails: ``EXT`` is the module or ``None`` and
``IMPORT_ERROR`` keeps the reason, which the ``cpu`` and ``cuda`` backends
report from ``why_unavailable`` (and the registry raises when one of them is
asked for by name). On success the four ops are available as
``torch.ops.ramda_kernels.{ramda_, rmda_, proxadamw_, proxsgd_}`` with fake
(meta) kernels registered, so they trace under ``torch.compile``.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional

import torch

EXT = None
IMPORT_ERROR: Optional[BaseException] = None

try:
    from ramda_kernels import _C as EXT  # noqa: N812
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
    if EXT is not None:
        return None
    note = build_note()
    msg = f"ramda_kernels._C is not built or failed to load ({type(IMPORT_ERROR).__name__}: {IMPORT_ERROR})"
    if note:
        msg += f"; build note: {note}"
    return msg + ". Build it with `pip install --no-build-isolation -e .`"


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
# backends (the op dispatches on the tensors' device).
#
# NOTE: [Extension fallbacks]
# These go to ``ramda_ref.functional`` in the same call (their entries in the
# returned list are the reference's):
# * the whole call for regularizer ``nuclear`` (an SVD per PG iteration) and
#   for ``solver="pg"`` with ``pg_stop="rtol"`` (a whole-tensor objective per
#   iteration, the authors' parity rule);
# * a tensor whose parameter is fp64 (fp64 state), whose gradient dtype
#   differs from the parameter's, whose state is not fp32, whose gradient or
#   state strides differ from the parameter's, that is not dense, or that
#   has more than 8 dimensions.
# The op returns nothing: the fused path does not report per-group solver
# iteration counts, so its entries are ``None``.
# ---------------------------------------------------------------------------

from typing import Callable, Sequence  # noqa: E402

from ramda_ref import functional as _ref  # noqa: E402
from ramda_ref.optim import _finite_flags as _ref_finite_flags  # noqa: E402

from ..layout import is_dense, same_layout  # noqa: E402

_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_DIMS = 8


def _fusable(p: torch.Tensor, g: torch.Tensor, states: Sequence[torch.Tensor]) -> bool:
    if p.dtype not in _FAST_DTYPES or g.dtype != p.dtype or p.dim() > _MAX_DIMS:
        return False
    if not (p.is_contiguous() or is_dense(p)) or not same_layout(g, p) or g.device != p.device:
        return False
    return all(s.dtype == torch.float32 and s.device == p.device and same_layout(s, p) for s in states)


def _split(params, grads, state_lists) -> tuple:
    """(indices for the op, indices for the reference)."""
    fast, slow = [], []
    for i, (p, g) in enumerate(zip(params, grads)):
        (fast if _fusable(p, g, [s[i] for s in state_lists]) else slow).append(i)
    return fast, slow


def _run(op: Callable, reference: Callable, params, grads, state_lists, optional_lists, *,
         op_kwargs, ref_kwargs):
    """Op on the fusable tensors, reference on the rest; returns the per-tensor list."""
    fast, slow = _split(params, grads, state_lists)
    out: List = [None] * len(params)
    pick = lambda xs, idx: [xs[i] for i in idx]  # noqa: E731
    if fast:
        lists = [pick(params, fast), pick(grads, fast)] + [pick(s, fast) for s in state_lists]
        lists += [pick(s, fast) if s else [] for s in optional_lists]
        op(*lists, **op_kwargs)
    if slow:
        lists = [pick(params, slow), pick(grads, slow)] + [pick(s, slow) for s in state_lists]
        lists += [pick(s, slow) if s else [] for s in optional_lists]
        res = reference(*lists, **ref_kwargs)
        for i, r in zip(slow, res):
            out[i] = r
    return out


def _whole_call_to_reference(regularizer: str, solver: str, pg_stop: str) -> bool:
    return regularizer == "nuclear" or (solver == "pg" and pg_stop == "rtol" and regularizer != "none")


def _dims(dims):
    if dims is None:
        return None
    return [int(dims)] if isinstance(dims, int) else [int(d) for d in dims]


def _view(view):
    return None if view is None else [int(v) for v in view]


def ramda(params, grads, initial_points, grad_sums, grad_sum_sqs, *, step, alpha, lr, momentum,
          epsilon, lambda_, regularizer, dims, view, reweight, solver, max_iters, rtol, pg_stop,
          pg_eps):
    ref_kwargs = dict(step=step, alpha=alpha, lr=lr, momentum=momentum, epsilon=epsilon,
                      lambda_=lambda_, regularizer=regularizer, dims=dims, view=view,
                      reweight=reweight, solver=solver, max_iters=max_iters, rtol=rtol,
                      pg_stop=pg_stop, pg_eps=pg_eps)
    if _whole_call_to_reference(regularizer, solver, pg_stop):
        return _ref.ramda(params, grads, initial_points, grad_sums, grad_sum_sqs, **ref_kwargs)
    op_kwargs = dict(step=int(step), alpha=float(alpha), lr=float(lr), momentum=float(momentum),
                     epsilon=float(epsilon), lambda_=float(lambda_), regularizer=regularizer,
                     dims=_dims(dims), view=_view(view), reweight=bool(reweight), solver=solver,
                     max_iters=int(max_iters), pg_eps=float(pg_eps))
    return _run(torch.ops.ramda_kernels.ramda_, _ref.ramda, params, grads,
                [initial_points, grad_sums, grad_sum_sqs], [], op_kwargs=op_kwargs, ref_kwargs=ref_kwargs)


def rmda(params, grads, initial_points, grad_sums, *, step, alpha, lr, momentum, lambda_,
         regularizer, dims, view, reweight):
    ref_kwargs = dict(step=step, alpha=alpha, lr=lr, momentum=momentum, lambda_=lambda_,
                      regularizer=regularizer, dims=dims, view=view, reweight=reweight)
    if _whole_call_to_reference(regularizer, "exact", "inexact"):
        return _ref.rmda(params, grads, initial_points, grad_sums, **ref_kwargs)
    op_kwargs = dict(step=int(step), alpha=float(alpha), lr=float(lr), momentum=float(momentum),
                     lambda_=float(lambda_), regularizer=regularizer, dims=_dims(dims),
                     view=_view(view), reweight=bool(reweight))
    return _run(torch.ops.ramda_kernels.rmda_, _ref.rmda, params, grads,
                [initial_points, grad_sums], [], op_kwargs=op_kwargs, ref_kwargs=ref_kwargs)


def proxadamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, step, lr, beta1, beta2,
              epsilon, weight_decay, amsgrad, lambda_, regularizer, dims, view, reweight, solver,
              max_iters, rtol, pg_stop, pg_eps):
    ref_kwargs = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, epsilon=epsilon,
                      weight_decay=weight_decay, amsgrad=amsgrad, lambda_=lambda_,
                      regularizer=regularizer, dims=dims, view=view, reweight=reweight,
                      solver=solver, max_iters=max_iters, rtol=rtol, pg_stop=pg_stop, pg_eps=pg_eps)
    if _whole_call_to_reference(regularizer, solver, pg_stop):
        return _ref.proxadamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, **ref_kwargs)
    op_kwargs = dict(step=int(step), lr=float(lr), beta1=float(beta1), beta2=float(beta2),
                     epsilon=float(epsilon), weight_decay=float(weight_decay),
                     amsgrad=bool(amsgrad), lambda_=float(lambda_), regularizer=regularizer,
                     dims=_dims(dims), view=_view(view), reweight=bool(reweight), solver=solver,
                     max_iters=int(max_iters), pg_eps=float(pg_eps))
    states = [exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    optional = [] if amsgrad else [[]]
    return _run(torch.ops.ramda_kernels.proxadamw_, _ref.proxadamw, params, grads, states,
                optional, op_kwargs=op_kwargs, ref_kwargs=ref_kwargs)


def proxsgd(params, grads, momentum_buffers, *, step, lr, momentum, lambda_, regularizer, dims,
            view, reweight):
    ref_kwargs = dict(step=step, lr=lr, momentum=momentum, lambda_=lambda_,
                      regularizer=regularizer, dims=dims, view=view, reweight=reweight)
    if _whole_call_to_reference(regularizer, "exact", "inexact"):
        return _ref.proxsgd(params, grads, momentum_buffers, **ref_kwargs)
    op_kwargs = dict(step=int(step), lr=float(lr), momentum=float(momentum),
                     lambda_=float(lambda_), regularizer=regularizer, dims=_dims(dims),
                     view=_view(view), reweight=bool(reweight))
    return _run(torch.ops.ramda_kernels.proxsgd_, _ref.proxsgd, params, grads,
                [momentum_buffers], [], op_kwargs=op_kwargs, ref_kwargs=ref_kwargs)
