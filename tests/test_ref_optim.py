"""The four reference optimizers against docs/math.md section 1, worked out by hand.

The expected numbers are written from the paper's update rules in numpy, step
by step, on tiny tensors; groups are formed by hand (``_util.to_groups``).
Float64 parameters, so the comparisons are tight.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ramda_ref as R
from _util import (assert_bitwise_equal, assert_close, assert_nuclear_optimal, from_groups,
                   group_lasso_bisect, group_soft_threshold_np, to_groups)

F64 = torch.float64
W0 = np.array([[0.5, -1.0, 2.0], [0.0, 0.3, -0.7]])
G1 = np.array([[0.2, -0.4, 1.0], [0.05, -0.3, 0.6]])
G2 = np.array([[-0.1, 0.5, 0.02], [0.3, 0.1, -0.9]])


def _param(w=W0, dtype=F64):
    return torch.nn.Parameter(torch.tensor(w, dtype=dtype))


def _run(opt, p, grads):
    out = []
    for g in grads:
        p.grad = torch.as_tensor(g, dtype=p.dtype).clone()
        opt.step()
        out.append(p.detach().double().numpy().copy())
    return out


# ---------------------------------------------------------------------------
# Two steps by hand
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("reg", ["none", "l1", "group_lasso"])
def test_ramda_two_steps_by_hand(reg):
    lr, c, eps, lam = 0.1, 0.5, 1e-3, 3.0
    kw = dict(regularizer=reg, dims=(1,) if reg == "group_lasso" else None)
    p = _param()
    got = _run(R.RAMDA([p], lr=lr, momentum=c, epsilon=eps, lambda_=lam, **kw), p, [G1, G2])

    x, V, U, alpha = W0.copy(), np.zeros_like(W0), np.zeros_like(W0), 0.0
    for t, g, pt in [(1, G1, got[0]), (2, G2, got[1])]:
        s = lr * math.sqrt(t)
        alpha += s
        V = V + s * g
        U = U + s * g * g
        d = np.cbrt(U) + eps
        # argmin_W <V, W> + 1/2 sum d (W - W0)^2 + alpha lam psi(W)
        if reg == "none":
            Wt = W0 - V / d
        elif reg == "l1":
            Wt = np.sign(W0 - V / d) * np.maximum(np.abs(W0 - V / d) - alpha * lam / d, 0)
        else:
            Wt = group_lasso_bisect(d * W0 - V, d, alpha * lam * math.sqrt(3), (1,))
        x = (1 - c) * x + c * Wt
        assert_close(pt, x, rtol=1e-12, atol=1e-15, msg=f"RAMDA {reg} step {t}")
    if reg != "none":
        assert (got[1] == 0).any(), "the hand example should zero something"


@pytest.mark.parametrize("reg", ["l1", "group_lasso"])
def test_rmda_two_steps_by_hand(reg):
    lr, c, lam = 0.3, 0.4, 3.0
    p = _param()
    kw = dict(regularizer=reg, dims=(0,) if reg == "group_lasso" else None)
    got = _run(R.RMDA([p], lr=lr, momentum=c, lambda_=lam, **kw), p, [G1, G2])
    x, V, alpha = W0.copy(), np.zeros_like(W0), 0.0
    for t, g, pt in [(1, G1, got[0]), (2, G2, got[1])]:
        s, beta = lr * math.sqrt(t), math.sqrt(t)
        alpha += s
        V = V + s * g
        y, thr = W0 - V / beta, alpha * lam / beta
        if reg == "l1":
            Wt = np.sign(y) * np.maximum(np.abs(y) - thr, 0)
        else:  # columns are the groups (dims=(0,)), c_g = sqrt(2)
            Wt = np.zeros_like(y)
            for j in range(3):
                n = np.linalg.norm(y[:, j])
                Wt[:, j] = y[:, j] * max(1 - thr * math.sqrt(2) / n, 0)
        x = (1 - c) * x + c * Wt
        assert_close(pt, x, rtol=1e-12, atol=1e-15, msg=f"RMDA {reg} step {t}")
    assert (got[1] == 0).any()


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("reg", ["none", "l1", "group_lasso"])
def test_proxadamw_two_steps_by_hand(reg, amsgrad):
    lr, (b1, b2), eps, wd, lam = 0.05, (0.8, 0.9), 1e-3, 0.1, 3.0
    g2 = G2 * 0.1  # smaller second gradient: v decreases, so amsgrad's max matters
    p = _param()
    kw = dict(regularizer=reg, dims=(1,) if reg == "group_lasso" else None)
    opt = R.ProxAdamW([p], lr=lr, betas=(b1, b2), epsilon=eps, weight_decay=wd, amsgrad=amsgrad,
                      lambda_=lam, **kw)
    got = _run(opt, p, [G1, g2])
    x, m, v, vmax = W0.copy(), np.zeros_like(W0), np.zeros_like(W0), np.zeros_like(W0)
    for t, g, pt in [(1, G1, got[0]), (2, g2, got[1])]:
        x = x * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        vmax = np.maximum(vmax, v)
        vv = vmax if amsgrad else v
        d = np.sqrt(vv) / math.sqrt(1 - b2 ** t) + eps
        step = lr / (1 - b1 ** t)
        # argmin <step m, W - x> + 1/2 d (W - x)^2 + lr lam psi(W)
        y = x - step * m / d
        if reg == "none":
            x = y
        elif reg == "l1":
            x = np.sign(y) * np.maximum(np.abs(y) - lr * lam / d, 0)
        else:
            x = group_lasso_bisect(d * y, d, lr * lam * math.sqrt(3), (1,))
        assert_close(pt, x, rtol=1e-11, atol=1e-15, msg=f"ProxAdamW {reg} amsgrad={amsgrad} step {t}")
    if amsgrad:
        assert_close(opt.state[p]["max_exp_avg_sq"], vmax, rtol=1e-15, msg="vmax")
    assert_close(opt.state[p]["exp_avg_sq"], v, rtol=1e-15, msg="v")
    if reg != "none":
        assert (got[1] == 0).any()


@pytest.mark.parametrize("reg", ["none", "l1", "group_lasso", "nuclear"])
def test_proxsgd_two_steps_by_hand(reg):
    lr, c, lam = 0.5, 0.3, 0.4
    p = _param()
    kw = dict(regularizer=reg, dims=(1,) if reg == "group_lasso" else None)
    got = _run(R.ProxSGD([p], lr=lr, momentum=c, lambda_=lam, **kw), p, [G1, G2])
    x, buf = W0.copy(), None
    for t, g, pt in [(1, G1, got[0]), (2, G2, got[1])]:
        buf = c * g if buf is None else (1 - c) * buf + c * g
        y, thr = x - lr * buf, lr * lam
        if reg == "none":
            x = y
        elif reg == "l1":
            x = np.sign(y) * np.maximum(np.abs(y) - thr, 0)
        elif reg == "group_lasso":
            x = np.stack([r * max(1 - thr * math.sqrt(3) / np.linalg.norm(r), 0) for r in y])
        else:
            u, s, vt = np.linalg.svd(y, full_matrices=False)
            x = (u * np.maximum(s - thr, 0)) @ vt
        assert_close(pt, x, rtol=1e-12, atol=1e-15, msg=f"ProxSGD {reg} step {t}")


def test_ramda_fp32_params_compute_in_fp32_and_round_once():
    """bf16 parameter: state fp32, W~ computed in fp32 from the fp32 state, p rounded once."""
    p = _param(dtype=torch.bfloat16)
    opt = R.RAMDA([p], lr=0.1, momentum=1.0, epsilon=1e-3)
    p.grad = torch.tensor(G1, dtype=torch.bfloat16)
    opt.step()
    w0 = torch.tensor(W0, dtype=torch.bfloat16).float()
    g = torch.tensor(G1, dtype=torch.bfloat16).float()
    V, U = 0.1 * g, 0.1 * g * g
    expected64 = w0.double().numpy() - V.double().numpy() / (np.cbrt(U.double().numpy()) + 1e-3)
    # one rounding to bf16 of a value that is fp32-accurate: within half a bf16 ulp + fp32 noise
    assert_close(p.float(), expected64, rtol=2 ** -8 + 1e-6, msg="bf16 RAMDA step")
    assert opt.state[p]["grad_sum"].dtype == torch.float32


# ---------------------------------------------------------------------------
# Unregularized RAMDA over many steps
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("c", [1.0, 0.3])
def test_ramda_unregularized_is_dual_average(c):
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(4, 5, generator=gen, dtype=F64)
    grads = [torch.randn(4, 5, generator=gen, dtype=F64) for _ in range(6)]
    p = torch.nn.Parameter(w0.clone())
    lr, eps = 0.02, 1e-4
    opt = R.RAMDA([p], lr=lr, momentum=c, epsilon=eps)
    x, V, U = w0.numpy().copy(), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        s = lr * math.sqrt(t)
        V, U = V + s * g.numpy(), U + s * g.numpy() ** 2
        x = (1 - c) * x + c * (w0.numpy() - V / (np.cbrt(U) + eps))
        assert_close(p, x, rtol=1e-12, atol=1e-14, msg=f"step {t}")
        assert opt.last_iterations[p] is None, "closed form: no iterations"
    assert opt.state[p]["step"] == 6
    assert opt.state[p]["alpha"] == pytest.approx(sum(lr * math.sqrt(t) for t in range(1, 7)), rel=1e-15)


# ---------------------------------------------------------------------------
# Every grouping, by hand
# ---------------------------------------------------------------------------

MODULES = [
    ("linear", lambda: torch.nn.Linear(6, 4), [(0,), (1,)]),
    ("conv1d", lambda: torch.nn.Conv1d(3, 4, 5), [(0, 2), (1, 2)]),
    ("conv2d", lambda: torch.nn.Conv2d(3, 4, 3), [(0, 2, 3), (1, 2, 3)]),
    ("conv3d", lambda: torch.nn.Conv3d(3, 2, 2), [(0, 2, 3, 4), (1, 2, 3, 4)]),
]
CASES = [(name, make, dims) for name, make, all_dims in MODULES for dims in all_dims]


def _group_scales(shape, dims) -> torch.Tensor:
    """Per-group factors spread over 1e-2..1 (one value per group, broadcast over it),
    so that one lambda zeroes some groups and keeps others."""
    n_groups = len(to_groups(np.zeros(shape), dims))
    rows = np.repeat(np.logspace(-2, 0, n_groups)[:, None], math.prod(shape) // n_groups, axis=1)
    return torch.from_numpy(from_groups(rows, shape, dims).copy())


def _weight(make, seed, memory_format=None):
    torch.manual_seed(seed)
    w = make().weight.detach().to(F64)
    if memory_format is not None:
        w = w.contiguous(memory_format=memory_format)
    return torch.nn.Parameter(w)


@pytest.mark.parametrize("name,make,dims", CASES, ids=[f"{n}-{d}" for n, _, d in CASES])
def test_ramda_every_grouping(name, make, dims):
    """RAMDA with c=1, three steps: p must be the exact group-lasso minimizer of the
    subproblem built by hand, with groups formed by hand (``to_groups``)."""
    p = _weight(make, 0)
    w0 = p.detach().numpy().copy()
    gsize = math.prod(p.shape[i] for i in dims)
    lr, eps = 0.05, 1e-3
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(p.shape, generator=gen, dtype=F64) for _ in range(3)]
    steps = [lr * math.sqrt(t) for t in (1, 2, 3)]
    # z = d*W0 - V does not depend on lambda: pick lambda so that the last step
    # cuts the groups in half (threshold half-way between two group norms)
    V = sum(s * g.numpy() for s, g in zip(steps, grads))
    U = sum(s * g.numpy() ** 2 for s, g in zip(steps, grads))
    norms = np.sort(np.linalg.norm(to_groups((np.cbrt(U) + eps) * w0 - V, dims), axis=1))
    k = len(norms) // 2
    lam = 0.5 * (norms[k - 1] + norms[k]) / (sum(steps) * math.sqrt(gsize))

    opt = R.RAMDA([p], lr=lr, momentum=1.0, epsilon=eps, lambda_=lam, dims=dims)
    V = U = 0.0
    alpha = 0.0
    for t, (s, g) in enumerate(zip(steps, grads), start=1):
        p.grad = g.clone()
        opt.step()
        alpha += s
        V, U = V + s * g.numpy(), U + s * g.numpy() ** 2
        d = np.cbrt(U) + eps
        z = d * w0 - V
        T = alpha * lam * math.sqrt(gsize)
        expected = group_lasso_bisect(z, d, T, dims)
        assert_close(p, expected, rtol=1e-9, atol=1e-13, msg=f"{name} dims={dims} step {t}")
        zero = np.linalg.norm(to_groups(z, dims), axis=1) <= T
        assert np.array_equal(np.all(to_groups(p, dims) == 0, axis=1), zero), "zero groups"
    assert zero.sum() == k, "half of the groups are zero at the last step"
    it = opt.last_iterations[p]
    assert it is not None and it.numel() == len(zero) and int(it.max()) <= 15


@pytest.mark.parametrize("name,make,dims", CASES, ids=[f"{n}-{d}" for n, _, d in CASES])
def test_proxsgd_rmda_every_grouping(name, make, dims):
    """Closed-form group prox (scalar d) per hand-made group."""
    gsize = math.prod(_weight(make, 0).shape[i] for i in dims)
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(_weight(make, 0).shape, generator=gen, dtype=F64)
    p = _weight(make, 0)
    x = p.detach().numpy().copy()
    opt = R.ProxSGD([p], lr=0.5, momentum=1.0, lambda_=0.2, dims=dims)
    p.grad = g
    opt.step()
    assert_close(p, group_soft_threshold_np(x - 0.5 * g.numpy(), 0.1 * math.sqrt(gsize), dims),
                 rtol=1e-13, atol=1e-15, msg=f"ProxSGD {name} {dims}")
    q = _weight(make, 0)
    opt = R.RMDA([q], lr=0.5, momentum=1.0, lambda_=0.2, dims=dims)
    q.grad = g
    opt.step()
    assert_close(q, group_soft_threshold_np(x - 0.5 * g.numpy(), 0.1 * math.sqrt(gsize), dims),
                 rtol=1e-13, atol=1e-15, msg=f"RMDA {name} {dims}")


CL_CASES = [("conv2d", lambda: torch.nn.Conv2d(3, 4, 3), torch.channels_last, (0, 2, 3)),
            ("conv2d", lambda: torch.nn.Conv2d(3, 4, 3), torch.channels_last, (1, 2, 3)),
            ("conv3d", lambda: torch.nn.Conv3d(3, 2, 2), torch.channels_last_3d, (1, 2, 3, 4))]


@pytest.mark.parametrize("opt_cls", [R.RAMDA, R.RMDA, R.ProxAdamW, R.ProxSGD])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,make,fmt,dims", CL_CASES, ids=[f"{c[0]}-{c[3]}" for c in CL_CASES])
def test_channels_last_equals_contiguous(opt_cls, dtype, name, make, fmt, dims):
    """A channels_last weight is grouped in place and gives the contiguous answer.

    Not bitwise: the group norms are summed in the tensor's own memory order
    (docs/math.md section 3), so the result may differ by rounding; the zero groups
    and the memory format must match exactly."""
    scale = _group_scales(_weight(make, 0).shape, dims)
    a = torch.nn.Parameter((_weight(make, 0).detach() * scale).to(dtype))
    b = torch.nn.Parameter(a.detach().clone().contiguous(memory_format=fmt))
    assert not b.is_contiguous() and b.is_contiguous(memory_format=fmt)
    kw = dict(lambda_=0.1, dims=dims)
    if opt_cls is not R.ProxAdamW:
        kw["momentum"] = 1.0
    oa, ob = opt_cls([a], **kw), opt_cls([b], **kw)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        g = (torch.randn(a.shape, generator=gen, dtype=F64) * scale).to(dtype)
        a.grad, b.grad = g.clone(), g.clone().contiguous(memory_format=fmt)
        oa.step()
        ob.step()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close(b, a, rtol=tol, atol=tol * 1e-2, msg=f"{opt_cls.__name__} channels_last")
    assert torch.equal(b == 0, a == 0), "zero pattern"
    assert b.is_contiguous(memory_format=fmt), "the parameter keeps its layout"
    for k, v in ob.state[b].items():
        if isinstance(v, torch.Tensor) and k != "sigma":  # sigma: one value per group
            assert v.is_contiguous(memory_format=fmt), f"state {k} keeps the layout"
    if "sigma" in oa.state[a]:  # fp32: a sigma small against d is ill-determined (w is not)
        assert_close(ob.state[b]["sigma"], oa.state[a]["sigma"],
                     rtol=tol if dtype == torch.float64 else 1e-3, atol=0,
                     msg="the same sigma per group, in the reference's group order")
    assert np.all(to_groups(a, dims) == 0, axis=1).any(), "the example must zero some groups"


# ---------------------------------------------------------------------------
# Zero groups with c = 1, views
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("opt_cls", [R.RAMDA, R.RMDA, R.ProxAdamW, R.ProxSGD])
def test_zero_groups_exactly_zero(opt_cls):
    torch.manual_seed(5)
    scale = _group_scales((8, 10), (1,)).float()
    p = torch.nn.Parameter(torch.randn(8, 10) * scale)
    kw = dict(lambda_=1.0, dims=(1,))
    if opt_cls is not R.ProxAdamW:
        kw["momentum"] = 1.0
    opt = opt_cls([p], **kw)
    for _ in range(2):
        p.grad = torch.randn_like(p) * scale
        opt.step()
    rows_zero = (p == 0).all(dim=1)
    assert 0 < int(rows_zero.sum()) < 8, f"{opt_cls.__name__}: want some (not all) zero groups"
    # a group is either exactly zero or has no zero entry at all (random data)
    assert torch.equal((p == 0).any(dim=1), rows_zero)


def test_view_heads_equals_reshaping_by_hand():
    """``view=(heads, -1, in), dims=(1, 2)`` on a [heads*hd, in] weight is one group per head."""
    heads, hd, fin = 3, 2, 4
    gen = torch.Generator().manual_seed(6)
    scale = torch.tensor([0.01, 0.1, 1.0], dtype=F64).repeat_interleave(hd)[:, None]
    w = torch.randn(heads * hd, fin, generator=gen, dtype=F64) * scale
    grads = [torch.randn(heads * hd, fin, generator=gen, dtype=F64) * scale for _ in range(3)]
    for cls, kw in [(R.RAMDA, dict(momentum=1.0, lambda_=0.3)), (R.ProxAdamW, dict(lambda_=0.3)),
                    (R.RMDA, dict(momentum=1.0, lambda_=0.3)), (R.ProxSGD, dict(momentum=1.0, lambda_=0.3)),
                    (R.RAMDA, dict(momentum=1.0, lambda_=0.3, solver="pg"))]:
        a = torch.nn.Parameter(w.clone())
        b = torch.nn.Parameter(w.clone().view(heads, hd, fin))
        oa = cls([a], view=(heads, -1, fin), dims=(1, 2), **kw)
        ob = cls([b], dims=(1, 2), **kw)
        for g in grads:
            a.grad, b.grad = g.clone(), g.clone().view(heads, hd, fin)
            oa.step()
            ob.step()
        assert_bitwise_equal(a.detach(), b.detach().reshape(heads * hd, fin), f"{cls.__name__} {kw}")
        heads_zero = (a.view(heads, hd * fin) == 0).all(dim=1)
        assert torch.equal(heads_zero, (a.view(heads, hd * fin) == 0).any(dim=1))
        assert heads_zero[0] and not heads_zero[2], f"{cls.__name__}: zero heads {heads_zero}"


def test_view_heads_by_hand():
    heads, hd, fin = 3, 2, 4
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(heads * hd, fin, generator=gen, dtype=F64)
    g = torch.randn(heads * hd, fin, generator=gen, dtype=F64)
    p = torch.nn.Parameter(w.clone())
    opt = R.ProxSGD([p], lr=1.0, momentum=1.0, lambda_=0.4, view=(heads, -1, fin), dims=(1, 2))
    p.grad = g
    opt.step()
    y = (w - g).numpy()
    expected = np.zeros_like(y)
    for h in range(heads):
        block = y[h * hd:(h + 1) * hd]
        n = np.linalg.norm(block)
        expected[h * hd:(h + 1) * hd] = block * max(1 - 0.4 * math.sqrt(hd * fin) / n, 0)
    assert_close(p, expected, rtol=1e-14, atol=1e-15, msg="heads by hand")


# ---------------------------------------------------------------------------
# Iteration counts
# ---------------------------------------------------------------------------

def test_last_iterations():
    torch.manual_seed(8)
    a = torch.nn.Parameter(torch.randn(6, 5, dtype=F64))
    b = torch.nn.Parameter(torch.randn(5, dtype=F64))
    opt = R.RAMDA([{"params": [a], "dims": (1,), "lambda_": 0.01},
                   {"params": [b], "regularizer": "l1", "lambda_": 0.01},
                   ], momentum=1.0)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()
    assert opt.last_iterations[a].shape == (6, 1) and opt.last_iterations[a].dtype == torch.int32
    assert opt.last_iterations[b] is None
    opt.add_param_group({"params": [c := torch.nn.Parameter(torch.randn(4, 3, dtype=F64))],
                         "dims": (0,), "lambda_": 0.01, "solver": "pg", "pg_stop": "rtol"})
    for x in (a, b, c):
        x.grad = torch.randn_like(x)
    opt.step()
    assert set(opt.last_iterations) == {a, b, c}
    it = opt.last_iterations[c]
    assert it.shape == (1, 3)
    nonzero = (c != 0).any(dim=0)
    assert (it[0][nonzero] >= 2).all(), "rtol takes at least two PG iterations"


@pytest.mark.parametrize("shape", [(6, 4), (4, 3, 2, 2)])
@pytest.mark.parametrize("opt_cls", [R.RAMDA, R.ProxAdamW])
def test_nuclear_step_is_optimal(opt_cls, shape):
    """Nuclear norm (PG with an SVD per iteration): after each step (c = 1) the
    weights solve that step's subproblem, checked by its optimality condition on
    ``p.reshape(p.shape[0], -1)``; the rank drops."""
    gen = torch.Generator().manual_seed(9)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=F64))
    if opt_cls is R.RAMDA:
        lr, eps, lam = 0.1, 0.5, (8.0 if len(shape) == 2 else 14.0)
        opt = R.RAMDA([p], lr=lr, momentum=1.0, epsilon=eps, lambda_=lam, regularizer="nuclear",
                      pg_eps=1e-12, max_iters=100000)
    else:
        lr, b1, b2, lam = 0.1, 0.5, 0.9, 10.0
        opt = R.ProxAdamW([p], lr=lr, betas=(b1, b2), epsilon=0.1, lambda_=lam, regularizer="nuclear",
                          pg_eps=1e-12, max_iters=100000)
    alpha = 0.0
    for t in (1, 2):
        x = p.detach().clone()
        p.grad = torch.randn(shape, generator=gen, dtype=F64)
        opt.step()
        st = opt.state[p]
        if opt_cls is R.RAMDA:
            alpha += lr * math.sqrt(t)
            d = st["grad_sum_sq"].numpy() ** (1 / 3) + eps
            z = d * st["initial_point"].numpy() - st["grad_sum"].numpy()
            tau = alpha * lam
        else:
            d = np.sqrt(st["exp_avg_sq"].numpy()) / math.sqrt(1 - b2 ** t) + 0.1
            z = d * x.numpy() - lr / (1 - b1 ** t) * st["exp_avg"].numpy()
            tau = lr * lam
        r = assert_nuclear_optimal(p, z, d, tau, 1e-8, msg=f"{opt_cls.__name__} step {t}")
    assert 0 < r < min(shape[0], math.prod(shape[1:])), f"rank {r}: the example must cut some"
    assert opt.last_iterations[p] is not None


def test_reweight_off_uses_unit_group_weights():
    """``reweight=False``: c_g = 1 instead of sqrt(|g|)."""
    p = _param()
    opt = R.ProxSGD([p], lr=0.5, momentum=1.0, lambda_=2.4, dims=(1,), reweight=False)
    p.grad = torch.tensor(G1, dtype=F64)
    opt.step()
    assert_close(p, group_soft_threshold_np(W0 - 0.5 * G1, 0.5 * 2.4, (1,)), rtol=1e-14, msg="c_g = 1")
    assert (p.detach()[1] == 0).all() and (p.detach()[0] != 0).all()
