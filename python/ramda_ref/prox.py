"""The proximal subproblem every optimizer reduces to (docs/math.md sections 2-5).

For one parameter tensor, with a diagonal preconditioner ``d > 0``::

    minimize over w:   sum_i ( 1/2 d_i w_i^2 - z_i w_i )  +  tau * psi(w)

`solve_subproblem` returns the minimizer and how many iterations each group
took. Everything is plain torch, computed in the dtype of ``z`` (fp32 for
fp32/bf16/fp16 parameters, fp64 for fp64), one tensor at a time.

The reference favours being obviously right over being fast: its iterative
loops stop when every group has converged, which reads a flag back to the
host. The fused backends run the same iterations without doing that; so does
the reference with ``capturable=True`` (NOTE: [capturable solves]).

NOTE: [capturable solves]
With ``capturable=True`` nothing here reads a value back to the host: the
threshold may be a 0-d tensor (never compared with 0 on the host), and the
Newton and PG loops run their full cap with converged groups masked, which
gives the same result as stopping early (a masked group no longer changes).
The two solves whose stopping needs the host stay refused: ``pg_stop="rtol"``
(a whole-tensor objective compared every iteration) and ``nuclear`` (an SVD,
which checks its convergence on the host).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

from .groups import group_max, group_min, group_norm, group_size, group_sum, group_weights, normalize_dims

REGULARIZERS = ("none", "l1", "group_lasso", "nuclear")
SOLVERS = ("exact", "pg")
PG_STOPS = ("inexact", "rtol")

#: Newton on the secular equation converges quadratically from the right;
#: this cap is never reached in practice (docs/math.md section 4: ~8 steps at d spread 1e6).
NEWTON_MAX_ITERS = 50


def newton_tolerance(dtype: torch.dtype) -> float:
    """Relative change of sigma under which the Newton solve stops."""
    return 4.0 * torch.finfo(dtype).eps


def inexact_tolerance(pg_eps: float, step):
    """The paper's summable schedule ``eps_t = eps_0 * t^-0.6`` (sum of eps_t^2 < inf).

    ``step`` may be a tensor (capturable steps): the result is then a tensor,
    computed in float64 like the number it stands for.
    """
    if isinstance(step, torch.Tensor):
        return pg_eps * step.double().pow(-0.6)
    return pg_eps * float(step) ** -0.6


def _is_zero(thr) -> bool:
    """``thr == 0`` for a number; ``False`` for a tensor, which is not read on the
    host (NOTE: [capturable solves]): a zero tensor threshold goes through the
    solve, which then returns ``z / d`` as the shortcut would."""
    return not isinstance(thr, torch.Tensor) and thr == 0


def refuse_capturable(regularizer: str, solver: str, pg_stop: str) -> None:
    """Raise for a solve that cannot run without reading the host (NOTE: [capturable solves])."""
    if regularizer == "nuclear":
        raise ValueError("regularizer='nuclear' cannot run with capturable=True: its SVD checks "
                         "convergence on the host; use capturable=False for nuclear-norm groups")
    if regularizer in ("l1", "group_lasso") and solver == "pg" and pg_stop == "rtol":
        raise ValueError("pg_stop='rtol' cannot run with capturable=True: it compares a "
                         "whole-tensor objective on the host every iteration; use "
                         "pg_stop='inexact' (per-group, masked on the device)")


# ---------------------------------------------------------------------------
# Closed-form proximal operators (scalar step)
# ---------------------------------------------------------------------------

def soft_threshold(y: torch.Tensor, thr) -> torch.Tensor:
    """prox of ``thr * ||.||_1``: ``sign(y) * max(|y| - thr, 0)``."""
    return torch.sign(y) * torch.clamp(y.abs() - thr, min=0)


def group_soft_threshold(y: torch.Tensor, thr, dims: Tuple[int, ...]) -> torch.Tensor:
    """prox of ``thr * sum_g ||y_g||``: shrink every group's norm by ``thr``.

    ``thr`` may be a number or a tensor broadcastable to the group norms.
    """
    norm = group_norm(y, dims)
    scale = torch.clamp(norm - thr, min=0) / torch.where(norm > 0, norm, torch.ones_like(norm))
    return y * scale


def singular_value_threshold(y: torch.Tensor, thr) -> torch.Tensor:
    """prox of ``thr * ||Y||_*`` on the matrix ``y.reshape(y.shape[0], -1)``."""
    mat = y.reshape(y.shape[0], -1)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    s = torch.clamp(s - thr, min=0)
    return ((u * s.unsqueeze(-2)) @ vh).reshape(y.shape)


def prox_scalar(y: torch.Tensor, thr: float, regularizer: str, dims: Tuple[int, ...],
                reweight: bool) -> torch.Tensor:
    """``prox_{thr * psi}(y)``: the whole subproblem when ``d`` is one scalar.

    With ``d`` scalar, minimizing ``1/2 d ||w||^2 - <z, w> + tau psi(w)`` is
    ``prox_{(tau/d) psi}(z/d)``; RMDA and ProxSGD use this directly.
    """
    if regularizer == "none" or _is_zero(thr):
        return y
    if regularizer == "l1":
        return soft_threshold(y, thr)
    if regularizer == "group_lasso":
        return group_soft_threshold(y, thr * group_weights(y.shape, dims, reweight), dims)
    if regularizer == "nuclear":
        return singular_value_threshold(y, thr)
    raise ValueError(f"unknown regularizer {regularizer!r}")


# ---------------------------------------------------------------------------
# Exact solves with a diagonal preconditioner (docs/math.md section 4)
# ---------------------------------------------------------------------------

def exact_l1(z: torch.Tensor, d: torch.Tensor, tau: float) -> torch.Tensor:
    """Closed form of the l1 subproblem: ``sign(z) * max(|z| - tau, 0) / d``."""
    return soft_threshold(z, tau) / d


def exact_group_lasso(z: torch.Tensor, d: torch.Tensor, thr: float,
                      dims: Tuple[int, ...], capturable: bool = False,
                      sigma: Optional[torch.Tensor] = None):
    """Solve the group-lasso subproblem with threshold ``T = thr`` for every group.

    Returns ``(w, newton_iterations_per_group)``; with ``sigma`` (the previous
    sigma per group, shaped like the group norms or flat in their order, 0
    meaning none) ``(w, newton_iterations_per_group, sigma_new)``.

    A group with ``||z_g|| <= T`` is exactly zero. Otherwise
    ``w_g = z_g / (d_g + sigma)`` with ``sigma`` the root of the concave
    ``phi(sigma) = 1/||z_g/(d_g+sigma)|| - sigma/T``; Newton from the upper
    bound ``sigma_hi = T max(d_g) / (||z_g|| - T)`` decreases monotonically to
    the root. When ``max(d_g) == min(d_g)`` that bound is the root (group
    soft-threshold) and no iteration is taken.

    Warm start (docs/math.md section 4, item 5): a group with a previous
    ``sigma > 0`` takes its first step from ``s0 = sigma`` (`_warm_step`)
    instead of from ``sigma_hi``; that step counts as one iteration. ``sigma_new`` is the root of every nonzero group (``sigma_hi``
    for constant ``d``) and the previous value of every zero group.

    ``capturable``: run all ``NEWTON_MAX_ITERS`` steps, masked, instead of
    stopping on a host read (NOTE: [capturable solves]).
    """
    znorm = group_norm(z, dims)
    iters = torch.zeros_like(znorm, dtype=torch.int32)
    previous = None if sigma is None else sigma.reshape(znorm.shape).to(znorm.dtype)
    if _is_zero(thr):
        return (z / d, iters) if sigma is None else (z / d, iters, previous)
    active = znorm > thr
    excess = torch.where(active, znorm - thr, torch.ones_like(znorm))
    dmax, dmin = group_max(d, dims), group_min(d, dims)
    sigma_hi = thr * dmax / excess
    sigma_cur = sigma_hi
    done = ~active | (dmax == dmin)
    tol = newton_tolerance(z.dtype)
    # the step is scale-free in z: take it on unit-norm groups (NOTE: [secular
    # equation without cancellation])
    safe_norm = torch.where(active, znorm, torch.ones_like(znorm))
    zeta, rel_excess = z / safe_norm, excess / safe_norm
    if previous is not None:
        warm = ~done & (previous > 0)
        if capturable or bool(warm.any()):
            s0 = torch.where(warm, previous, sigma_hi)
            start, stop = _warm_step(zeta, d, s0, sigma_hi, rel_excess, dims, tol)
            sigma_cur = torch.where(warm, start, sigma_hi)
            iters += warm.to(torch.int32)
            done = done | (warm & stop)
    for _ in range(NEWTON_MAX_ITERS):
        if not capturable and bool(done.all()):
            break
        delta = _newton_step(zeta, d, sigma_cur, rel_excess, dims)
        # Right of the root delta > 0; a computed delta <= 0 (or NaN) means phi
        # is at its rounding floor: sigma is the root.
        step = ~done
        sigma_cur = torch.where(step & (delta > 0), sigma_cur - delta, sigma_cur)
        iters += step.to(torch.int32)
        done = done | ~(delta > tol * sigma_cur)
    w = torch.where(active, z / (d + sigma_cur), torch.zeros_like(z))
    if sigma is None:
        return w, iters
    kept = previous if previous is not None else torch.zeros_like(znorm)
    return w, iters, torch.where(active, sigma_cur, kept)


def _newton_parts(zeta, d, sigma, rel_excess, dims):
    """``(f, ||v||, a, b)`` of NOTE: [secular equation without cancellation] at
    ``sigma``: ``phi(sigma)`` has the sign of ``-f`` and ``phi'(sigma)`` that
    of ``-(a + f b / ||v||)``; the Newton step is ``sigma f ||v|| / (a + f b / ||v||)``."""
    denom = d + sigma
    v = zeta * (sigma / denom)
    u = zeta * (d / denom)
    a = group_sum(v * v * (d / denom), dims)
    b = group_sum(v * v * (sigma / denom), dims)
    vn = torch.sqrt(a + b)
    f = rel_excess - group_sum(u * (zeta + v), dims) / (1.0 + vn)
    return f, vn, a, b


def _newton_step(zeta, d, sigma, rel_excess, dims):
    """The Newton step ``phi(sigma) / phi'(sigma)`` of `exact_group_lasso`, per group,
    from the unit-norm groups ``zeta = z/||z_g||`` and ``rel_excess = (||z_g|| - T)/||z_g||``.

    NOTE: [secular equation without cancellation]. Written as in docs/math.md section 4,
    ``phi = 1/r - sigma/T`` and ``phi' = sum(q^2/(d+sigma))/r^3 - 1/T`` are
    differences of two nearly equal numbers when ``||z_g||`` is just above ``T``
    (then sigma is huge): in fp32 the computed step can exceed sigma itself,
    sending sigma negative and ``w`` to the wrong sign; and ``r^3`` leaves the
    floating-point range for small or large ``z``. The same step, in terms of
    ``v = sigma*zeta/(d+sigma)``, ``f = ||v|| - T/||z_g||``,
    ``a = sum(v^2 d/(d+sigma))`` and ``b = sum(v^2 sigma/(d+sigma))``
    (so ``||v||^2 = a + b``), is::

        phi / phi' = sigma f ||v|| / (a + f b / ||v||)

    which has only same-signed sums of numbers at most 1; ``f`` is the exactly
    computed relative excess minus ``1 - ||v|| = <u, zeta + v> / (1 + ||v||)``
    with ``u = zeta - v = d*zeta/(d+sigma)``. For ``f >= 0`` the step lies in
    ``[0, sigma)``, so sigma stays positive.
    """
    f, vn, a, b = _newton_parts(zeta, d, sigma, rel_excess, dims)
    return sigma * f * vn / (a + f * b / vn)


def _warm_step(zeta, d, s0, sigma_hi, rel_excess, dims, tol):
    """The first Newton step from a warm start ``s0 > 0`` (docs/math.md section 4,
    item 5): ``(sigma, converged)`` per group. Every iterate is capped at
    ``sigma_hi`` (both are right of the root); a step capped there goes on as
    the cold solve.

    * ``phi(s0) <= 0`` (``f >= 0``, or NaN: phi at its rounding floor): right
      of the root, the plain monotone step of `exact_group_lasso`'s loop;
    * ``phi(s0) > 0`` and ``phi'(s0) < 0``: left of the root; by concavity the
      Newton step lands at or right of it, clamped to ``sigma_hi`` (also right
      of it); converged when it moved ``sigma`` by less than the tolerance;
    * otherwise (``phi'(s0) >= 0``, far left of the root): ``sigma_hi``, not converged.
    """
    f, vn, a, b = _newton_parts(zeta, d, s0, rel_excess, dims)
    denom = a + f * b / vn
    delta = s0 * f * vn / denom
    left = f < 0
    rising = left & (denom > 0)
    right_raw = torch.where(delta > 0, s0 - delta, s0)
    capped = ~(right_raw <= sigma_hi)
    right_new = torch.where(capped, sigma_hi, right_raw)
    left_new = torch.minimum(s0 - delta, sigma_hi)
    sigma = torch.where(~left, right_new, torch.where(rising, left_new, sigma_hi))
    converged = torch.where(~left, ~capped & ~(delta > tol * right_new),
                            rising & ~(left_new - s0 > tol * left_new))
    return sigma, converged


def kkt_residual(w: torch.Tensor, z: torch.Tensor, d: torch.Tensor, thr: float,
                 dims: Tuple[int, ...]) -> torch.Tensor:
    """Per-group optimality residual of the group-lasso subproblem, relative to ``||z_g||``.

    Nonzero group: ``||d*w - z + T w/||w|| || / ||z_g||``.
    Zero group: ``max(||z_g|| - T, 0) / ||z_g||`` (0 iff ``0`` is optimal).
    """
    wn = group_norm(w, dims)
    zn = group_norm(z, dims)
    safe_wn = torch.where(wn > 0, wn, torch.ones_like(wn))
    res_nz = group_norm(d * w - z + thr * w / safe_wn, dims)
    res_zero = torch.clamp(zn - thr, min=0)
    res = torch.where(wn > 0, res_nz, res_zero)
    return res / torch.where(zn > 0, zn, torch.ones_like(zn))


# ---------------------------------------------------------------------------
# Proximal gradient (docs/math.md section 5, the paper's Algorithm 2)
# ---------------------------------------------------------------------------

def proximal_gradient(z: torch.Tensor, d: torch.Tensor, x0: torch.Tensor, *,
                      prox: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                      penalty: Callable[[torch.Tensor], torch.Tensor],
                      theta: torch.Tensor, gdims: Tuple[int, ...],
                      frozen: Optional[torch.Tensor], max_iters: int, stop: str,
                      eps_t: float, rtol: float, anchor: Optional[torch.Tensor],
                      capturable: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run ``Z <- prox_theta(Z - theta * (d*Z - z))`` from ``x0``, per group.

    ``theta = 1/max(d_g)`` is shaped like the group norms over ``gdims``;
    ``prox(Y, theta)`` is the regularizer's prox with step ``theta``;
    ``penalty(Z)`` is ``tau * psi(Z)`` (used only by the ``rtol`` rule);
    ``frozen`` marks groups already known to be exactly zero (screened).

    Stopping, ``stop="inexact"`` (the paper's eq. 7): group ``g`` stops once
    ``s_g = (1/theta - d) * (Z_j - Z_{j+1})``, an element of the subdifferential
    of the objective at ``Z_{j+1}``, has ``||s_g|| <= eps_t * sqrt(|g| / n)``;
    together the groups then satisfy ``||s|| <= eps_t``.
    ``stop="rtol"`` (the authors' rule): the whole tensor stops when the
    objective, written around ``anchor`` as the authors write it,
    ``<d*a - z, Z - a> + 1/2 <Z - a, d (Z - a)> + tau psi(Z)``, decreases by
    less than ``rtol * (|Q| + 1)``, after at least two iterations.

    ``capturable``: the ``inexact`` rule runs all ``max_iters`` iterations with
    stopped groups masked (NOTE: [capturable solves]); ``rtol`` is refused.

    Returns ``(Z, iterations_per_group)``.
    """
    if capturable and stop == "rtol":
        refuse_capturable("l1", "pg", stop)
    n = z.numel()
    shape = theta.shape
    iters = torch.zeros_like(theta, dtype=torch.int32)
    active = torch.ones_like(theta, dtype=torch.bool)
    if frozen is not None:
        active &= ~frozen
    zeros = torch.zeros_like(z)
    Z = torch.where(active, x0, zeros)
    if n == 0:
        return Z, iters
    a = zeros if anchor is None else anchor

    def objective(w):
        diff = w - a
        return float((diff * (d * a - z)).sum() + 0.5 * (d * diff * diff).sum() + penalty(w))

    gsize = n // shape.numel()
    tol_g = eps_t * math.sqrt(gsize / n)
    previous = objective(Z) if stop == "rtol" else None
    for j in range(max_iters):
        if not capturable and not bool(active.any()):
            break
        Znew = prox(Z - theta * (d * Z - z), theta)
        Znew = torch.where(active, Znew, Z)
        iters += active.to(torch.int32)
        if stop == "inexact":
            s = (1.0 / theta - d) * (Z - Znew)
            active &= group_norm(s, gdims) > tol_g
            Z = Znew
        else:
            Z = Znew
            current = objective(Z)
            if j > 0 and (previous - current) / (abs(current) + 1.0) < rtol:
                break
            previous = current
    return Z, iters


# ---------------------------------------------------------------------------
# The one entry point
# ---------------------------------------------------------------------------

def solve_subproblem(z: torch.Tensor, d: torch.Tensor, tau: float, *, regularizer: str,
                     dims: Tuple[int, ...], reweight: bool = True, solver: str = "exact",
                     x0: Optional[torch.Tensor] = None, anchor: Optional[torch.Tensor] = None,
                     max_iters: int = 100, pg_stop: str = "inexact", eps_t: float = 1e-3,
                     rtol: float = 1e-8, capturable: bool = False,
                     sigma: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Minimize ``sum(1/2 d w^2 - z w) + tau * psi(w)`` for one tensor.

    ``dims`` are the normalized group dims (group_lasso only). ``x0`` is PG's
    warm start (the current weights). Returns ``(w, iterations)``:
    iterations per group for group_lasso (Newton steps for ``exact``, PG steps
    for ``pg``), one count for the whole tensor for PG on l1/nuclear, and
    ``None`` for closed forms.

    ``nuclear`` has no closed form with a non-scalar ``d``: it always runs PG
    with an SVD per iteration, whatever ``solver`` says.

    ``capturable``: ``tau`` and ``eps_t`` may be 0-d tensors and nothing is
    read back to the host (NOTE: [capturable solves]).

    ``sigma``: the exact group-lasso solve's warm start, one value per group in
    the order of ``group_norm(z, dims).flatten()`` (0: none), updated in place
    with the sigma each group ended with (docs/math.md section 4, item 5);
    ignored by every other solve.
    """
    if regularizer == "none" or _is_zero(tau) or z.numel() == 0:
        return z / d, None
    if capturable:
        refuse_capturable(regularizer, solver, pg_stop)
    if regularizer == "l1" and solver == "exact":
        return exact_l1(z, d, tau), None
    if regularizer == "group_lasso" and solver == "exact":
        thr = tau * group_weights(z.shape, dims, reweight)
        if sigma is None:
            return exact_group_lasso(z, d, thr, dims, capturable)
        groups = z.numel() // group_size(z.shape, dims)
        if sigma.numel() != groups:
            raise ValueError(f"sigma has {sigma.numel()} values for {groups} groups (one per "
                             f"group of the grouped view {tuple(z.shape)} over dims {dims})")
        w, iters, new = exact_group_lasso(z, d, thr, dims, capturable, sigma=sigma)
        sigma.copy_(new.reshape(sigma.shape))
        return w, iters

    if x0 is None:
        raise ValueError("the pg solver needs a warm start x0")
    common = dict(max_iters=max_iters, stop=pg_stop, eps_t=eps_t, rtol=rtol, anchor=anchor,
                  capturable=capturable)
    if regularizer == "group_lasso":
        thr = tau * group_weights(z.shape, dims, reweight)
        theta = 1.0 / group_max(d, dims)
        return proximal_gradient(
            z, d, x0, theta=theta, gdims=dims, frozen=group_norm(z, dims) <= thr,
            prox=lambda y, th: group_soft_threshold(y, th * thr, dims),
            penalty=lambda w: thr * group_norm(w, dims).sum(), **common)
    whole = tuple(range(z.dim()))
    theta = 1.0 / group_max(d, whole)
    if regularizer == "l1":
        return proximal_gradient(
            z, d, x0, theta=theta, gdims=whole, frozen=None,
            prox=lambda y, th: soft_threshold(y, th * tau),
            penalty=lambda w: tau * w.abs().sum(), **common)
    if regularizer == "nuclear":
        return proximal_gradient(
            z, d, x0, theta=theta, gdims=whole, frozen=None,
            prox=lambda y, th: singular_value_threshold(y, (th * tau).reshape(())),
            penalty=lambda w: tau * torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord="nuc"),
            **common)
    raise ValueError(f"unknown regularizer {regularizer!r}")


__all__ = [
    "REGULARIZERS", "SOLVERS", "PG_STOPS", "NEWTON_MAX_ITERS", "newton_tolerance",
    "inexact_tolerance", "refuse_capturable", "soft_threshold", "group_soft_threshold", "singular_value_threshold",
    "prox_scalar", "exact_l1", "exact_group_lasso", "kkt_residual", "proximal_gradient",
    "solve_subproblem", "normalize_dims", "group_size",
]
