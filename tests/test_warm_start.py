"""Warm-started Newton for the exact group-lasso solve (docs/math.md section 4, item 5).

Checked by math, never against the code's own output: the KKT residual of
the solution (`_util.kkt_residual_np`), the root written back against
``T / ||w_g||`` (the KKT condition ``w_g = z_g / (d_g + sigma)`` with
``sigma = T / ||w_g||``), the branch a start takes against ``phi`` and
``phi'`` evaluated here in float64 from their definitions, and a cold solve
(sigma = 0) as the trajectory a warm one must reproduce where the rule
sends it to ``sigma_hi``. Then the optimizer's state (creation, restart,
state_dict, old checkpoints, a regularizer switched on later, capturable
steps, every parameter dtype) and the C++ ``cpu`` backend against the
reference on rows, columns, channels_last, strided and permuted layouts.

    timeout 900 python -m pytest -q tests/test_warm_start.py
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import ramda_ref as R
import ramda_ref.functional as ref
from ramda_ref import prox
from ramda_ref.groups import group_min, group_norm, grouped_view, normalize_dims
from _util import assert_bitwise_equal, kkt_residual_np

# -- the solver ----------------------------------------------------------------


def _problem(groups, size, dtype, seed=0, spread=3.0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(groups, size, generator=gen, dtype=torch.float64)
    z = z * torch.exp(torch.randn(groups, 1, generator=gen, dtype=torch.float64))  # mixed group scales
    d = torch.exp(spread * torch.rand(groups, size, generator=gen, dtype=torch.float64))
    return z.to(dtype), d.to(dtype)


def _phi(z, d, T, s):
    """phi(s) = 1/||z/(d+s)|| - s/T and phi'(s) = sum(q^2/(d+s))/||q||^3 - 1/T, per
    row, in float64 (docs/math.md section 4, item 2)."""
    z, d = z.double(), d.double()
    q = z / (d + s)
    qn = q.norm(dim=-1, keepdim=True)
    return 1.0 / qn - s / T, (q * q / (d + s)).sum(-1, keepdim=True) / qn ** 3 - 1.0 / T


def _kkt_bound(dtype):
    return 1e-10 if dtype == torch.float64 else 2e-5


def _assert_root(sigma, w, T, dtype, msg=""):
    """sigma of every nonzero group is T / ||w_g|| (the KKT condition)."""
    wn = w.double().norm(dim=-1, keepdim=True)
    nz = wn > 0
    want = T / wn[nz]
    rel = ((sigma.double()[nz] - want).abs() / want).max().item()
    assert rel < (1e-12 if dtype == torch.float64 else 1e-5), f"{msg}: sigma vs T/||w_g||: {rel:.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_warm_start_solves_the_same_problem(dtype):
    """A warm start from the previous step's sigma, after z and d moved a little,
    gives a solution as optimal as the cold one, the same zero groups, fewer
    Newton steps in all, and writes back the root."""
    z, d = _problem(256, 64, dtype)
    T = float(z.double().norm(dim=1).median())
    w0, it0, s0 = prox.exact_group_lasso(z, d, T, (1,), sigma=torch.zeros(256, 1, dtype=dtype))
    gen = torch.Generator().manual_seed(1)
    z1 = z * (1 + 0.02 * torch.randn(z.shape, generator=gen, dtype=dtype))
    d1 = d * (1 + 0.02 * torch.rand(d.shape, generator=gen, dtype=dtype))
    wc, itc = prox.exact_group_lasso(z1, d1, T, (1,))
    ww, itw, sw = prox.exact_group_lasso(z1, d1, T, (1,), sigma=s0)
    bound = _kkt_bound(dtype)
    for w, name in ((wc, "cold"), (ww, "warm")):
        res = kkt_residual_np(w.double(), z1.double(), d1.double(), T, (1,))
        assert res.max() < bound, f"{name}: KKT residual {res.max():.3g}"
    assert torch.equal(wc.norm(dim=1) == 0, ww.norm(dim=1) == 0)
    assert 0 < int((ww.norm(dim=1) == 0).sum()) < 256  # both kinds of group present
    assert int(itw.sum()) < int(itc.sum()), (itw.sum(), itc.sum())
    _assert_root(sw, ww, T, dtype, "warm")
    zero = ww.norm(dim=1, keepdim=True) == 0
    assert torch.equal(sw[zero], s0[zero]), "a zero group keeps its previous sigma"


def _one_group(dtype=torch.float64):
    # d spread over 1..100: phi'(s) > 0 near s = 0 (T close to ||z||)
    z = torch.tensor([[1.0, 1.0, 0.5, 0.25]], dtype=dtype)
    d = torch.tensor([[1.0, 100.0, 30.0, 3.0]], dtype=dtype)
    T = 0.92 * float(z.double().norm())
    return z, d, T


def _cold(z, d, T):
    w, it, s = prox.exact_group_lasso(z, d, T, (1,), sigma=torch.zeros(1, 1, dtype=z.dtype))
    return w, int(it), s


def _warm(z, d, T, s0):
    w, it, s = prox.exact_group_lasso(z, d, T, (1,), sigma=torch.full((1, 1), s0, dtype=z.dtype))
    return w, int(it), s


def _sigma_hi(z, d, T):
    zn = float(z.double().norm())
    return T * float(d.max()) / (zn - T)


def test_every_branch_of_the_warm_start_rule():
    z, d, T = _one_group()
    wc, itc, sc = _cold(z, d, T)
    root, hi = float(sc), _sigma_hi(z, d, T)
    assert 0 < root < hi and itc >= 4
    _assert_root(sc, wc, T, torch.float64, "cold")

    # phi(s0) <= 0 at the root itself: one step, which confirms it
    phi, _ = _phi(z, d, T, root)
    assert float(phi) <= 1e-15
    w, it, s = _warm(z, d, T, root)
    assert it == 1 and abs(float(s) - root) <= 1e-15 * root

    # phi(s0) < 0 right of the root: monotone Newton from s0, fewer steps than from sigma_hi
    s0 = root * 1.01
    phi, _ = _phi(z, d, T, s0)
    assert float(phi) < 0
    w, it, s = _warm(z, d, T, s0)
    assert it < itc and abs(float(s) - root) <= 1e-14 * root
    _assert_root(s, w, T, torch.float64, "right")

    # phi(s0) > 0, phi'(s0) < 0 just left of the root: one Newton step lands right of it
    s0 = root * 0.99
    phi, dphi = _phi(z, d, T, s0)
    assert float(phi) > 0 and float(dphi) < 0
    w, it, s = _warm(z, d, T, s0)
    assert it < itc and abs(float(s) - root) <= 1e-14 * root
    _assert_root(s, w, T, torch.float64, "left")

    # phi'(s0) >= 0 (far left): the cold trajectory from sigma_hi after the step spent at s0
    crit = _critical_point(z, d, T, root)
    s0 = crit * 0.5
    phi, dphi = _phi(z, d, T, s0)
    assert float(phi) > 0 and float(dphi) >= 0
    w, it, s = _warm(z, d, T, s0)
    assert it == itc + 1 and torch.equal(s, sc) and torch.equal(w, wc)

    # phi'(s0) < 0 but so flat that the Newton step passes sigma_hi: clamped there,
    # then the cold trajectory
    s0 = crit * (1 + 1e-9)
    phi, dphi = _phi(z, d, T, s0)
    assert float(phi) > 0 and float(dphi) < 0
    assert s0 - float(phi / dphi) > hi
    w, it, s = _warm(z, d, T, s0)
    assert it == itc + 1 and torch.equal(s, sc) and torch.equal(w, wc)

    # s0 = 0 is a cold start
    w, it, s = _warm(z, d, T, 0.0)
    assert it == itc and torch.equal(s, sc) and torch.equal(w, wc)

    # s0 far above sigma_hi (phi(s0) < 0): Newton from there (at or right of the
    # root by concavity, capped at sigma_hi) reaches the root
    s0 = 1e3 * hi
    phi, dphi = _phi(z, d, T, s0)
    assert float(phi) < 0
    w, it, s = _warm(z, d, T, s0)
    assert it <= itc + 1 and abs(float(s) - root) <= 1e-14 * root
    _assert_root(s, w, T, torch.float64, "far right")


def _critical_point(z, d, T, root):
    """Where phi' = 0, left of the root (phi' is decreasing: phi is concave), by bisection."""
    lo, hi = 0.0, root
    _, at0 = _phi(z, d, T, 0.0)
    assert float(at0) > 0, "the constructed group needs phi'(0) > 0"
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        _, dphi = _phi(z, d, T, mid)
        lo, hi = (mid, hi) if float(dphi) > 0 else (lo, mid)
    return hi


def test_zero_and_constant_d_groups():
    """A zero group keeps its sigma; a constant-d group writes the closed-form
    root T d / (||z|| - T) = T / ||w_g|| without iterating."""
    z = torch.tensor([[0.1, 0.1, 0.0], [3.0, 4.0, 0.0]], dtype=torch.float64)
    d = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]], dtype=torch.float64)
    T = 1.0
    w, it, s = prox.exact_group_lasso(z, d, T, (1,), sigma=torch.tensor([[7.0], [0.5]],
                                                                        dtype=torch.float64))
    assert torch.equal(w[0], torch.zeros(3, dtype=torch.float64)) and float(s[0]) == 7.0
    assert int(it[1]) == 0 and math.isclose(float(s[1]), T * 2.0 / (5.0 - T), rel_tol=1e-15)
    _assert_root(s, w, T, torch.float64, "constant d")


def test_capturable_solve_matches():
    z, d = _problem(64, 32, torch.float32, seed=3)
    T = 0.5 * float(z.norm(dim=1).median())
    _, _, s0 = prox.exact_group_lasso(z, d, T, (1,), sigma=torch.zeros(64, 1))
    z1 = z * 1.01
    w, it, s = prox.exact_group_lasso(z1, d, T, (1,), sigma=s0)
    wc, itc, sc = prox.exact_group_lasso(z1, d, torch.tensor(T, dtype=torch.float64), (1,),
                                         capturable=True, sigma=s0)
    assert torch.equal(w, wc) and torch.equal(it, itc) and torch.equal(s, sc)


def test_solve_subproblem_checks_the_sigma_count():
    z, d = _problem(4, 8, torch.float32)
    with pytest.raises(ValueError, match="sigma has 3 values for 4 groups"):
        prox.solve_subproblem(z, d, 0.1, regularizer="group_lasso", dims=(1,),
                              sigma=torch.zeros(3))


# -- the optimizers' state ------------------------------------------------------------


def _signal_grads(shape, steps, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    signal = 0.3 * torch.randn(shape, generator=gen)
    return [(signal + torch.randn(shape, generator=gen)).to(dtype) for _ in range(steps)]


def _count(p, dims, view=None):
    x = grouped_view(p, view)
    return group_norm(x, normalize_dims(dims, x.dim())).numel()


def _linear(dtype=torch.float32, shape=(24, 16), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))


OPTIMIZERS = {
    "ramda": (R.RAMDA, dict(lr=0.05, lambda_=0.05)),
    "proxadamw": (R.ProxAdamW, dict(lr=0.01, lambda_=0.5)),
}


def _run(cls, kw, p, grads, zero_sigma=False, **group):
    opt = cls([dict(params=[p], **group)], **kw)
    for g in grads:
        p.grad = g.clone()
        if zero_sigma and "sigma" in opt.state[p]:
            opt.state[p]["sigma"].zero_()
        opt.step()
    return opt


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_created_written_and_only_for_the_exact_solve(name):
    cls, kw = OPTIMIZERS[name]
    p = _linear(torch.float64)
    opt = _run(cls, kw, p, _signal_grads(p.shape, 3, p.dtype), dims=0)
    sig = opt.state[p]["sigma"]
    assert sig.shape == (_count(p, 0),) and sig.dtype == torch.float64
    assert (sig > 0).any()
    if name == "proxadamw":  # p is the solution W~: sigma = T / ||p_g||, T = lr lambda sqrt(|g|)
        T = kw["lr"] * kw["lambda_"] * math.sqrt(p.shape[0])
        pn = p.detach().double().norm(dim=0)
        nz = pn > 0
        rel = ((sig.double()[nz] - T / pn[nz]).abs() / (T / pn[nz])).max().item()
        assert rel < 1e-12, rel
    for group in (dict(dims=0, solver="pg"), dict(regularizer="l1"), dict()):
        q = _linear()
        o = _run(cls, kw, q, _signal_grads(q.shape, 1, q.dtype), **group)
        assert "sigma" not in o.state[q], group


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_warm_run_matches_cold_run(name):
    """20 steps warm and with sigma zeroed before every step (cold): the same
    zero groups, parameters equal to rounding, fewer Newton steps."""
    cls, kw = OPTIMIZERS[name]
    runs = []
    for cold in (False, True):
        p = _linear(torch.float64)
        opt = cls([dict(params=[p], dims=0)], **kw)
        total = 0
        for g in _signal_grads(p.shape, 20, p.dtype):
            p.grad = g
            if cold:
                opt.state[p]["sigma"].zero_() if opt.state[p] else None
            opt.step()
            total += int(opt.last_iterations[p].sum())
        runs.append((p.detach(), total))
    (pw, nw), (pc, nc) = runs
    assert torch.equal(pw.norm(dim=0) == 0, pc.norm(dim=0) == 0)
    assert (pw - pc).abs().max() <= 1e-12 * pc.abs().max()
    assert nw < nc, (nw, nc)


def test_restart_clears_sigma():
    p = _linear()
    opt = _run(R.RAMDA, OPTIMIZERS["ramda"][1], p, _signal_grads(p.shape, 2, p.dtype), dims=0)
    assert (opt.state[p]["sigma"] > 0).any()
    opt.restart()
    assert torch.equal(opt.state[p]["sigma"], torch.zeros(_count(p, 0)))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip_and_old_checkpoint(name):
    cls, kw = OPTIMIZERS[name]
    grads = _signal_grads((24, 16), 5, torch.float32)
    p = _linear()
    opt = _run(cls, kw, p, grads[:3], dims=0)
    saved = copy.deepcopy(opt.state_dict())
    assert torch.equal(saved["state"][0]["sigma"], opt.state[p]["sigma"])
    p_at_3 = p.detach().clone()

    # round trip: continuing from the loaded state is bitwise the uninterrupted run
    for g in grads[3:]:
        p.grad = g.clone()
        opt.step()
    q = torch.nn.Parameter(p_at_3.clone())
    o2 = cls([dict(params=[q], dims=0)], **kw)
    o2.load_state_dict(copy.deepcopy(saved))
    for g in grads[3:]:
        q.grad = g.clone()
        o2.step()
    assert_bitwise_equal(q, p)
    assert_bitwise_equal(o2.state[q]["sigma"], opt.state[p]["sigma"])

    # a checkpoint without sigma loads (no warning, nothing dropped) and cold-starts:
    # bitwise the run whose sigma is zeroed at step 4
    old = copy.deepcopy(saved)
    del old["state"][0]["sigma"]
    r = torch.nn.Parameter(p_at_3.clone())
    o3 = cls([dict(params=[r], dims=0)], **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o3.load_state_dict(old)
    assert torch.equal(o3.state[r]["sigma"], torch.zeros(_count(r, 0)))
    assert o3.state[r]["step"] == 3
    s = torch.nn.Parameter(p_at_3.clone())
    o4 = cls([dict(params=[s], dims=0)], **kw)
    o4.load_state_dict(copy.deepcopy(saved))
    o4.state[s]["sigma"].zero_()
    for g in grads[3:]:
        r.grad, s.grad = g.clone(), g.clone()
        o3.step()
        o4.step()
    assert_bitwise_equal(r, s)

    # a sigma that is not one value per group is refused before anything loads
    bad = copy.deepcopy(saved)
    bad["state"][0]["sigma"] = torch.zeros(2, 3)
    o5 = cls([dict(params=[torch.nn.Parameter(p_at_3.clone())], dims=0)], **kw)
    with pytest.raises(ValueError, match="'sigma'.*one floating-point value per group"):
        o5.load_state_dict(bad)
    assert len(o5.state) == 0


def test_switching_to_group_lasso_or_other_groups_creates_sigma():
    cls, kw = OPTIMIZERS["ramda"]
    p = _linear()
    grads = _signal_grads(p.shape, 4, p.dtype)
    opt = _run(cls, kw, p, grads[:1])  # no regularizer
    assert "sigma" not in opt.state[p]
    opt.param_groups[0]["regularizer"] = "group_lasso"
    opt.param_groups[0]["dims"] = 0
    p.grad = grads[1].clone()
    opt.step()
    assert opt.state[p]["sigma"].shape == (_count(p, 0),) and (opt.state[p]["sigma"] > 0).any()
    opt.param_groups[0]["dims"] = 1  # other groups: the old sigmas mean nothing, cold start
    p.grad = grads[2].clone()
    opt.step()
    assert opt.state[p]["sigma"].shape == (_count(p, 1),)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_capturable_step_matches(name):
    cls, kw = OPTIMIZERS[name]
    grads = _signal_grads((24, 16), 4, torch.float32)
    out = []
    for capturable in (False, True):
        p = _linear()
        opt = _run(cls, dict(kw, capturable=capturable), p, grads, dims=0)
        out.append((p.detach(), opt.state[p]["sigma"]))
    # the capturable step's scalars are float64 tensors (not Python floats): rounding apart
    (p0, s0), (p1, s1) = out
    assert (p1 - p0).abs().max() <= 1e-6 * p0.abs().max()
    assert torch.equal(s1 > 0, s0 > 0) and (s0 > 0).any()
    assert ((s1 - s0).abs() <= 1e-5 * s0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64],
                         ids=str)
def test_every_parameter_dtype(dtype):
    """sigma in the state dtype; the warm solve's zero groups and parameters are
    those of a cold one (to the parameter's rounding)."""
    cls, kw = OPTIMIZERS["ramda"]
    grads = _signal_grads((24, 16), 6, dtype)
    p, q = _linear(dtype), _linear(dtype)
    opt = _run(cls, kw, p, grads, dims=0)
    _run(cls, kw, q, grads, zero_sigma=True, dims=0)
    sig = opt.state[p]["sigma"]
    assert sig.dtype == ref.state_dtype(p) and bool(torch.isfinite(sig).all())
    assert torch.equal(p.norm(dim=0) == 0, q.norm(dim=0) == 0)
    ulp = torch.finfo(dtype).eps
    assert (p.double() - q.double()).abs().max() <= 4 * ulp * q.double().abs().max()


# -- the C++ cpu backend against the reference -------------------------------------

try:
    from ramda_kernels import backends as _backends
    _REASON = _backends.why_unavailable("cpu", "cpu")
except Exception as exc:  # noqa: BLE001 - report any import problem as the skip reason
    _REASON = repr(exc)
needs_cpu = pytest.mark.skipif(_REASON is not None, reason=f"cpu backend: {_REASON}")

LAYOUTS = {
    "rows": ((64, 96), (1,), None),
    "columns": ((96, 64), (0,), None),
    "conv-filter-channels_last": ((16, 12, 3, 3), (1, 2, 3), "channels_last"),
    "conv-input-channels_last": ((16, 12, 3, 3), (0, 2, 3), "channels_last"),
    "conv-channel": ((16, 12, 3, 3), (2, 3), None),
    "transposed-rows": ((64, 96), (0,), "t"),
    "transposed-columns": ((64, 96), (1,), "t"),
    "permuted-kept": ((6, 40, 10), (1,), "permute"),  # kept dims in reversed memory order
}


def _layout(x, how):
    if how == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if how == "t":
        return x.t().contiguous().t()
    if how == "permute":
        return x.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    return x


def _functional_kwargs(name, dims):
    if name == "ramda":
        # momentum 1: p is the solution W~, so zero groups show in p
        return dict(alpha=0.6, lr=0.1, momentum=1.0, epsilon=1e-6, lambda_=0.5,
                    regularizer="group_lasso", dims=dims, view=None, reweight=True,
                    solver="exact", max_iters=100, rtol=1e-8, pg_stop="inexact", pg_eps=1e-3)
    return dict(lr=0.01, beta1=0.9, beta2=0.999, epsilon=1e-8, weight_decay=0.0, amsgrad=False,
                lambda_=20.0, regularizer="group_lasso", dims=dims, view=None, reweight=True,
                solver="exact", max_iters=100, rtol=1e-8, pg_stop="inexact", pg_eps=1e-3)


def _functional_state(name, p, gen):
    if name == "ramda":
        return [[p.detach().float().clone()], [torch.rand(p.shape, generator=gen) * 0.1],
                [torch.rand(p.shape, generator=gen) * 0.01]]
    return [[torch.randn(p.shape, generator=gen) * 0.1], [torch.rand(p.shape, generator=gen) * 0.01], []]


@needs_cpu
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", ["ramda", "proxadamw"])
def test_cpu_backend_matches_the_reference(name, layout):
    """Three steps of the C++ step and of the fp32 and fp64 reference from the
    same state, the sigmas carried along: zero groups exactly those of the fp32
    reference; parameters and sigmas as close to the fp64 truth as the fp32
    reference is (4x its error per group, as the parity harness bounds it);
    the rest of the state to fp32 rounding."""
    _check_cpu_against_reference(name, layout, steps=3, noise=1.0)


@needs_cpu
@pytest.mark.parametrize("layout", ["rows", "columns", "conv-channel", "conv-input-channels_last"])
@pytest.mark.parametrize("name", ["ramda", "proxadamw"])
def test_cpu_backend_steady_state_matches_the_reference(name, layout):
    """Twelve steps whose gradients share a fixed signal (noise 0.05 of it), as
    in training: z and d move little between steps, so the fused solve takes
    its first Newton step from the sums of pass 1 and stops on the predicted
    error (NOTE: [Warm sums on the raw z] in csrc/cpu/kernels_impl.h), where
    the reference confirms every root with one more step; the bounds of the
    three-step test hold all the same."""
    _check_cpu_against_reference(name, layout, steps=12, noise=0.05)


def _check_cpu_against_reference(name, layout, steps, noise):
    from ramda_kernels.backends import cpu as C

    shape, dims, how = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(0)
    # groups of mixed scales, so that some are zero and some are not
    scale = torch.exp(2 * torch.randn([1 if i in dims else n for i, n in enumerate(shape)],
                                      generator=gen))
    base = torch.randn(shape, generator=gen) * scale
    # noise < 1: a fixed signal plus that much noise per step
    signal = torch.randn(shape, generator=gen) * scale if noise < 1 else 0.0
    grads = [signal + noise * torch.randn(shape, generator=gen) * scale + 0.5 * base
             for _ in range(steps)]
    kw = _functional_kwargs(name, dims)
    results = []
    for impl, dtype in ((getattr(C, name), torch.float32), (getattr(ref, name), torch.float32),
                        (getattr(ref, name), torch.float64)):
        g0 = torch.Generator().manual_seed(1)
        p = _layout(base.clone().to(dtype), how)
        states = [[_layout(s.to(dtype), how) for s in lst]
                  for lst in _functional_state(name, p, g0)]
        if name == "ramda":
            states[0] = [p.detach().clone(memory_format=torch.preserve_format)]
        sig = torch.zeros(_count(p, dims), dtype=dtype)
        for t, g in enumerate(grads, start=1):
            impl([p], [_layout(g.clone().to(dtype), how)], *states, [sig], step=t, **kw)
        results.append((p, sum(states, []), sig))
    (pf, sf, gf), (pr, sr, gr), (pt, st, gt) = results
    assert pf.stride() == pr.stride()
    zf, zr = _zero_groups(pf, dims), _zero_groups(pr, dims)
    assert torch.equal(zf, zr) and 0 < int(zr.sum()) < zr.numel(), (int(zf.sum()), int(zr.sum()))
    nd = normalize_dims(dims, pf.dim())
    scale_t = group_norm(pt, nd).flatten().clamp_min(1e-30)
    err_f = group_norm(pf.double() - pt, nd).flatten() / scale_t
    err_r = group_norm(pr.double() - pt, nd).flatten() / scale_t
    assert float(err_f.max()) <= max(4 * float(err_r.max()), 1e-5), (err_f.max(), err_r.max())
    for a, b in zip(sf, sr):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    # sigma matters through w = z/(d + sigma): an error e moves w_g by about
    # e/(min d_g + sigma) relative, which is the measure here (sigma itself is
    # ill-determined where it is small against d); groups on the zero threshold
    # at some step (zero in one run, not in another) are left out
    both = (gf > 0) & (gr > 0) & (gt > 0)
    assert int(both.sum()) >= 0.9 * int((gr > 0).sum())
    dmin = group_min(_last_d(name, st, kw, t=steps), nd).flatten()
    e_f = (gf.double() - gt).abs() / (dmin + gt)
    e_r = (gr.double() - gt).abs() / (dmin + gt)
    bad = both & ~(e_f <= 4 * e_r + 3e-5)
    assert not bad.any(), (e_f[bad], e_r[bad], gt[bad])


def _last_d(name, states, kw, t=3):
    """d of step t from the (fp64) state: cbrt(U) + eps for RAMDA, sqrt(v) /
    sqrt(1 - beta2^t) + eps for ProxAdamW (docs/math.md section 1)."""
    if name == "ramda":
        return states[2].pow(1.0 / 3.0) + kw["epsilon"]
    return states[1].sqrt() / math.sqrt(1.0 - kw["beta2"] ** t) + kw["epsilon"]


def _zero_groups(p, dims):
    return (group_norm(p.double(), normalize_dims(dims, p.dim())) == 0).flatten()


@needs_cpu
def test_cpu_backend_refuses_a_wrong_sigma():
    from ramda_kernels.backends import cpu as C

    p = torch.randn(8, 6)
    before = p.clone()
    kw = _functional_kwargs("ramda", (0,))
    states = [[p.clone()], [torch.zeros(8, 6)], [torch.zeros(8, 6)]]
    op = torch.ops.ramda_kernels.ramda_
    with pytest.raises(RuntimeError, match=r"sigmas\[0\] has shape \[5\].*\(6\)"):
        op([p], [torch.randn(8, 6)], *states, [torch.zeros(5)], s=0.1, epsilon=1e-6, keep=0.5,
           c=0.5, tau=0.1, eps_t=1e-3, regularizer="group_lasso", dims=[0], view=None,
           reweight=True, solver="exact", max_iters=100)
    with pytest.raises(RuntimeError, match="sigmas has 2 tensors but params has 1"):
        op([p], [torch.randn(8, 6)], *states, [torch.zeros(6)] * 2, s=0.1, epsilon=1e-6,
           keep=0.5, c=0.5, tau=0.1, eps_t=1e-3, regularizer="group_lasso", dims=[0],
           view=None, reweight=True, solver="exact", max_iters=100)
    assert torch.equal(p, before)
    # through the backend's functional: the same count check as the reference's
    with pytest.raises(RuntimeError, match="sigmas"):
        C.ramda([p], [torch.randn(8, 6)], *states, [torch.zeros(5)], step=1, **kw)
    assert torch.equal(p, before)
