"""The grouped Triton step: warm-started Newton and the size-class tiling.

Calls the backend functional directly with the warm-start state of
docs/math.md section 4 (one fp32 ``sigma`` per group), on subproblems whose
``z`` and ``d`` are set through RAMDA's state (zero gradients, ``W0 = 0``,
momentum 1: ``z = -V``, ``d = cbrt(U)``, ``p = w``), and checks the result
against the reference's cold solve and the KKT conditions. Runs under the
Triton interpreter on CPU (conftest.py), or on CUDA when a GPU is visible.

    timeout 900 python -m pytest -q tests/test_triton_tiling.py
"""

from __future__ import annotations

import math

import pytest
import torch

import ramda_ref
# the device, the backend module and the skip / warning marks of the Triton tests
from test_triton import DEVICE, pytestmark, tb  # noqa: F401  (pytestmark applies here too)

#: name -> (group size, number of groups, dims of a [groups, size] or
#: [size, groups] tensor, MAX_BLOCK_E): rows and columns, in registers and in chunks.
LAYOUTS = {
    "rows-registers": (48, 40, (1,), 64),
    "rows-chunks": (77, 24, (1,), 32),
    "columns-registers": (24, 40, (0,), 64),
    "columns-chunks": (77, 24, (0,), 32),
}
#: KKT residual bound of the fp32 solves (tests/test_triton.py: test_newton_near_threshold).
KKT_BOUND = 1e-4


def _subproblem(gsize, n_groups, gen, T=1.0):
    """float64 ``z, d`` of ``n_groups`` groups (rows), a quarter of them zero
    (``||z_g|| < T``), ``d`` spread over 1..1e3."""
    d = 10.0 ** (3.0 * torch.rand(n_groups, gsize, generator=gen, dtype=torch.float64))
    z = torch.randn(n_groups, gsize, generator=gen, dtype=torch.float64)
    norms = torch.empty(n_groups, dtype=torch.float64).uniform_(1.2, 20.0, generator=gen) * T
    norms[::4] = 0.7 * T
    z = z * (norms / z.norm(dim=1))[:, None]
    return z, d


def _solve(z, d, T, dims, sigma=None, count=False):
    """One kernel call on the subproblem ``z, d`` (rows = groups, float64),
    laid out with ``dims``; returns ``(w rows float64, sigma, counts)``."""
    cols = dims == (0,)
    zf, uf = z.float(), (d.float() ** 3)
    lay = (lambda t: t.t().contiguous()) if cols else (lambda t: t.contiguous())
    p = torch.zeros_like(lay(zf), device=DEVICE)
    sigmas = [] if sigma is None else [sigma]
    kwargs = dict(step=1, alpha=1.0, lr=1.0, momentum=1.0, epsilon=0.0, lambda_=T,
                  regularizer="group_lasso", dims=dims, view=None, reweight=False, solver="exact",
                  max_iters=20, rtol=1e-8, pg_stop="inexact", pg_eps=1e-3)
    args = ([p], [torch.zeros_like(p)], [torch.zeros_like(p)], [lay(-zf).to(DEVICE)],
            [lay(uf).to(DEVICE)], sigmas)
    if count:
        with tb.newton_counts(DEVICE) as counts:
            tb.ramda(*args, **kwargs)
        counts = counts.tolist()
    else:
        tb.ramda(*args, **kwargs)
        counts = None
    w = p.cpu().double()
    return (w.t() if cols else w), sigma, counts


def _exact(z, d):
    """The values the kernel sees: fp32 ``z`` and ``d = cbrt(fp32 d^3)``, in float64."""
    zf = z.float().double()
    df = (d.float() ** 3).double() ** (1.0 / 3.0)
    return zf, df


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_warm_start_solution_and_written_sigma(monkeypatch, layout):
    """From a warm start near the root (both sides), far from it and absent:
    the reference's cold solution within the KKT bound, the same zero groups,
    ``sigma = T/||w_g||`` written for nonzero groups, zero groups' sigma kept."""
    gsize, n_groups, dims, block_e = LAYOUTS[layout]
    monkeypatch.setattr(tb, "TILE", 512)
    monkeypatch.setattr(tb, "MAX_BLOCK_E", block_e)
    gen = torch.Generator().manual_seed(11)
    T = 1.0
    z, d = _subproblem(gsize, n_groups, gen, T)
    z64, d64 = _exact(z, d)
    w_ref, _ = ramda_ref.prox.exact_group_lasso(z64, d64, T, (1,))
    root = T / w_ref.norm(dim=1).clamp_min(1e-300)
    # starts: 0 (none), the root moved by -20%..+20%, 10x and 0.1x the root
    factor = torch.tensor([0.0, 0.8, 0.95, 0.999, 1.0, 1.001, 1.05, 1.2, 10.0, 0.1],
                          dtype=torch.float64).repeat(n_groups // 10 + 1)[:n_groups]
    s0 = torch.where(w_ref.norm(dim=1) > 0, root * factor, 3.5).float()
    sigma = s0.clone().to(DEVICE)
    w, sigma, _ = _solve(z, d, T, dims, sigma)
    plan = list(tb._cache.values())[-1]
    assert plan.launches[0].constexprs["ONE_CHUNK"] == (layout.endswith("registers"))

    zero, zero_ref = w.norm(dim=1) == 0, w_ref.norm(dim=1) == 0
    assert torch.equal(zero, zero_ref), "zero groups differ from the reference's"
    assert int(zero.sum()) == n_groups // 4 + (n_groups % 4 > 0)
    res = ramda_ref.prox.kkt_residual(w, z64, d64, T, (1,))
    assert float(res.max()) < KKT_BOUND, f"KKT residual {float(res.max()):.3g}"
    rel = (w - w_ref).norm(dim=1) / w_ref.norm(dim=1).clamp_min(1e-30)
    assert float(rel[~zero].max()) < 1e-4
    sig = sigma.cpu().double()
    kkt_sigma = T / w.norm(dim=1)[~zero]
    torch.testing.assert_close(sig[~zero], kkt_sigma, rtol=1e-5, atol=0)
    assert torch.equal(sig[zero], s0.double()[zero]), "a zero group's sigma was overwritten"


def test_cold_start_without_sigma_is_unchanged(monkeypatch):
    """No sigma tensor: the kernel's cold start takes the reference's Newton path
    (same iterations per group, counted)."""
    monkeypatch.setattr(tb, "TILE", 512)
    monkeypatch.setattr(tb, "MAX_BLOCK_E", 64)
    gen = torch.Generator().manual_seed(5)
    z, d = _subproblem(48, 40, gen)
    z64, d64 = _exact(z, d)
    w_ref, iters = ramda_ref.prox.exact_group_lasso(z64.float(), d64.float(), 1.0, (1,))
    w, _, counts = _solve(z, d, 1.0, (1,), count=True)
    iterating = int((iters > 0).sum())
    assert counts[1] == iterating
    # fp32 reference and kernel may differ by one confirming step in a few groups
    assert abs(counts[0] - int(iters.sum())) <= max(2, iterating // 10)
    torch.testing.assert_close(w, w_ref.double(), rtol=1e-4, atol=1e-6)


def _moved(monkeypatch, layout, move):
    """A steady state on ``layout``'s tiles: ``z, d`` (float64) moved by about
    ``move`` since the step that left ``sigma`` (fp32, on DEVICE). Returns
    ``(z, d, dims, sigma)``."""
    gsize, n_groups, dims, block_e = LAYOUTS[layout]
    monkeypatch.setattr(tb, "TILE", 512)
    monkeypatch.setattr(tb, "MAX_BLOCK_E", block_e)
    gen = torch.Generator().manual_seed(7)
    z, d = _subproblem(gsize, n_groups, gen)
    prev_z = z * (1 + move * torch.randn(z.shape, generator=gen, dtype=torch.float64))
    prev_d = d * (1 + move * torch.rand(d.shape, generator=gen, dtype=torch.float64))
    sigma = torch.zeros(n_groups, device=DEVICE)
    _solve(prev_z, prev_d, 1.0, dims, sigma)  # leaves the previous step's sigma
    return z, d, dims, sigma


@pytest.mark.parametrize("layout", ["rows-registers", "columns-chunks"])
def test_warm_start_needs_fewer_newton_steps(monkeypatch, layout):
    """A steady state: ``z`` and ``d`` moved by 1% since the step that left
    ``sigma``. The warm start takes at most three Newton steps per group, fewer
    than the cold start; groups read in chunks take fewer passes over memory,
    at most three per tile here (``d`` spread over 1..1e3 makes ``phi`` curved
    enough that one step from the warm start is not predicted converged: pass
    1, one Newton pass, the last pass; NOTE: [two-pass plan])."""
    z, d, dims, sigma = _moved(monkeypatch, layout, 0.01)
    _, _, cold = _solve(z, d, 1.0, dims, count=True)
    w, _, warm = _solve(z, d, 1.0, dims, sigma, count=True)
    z64, d64 = _exact(z, d)
    assert float(ramda_ref.prox.kkt_residual(w, z64, d64, 1.0, (1,)).max()) < KKT_BOUND
    assert warm[1] == cold[1] > 0
    assert warm[0] <= 3 * warm[1], f"{warm[0] / warm[1]:.2f} Newton steps per group"
    assert warm[0] < cold[0], (warm, cold)
    if layout.endswith("chunks"):
        assert warm[2] <= 3 * warm[3], f"{warm[2] / warm[3]:.2f} passes per tile"
        assert warm[2] < cold[2]


@pytest.mark.parametrize("layout", ["rows-chunks", "columns-chunks"])
def test_second_order_point_ends_a_moving_warm_start(monkeypatch, layout):
    """Sigma moved by a few percent since the last step (z, d 2% apart): in
    float64 one Newton step from the warm start leaves most nonzero groups
    above the fp32 tolerance, so a solve that stops only on the Newton step's
    predicted error pays a Newton pass for each of them. `_predicted`'s
    second-order point (NOTE: [two-pass plan]) ends all but a few of them
    without one, within the KKT bound, with ``sigma = T/||w||`` written."""
    z, d, dims, sigma = _moved(monkeypatch, layout, 0.02)
    n_groups = z.shape[0]
    s0 = sigma.cpu().double()
    w, sigma, warm = _solve(z, d, 1.0, dims, sigma, count=True)
    z64, d64 = _exact(z, d)
    # one plain Newton step from s0, in float64 (ramda_ref.prox._warm_step)
    w64, _ = ramda_ref.prox.exact_group_lasso(z64, d64, 1.0, (1,))
    nz = w64.norm(dim=1) > 0
    root = 1.0 / w64.norm(dim=1).clamp_min(1e-300)
    zn = z64.norm(dim=1, keepdim=True)
    rel = (zn - 1.0) / zn
    sigma_hi = d64.max(1).values[:, None] / (zn - 1.0)
    s1, _ = ramda_ref.prox._warm_step(z64 / zn, d64, s0[:, None], sigma_hi, rel, (1,), 0.0)
    err_newton = (s1.squeeze(1) - root).abs() / root
    tol = 4 * torch.finfo(torch.float32).eps
    need = int((nz & (s0 > 0) & (err_newton > tol)).sum())
    assert need >= n_groups // 3, need
    # Newton steps after each group's warm step: 2 here, 15 with the Newton
    # point alone; the margin leaves room for a GPU's summation order
    extra = warm[0] - warm[1]
    assert extra <= need // 2, (extra, need)
    res = ramda_ref.prox.kkt_residual(w, z64, d64, 1.0, (1,))
    assert float(res.max()) < KKT_BOUND
    sig = sigma.cpu().double()
    torch.testing.assert_close(sig[nz], 1.0 / w.norm(dim=1)[nz], rtol=1e-5, atol=0)


def test_bad_sigma_is_refused_before_anything_runs(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    z, d = _subproblem(16, 12, gen)
    p = torch.randn(12, 16, device=DEVICE)
    state = [torch.zeros_like(p), -z.float().to(DEVICE), (d.float() ** 3).to(DEVICE)]
    before = [t.clone() for t in [p] + state]
    kwargs = dict(step=1, alpha=1.0, lr=1.0, momentum=1.0, epsilon=0.0, lambda_=1.0,
                  regularizer="group_lasso", dims=(1,), view=None, reweight=False, solver="exact",
                  max_iters=20, rtol=1e-8, pg_stop="inexact", pg_eps=1e-3)
    grads = [torch.randn_like(p)]
    for bad, match in ((torch.zeros(11, device=DEVICE), "12 values"),
                       (torch.zeros(12, dtype=torch.float64, device=DEVICE), "torch.float32"),
                       (torch.zeros(12, 1, device=DEVICE), "1-D"),
                       (torch.zeros(24, device=DEVICE)[::2], "contiguous")):
        with pytest.raises(ValueError, match=match):
            tb.ramda([p], grads, *[[s] for s in state], [bad], **kwargs)
    with pytest.raises(ValueError, match="solver='pg'"):
        tb.ramda([p], grads, *[[s] for s in state], [torch.zeros(12, device=DEVICE)],
                 **dict(kwargs, solver="pg"))
    for a, b in zip([p] + state, before):
        assert torch.equal(a, b), "a refused call changed a tensor"


def test_size_classes_bound_the_launches_and_hold_large_groups(monkeypatch):
    """Default tiles: rows of up to MAX_BLOCK_E (8192) elements and columns
    groups of up to 1024 stay in registers (no 64-element column cap); tensors
    of one size class share a launch, so the launches do not grow with the
    tensor count."""
    monkeypatch.setattr(tb, "TILE", 2048)
    monkeypatch.setattr(tb, "MAX_BLOCK_E", 8192)
    meta = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    reg = tb._REG_GROUP

    def classes(shapes, dims):
        stats = [tb._TileStats(s[0] * s[1], tb._layout(meta(*s), reg, dims, None)) for s in shapes]
        out = []
        for members in tb.size_classes(stats, False):
            c, warps = tb._specialization(0, reg, 0, False, False, False, torch.float32,
                                          torch.float32, [stats[i] for i in members], True)
            out.append((len(members), c["ONE_CHUNK"], c["BG"], c["BE"], warps))
        return out

    assert classes([(4, 8192)], (1,)) == [(1, True, 1, 8192, 16)]
    assert classes([(4, 8193)], (1,))[0][1] is False
    assert classes([(1024, 64)], (0,)) == [(1, True, 8, 1024, 16)]
    assert classes([(256, 512)], (0,)) == [(1, True, 32, 256, 16)]
    assert classes([(4096, 64)], (0,))[0][1] is False
    # ResNet-like filters of 64 and 4608 elements: two launches, tiles sized to each
    many = [(64, 576)] * 5 + [(128, 64)] * 7 + [(512, 4608)] * 3
    got = classes(many, (1,))
    assert [(n, one, be) for n, one, _, be, _ in got] == [(5, True, 1024), (7, True, 64),
                                                          (3, True, 8192)]
    assert classes(many * 3, (1,)) == [(3 * n, *rest) for n, *rest in got]


def _runs_of_four(shape, dims):
    """From first principles: do the groups of a contiguous ``shape`` tensor,
    grouped over ``dims``, lie in whole aligned 4-element vectors along one
    axis of the tile (NOTE: [grouped vector loads])? ``offs[g, e]``: the
    memory offset of element ``e`` of group ``g``; rows: each group's offsets
    are aligned runs of 4, columns: each element's offsets across the groups."""
    kept = [k for k in range(len(shape)) if k not in dims]
    n_groups = math.prod(shape[k] for k in kept)
    offs = torch.arange(math.prod(shape)).reshape(shape).permute(*kept, *dims).reshape(n_groups, -1)

    def aligned_runs(lines):
        if lines.shape[1] % 4:
            return False
        q = lines.sort(dim=1).values.reshape(lines.shape[0], -1, 4)
        return bool((q.diff(dim=2) == 1).all() and (q[..., 0] % 4 == 0).all())

    return aligned_runs(offs) or aligned_runs(offs.t())


@pytest.mark.parametrize("shape,dims", [((40, 48), (1,)), ((24, 77), (1,)), ((48, 40), (0,)),
                                        ((77, 24), (0,)), ((8, 6, 4), (1, 2)), ((8, 3, 3), (1, 2)),
                                        ((12, 10), (0,)), ((10, 12), (0,))])
def test_vector_promise_only_where_groups_run_in_fours(shape, dims):
    """A grouped launch promises 4-element runs (ALIGNED) only where the groups
    really are whole 4-element vectors along the unit-stride axis: the
    interpreter ignores the hint, so a wrong promise would only show on a GPU."""
    p = torch.zeros(shape, device=DEVICE)
    st = [torch.zeros_like(p) for _ in range(3)]
    plan = tb._build_plan(0, [p], [torch.zeros_like(p)], [[s] for s in st], reg=tb._REG_GROUP,
                          solver=0, flat=False, scalar_d=False, amsgrad=False, dims=dims,
                          view=None, reweight=False)
    (launch,) = plan.launches
    c = launch.constexprs
    promised = c["ALIGNED"] and (c["UNIT_RED"] or c["UNIT_KEPT"])
    assert promised == _runs_of_four(shape, dims), (shape, dims, c)


def test_groups_out_of_row_major_order_are_warm_started(monkeypatch):
    """Groups stored in another order than the reference's (kept dims whose
    strides increase: a permuted [B, A, S] buffer seen as [A, B, S]) get the
    warm start too: the kernel reads and writes a copy of ``sigma`` in memory
    order, so each group's sigma lands on its own entry, ``T/||w_g||`` (the
    KKT value) for nonzero groups and kept for zero groups."""
    monkeypatch.setattr(tb, "TILE", 512)
    monkeypatch.setattr(tb, "MAX_BLOCK_E", 64)
    gen = torch.Generator().manual_seed(13)
    A, B, S, T = 5, 6, 24, 1.0
    z, d = _subproblem(S, A * B, gen, T)
    z64, d64 = _exact(z, d)
    w_ref, _ = ramda_ref.prox.exact_group_lasso(z64, d64, T, (1,))

    def permuted(x):  # logical [A, B, S], stored as [B, A, S]
        buf = torch.empty(B, A, S, device=DEVICE).permute(1, 0, 2)
        return buf.copy_(x.reshape(A, B, S))

    p = permuted(torch.zeros(A * B, S))
    state = [permuted(torch.zeros(A * B, S)), permuted(-z.float()), permuted(d.float() ** 3)]
    s0 = torch.where(w_ref.norm(dim=1) > 0, 0.0, 2.5).float()
    sigma = s0.clone().to(DEVICE)
    kwargs = dict(step=1, alpha=1.0, lr=1.0, momentum=1.0, epsilon=0.0, lambda_=T,
                  regularizer="group_lasso", dims=(2,), view=None, reweight=False, solver="exact",
                  max_iters=20, rtol=1e-8, pg_stop="inexact", pg_eps=1e-3)
    tb.ramda([p], [torch.zeros_like(p)], *[[s] for s in state], [sigma], **kwargs)
    w = p.cpu().double().reshape(A * B, S)
    zero = w_ref.norm(dim=1) == 0
    assert float(ramda_ref.prox.kkt_residual(w, z64, d64, T, (1,)).max()) < KKT_BOUND
    sig = sigma.cpu().double()
    torch.testing.assert_close(sig[~zero], T / w.norm(dim=1)[~zero], rtol=1e-5, atol=0)
    assert torch.equal(sig[zero], s0.double()[zero]), "a zero group's sigma was overwritten"
