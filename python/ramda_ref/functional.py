"""One step of each optimizer on a list of tensors (SPEC section 1), as a plain loop.

Every backend of ``ramda_kernels`` implements these four functions with the
same signature; this module is the oracle they are tested against.

Common conventions:

* ``params`` are updated in place; state tensors (``initial_points``,
  ``grad_sums``, ...) are updated in place and have the state dtype (fp32 for
  fp32/bf16/fp16 parameters, fp64 for fp64). All math runs in the state dtype;
  the parameter is rounded once when written.
* ``step`` is ``t`` of this step (already counted, ``t >= 1``); every tensor
  in one call shares it. RAMDA/RMDA also get ``alpha = alpha_t`` (including
  this step's ``s_t``).
* ``dims`` (normalized per tensor), ``view`` and ``reweight`` describe the
  groups; ``regularizer`` is one of ``none, l1, group_lasso, nuclear``.
* Each function returns one entry per tensor: the solver's iterations per
  group, or ``None`` where the solve was closed form.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from .groups import grouped_view, normalize_dims
from .prox import inexact_tolerance, prox_scalar, solve_subproblem

Tensors = List[torch.Tensor]


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """fp64 state for fp64 parameters, fp32 state for everything else."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _group_dims(x: torch.Tensor, regularizer: str, dims, view) -> tuple:
    if regularizer != "group_lasso":
        return ()
    return normalize_dims(dims, grouped_view(x, view).dim())


def _write(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.reshape(param.shape))


def ramda(params: Tensors, grads: Tensors, initial_points: Tensors, grad_sums: Tensors,
          grad_sum_sqs: Tensors, *, step: int, alpha: float, lr: float, momentum: float,
          epsilon: float, lambda_: float, regularizer: str, dims, view, reweight: bool,
          solver: str, max_iters: int, rtol: float, pg_stop: str, pg_eps: float
          ) -> List[Optional[torch.Tensor]]:
    """RAMDA (paper Algorithm 1)::

        s_t = lr sqrt(t);  V += s_t g;  U += s_t g*g;  d = cbrt(U) + eps
        W~  = argmin <V, W> + 1/2 sum d (W - W0)^2 + alpha_t lambda psi(W)
            = argmin sum(1/2 d W^2 - z W) + tau psi(W),  z = d W0 - V,  tau = alpha_t lambda
        p   = (1 - c) p + c W~
    """
    s = lr * math.sqrt(step)
    tau = alpha * lambda_
    eps_t = inexact_tolerance(pg_eps, step)
    iterations = []
    for p, g, w0, v, u in zip(params, grads, initial_points, grad_sums, grad_sum_sqs):
        g = g.to(v.dtype)
        v.add_(g, alpha=s)
        u.addcmul_(g, g, value=s)
        d = u.pow(1.0 / 3.0) + epsilon
        z = d * w0 - v
        x = p.to(v.dtype)
        w, it = solve_subproblem(
            grouped_view(z, view), grouped_view(d, view), tau, regularizer=regularizer,
            dims=_group_dims(p, regularizer, dims, view), reweight=reweight, solver=solver,
            x0=grouped_view(x, view), anchor=grouped_view(w0, view), max_iters=max_iters,
            pg_stop=pg_stop, eps_t=eps_t, rtol=rtol)
        _write(p, (1.0 - momentum) * x + momentum * w.reshape(x.shape))
        iterations.append(it)
    return iterations


def rmda(params: Tensors, grads: Tensors, initial_points: Tensors, grad_sums: Tensors, *,
         step: int, alpha: float, lr: float, momentum: float, lambda_: float, regularizer: str,
         dims, view, reweight: bool) -> List[Optional[torch.Tensor]]:
    """RMDA: RAMDA with the scalar preconditioner ``beta_t = sqrt(t)``::

        V += s_t g;  W~ = prox_{(alpha_t/beta_t) lambda psi}(W0 - V/beta_t);  p = (1-c) p + c W~
    """
    s = lr * math.sqrt(step)
    beta = math.sqrt(step)
    thr = alpha * lambda_ / beta
    for p, g, w0, v in zip(params, grads, initial_points, grad_sums):
        v.add_(g.to(v.dtype), alpha=s)
        y = grouped_view(w0 - v / beta, view)
        w = prox_scalar(y, thr, regularizer, _group_dims(p, regularizer, dims, view), reweight)
        x = p.to(v.dtype)
        _write(p, (1.0 - momentum) * x + momentum * w.reshape(x.shape))
    return [None] * len(params)


def proxadamw(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
              max_exp_avg_sqs: Tensors, *, step: int, lr: float, beta1: float, beta2: float,
              epsilon: float, weight_decay: float, amsgrad: bool, lambda_: float,
              regularizer: str, dims, view, reweight: bool, solver: str, max_iters: int,
              rtol: float, pg_stop: str, pg_eps: float) -> List[Optional[torch.Tensor]]:
    """ProxAdamW (ProxGen with an AdamW base)::

        p  = p (1 - lr wd);  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g*g  (amsgrad: vmax = max(vmax, v))
        d  = sqrt(v) / sqrt(1 - b2^t) + eps
        W~ = argmin <(lr/(1-b1^t)) m, W - p> + 1/2 sum d (W - p)^2 + lr lambda psi(W);  p = W~

    ``max_exp_avg_sqs`` is empty unless ``amsgrad``.
    """
    bias1 = 1.0 - beta1 ** step
    bias2_sqrt = math.sqrt(1.0 - beta2 ** step)
    step_size = lr / bias1
    tau = lr * lambda_
    eps_t = inexact_tolerance(pg_eps, step)
    maxes = max_exp_avg_sqs if amsgrad else [None] * len(params)
    iterations = []
    for p, g, m, v, vmax in zip(params, grads, exp_avgs, exp_avg_sqs, maxes):
        g = g.to(m.dtype)
        x = p.to(m.dtype) * (1.0 - lr * weight_decay)
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        if amsgrad:
            torch.maximum(vmax, v, out=vmax)
            v = vmax
        d = v.sqrt() / bias2_sqrt + epsilon
        z = d * x - step_size * m
        w, it = solve_subproblem(
            grouped_view(z, view), grouped_view(d, view), tau, regularizer=regularizer,
            dims=_group_dims(p, regularizer, dims, view), reweight=reweight, solver=solver,
            x0=grouped_view(x, view), anchor=grouped_view(x, view), max_iters=max_iters,
            pg_stop=pg_stop, eps_t=eps_t, rtol=rtol)
        _write(p, w)
        iterations.append(it)
    return iterations


def proxsgd(params: Tensors, grads: Tensors, momentum_buffers: Tensors, *, step: int,
            lr: float, momentum: float, lambda_: float, regularizer: str, dims, view,
            reweight: bool) -> List[Optional[torch.Tensor]]:
    """ProxSGD: ``buf = (1-c) buf + c g`` (``buf = c g`` at the first step, the
    buffer starting at zero), then ``p = prox_{lr lambda psi}(p - lr buf)``."""
    thr = lr * lambda_
    for p, g, buf in zip(params, grads, momentum_buffers):
        buf.mul_(1.0 - momentum).add_(g.to(buf.dtype), alpha=momentum)
        y = grouped_view(p.to(buf.dtype) - lr * buf, view)
        _write(p, prox_scalar(y, thr, regularizer, _group_dims(p, regularizer, dims, view), reweight))
    return [None] * len(params)


__all__ = ["ramda", "rmda", "proxadamw", "proxsgd", "state_dtype"]
