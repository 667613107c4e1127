"""The Triton backend against the reference: parameters, state and zero groups.

Runs on CUDA when a GPU is visible, else on CPU tensors under the Triton
interpreter (``TRITON_INTERPRET=1``, set by conftest.py).
The tile sizes are shrunk (``triton_backend.TILE`` / ``MAX_BLOCK_E``) so that
small tensors already exercise the multi-chunk paths of NOTE: [Triton tiling].

    timeout 600 python -m pytest -q tests/test_triton.py     (2-3 minutes on 2 shared CPU cores)
"""

from __future__ import annotations

import os

import torch

import pytest

import ramda_kernels
import ramda_ref
from ramda_kernels import backends
from ramda_kernels.testing import run_parity
from ramda_ref.definitions import DEFINITIONS, NAMES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_REASON = backends.why_unavailable("triton", DEVICE)
pytestmark = [
    pytest.mark.skipif(_REASON is not None, reason=f"triton backend: {_REASON}"),
    # the interpreter evaluates masked-off lanes too (1/0 on padding): numpy warns
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]

if _REASON is None:
    from ramda_kernels.backends import triton_backend as tb
else:  # keep collection working; every test is skipped
    tb = None

#: Small tiles: groups of more than 32 elements take the multi-chunk path.
TEST_TILE, TEST_BLOCK_E = 128, 32

#: name -> (shapes, dims, view, memory_format). Sizes 1, odd, prime, groups
#: larger than TEST_BLOCK_E (37, 54, 77), a zero-size tensor; one param group each.
GROUPINGS = {
    "linear-input": ([(13, 7), (1, 1), (37, 3), (0, 5)], (0,), None, torch.contiguous_format),
    "linear-output": ([(7, 13), (1, 1), (3, 11)], (1,), None, torch.contiguous_format),
    "conv2d-channel": ([(6, 3, 3, 3), (5, 7, 1, 1), (1, 1, 1, 1)], (0, 2, 3), None,
                       torch.contiguous_format),
    "conv2d-filter": ([(6, 3, 3, 3), (7, 5, 1, 1)], (1, 2, 3), None, torch.contiguous_format),
    "conv2d-channels-last": ([(6, 3, 3, 3), (5, 7, 1, 1)], (0, 2, 3), None, torch.channels_last),
    "conv1d-channel": ([(6, 5, 3), (11, 2, 7)], (0, 2), None, torch.contiguous_format),
    "heads": ([(12, 5)], (1, 2), (3, 4, 5), torch.contiguous_format),
}


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    monkeypatch.setattr(tb, "TILE", TEST_TILE)
    monkeypatch.setattr(tb, "MAX_BLOCK_E", TEST_BLOCK_E)


# ---------------------------------------------------------------------------
# Parity (ramda_kernels.testing.run_parity): every grouping kind as its own
# param group of one optimizer, on small tensors
# ---------------------------------------------------------------------------



def _groupings(regularizer: str, solver: str):
    if regularizer != "group_lasso":
        return ["linear-input", "conv2d-channels-last"]
    if solver == "pg":  # PG is the slow one under the interpreter: fewer layouts
        return ["linear-input", "linear-output", "conv2d-channels-last", "conv1d-channel"]
    return list(GROUPINGS)


def _parity(opt: str, regularizer: str, solver: str, dtype: str, groupings=None, **hparams):
    if DEFINITIONS[opt].solves:
        # a looser PG tolerance and cap than the defaults, so that groups stop
        # both by the inexactness rule and by the cap within a few iterations
        hparams = dict(dict(pg_eps=1e-2, max_iters=20), **hparams)
    return run_parity("triton", opt, regularizer, solver, dtype,
                      groupings or _groupings(regularizer, solver), device=DEVICE,
                      layouts=GROUPINGS, hparams=hparams)


def _cases():
    for opt in NAMES:
        for reg in ("none", "l1", "group_lasso"):
            solvers = ("exact", "pg") if DEFINITIONS[opt].solves and reg != "none" else ("exact",)
            for solver in solvers:
                yield opt, reg, solver, "fp32"
    # low precision and mixed dtypes in one param group
    for opt in NAMES:
        yield opt, "group_lasso", "exact", "bf16"
    yield "proxadamw", "group_lasso", "exact", "fp16"
    yield "proxadamw", "l1", "exact", "fp16"
    yield "ramda", "group_lasso", "exact", "mixed"
    yield "proxsgd", "group_lasso", "exact", "mixed"


@pytest.mark.parametrize("opt,regularizer,solver,dtype", list(_cases()))
def test_matches_reference(opt, regularizer, solver, dtype):
    res = _parity(opt, regularizer, solver, dtype)
    assert res.ok, str(res)
    if regularizer == "group_lasso":
        # the case is only meaningful when some but not all groups are zero
        assert 0 < res.zero_groups < res.groups, str(res)


def test_amsgrad_and_weight_decay():
    res = _parity("proxadamw", "group_lasso", "exact", "fp32", ["linear-input", "conv2d-filter"],
                  amsgrad=True, weight_decay=0.05)
    assert res.ok, str(res)


# ---------------------------------------------------------------------------
# Groups just above their threshold (NOTE: [secular equation without cancellation])
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("gsize", [16, 77])  # in registers; three chunks of TEST_BLOCK_E
@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
def test_newton_near_threshold(monkeypatch, gsize, scale):
    """fp32 groups with ``||z_g|| = T (1 + 10^-k)``, k = 1..6, and ``d`` spread over
    1..1e4: ``w_g = z_g/(d + sigma)`` with ``sigma > 0``, so ``w`` has the sign of ``z``,
    and the KKT residual (float64, on the fp32 result) is small. Written literally
    (``1/r - sigma/T``) the Newton step cancels here and sends sigma negative.

    The subproblem is set up through the RAMDA functional with zero gradients,
    ``W0 = 0`` and momentum 1, so ``z = -V``, ``d = cbrt(U)`` and ``p = w``.
    """
    monkeypatch.setattr(tb, "TILE", 8192)  # few programs: the interpreter is slow per program
    gen = torch.Generator().manual_seed(3)
    reps, ks = 64, range(1, 7)
    n_groups = reps * len(ks)
    T = scale
    # d: log-uniform in 1..1e4, with both ends present in every group
    d = 10.0 ** (4.0 * torch.rand(n_groups, gsize, generator=gen, dtype=torch.float64))
    d[:, 0], d[:, 1] = 1.0, 1e4
    d = d[:, torch.randperm(gsize, generator=gen)]
    z = torch.randn(n_groups, gsize, generator=gen, dtype=torch.float64)
    z = torch.where(z.abs() < 1e-3, 1e-3, z)  # every element has a sign
    excess = torch.tensor([10.0 ** -k for k in ks for _ in range(reps)], dtype=torch.float64)
    z = (z * (T * (1.0 + excess) / z.norm(dim=1))[:, None]).float()
    u = d.float() ** 3  # d = cbrt(U) (epsilon 0)
    d64 = u.double() ** (1.0 / 3.0)
    z64 = z.double()
    assert bool((z64.norm(dim=1) > T).all())

    p = torch.zeros(n_groups, gsize, device=DEVICE)
    tb.ramda([p], [torch.zeros_like(p)], [torch.zeros_like(p)], [(-z).to(DEVICE)], [u.to(DEVICE)],
             step=1, alpha=1.0, lr=1.0, momentum=1.0, epsilon=0.0, lambda_=T,
             regularizer="group_lasso", dims=(1,), view=None, reweight=False, solver="exact",
             max_iters=20, rtol=1e-8, pg_stop="inexact", pg_eps=1e-3)
    w = p.cpu().double()
    plan = list(tb._cache.values())[-1]  # the most recently used
    assert plan.launches[0].constexprs["ONE_CHUNK"] == (gsize <= TEST_BLOCK_E)

    wrong = (w * z64 <= 0).sum(dim=1)
    assert int(wrong.sum()) == 0, (
        f"w has the wrong sign or is zero in {int((wrong > 0).sum())}/{n_groups} groups "
        f"(excess per bad group: {excess[wrong > 0].tolist()[:8]})")
    res = ramda_ref.prox.kkt_residual(w, z64, d64, T, (1,))
    worst = int(res.argmax())
    assert float(res.max()) < 1e-4, (
        f"KKT residual {float(res.max()):.3g} at excess {float(excess[worst]):.0e}; "
        f"{int((res >= 1e-4).sum())}/{n_groups} groups over 1e-4")


# ---------------------------------------------------------------------------
# The harness's own groupings (tensors up to 1031 elements), a few cases
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("opt,regularizer,solver,dtype,grouping", [
    ("ramda", "group_lasso", "exact", "fp32", "linear-input"),
    ("proxadamw", "group_lasso", "exact", "bf16", "conv2d-channels-last"),
    ("rmda", "group_lasso", "exact", "mixed", "conv2d-filter"),
])
def test_harness_groupings(monkeypatch, opt, regularizer, solver, dtype, grouping):
    # the harness's groups reach 1031 elements: larger tiles keep the interpreter fast
    monkeypatch.setattr(tb, "TILE", 4096)
    monkeypatch.setattr(tb, "MAX_BLOCK_E", 512)
    res = run_parity(backend="triton", optimizer=opt, regularizer=regularizer, solver=solver,
                     dtype=dtype, grouping=grouping, device=DEVICE)
    assert res.ok, str(res)


# ---------------------------------------------------------------------------
# One launch per call and dtype; cached tables; fallbacks
# ---------------------------------------------------------------------------

def _count_launches(monkeypatch):
    calls = {"launch": 0, "build": 0}
    launch, build = tb._launch, tb._build_plan

    def counting_launch(*a, **k):
        calls["launch"] += 1
        return launch(*a, **k)

    def counting_build(*a, **k):
        calls["build"] += 1
        return build(*a, **k)

    monkeypatch.setattr(tb, "_launch", counting_launch)
    monkeypatch.setattr(tb, "_build_plan", counting_build)
    return calls


@pytest.mark.parametrize("regularizer", ["l1", "group_lasso"])
def test_launches_do_not_grow_with_tensor_count(monkeypatch, regularizer):
    calls = _count_launches(monkeypatch)
    tb.clear_cache()
    per_step = []
    for n in (1, 2, 9):
        params = [torch.nn.Parameter(torch.randn(3 + i, 5, device=DEVICE)) for i in range(n)]
        params.append(torch.nn.Parameter(torch.randn(0, 5, device=DEVICE)))  # skipped
        opt = ramda_kernels.RAMDA(params, lr=0.1, lambda_=0.1, regularizer=regularizer,
                                  dims=(1,) if regularizer == "group_lasso" else None,
                                  backend="triton")
        builds = calls["build"]
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            before = calls["launch"]
            opt.step()
            per_step.append(calls["launch"] - before)
        assert calls["build"] == builds + 1, "the launch plan was rebuilt on a repeated step"
    assert per_step == [1] * len(per_step), per_step


def test_one_launch_per_dtype(monkeypatch):
    calls = _count_launches(monkeypatch)
    params = [torch.nn.Parameter(torch.randn(4, 3, device=DEVICE, dtype=dt))
              for dt in (torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.bfloat16)]
    opt = ramda_kernels.ProxAdamW(params, lambda_=0.1, dims=(0,), backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert calls["launch"] == 3


def test_fallbacks_match_reference():
    """nuclear, pg_stop='rtol' and fp64 go to the reference (NOTE: [Triton fallbacks])."""
    gen = torch.Generator().manual_seed(1)
    for kwargs, dtype in ((dict(regularizer="nuclear"), torch.float32),
                          (dict(dims=(0,), solver="pg", pg_stop="rtol"), torch.float32),
                          (dict(dims=(0,)), torch.float64)):
        base = [torch.randn(5, 4, generator=gen, dtype=dtype), torch.randn(3, 2, generator=gen, dtype=dtype)]
        pf = [torch.nn.Parameter(b.clone().to(DEVICE)) for b in base]
        pr = [torch.nn.Parameter(b.clone().to(DEVICE)) for b in base]
        fast = ramda_kernels.RAMDA(pf, lr=0.1, lambda_=0.2, backend="triton", **kwargs)
        ref = ramda_ref.RAMDA(pr, lr=0.1, lambda_=0.2, **kwargs)
        for _ in range(3):
            for a, b in zip(pf, pr):
                a.grad = torch.randn(a.shape, generator=gen, dtype=dtype).to(DEVICE)
                b.grad = a.grad.clone()
            fast.step()
            ref.step()
        for a, b in zip(pf, pr):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{kwargs} {dtype}: {m}")


def test_gradient_in_another_layout_is_staged():
    """A contiguous gradient of a channels_last weight still takes the kernel."""
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(6, 3, 3, 3, generator=gen).contiguous(memory_format=torch.channels_last)
    pf = torch.nn.Parameter(base.clone(memory_format=torch.preserve_format).to(DEVICE))
    pr = torch.nn.Parameter(base.clone(memory_format=torch.preserve_format).to(DEVICE))
    fast = ramda_kernels.RAMDA([pf], lr=0.1, lambda_=0.3, dims=(0, 2, 3), backend="triton")
    ref = ramda_ref.RAMDA([pr], lr=0.1, lambda_=0.3, dims=(0, 2, 3))
    for _ in range(3):
        g = torch.randn(base.shape, generator=gen).to(DEVICE)  # contiguous
        pf.grad, pr.grad = g.clone(), g.clone()
        fast.step()
        ref.step()
    plan = list(tb._cache.values())[-1]  # the most recently used
    assert plan.staged and not plan.fallback
    torch.testing.assert_close(pf, pr, rtol=1e-5, atol=1e-6)


def test_why_unavailable_says_why():
    assert tb.why_unavailable(DEVICE) is None
    other = torch.device("cpu" if DEVICE.type == "cuda" else "cuda")
    reason = tb.why_unavailable(other)
    if other.type == "cpu":
        assert "TRITON_INTERPRET" in reason
    else:
        assert reason is not None
    assert tb.why_unavailable(torch.device("meta")) is not None


@pytest.mark.skipif(DEVICE.type != "cuda", reason="host synchronization is a CUDA notion")
def test_step_does_not_synchronize():
    params = [torch.nn.Parameter(torch.randn(33, 17, device="cuda")) for _ in range(3)]
    states = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    w0 = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    kwargs = dict(alpha=0.1, lr=0.1, momentum=0.1, epsilon=1e-6, lambda_=0.5,
                  regularizer="group_lasso", dims=(0,), view=None, reweight=True, solver="pg",
                  max_iters=20, rtol=1e-8, pg_stop="inexact", pg_eps=1e-3)
    tb.ramda(params, grads, w0, *states, step=1, **kwargs)  # builds and caches the plan
    fresh = [torch.randn_like(p) for p in params]  # new gradient tensors: the table is patched
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tb.ramda(params, grads, w0, *states, step=2, **kwargs)
        tb.ramda(params, fresh, w0, *states, step=3, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_kernel_compiles_for_h100():
    """The interpreter accepts code the compiler rejects: build every code path
    for sm_90 (no GPU needed) in a process without TRITON_INTERPRET."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "ramda_kernels.triton_kernels.compile_check",
                           "--quick", "--arch", "90"], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode == 2:
        pytest.skip(proc.stdout.strip() or proc.stderr.strip())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
