"""The subproblem solvers of the reference (docs/math.md sections 2-5) against math.

Every check here is a closed form, an optimality (KKT) condition written out in
``_util``, a brute-force minimizer, or a high-precision solve; never the
reference's own output. Float64 throughout.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch

from ramda_ref import prox
from _util import (assert_close, group_lasso_bisect, group_lasso_objective, kkt_residual_np,
                   log_uniform, min_norm_subgradient, soft_threshold_np, svt_np, to_groups)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _problem(shape, dims, spread, seed, quantile=0.5):
    """Random ``z``, ``d`` spread log-uniformly over ``[1, spread]``, and a threshold
    ``T`` at the given quantile of the group norms (so about that fraction of the
    groups is zero)."""
    g = _gen(seed)
    z = torch.randn(shape, generator=g, dtype=F64)
    d = log_uniform(shape, 1.0, spread, g)
    norms = np.linalg.norm(to_groups(z, dims), axis=1)
    T = float(np.quantile(norms, quantile))
    return z, d, T


def _check_kkt(w, z, d, T, dims, tol=1e-10, msg=""):
    ours = kkt_residual_np(w, z, d, T, dims)
    assert ours.max() < tol, f"{msg}: own KKT residual {ours.max():.3e} (group {ours.argmax()}) >= {tol}"
    theirs = prox.kkt_residual(w, z, d, T, dims).flatten().numpy()
    assert theirs.max() < tol, f"{msg}: prox.kkt_residual {theirs.max():.3e} >= {tol}"


# ---------------------------------------------------------------------------
# Exact group lasso (docs/math.md section 4)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("spread", [1.0, 1e2, 1e6])
@pytest.mark.parametrize("shape,dims", [
    ((64, 512), (1,)),        # 64 groups of 512
    ((512, 64), (0,)),        # 64 groups of 512, strided (reduced dim first)
    ((8, 3, 5, 7), (1, 3)),   # 40 groups of 21 spread over the tensor
    ((33, 1), (1,)),          # group size 1
    ((9, 17), (0, 1)),        # a single group
])
def test_exact_group_lasso_kkt(spread, shape, dims):
    z, d, T = _problem(shape, dims, spread, seed=hash((shape, spread)) % 2**31)
    w, iters = prox.exact_group_lasso(z, d, T, dims)
    _check_kkt(w, z, d, T, dims, msg=f"spread {spread:g}")
    zero = np.linalg.norm(to_groups(z, dims), axis=1) <= T
    got_zero = np.all(to_groups(w, dims) == 0, axis=1)
    assert np.array_equal(zero, got_zero), "zero groups must be exactly those with ||z_g|| <= T"
    assert iters.shape == prox.group_norm(z, dims).shape
    assert int(iters.max()) <= 15, f"Newton took {int(iters.max())} steps at spread {spread:g}"
    # the same solution through the one entry point, with the paper's c_g = sqrt(|g|)
    c_g = math.sqrt(math.prod(shape[i] for i in dims))
    w2, _ = prox.solve_subproblem(z, d, T / c_g, regularizer="group_lasso", dims=dims)
    _check_kkt(w2, z, d, (T / c_g) * c_g, dims, msg="solve_subproblem")


def test_exact_group_lasso_matches_bisection():
    z, d, T = _problem((16, 40), (1,), 1e6, seed=3)
    w, _ = prox.exact_group_lasso(z, d, T, (1,))
    ref = group_lasso_bisect(z, d, T, (1,))
    assert_close(w, ref, rtol=1e-9, atol=1e-14, msg="Newton vs bisection")


def test_exact_group_lasso_constant_d_is_group_soft_threshold():
    g = _gen(5)
    z = torch.randn(20, 30, generator=g, dtype=F64)
    d = torch.full_like(z, 7.5)
    T = 5.0
    w, iters = prox.exact_group_lasso(z, d, T, (1,))
    zn = np.linalg.norm(z.numpy(), axis=1, keepdims=True)
    expected = np.where(zn > T, z.numpy() * (1 - T / zn) / 7.5, 0.0)
    assert_close(w, expected, rtol=1e-12, msg="constant d")
    assert int(iters.max()) == 0, "equal bounds need no Newton step"


def test_exact_group_size_one_is_l1():
    g = _gen(6)
    z = torch.randn(50, 1, generator=g, dtype=F64)
    d = log_uniform((50, 1), 1.0, 1e6, g)
    T = 0.7
    w, iters = prox.exact_group_lasso(z, d, T, (1,))
    assert_close(w, soft_threshold_np(z, T) / d.numpy(), rtol=1e-14, msg="size-1 groups")
    assert int(iters.max()) == 0


@pytest.mark.parametrize("kind", ["zeros", "below"])
def test_exact_all_groups_zero(kind):
    """The authors' solver fails here (docs/math.md section 8); every group must be exactly 0."""
    g = _gen(7)
    z = torch.zeros(6, 10, dtype=F64) if kind == "zeros" else 1e-3 * torch.randn(6, 10, generator=g, dtype=F64)
    d = log_uniform((6, 10), 1.0, 1e6, g)
    w, iters = prox.exact_group_lasso(z, d, 1.0, (1,))
    assert torch.equal(w, torch.zeros_like(w)) and not w.isnan().any()
    assert int(iters.max()) == 0
    w2, _ = prox.solve_subproblem(z, d, 1.0, regularizer="group_lasso", dims=(1,), solver="pg",
                                  x0=torch.randn(6, 10, generator=g, dtype=F64))
    assert torch.equal(w2, torch.zeros_like(w2)), "pg must also return exact zeros"


def _pythagorean_groups():
    """Groups whose norms are exact in floating point: (1,2,2)->3, (2,3,6)->7, (1,4,8)->9."""
    rows = [[1.0, 2.0, 2.0], [2.0, 3.0, 6.0], [1.0, 4.0, 8.0], [-2.0, 1.0, 2.0]]
    return torch.tensor(rows, dtype=F64), [3.0, 7.0, 9.0, 3.0]


def _mp_solve(zg, dg, T, digits=60):
    """sigma and w of one group to ``digits`` decimal digits (mpmath bisection)."""
    with mpmath.workdps(digits):
        z = [mpmath.mpf(float(v)) for v in zg]
        dd = [mpmath.mpf(float(v)) for v in dg]
        T = mpmath.mpf(T)
        f = lambda s: s * mpmath.sqrt(sum((zi / (di + s)) ** 2 for zi, di in zip(z, dd))) - T
        lo, hi = mpmath.mpf(0), mpmath.mpf(1)
        while f(hi) < 0:
            hi *= 2
        for _ in range(4 * digits):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
        s = (lo + hi) / 2
        return [float(zi / (di + s)) for zi, di in zip(z, dd)]


@pytest.mark.parametrize("factor", [1.0, 1 + 1e-12, 1 - 1e-12, 1 - 1e-6])
def test_exact_threshold_boundary(factor):
    """``||z_g|| == T`` exactly gives 0; just below the norm the group is tiny but
    nonzero and still satisfies KKT."""
    z, norms = _pythagorean_groups()
    d = log_uniform(z.shape, 1.0, 1e6, _gen(8))
    for k, n in enumerate(norms):
        zk, dk = z[k:k + 1], d[k:k + 1]
        T = n * factor
        w, iters = prox.exact_group_lasso(zk, dk, T, (1,))
        if factor >= 1.0:
            assert torch.equal(w, torch.zeros_like(w)), f"group {k}: ||z|| = {n} <= T = {T!r} must be 0"
            assert int(iters.max()) == 0
        else:
            assert bool((w != 0).all()), f"group {k}: ||z|| > T must be nonzero"
            _check_kkt(w, zk, dk, T, (1,), msg=f"group {k} factor {factor!r}")
            ref = _mp_solve(zk[0], dk[0], T)
            # the solution is ill-conditioned near the threshold; judge by KKT,
            # and only ask for the right magnitude elementwise (docs/math.md section 4.3)
            assert_close(w[0], ref, rtol=1e-2 if factor > 1 - 1e-9 else 1e-8,
                         msg=f"group {k} vs 60-digit solve")
            assert int(iters.max()) <= 15


def test_exact_no_iterations_for_inactive_groups_and_none_nan():
    z, d, T = _problem((200, 16), (1,), 1e6, seed=9, quantile=0.9)
    w, iters = prox.exact_group_lasso(z, d, T, (1,))
    zero = np.linalg.norm(to_groups(z, (1,)), axis=1) <= T
    assert (iters.flatten().numpy()[zero] == 0).all()
    assert torch.isfinite(w).all()


# ---------------------------------------------------------------------------
# l1 against a brute-force 1-D minimizer
# ---------------------------------------------------------------------------

def _golden_l1(z, d, tau, iters=200):
    """Minimize ``1/2 d w^2 - z w + tau |w|`` per coordinate by golden-section search."""
    f = lambda w: 0.5 * d * w * w - z * w + tau * np.abs(w)
    bound = np.abs(z) / d + 1.0
    a, b = -bound, bound
    r = (math.sqrt(5) - 1) / 2
    c, e = b - r * (b - a), a + r * (b - a)
    for _ in range(iters):
        left = f(c) < f(e)
        b = np.where(left, e, b)
        a = np.where(left, a, c)
        c, e = b - r * (b - a), a + r * (b - a)
    return 0.5 * (a + b), f


@pytest.mark.parametrize("solver", ["exact", "pg"])
def test_l1_against_golden_section(solver):
    g = _gen(10)
    z = torch.randn(7, 13, generator=g, dtype=F64)
    d = log_uniform(z.shape, 1.0, 1e6 if solver == "exact" else 3.0, g)
    tau = 0.6
    w, _ = prox.solve_subproblem(z, d, tau, regularizer="l1", dims=(), solver=solver,
                                 x0=torch.randn(7, 13, generator=g, dtype=F64),
                                 max_iters=100000, eps_t=1e-13)
    zn, dn = z.numpy(), d.numpy()
    brute, f = _golden_l1(zn, dn, tau)
    assert_close(w, brute, atol=1e-7, msg=f"l1 {solver} vs golden section")
    # no coordinate of the brute-force answer (or a dense grid) does better
    wn = w.numpy()
    assert (f(wn) <= f(brute) + 1e-12).all()
    grid = np.linspace(-1, 1, 2001)[:, None, None] * (np.abs(zn) / dn + 1e-3)
    assert (f(wn) <= f(grid).min(axis=0) + 1e-12).all()
    # exact zeros exactly where |z| <= tau
    assert np.array_equal(wn == 0, np.abs(zn) <= tau)


def test_exact_l1_closed_form():
    g = _gen(11)
    z = torch.randn(40, generator=g, dtype=F64)
    d = log_uniform(z.shape, 1.0, 1e6, g)
    w = prox.exact_l1(z, d, 0.5)
    assert_close(w, soft_threshold_np(z, 0.5) / d.numpy(), rtol=1e-15, msg="l1 closed form")


# ---------------------------------------------------------------------------
# Proximal gradient (docs/math.md section 5)
# ---------------------------------------------------------------------------

def test_pg_converges_to_exact():
    z, d, T = _problem((30, 25), (1,), 10.0, seed=12)
    x0 = torch.randn(z.shape, generator=_gen(13), dtype=F64)
    tau = T / 5.0  # c_g = sqrt(25)
    w, iters = prox.solve_subproblem(z, d, tau, regularizer="group_lasso", dims=(1,), solver="pg",
                                     x0=x0, max_iters=100000, pg_stop="inexact", eps_t=1e-13)
    assert int(iters.max()) < 100000, "PG must stop by its test, not the cap"
    assert_close(w, group_lasso_bisect(z, d, T, (1,)), rtol=1e-9, atol=1e-12, msg="PG vs exact")
    _check_kkt(w, z, d, T, (1,), tol=1e-10)


@pytest.mark.parametrize("eps_t", [1e-1, 1e-3])
@pytest.mark.parametrize("shape,dims", [((40, 12), (1,)), ((6, 5, 4), (0, 2))])
def test_pg_inexact_condition_holds(eps_t, shape, dims):
    """Paper eq. 7: some s in the subdifferential of Q at Z has ||s|| <= eps_t; the
    smallest one is computed here from the optimality condition. And Q(Z) <= Q(p)."""
    z, d, T = _problem(shape, dims, 100.0, seed=14, quantile=0.4)
    gsize = math.prod(shape[i] for i in dims)
    x0 = torch.randn(shape, generator=_gen(15), dtype=F64)
    w, iters = prox.solve_subproblem(z, d, T / math.sqrt(gsize), regularizer="group_lasso",
                                     dims=dims, solver="pg", x0=x0, max_iters=100000,
                                     pg_stop="inexact", eps_t=eps_t)
    s = min_norm_subgradient(w, z, d, T, dims)
    assert s <= eps_t, f"min-norm subgradient {s:.3e} > eps_t {eps_t:g}"
    assert 1 <= int(iters.max()) < 100000
    assert group_lasso_objective(w, z, d, T, dims) <= group_lasso_objective(x0, z, d, T, dims)
    # the inexact answer is not the exact one (the test is not vacuous) at the loose eps
    if eps_t >= 1e-1:
        assert min_norm_subgradient(w, z, d, T, dims) > 1e-9


def test_pg_inexact_l1_condition_holds():
    g = _gen(16)
    z = torch.randn(9, 11, generator=g, dtype=F64)
    d = log_uniform(z.shape, 1.0, 100.0, g)
    x0 = torch.randn(z.shape, generator=g, dtype=F64)
    tau, eps_t = 0.5, 1e-2
    w, iters = prox.solve_subproblem(z, d, tau, regularizer="l1", dims=(), solver="pg", x0=x0,
                                     max_iters=100000, eps_t=eps_t)
    wn, zn, dn = w.numpy(), z.numpy(), d.numpy()
    s = np.where(wn != 0, dn * wn - zn + tau * np.sign(wn), np.maximum(np.abs(zn) - tau, 0))
    assert np.linalg.norm(s) <= eps_t
    q = lambda v: float(np.sum(0.5 * dn * v * v - zn * v) + tau * np.abs(v).sum())
    assert q(wn) <= q(x0.numpy())


def _own_pg_objectives(z, d, x0, T, anchor, n_iter):
    """Objective values ``Q_a(Z_j)``, j = 0..n_iter, of PG with theta = 1/max(d_g)
    (rows are the groups), written around ``anchor`` like the authors."""
    Z, D, A = z.numpy(), d.numpy(), anchor.numpy()
    theta = 1.0 / D.max(axis=1, keepdims=True)
    W = np.where(np.linalg.norm(Z, axis=1, keepdims=True) <= T, 0.0, x0.numpy())

    def q(w):
        diff = w - A
        return float(np.sum(diff * (D * A - Z)) + 0.5 * np.sum(D * diff * diff)
                     + T * np.linalg.norm(w, axis=1).sum())

    out = [q(W)]
    for _ in range(n_iter):
        Y = W - theta * (D * W - Z)
        n = np.linalg.norm(Y, axis=1, keepdims=True)
        W = np.where(n > theta * T, Y * (1 - theta * T / np.where(n > 0, n, 1)), 0.0)
        out.append(q(W))
    return out


def _own_pg_inexact(z, d, x0, T, eps_t, max_iters=100000):
    """PG with the per-group stop of docs/math.md section 5 (rows are the groups): group g
    stops after the first iteration with ``||(1/theta - d)(Z_j - Z_{j+1})_g|| <=
    eps_t sqrt(|g| / n)``. Returns the answer and the iterations per group."""
    Z, D = z.numpy(), d.numpy()
    n_groups, gsize = Z.shape
    theta = 1.0 / D.max(axis=1, keepdims=True)
    W = np.where(np.linalg.norm(Z, axis=1, keepdims=True) <= T, 0.0, x0.numpy())
    active = np.linalg.norm(Z, axis=1) > T
    iters = np.zeros(n_groups, dtype=int)
    tol = eps_t * math.sqrt(gsize / Z.size)
    for _ in range(max_iters):
        if not active.any():
            break
        Y = W - theta * (D * W - Z)
        nrm = np.linalg.norm(Y, axis=1, keepdims=True)
        Wn = np.where(nrm > theta * T, Y * (1 - theta * T / np.where(nrm > 0, nrm, 1)), 0.0)
        Wn = np.where(active[:, None], Wn, W)
        iters += active
        s = (1 / theta - D) * (W - Wn)
        active &= np.linalg.norm(s, axis=1) > tol
        W = Wn
    return W, iters


def test_pg_inexact_iteration_counts():
    """PG stops each group at the first iteration that passes its test: not later."""
    z, d, T = _problem((30, 10), (1,), 20.0, seed=22, quantile=0.3)
    x0 = torch.randn(z.shape, generator=_gen(23), dtype=F64)
    for eps_t in (1e-1, 1e-4):
        w, iters = prox.solve_subproblem(z, d, T / math.sqrt(10), regularizer="group_lasso",
                                         dims=(1,), solver="pg", x0=x0, max_iters=100000,
                                         eps_t=eps_t)
        own_w, own_iters = _own_pg_inexact(z, d, x0, T, eps_t)
        assert np.array_equal(iters.flatten().numpy(), own_iters), \
            f"eps {eps_t:g}: iterations {iters.flatten().tolist()} != {own_iters.tolist()}"
        assert_close(w, own_w, rtol=1e-12, atol=1e-14, msg=f"eps {eps_t:g}")


@pytest.mark.parametrize("spread", [1.0, 50.0])
def test_pg_rtol_rule(spread):
    """The authors' rule: stop at the first k >= 2 with (Q_{k-1} - Q_k)/(|Q_k| + 1) < rtol,
    with the objective computed correctly (quadratic part once, docs/math.md section 8)."""
    z, d, T = _problem((20, 16), (1,), spread, seed=17)
    if spread == 1.0:
        d = torch.full_like(d, 2.0)  # PG is exact after one step, yet takes two
    x0 = torch.randn(z.shape, generator=_gen(18), dtype=F64)
    anchor = torch.randn(z.shape, generator=_gen(19), dtype=F64)
    rtol = 1e-8
    w, iters = prox.solve_subproblem(z, d, T / 4.0, regularizer="group_lasso", dims=(1,),
                                     solver="pg", x0=x0, anchor=anchor, max_iters=100000,
                                     pg_stop="rtol", rtol=rtol)
    active = np.linalg.norm(z.numpy(), axis=1) > T
    k = int(iters.flatten().numpy()[active].max())
    assert (iters.flatten().numpy()[active] == k).all(), "rtol stops the whole tensor at once"
    assert k >= 2
    if spread == 1.0:
        assert k == 2
        # started at the answer, the first step decreases nothing: still two iterations
        _, it0 = prox.solve_subproblem(z, d, T / 4.0, regularizer="group_lasso", dims=(1,),
                                       solver="pg", x0=w, anchor=anchor, max_iters=100,
                                       pg_stop="rtol", rtol=rtol)
        assert int(it0.max()) == 2
    q = _own_pg_objectives(z, d, x0, T, anchor, k)
    dec = [(q[j - 1] - q[j]) / (abs(q[j]) + 1) for j in range(1, k + 1)]
    assert dec[-1] < rtol * (1 + 1e-6), f"stopped at {k} with decrease {dec[-1]:.3e}"
    assert all(x >= rtol * (1 - 1e-6) for x in dec[1:-1]), f"should have stopped earlier: {dec}"
    assert group_lasso_objective(w, z, d, T, (1,)) <= group_lasso_objective(x0, z, d, T, (1,))


# ---------------------------------------------------------------------------
# Nuclear norm
# ---------------------------------------------------------------------------

def test_nuclear_constant_d_is_svt():
    g = _gen(20)
    z = torch.randn(6, 2, 2, generator=g, dtype=F64)  # treated as the 6x4 matrix
    d = torch.full_like(z, 4.0)
    tau = 2.0
    for solver in ("exact", "pg"):
        w, _ = prox.solve_subproblem(z, d, tau, regularizer="nuclear", dims=(), solver=solver,
                                     x0=torch.randn(z.shape, generator=g, dtype=F64))
        expected = svt_np(z.numpy() / 4.0, tau / 4.0)
        assert_close(w, expected, rtol=1e-12, atol=1e-13, msg=f"nuclear {solver}")
        assert np.linalg.matrix_rank(expected.reshape(6, 4)) < 4, "thresholding must cut a value"


def test_nuclear_nonconstant_d_is_optimal():
    """Optimality of ``min sum(1/2 d w^2 - z w) + tau ||W||_*`` with W = U S V^T (rank r):
    ``G = z - d*W`` must equal ``tau (U V^T + M)`` with ``U^T M = 0, M V = 0, ||M||_2 <= 1``."""
    g = _gen(21)
    z = torch.randn(7, 5, generator=g, dtype=F64)
    d = log_uniform(z.shape, 1.0, 4.0, g)
    tau = 1.5
    w, iters = prox.solve_subproblem(z, d, tau, regularizer="nuclear", dims=(), solver="pg",
                                     x0=torch.zeros_like(z), max_iters=100000, eps_t=1e-12)
    W, Z, D = w.numpy(), z.numpy(), d.numpy()
    u, s, vt = np.linalg.svd(W, full_matrices=False)
    r = int((s > 1e-8).sum())
    assert 0 < r < 5, f"test needs a rank-deficient nonzero answer, got rank {r}"
    U, V = u[:, :r], vt[:r].T
    G = (Z - D * W) / tau
    assert_close(U.T @ G @ V, np.eye(r), atol=1e-9, msg="U^T G V = I")
    Pu, Pv = np.eye(7) - U @ U.T, np.eye(5) - V @ V.T
    assert_close(Pu @ G @ V, np.zeros((7, r)), atol=1e-9, msg="M V = 0")
    assert_close(U.T @ G @ Pv, np.zeros((r, 5)), atol=1e-9, msg="U^T M = 0")
    assert np.linalg.norm(Pu @ G @ Pv, 2) <= 1 + 1e-9
    # and no random perturbation does better
    obj = lambda x: float(np.sum(0.5 * D * x * x - Z * x) + tau * np.linalg.svd(x, compute_uv=False).sum())
    rng = np.random.default_rng(0)
    base = obj(W)
    for scale in (1e-2, 1e-4):
        for _ in range(50):
            assert obj(W + scale * rng.standard_normal(W.shape)) >= base - 1e-12


# ---------------------------------------------------------------------------
# PG through the optimizers: eps_t = pg_eps * t^-0.6, warm start at the weights
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ramda", "proxadamw"])
def test_pg_inexact_condition_in_optimizer(name):
    """After each step (c = 1 so that p is the subproblem's answer) some subgradient of
    the step's subproblem is no larger than ``eps_t = pg_eps * t^-0.6``, and the
    answer is no worse than the warm start (the weights before the step)."""
    from ramda_ref import RAMDA, ProxAdamW
    g = _gen(30)
    rows = torch.logspace(-2, 0, 12, dtype=F64)[:, None]  # group scales: some groups get cut
    p = torch.nn.Parameter(torch.randn(12, 6, generator=g, dtype=F64) * rows)
    pg_eps, lam, dims = 1e-2, 0.05, (1,)
    if name == "ramda":
        opt = RAMDA([p], lr=0.1, momentum=1.0, epsilon=0.05, lambda_=lam, dims=dims,
                    solver="pg", pg_eps=pg_eps, max_iters=100000)
    else:
        opt = ProxAdamW([p], lr=0.05, betas=(0.5, 0.9), lambda_=lam * 20, dims=dims,
                        solver="pg", pg_eps=pg_eps, max_iters=100000)
    alpha = 0.0
    for t in range(1, 5):
        x = p.detach().clone()
        p.grad = torch.randn(p.shape, generator=g, dtype=F64) * rows
        opt.step()
        st = opt.state[p]
        if name == "ramda":
            alpha += 0.1 * math.sqrt(t)
            d = st["grad_sum_sq"] ** (1 / 3) + 0.05
            z = d * st["initial_point"] - st["grad_sum"]
            T = alpha * lam * math.sqrt(6)
        else:
            d = st["exp_avg_sq"].sqrt() / math.sqrt(1 - 0.9 ** t) + 1e-8
            z = d * x - 0.05 / (1 - 0.5 ** t) * st["exp_avg"]
            T = 0.05 * lam * 20 * math.sqrt(6)
        eps_t = pg_eps * t ** -0.6
        s = min_norm_subgradient(p, z, d, T, dims)
        assert s <= eps_t, f"step {t}: min-norm subgradient {s:.3e} > eps_t {eps_t:.3e}"
        assert group_lasso_objective(p, z, d, T, dims) <= group_lasso_objective(x, z, d, T, dims)
        assert int(opt.last_iterations[p].max()) < 100000
    zero = np.all(to_groups(p, dims) == 0, axis=1)
    assert 0 < zero.sum() < len(zero), "the example must zero some groups"


def test_pg_equals_exact_in_optimizer_when_run_long():
    from ramda_ref import RAMDA
    g = _gen(31)
    cols = torch.logspace(-2, 0, 8, dtype=F64)  # group scales: some groups get cut
    w = torch.randn(10, 8, generator=g, dtype=F64) * cols
    grads = [torch.randn(10, 8, generator=g, dtype=F64) * cols for _ in range(3)]
    out = {}
    for solver in ("exact", "pg"):
        p = torch.nn.Parameter(w.clone())
        opt = RAMDA([p], lr=0.1, momentum=1.0, epsilon=0.5, lambda_=0.1, dims=(0,), solver=solver,
                    pg_eps=1e-13, max_iters=100000)
        for gr in grads:
            p.grad = gr.clone()
            opt.step()
        out[solver] = p.detach()
    assert_close(out["pg"], out["exact"], rtol=1e-9, atol=1e-12, msg="RAMDA pg vs exact")
    assert (out["exact"] == 0).any() and torch.equal(out["pg"] == 0, out["exact"] == 0)


# ---------------------------------------------------------------------------
# Rounding: groups just above the threshold, extreme scales
# ---------------------------------------------------------------------------

def _near_threshold_batch(rng, dtype, z_exp, d_exp, max_spread_exp, delta_exp, n_trials):
    for _ in range(n_trials):
        n = int(rng.integers(1, 64))
        zs, dlo = 10.0 ** rng.uniform(*z_exp), 10.0 ** rng.uniform(*d_exp)
        spread = 10.0 ** rng.uniform(0, max_spread_exp)
        z = torch.from_numpy(rng.standard_normal((4, n)) * zs).to(dtype)
        d = torch.from_numpy(dlo * np.exp(rng.uniform(0, math.log(spread), (4, n)))).to(dtype)
        # the smallest group sits a relative delta above the threshold
        delta = 10.0 ** rng.uniform(*delta_exp)
        T = float(np.linalg.norm(z.double().numpy(), axis=1).min() * (1 - delta))
        yield z, d, T, f"n={n} |z|~{zs:.1e} d>={dlo:.1e} spread {spread:.1e} delta {delta:.1e}"


def test_exact_fp32_near_threshold():
    """fp32 state (fp32/bf16/fp16 parameters): a group with ||z_g|| a few ulps to a
    few percent above T must still satisfy KKT to fp32 accuracy and keep the sign
    of z (w = z/(d + sigma) with sigma > 0)."""
    rng = np.random.default_rng(40)
    for z, d, T, what in _near_threshold_batch(rng, torch.float32, (-12, 12), (-6, 1), 4, (-7, -1), 150):
        w, iters = prox.exact_group_lasso(z, d, T, (1,))
        assert torch.isfinite(w).all(), what
        assert not (w * z < 0).any(), f"{what}: w has the wrong sign"
        r = kkt_residual_np(w.double(), z.double(), d.double(), T, (1,)).max()
        assert r < 1e-5, f"{what}: KKT residual {r:.2e}"
        assert int(iters.max()) <= 15, f"{what}: {int(iters.max())} Newton steps"


def test_exact_fp64_extreme_scales():
    """fp64: |z| from 1e-100 to 1e100, d from 1e-50 to 1e50, thresholds anywhere."""
    rng = np.random.default_rng(41)
    for z, d, T, what in _near_threshold_batch(rng, F64, (-100, 100), (-50, 50), 8, (-15, 0), 150):
        T *= rng.uniform(0.0, 1.0) if rng.uniform() < 0.5 else 1.0
        w, iters = prox.exact_group_lasso(z, d, T, (1,))
        r = kkt_residual_np(w, z, d, T, (1,)).max()
        assert r < 1e-10, f"{what}: KKT residual {r:.2e}"
        assert int(iters.max()) <= 15, f"{what}: {int(iters.max())} Newton steps"


def test_exact_any_dims_any_rank():
    """Random shapes of rank 1..5 and random non-empty dims: KKT per hand-made group,
    and the zero groups are exactly those with ||z_g|| <= T."""
    rng = np.random.default_rng(42)
    for case in range(60):
        rank = int(rng.integers(1, 6))
        shape = tuple(int(s) for s in rng.integers(1, 5, size=rank))
        k = int(rng.integers(1, rank + 1))
        dims = tuple(sorted(int(x) for x in rng.choice(rank, size=k, replace=False)))
        z = torch.from_numpy(rng.standard_normal(shape))
        d = torch.from_numpy(np.exp(rng.uniform(0, math.log(1e6), shape)))
        norms = np.linalg.norm(to_groups(z, dims), axis=1)
        srt = np.sort(norms)
        # half-way between two group norms: no group sits on the threshold
        T = float(0.5 * (srt[len(srt) // 2 - 1] + srt[len(srt) // 2])) if len(srt) > 1 else 0.5 * srt[0]
        w, _ = prox.exact_group_lasso(z, d, T, dims)
        _check_kkt(w, z, d, T, dims, msg=f"shape {shape} dims {dims}")
        assert np.array_equal(np.all(to_groups(w, dims) == 0, axis=1), norms <= T), f"{shape} {dims}"
        # negative dims name the same groups
        neg = tuple(x - rank for x in dims)
        w2, _ = prox.solve_subproblem(z, d, T / math.sqrt(math.prod(shape[i] for i in dims)),
                                      regularizer="group_lasso", dims=prox.normalize_dims(neg, rank))
        assert_close(w2, w, rtol=1e-13, atol=1e-300, msg=f"negative dims {neg}")
