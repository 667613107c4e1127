"""Helpers shared by the reference tests: verbose comparisons and independent math.

Everything mathematical here is written from docs/math.md with numpy / explicit
per-group loops, not with ``ramda_ref``'s own helpers, so that a test built on
it can fail when the reference is wrong.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def assert_close(actual, expected, *, rtol: float = 0.0, atol: float = 0.0, msg: str = "") -> None:
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise, or a report of
    how many elements fail, the worst one (index, both values, error) and the
    largest absolute and relative errors."""
    a, e = _np(actual), _np(expected)
    assert a.shape == e.shape, f"{msg}: shape {a.shape} != expected {e.shape}"
    if a.size == 0:
        return
    err = np.abs(a - e)
    bound = atol + rtol * np.abs(e)
    bad = ~(err <= bound)  # NaN counts as a failure
    if not bad.any():
        return
    excess = np.where(bad, np.nan_to_num(err - bound, nan=np.inf), -np.inf)
    idx = np.unravel_index(int(np.argmax(excess)), a.shape)
    rel = err / np.maximum(np.abs(e), np.finfo(np.float64).tiny)
    raise AssertionError(
        f"{msg}: {int(bad.sum())} of {a.size} elements differ (rtol={rtol:g}, atol={atol:g}); "
        f"worst at index {tuple(int(i) for i in idx)}: actual {a[idx]!r}, expected {e[idx]!r}, "
        f"|diff| {err[idx]:.3e}; max |diff| {np.nanmax(err):.3e}, max rel {np.nanmax(rel):.3e}")


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """Same dtype, shape and bits (NaNs with equal payload compare equal)."""
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    # reshape(-1): a 0-d tensor (a capturable step counter) cannot be viewed as bytes
    a = actual.detach().contiguous().reshape(-1).view(torch.uint8) if actual.numel() else actual
    e = expected.detach().contiguous().reshape(-1).view(torch.uint8) if expected.numel() else expected
    if torch.equal(a, e):
        return
    diff = (actual.detach().double() - expected.detach().double()).abs()
    differ = actual.detach() != expected.detach()
    idx = np.unravel_index(int(torch.argmax(differ.to(torch.int8).flatten())), tuple(actual.shape))
    raise AssertionError(
        f"{msg}: {int(differ.sum())} of {actual.numel()} elements differ bitwise; first at "
        f"{tuple(int(i) for i in idx)}: {actual[idx].item()!r} vs {expected[idx].item()!r}; "
        f"max |diff| {diff.max().item():.3e}")


def assert_state_equal(a: dict, b: dict, msg: str = "") -> None:
    """Two optimizer states (per-parameter dicts) are identical, tensors bitwise."""
    assert a.keys() == b.keys(), f"{msg}: state keys {sorted(a)} != {sorted(b)}"
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert_bitwise_equal(a[k], b[k], f"{msg} state[{k!r}]")
        else:
            assert a[k] == b[k], f"{msg} state[{k!r}]: {a[k]!r} != {b[k]!r}"


def log_uniform(shape, low: float, high: float, gen: torch.Generator,
                dtype=torch.float64) -> torch.Tensor:
    """Values spread log-uniformly over ``[low, high]``."""
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    return torch.exp(math.log(low) + u * (math.log(high) - math.log(low))).to(dtype)


# ---------------------------------------------------------------------------
# Groups written out by hand: move the non-reduced dims to the front.
# ---------------------------------------------------------------------------

def to_groups(x, dims: Sequence[int]) -> np.ndarray:
    """``[n_groups, group_size]`` array; row ``k`` holds the elements of group ``k``
    (the groups enumerated in C order over the kept dims)."""
    a = _np(x)
    dims = [d % a.ndim for d in dims]
    keep = [i for i in range(a.ndim) if i not in dims]
    moved = np.transpose(a, keep + dims)
    n_groups = int(np.prod([a.shape[i] for i in keep])) if keep else 1
    return moved.reshape(n_groups, -1)


def from_groups(rows: np.ndarray, shape: Sequence[int], dims: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`to_groups`."""
    ndim = len(shape)
    dims = [d % ndim for d in dims]
    keep = [i for i in range(ndim) if i not in dims]
    order = keep + dims
    moved = rows.reshape([shape[i] for i in order])
    return np.transpose(moved, np.argsort(order))


def kkt_residual_np(w, z, d, T: float, dims: Sequence[int]) -> np.ndarray:
    """Per-group relative KKT residual of ``min sum(1/2 d w^2 - z w) + T sum_g ||w_g||``,
    written from the optimality condition ``0 in d*w - z + T * subdiff||w_g||``:
    nonzero group ``||d w - z + T w/||w|| || / ||z||``; zero group: distance of
    ``z`` from the ball of radius T, ``max(||z|| - T, 0) / ||z||``."""
    W, Z, D = to_groups(w, dims), to_groups(z, dims), to_groups(d, dims)
    out = np.empty(W.shape[0])
    for k in range(W.shape[0]):
        wn, zn = math.sqrt(float(np.sum(W[k] ** 2))), math.sqrt(float(np.sum(Z[k] ** 2)))
        if wn > 0:
            r = math.sqrt(float(np.sum((D[k] * W[k] - Z[k] + T * W[k] / wn) ** 2)))
        else:
            r = max(zn - T, 0.0)
        out[k] = r / zn if zn > 0 else r
    return out


def min_norm_subgradient(w, z, d, T: float, dims: Sequence[int]) -> float:
    """Norm of the smallest element of the subdifferential of
    ``Q(w) = sum(1/2 d w^2 - z w) + T sum_g ||w_g||`` at ``w`` (unnormalized).
    Every ``s`` in the subdifferential has at least this norm."""
    W, Z, D = to_groups(w, dims), to_groups(z, dims), to_groups(d, dims)
    total = 0.0
    for k in range(W.shape[0]):
        wn = math.sqrt(float(np.sum(W[k] ** 2)))
        if wn > 0:
            total += float(np.sum((D[k] * W[k] - Z[k] + T * W[k] / wn) ** 2))
        else:
            total += max(math.sqrt(float(np.sum(Z[k] ** 2))) - T, 0.0) ** 2
    return math.sqrt(total)


def group_lasso_objective(w, z, d, T: float, dims: Sequence[int]) -> float:
    W, Z, D = to_groups(w, dims), to_groups(z, dims), to_groups(d, dims)
    return float(np.sum(0.5 * D * W * W - Z * W) + T * np.sum(np.sqrt(np.sum(W * W, axis=1))))


def group_lasso_bisect(z, d, T: float, dims: Sequence[int]) -> np.ndarray:
    """Exact preconditioned group-lasso solution by bisection on sigma (not Newton):
    zero if ``||z_g|| <= T``, else ``w = z/(d+sigma)`` with ``||w|| = T/sigma``."""
    Z, D = to_groups(z, dims), to_groups(d, dims)
    W = np.zeros_like(Z)
    for k in range(Z.shape[0]):
        zn = math.sqrt(float(np.sum(Z[k] ** 2)))
        if zn <= T:
            continue
        lo, hi = 0.0, T * float(D[k].max()) / (zn - T) * 2 + 1.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            # ||z/(d+sigma)|| * sigma - T is increasing in sigma
            if math.sqrt(float(np.sum((Z[k] / (D[k] + mid)) ** 2))) * mid < T:
                lo = mid
            else:
                hi = mid
        W[k] = Z[k] / (D[k] + 0.5 * (lo + hi))
    return from_groups(W, np.shape(_np(z)), dims)


def group_soft_threshold_np(y, thr: float, dims: Sequence[int]) -> np.ndarray:
    """``prox_{thr * sum_g ||.||}(y)`` group by group."""
    Y = to_groups(y, dims)
    out = np.zeros_like(Y)
    for k in range(Y.shape[0]):
        n = math.sqrt(float(np.sum(Y[k] ** 2)))
        if n > thr:
            out[k] = Y[k] * (1.0 - thr / n)
    return from_groups(out, np.shape(_np(y)), dims)


def soft_threshold_np(y, thr: float) -> np.ndarray:
    y = _np(y)
    return np.sign(y) * np.maximum(np.abs(y) - thr, 0.0)


def svt_np(y, thr: float) -> np.ndarray:
    """Singular value thresholding of ``y.reshape(y.shape[0], -1)``."""
    y = _np(y)
    u, s, vt = np.linalg.svd(y.reshape(y.shape[0], -1), full_matrices=False)
    return ((u * np.maximum(s - thr, 0.0)) @ vt).reshape(y.shape)


def assert_nuclear_optimal(w, z, d, tau: float, tol: float, msg: str = "") -> int:
    """Optimality of ``min sum(1/2 d w^2 - z w) + tau ||W||_*`` (W = w.reshape(rows, -1)):
    with ``W = U S V^T`` of rank r, ``G = (z - d*w)/tau`` must be ``U V^T + M`` with
    ``U^T M = 0``, ``M V = 0`` and ``||M||_2 <= 1``. Returns r."""
    W, Z, D = (_np(x).reshape(_np(x).shape[0], -1) for x in (w, z, d))
    u, s, vt = np.linalg.svd(W, full_matrices=False)
    r = int((s > tol * max(1.0, s.max(initial=0.0))).sum())
    U, V = u[:, :r], vt[:r].T
    G = (Z - D * W) / tau
    Pu, Pv = np.eye(W.shape[0]) - U @ U.T, np.eye(W.shape[1]) - V @ V.T
    assert_close(U.T @ G @ V, np.eye(r), atol=tol, msg=f"{msg}: U^T G V = I")
    assert_close(Pu @ G @ V, np.zeros((W.shape[0], r)), atol=tol, msg=f"{msg}: M V = 0")
    assert_close(U.T @ G @ Pv, np.zeros((r, W.shape[1])), atol=tol, msg=f"{msg}: U^T M = 0")
    spec = np.linalg.norm(Pu @ G @ Pv, 2) if min(Pu.shape[0], Pv.shape[0]) else 0.0
    assert spec <= 1 + tol, f"{msg}: ||M||_2 = {spec!r} > 1"
    return r


class TinyConvNet(torch.nn.Module):
    """A Conv2d(2->3, 3x3) and a Linear(12->4) on 2x4x4 inputs: the smallest
    net with one parameter of each grouped kind, for optimizer plumbing tests."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.fc = torch.nn.Linear(3 * 2 * 2, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))
