"""The Triton backend's capturable steps as opaque ops, for ``torch.compile``.

NOTE: [Triton steps under torch.compile]
Dynamo cannot trace a Triton-backend step: the launch plans are cached by data
pointers, their tables hold raw addresses, and the fallback split depends on
each tensor's layout. So while a capturable step is being compiled
(``torch.compiler.is_compiling()``), each functional of
``ramda_kernels.backends.triton_backend`` calls one custom op here instead
(``ramda_kernels::triton_ramda_`` and the like). The op's implementation is the
eager functional itself; its fake implementation does nothing, and its schema
declares the parameters and state lists it mutates, so the compiled graph keeps
the step in place, in order, with no graph break (tested with
``torch.compile(optimizer.step, fullgraph=True)``). The op returns nothing, so
a compiled step reports no per-group iteration counts, like the other fused
paths. Only capturable calls take this route: a non-capturable step has Python
step counters, which a compiled graph would specialize on (recompiling every
step), and reads its NaN screen on the host anyway.

No ``from __future__ import annotations`` here: ``torch.library.custom_op``
reads the schema from these annotations.
"""

from typing import List, Optional, Sequence

import torch

Tensor = torch.Tensor


def _ints(x: Optional[Sequence[int]]) -> Optional[List[int]]:
    return None if x is None else [int(v) for v in x]


def _backend():
    from . import triton_backend  # imported late: triton_backend calls into this module
    return triton_backend


@torch.library.custom_op("ramda_kernels::triton_ramda_", mutates_args=("params", "grad_sums", "grad_sum_sqs"))
def ramda_op(params: List[Tensor], grads: List[Tensor], initial_points: List[Tensor],
             grad_sums: List[Tensor], grad_sum_sqs: List[Tensor], step: List[Tensor],
             alpha: List[Tensor], lr: float, momentum: float, epsilon: float, lambda_: float,
             regularizer: str, dims: Optional[List[int]], view: Optional[List[int]], reweight: bool,
             solver: str, max_iters: int, rtol: float, pg_stop: str, pg_eps: float,
             found_inf: Optional[Tensor], grad_scale: Optional[Tensor]) -> None:
    _backend().ramda(params, grads, initial_points, grad_sums, grad_sum_sqs, step=step, alpha=alpha,
                     lr=lr, momentum=momentum, epsilon=epsilon, lambda_=lambda_,
                     regularizer=regularizer, dims=dims, view=view, reweight=reweight,
                     solver=solver, max_iters=max_iters, rtol=rtol, pg_stop=pg_stop,
                     pg_eps=pg_eps, capturable=True, found_inf=found_inf, grad_scale=grad_scale)


@torch.library.custom_op("ramda_kernels::triton_rmda_", mutates_args=("params", "grad_sums"))
def rmda_op(params: List[Tensor], grads: List[Tensor], initial_points: List[Tensor],
            grad_sums: List[Tensor], step: List[Tensor], alpha: List[Tensor], lr: float,
            momentum: float, lambda_: float, regularizer: str, dims: Optional[List[int]],
            view: Optional[List[int]], reweight: bool, found_inf: Optional[Tensor],
            grad_scale: Optional[Tensor]) -> None:
    _backend().rmda(params, grads, initial_points, grad_sums, step=step, alpha=alpha, lr=lr,
                    momentum=momentum, lambda_=lambda_, regularizer=regularizer, dims=dims,
                    view=view, reweight=reweight, capturable=True, found_inf=found_inf,
                    grad_scale=grad_scale)


@torch.library.custom_op("ramda_kernels::triton_proxadamw_",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"))
def proxadamw_op(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                 exp_avg_sqs: List[Tensor], max_exp_avg_sqs: List[Tensor], step: List[Tensor],
                 lr: float, beta1: float, beta2: float, epsilon: float, weight_decay: float,
                 amsgrad: bool, lambda_: float, regularizer: str, dims: Optional[List[int]],
                 view: Optional[List[int]], reweight: bool, solver: str, max_iters: int,
                 rtol: float, pg_stop: str, pg_eps: float, found_inf: Optional[Tensor],
                 grad_scale: Optional[Tensor]) -> None:
    _backend().proxadamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step=step, lr=lr,
                         beta1=beta1, beta2=beta2, epsilon=epsilon, weight_decay=weight_decay,
                         amsgrad=amsgrad, lambda_=lambda_, regularizer=regularizer, dims=dims,
                         view=view, reweight=reweight, solver=solver, max_iters=max_iters,
                         rtol=rtol, pg_stop=pg_stop, pg_eps=pg_eps, capturable=True,
                         found_inf=found_inf, grad_scale=grad_scale)


@torch.library.custom_op("ramda_kernels::triton_proxsgd_", mutates_args=("params", "momentum_buffers"))
def proxsgd_op(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor],
               step: List[Tensor], lr: float, momentum: float, lambda_: float, regularizer: str,
               dims: Optional[List[int]], view: Optional[List[int]], reweight: bool,
               found_inf: Optional[Tensor], grad_scale: Optional[Tensor]) -> None:
    _backend().proxsgd(params, grads, momentum_buffers, step=step, lr=lr, momentum=momentum,
                       lambda_=lambda_, regularizer=regularizer, dims=dims, view=view,
                       reweight=reweight, capturable=True, found_inf=found_inf,
                       grad_scale=grad_scale)


for _op in (ramda_op, rmda_op, proxadamw_op, proxsgd_op):
    # in-place steps: nothing to compute for a fake tensor
    _op.register_fake(lambda *args, **kwargs: None)


_OPS = {"ramda": ramda_op, "rmda": rmda_op, "proxadamw": proxadamw_op, "proxsgd": proxsgd_op}


def op_args(name: str, lists, kwargs: dict, found_inf: Optional[Tensor], grad_scale: Optional[Tensor]):
    """``(op, args, kwargs)`` for functional ``name``'s capturable call: ``lists`` are
    its tensor lists in order, ``kwargs`` its other arguments."""
    kw = dict(kwargs)
    kw["step"] = list(kw["step"])
    if "alpha" in kw:
        kw["alpha"] = list(kw["alpha"])
    kw["dims"], kw["view"] = _ints(kw["dims"]), _ints(kw["view"])
    kw.update(found_inf=found_inf, grad_scale=grad_scale)
    return _OPS[name], [list(x) for x in lists], kw


def call(name: str, lists, kwargs: dict, found_inf: Optional[Tensor], grad_scale: Optional[Tensor]) -> list:
    """Run functional ``name``'s capturable call through its op (`op_args`); one
    ``None`` per tensor."""
    op, args, kw = op_args(name, lists, kwargs, found_inf, grad_scale)
    op(*args, **kw)
    return [None] * len(lists[0])
