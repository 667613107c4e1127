"""One step of each optimizer on a list of tensors (docs/math.md section 1), as a plain loop.

Every backend of ``ramda_kernels`` implements these four functions with the
same signature; this module is the oracle they are tested against.

Common conventions:

* ``params`` are updated in place; state tensors (``grad_sums``, ...) are
  updated in place and have the state dtype (fp32 for fp32/bf16/fp16
  parameters, fp64 for fp64); ``initial_points`` (read only) have the
  parameter's dtype (``Definition.state_dtype``; any floating dtype is read).
  All math runs in the state dtype; the parameter is rounded once when written.
* ``step`` is ``t`` of this step (already counted, ``t >= 1``); every tensor
  in one call shares it. RAMDA/RMDA also get ``alpha = alpha_t`` (including
  this step's ``s_t``). The numbers a step derives from them and the
  hyperparameters are ``ramda_ref.definitions``' named step scalars.
* ``dims`` (normalized per tensor), ``view`` and ``reweight`` describe the
  groups; ``regularizer`` is one of ``none, l1, group_lasso, nuclear``.
* Each function returns one entry per tensor: the solver's iterations per
  group, or ``None`` where the solve was closed form.

Capturable steps (``capturable=True``; NOTE: [capturable steps]): nothing is
read back to the host, so the call can run inside a CUDA graph.

* ``step`` holds one counted step per tensor (a 1-D float32 tensor, or a
  list of 0-d tensors, on the tensors' device) and RAMDA/RMDA's ``alpha``
  one ``alpha_t`` per tensor (float64); every step-derived scalar is
  computed from them with tensor ops, in float64 like the numbers of the
  non-capturable call.
* ``found_inf`` (optional 0-d tensor): when nonzero the call writes nothing,
  parameters and state stay bitwise unchanged. The caller keeps the step
  counters where they were (the optimizer does, see ``ramda_ref.optim``).
* ``grad_scale`` (optional 0-d tensor): gradients are divided by it (as
  ``torch.amp.GradScaler`` hands it to fused optimizers).
* ``nuclear`` and ``pg_stop="rtol"`` raise (NOTE: [capturable solves] in
  ``prox.py``).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from . import definitions as D
from .groups import grouped_view, normalize_dims
from .prox import prox_scalar, refuse_capturable, solve_subproblem

Tensors = List[torch.Tensor]


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """fp64 state for fp64 parameters, fp32 state for everything else (the math's
    dtype; W0 is kept in the parameter's, ``Definition.state_dtype``)."""
    return D.float_state_dtype(param.dtype)


def _group_dims(x: torch.Tensor, regularizer: str, dims, view) -> tuple:
    if regularizer != "group_lasso":
        return ()
    return normalize_dims(dims, grouped_view(x, view).dim())


def _write(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.reshape(param.shape))


def _axpy_(x: torch.Tensor, a, y: torch.Tensor) -> None:
    """``x += a * y`` for a number or a 0-d tensor ``a``."""
    if isinstance(a, torch.Tensor):
        x.add_(y * a)
    else:
        x.add_(y, alpha=a)


# NOTE: [capturable steps]
# With capturable=True a functional works on private copies of each tensor's
# parameter and state and commits them with torch.where(keep, new, old), keep
# being found_inf == 0 on the device: a skipped step leaves everything bitwise
# unchanged without the host knowing it was skipped. Numbers that depend on
# the step are 0-d float64 tensors (the non-capturable call's Python floats
# are float64 too), used where the non-capturable call uses the number.

class _Capture:
    """The capturable part of one call: per-tensor step/alpha, the keep flag,
    the gradient scale. ``None`` for a non-capturable call (see `_capture`)."""

    def __init__(self, step, alpha, found_inf, grad_scale):
        self.step, self.alpha = step, alpha
        self.keep = None if found_inf is None else found_inf == 0
        self.grad_scale = grad_scale

    def t(self, i: int) -> torch.Tensor:
        """``t`` of tensor ``i`` as a 0-d float64 tensor."""
        return self.step[i].double()

    def grad(self, g: torch.Tensor) -> torch.Tensor:
        return g if self.grad_scale is None else g / self.grad_scale

    def private(self, *tensors: torch.Tensor) -> List[torch.Tensor]:
        """Tensors to update: copies when a step may be skipped, else the tensors."""
        if self.keep is None:
            return list(tensors)
        return [t.clone(memory_format=torch.preserve_format) for t in tensors]

    def commit(self, targets: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        if self.keep is None:
            return
        for target, value in zip(targets, values):
            target.copy_(torch.where(self.keep, value, target))


def _capture(capturable: bool, n: int, step, alpha, found_inf, grad_scale, regularizer: str,
             solver: str = "exact", pg_stop: str = "inexact") -> Optional[_Capture]:
    if not capturable:
        if found_inf is not None or grad_scale is not None:
            raise ValueError("found_inf and grad_scale are taken with capturable=True only "
                             "(a non-capturable call divides and skips before it is made)")
        return None
    refuse_capturable(regularizer, solver, pg_stop)
    for name, value in (("step", step), ("alpha", alpha)):
        if value is not None and (isinstance(value, (int, float)) or len(value) != n):
            raise ValueError(f"capturable=True takes {name} as one 0-d tensor per parameter "
                             f"({n}), got {type(value).__name__}")
    return _Capture(step, alpha, found_inf, grad_scale)


def _sigmas(sigmas: Tensors, n: int) -> List[Optional[torch.Tensor]]:
    """One warm-start sigma per tensor, or ``None`` each when the list is empty
    (no exact group-lasso solve: nothing kept)."""
    if len(sigmas) == 0:
        return [None] * n
    if len(sigmas) != n:
        raise ValueError(f"sigmas has {len(sigmas)} tensors but params has {n} (one per "
                         f"parameter, or none)")
    return list(sigmas)


def _no_host_reads(cap: Optional[_Capture], p: torch.Tensor) -> bool:
    """Solve without reading values back: capturable calls, and meta tensors
    (which hold no values; a meta step gives the shapes, as torch's AdamW does)."""
    return cap is not None or p.is_meta


def ramda(params: Tensors, grads: Tensors, initial_points: Tensors, grad_sums: Tensors,
          grad_sum_sqs: Tensors, sigmas: Tensors = (), *, step: int, alpha: float, lr: float, momentum: float,
          epsilon: float, lambda_: float, regularizer: str, dims, view, reweight: bool,
          solver: str, max_iters: int, rtol: float, pg_stop: str, pg_eps: float,
          capturable: bool = False, found_inf: Optional[torch.Tensor] = None,
          grad_scale: Optional[torch.Tensor] = None) -> List[Optional[torch.Tensor]]:
    """RAMDA (paper Algorithm 1)::

        s_t = lr sqrt(t);  V += s_t g;  U += s_t g*g;  d = cbrt(U) + eps
        W~  = argmin <V, W> + 1/2 sum d (W - W0)^2 + alpha_t lambda psi(W)
            = argmin sum(1/2 d W^2 - z W) + tau psi(W),  z = d W0 - V,  tau = alpha_t lambda
        p   = (1 - c) p + c W~

    ``sigmas`` (group lasso with the exact solve; empty otherwise): each
    group's sigma, the Newton warm start, updated in place (`_sigmas`).
    """
    cap = _capture(capturable, len(params), step, alpha, found_inf, grad_scale, regularizer,
                   solver, pg_stop)
    hp = dict(lr=lr, momentum=momentum, epsilon=epsilon, lambda_=lambda_, pg_eps=pg_eps)
    if cap is None:
        sc = D.RAMDA.scalars(step, alpha, hp)
    iterations = []
    sigmas = _sigmas(sigmas, len(params))
    for i, (p, g, w0, v, u) in enumerate(zip(params, grads, initial_points, grad_sums, grad_sum_sqs)):
        sig = sigmas[i]
        if cap is not None:
            sc = D.RAMDA.scalars(cap.t(i), cap.alpha[i], hp)
            g = cap.grad(g)
            targets = (p, v, u) + ((sig,) if sig is not None else ())
            private = cap.private(*targets)
            p, v, u = private[:3]
            sig = private[3] if sig is not None else None
        s = sc["s"]
        g = g.to(v.dtype)
        w0 = w0.to(v.dtype)  # exact: W0 holds values of the parameter's dtype
        _axpy_(v, s, g)
        if isinstance(s, torch.Tensor):
            u.add_(g * g * s)
        else:
            u.addcmul_(g, g, value=s)
        d = u.pow(1.0 / 3.0) + sc["epsilon"]
        z = d * w0 - v
        x = p.to(v.dtype)
        w, it = solve_subproblem(
            grouped_view(z, view), grouped_view(d, view), sc["tau"], regularizer=regularizer,
            dims=_group_dims(p, regularizer, dims, view), reweight=reweight, solver=solver,
            x0=grouped_view(x, view), anchor=grouped_view(w0, view), max_iters=max_iters,
            pg_stop=pg_stop, eps_t=sc["eps_t"], rtol=rtol, capturable=_no_host_reads(cap, p),
            sigma=sig)
        _write(p, sc["keep"] * x + sc["c"] * w.reshape(x.shape))
        if cap is not None:
            cap.commit(targets, private)
        iterations.append(it)
    return iterations


def rmda(params: Tensors, grads: Tensors, initial_points: Tensors, grad_sums: Tensors, *,
         step: int, alpha: float, lr: float, momentum: float, lambda_: float, regularizer: str,
         dims, view, reweight: bool, capturable: bool = False,
         found_inf: Optional[torch.Tensor] = None, grad_scale: Optional[torch.Tensor] = None
         ) -> List[Optional[torch.Tensor]]:
    """RMDA: RAMDA with the scalar preconditioner ``beta_t = sqrt(t)``::

        V += s_t g;  W~ = prox_{(alpha_t/beta_t) lambda psi}(W0 - V/beta_t);  p = (1-c) p + c W~
    """
    cap = _capture(capturable, len(params), step, alpha, found_inf, grad_scale, regularizer)
    hp = dict(lr=lr, momentum=momentum, lambda_=lambda_)
    if cap is None:
        sc = D.RMDA.scalars(step, alpha, hp)
    for i, (p, g, w0, v) in enumerate(zip(params, grads, initial_points, grad_sums)):
        if cap is not None:
            sc = D.RMDA.scalars(cap.t(i), cap.alpha[i], hp)
            g = cap.grad(g)
            targets = (p, v)
            p, v = cap.private(*targets)
        _axpy_(v, sc["s"], g.to(v.dtype))
        y = grouped_view(w0.to(v.dtype) - v / sc["beta"], view)
        w = prox_scalar(y, sc["thr"], regularizer, _group_dims(p, regularizer, dims, view), reweight)
        x = p.to(v.dtype)
        _write(p, sc["keep"] * x + sc["c"] * w.reshape(x.shape))
        if cap is not None:
            cap.commit(targets, (p, v))
    return [None] * len(params)


def proxadamw(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
              max_exp_avg_sqs: Tensors, sigmas: Tensors = (), *, step: int, lr: float, beta1: float, beta2: float,
              epsilon: float, weight_decay: float, amsgrad: bool, lambda_: float,
              regularizer: str, dims, view, reweight: bool, solver: str, max_iters: int,
              rtol: float, pg_stop: str, pg_eps: float, capturable: bool = False,
              found_inf: Optional[torch.Tensor] = None, grad_scale: Optional[torch.Tensor] = None
              ) -> List[Optional[torch.Tensor]]:
    """ProxAdamW (ProxGen with an AdamW base)::

        p  = p (1 - lr wd);  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g*g  (amsgrad: vmax = max(vmax, v))
        d  = sqrt(v) / sqrt(1 - b2^t) + eps
        W~ = argmin <(lr/(1-b1^t)) m, W - p> + 1/2 sum d (W - p)^2 + lr lambda psi(W);  p = W~

    ``max_exp_avg_sqs`` is empty unless ``amsgrad``; ``sigmas`` as in `ramda`.
    """
    cap = _capture(capturable, len(params), step, None, found_inf, grad_scale, regularizer,
                   solver, pg_stop)
    hp = dict(lr=lr, beta1=beta1, beta2=beta2, epsilon=epsilon, weight_decay=weight_decay,
              lambda_=lambda_, pg_eps=pg_eps)
    if cap is None:
        sc = D.PROXADAMW.scalars(step, None, hp)
    maxes = max_exp_avg_sqs if amsgrad else [None] * len(params)
    sigmas = _sigmas(sigmas, len(params))
    iterations = []
    for i, (p, g, m, v, vmax) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, maxes)):
        sig = sigmas[i]
        if cap is not None:
            sc = D.PROXADAMW.scalars(cap.t(i), None, hp)
            g = cap.grad(g)
            targets = (p, m, v) + ((vmax,) if amsgrad else ()) + ((sig,) if sig is not None else ())
            private = cap.private(*targets)  # updated in place below
            p, m, v = private[:3]
            vmax = private[3] if amsgrad else None
            sig = private[-1] if sig is not None else None
        g = g.to(m.dtype)
        x = p.to(m.dtype) * sc["decay"]
        m.mul_(sc["beta1"]).add_(g, alpha=sc["one_minus_beta1"])
        v.mul_(sc["beta2"]).addcmul_(g, g, value=sc["one_minus_beta2"])
        if amsgrad:
            torch.maximum(vmax, v, out=vmax)
            v = vmax
        d = v.sqrt() / sc["bias2_sqrt"] + sc["epsilon"]
        z = d * x - sc["step_size"] * m
        w, it = solve_subproblem(
            grouped_view(z, view), grouped_view(d, view), sc["tau"], regularizer=regularizer,
            dims=_group_dims(p, regularizer, dims, view), reweight=reweight, solver=solver,
            x0=grouped_view(x, view), anchor=grouped_view(x, view), max_iters=max_iters,
            pg_stop=pg_stop, eps_t=sc["eps_t"], rtol=rtol, capturable=_no_host_reads(cap, p),
            sigma=sig)
        _write(p, w)
        if cap is not None:
            cap.commit(targets, private)
        iterations.append(it)
    return iterations


def proxsgd(params: Tensors, grads: Tensors, momentum_buffers: Tensors, *, step: int,
            lr: float, momentum: float, lambda_: float, regularizer: str, dims, view,
            reweight: bool, capturable: bool = False, found_inf: Optional[torch.Tensor] = None,
            grad_scale: Optional[torch.Tensor] = None) -> List[Optional[torch.Tensor]]:
    """ProxSGD: ``buf = (1-c) buf + c g`` (``buf = c g`` at the first step, the
    buffer starting at zero), then ``p = prox_{lr lambda psi}(p - lr buf)``."""
    cap = _capture(capturable, len(params), step, None, found_inf, grad_scale, regularizer)
    sc = D.PROXSGD.scalars(step, None, dict(lr=lr, momentum=momentum, lambda_=lambda_))
    for p, g, buf in zip(params, grads, momentum_buffers):
        if cap is not None:
            g = cap.grad(g)
            targets = (p, buf)
            p, buf = cap.private(*targets)
        buf.mul_(sc["keep"]).add_(g.to(buf.dtype), alpha=sc["c"])
        y = grouped_view(p.to(buf.dtype) - sc["lr"] * buf, view)
        _write(p, prox_scalar(y, sc["thr"], regularizer, _group_dims(p, regularizer, dims, view),
                              reweight))
        if cap is not None:
            cap.commit(targets, (p, buf))
    return [None] * len(params)


__all__ = ["ramda", "rmda", "proxadamw", "proxsgd", "state_dtype"]
