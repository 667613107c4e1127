"""``capturable=True`` (issue 7): a step that reads nothing back to the host.

Oracles: the non-capturable reference and its float64 twin, compared with the
tolerance policy of ``ramda_kernels.testing`` (the capturable run may be at most
4x the reference's own error off the float64 run, plus a few ulps); bitwise
equality where nothing may change (skipped steps); closed forms for the step
counters. Runs the reference and, where it can run, the Triton backend (on CPU
tensors under ``TRITON_INTERPRET=1``). The CUDA-only checks (sync debug mode,
CUDA graph capture and replay) skip without a GPU.

    TRITON_INTERPRET=1 timeout 600 python -m pytest -q tests/test_capturable.py
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

import pytest

import ramda_kernels as rk
import ramda_ref
from ramda_kernels import backends
from ramda_kernels.testing import HPARAMS, LAMBDAS, ParityResult, compare_runs
from _util import TinyConvNet, assert_bitwise_equal, assert_close, assert_state_equal

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_TRITON_REASON = backends.why_unavailable("triton", DEVICE)
BACKENDS = ["reference"] + (["triton"] if _TRITON_REASON is None else [])
#: and the cpu backend, which reads its counters on the host (free on the CPU;
#: ``_ext._capturable_on_host``): every test but the no-host-read ones
_CPU_REASON = backends.why_unavailable("cpu", DEVICE)
WITH_CPU = BACKENDS + (["cpu"] if _CPU_REASON is None else [])
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="host synchronization and CUDA graphs need a CUDA device")
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # interpreter

#: 1, 7, 37 and 130 elements; with dims=(1,): one group of 1, one of 7,
#: 37 groups of 1 and 13 groups of 10 (more than the test block of 8).
SHAPES = [(1, 1), (1, 7), (37, 1), (13, 10)]
DIMS = (1,)
_CLASSES = {"ramda": "RAMDA", "rmda": "RMDA", "proxadamw": "ProxAdamW", "proxsgd": "ProxSGD"}
_HAS_SOLVER = ("ramda", "proxadamw")


def _cases():
    for opt in _CLASSES:
        for reg in ("none", "l1", "group_lasso"):
            yield opt, reg, "exact"
        if opt in _HAS_SOLVER:
            yield opt, "group_lasso", "pg"


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    """Groups of 10 take the Triton kernel's multi-chunk paths."""
    if _TRITON_REASON is None:
        from ramda_kernels.backends import triton_backend as tb
        monkeypatch.setattr(tb, "TILE", 64)
        monkeypatch.setattr(tb, "MAX_BLOCK_E", 8)


def _build(module, opt: str, params, regularizer: str, solver: str, **kwargs):
    hp = dict(HPARAMS[opt], lambda_=LAMBDAS[opt][regularizer])
    group = dict(params=params, regularizer=regularizer, **hp)
    if regularizer == "group_lasso":
        group["dims"] = DIMS
    if opt in _HAS_SOLVER:
        group.update(solver=solver, pg_eps=1e-2, max_iters=20)
    if opt != "proxadamw":
        group["momentum"] = 0.5
    return getattr(module, _CLASSES[opt])([group], **kwargs)


def _params(base, dtype=None):
    return [torch.nn.Parameter(b.to(device=DEVICE, dtype=dtype or torch.float32)) for b in base]


def _base(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return gen, [0.5 * torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]


def _set_grads(params_lists, gen, k: int, late: int = 2):
    """The same gradient for every run; tensor ``late`` gets none at step 0, so
    tensors of one call are at different steps (per-tensor step counters)."""
    for i, ref in enumerate(params_lists[0]):
        g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        for ps in params_lists:
            ps[i].grad = None if (k == 0 and i == late) else g.to(DEVICE, ps[i].dtype)


def _set_momentum(opts, value):
    for o in opts:
        for g in o.param_groups:
            if "momentum" in g:
                g["momentum"] = value


class _Tensors:
    """An optimizer seen without its step counters, for ``compare_runs`` (which
    wants numbers in the state equal): `_check_counters` checks those."""

    def __init__(self, opt):
        self.param_groups = opt.param_groups
        self.state = {p: {k: v for k, v in st.items() if k not in ("step", "alpha")}
                      for p, st in opt.state.items()}


def _compare(case, fast, ref, truth, regularizer):
    res = compare_runs(ParityResult(case), _Tensors(fast), _Tensors(ref), _Tensors(truth),
                       regularizer, DIMS, None)
    assert res.ok, str(res)
    return res


def _check_counters(fast, ref):
    """Capturable counters: 0-d tensors on the device (step float32, alpha float64),
    equal to the reference's numbers (alpha to a few float64 ulps: torch's float64
    sqrt on the CPU is not always correctly rounded)."""
    for pf, pr in zip(fast.param_groups[0]["params"], ref.param_groups[0]["params"]):
        sf, sr = fast.state[pf], ref.state[pr]
        assert isinstance(sf["step"], torch.Tensor) and sf["step"].shape == ()
        assert sf["step"].dtype == torch.float32 and sf["step"].device == pf.device
        assert float(sf["step"]) == sr["step"]
        if "alpha" in sr:
            assert sf["alpha"].dtype == torch.float64 and sf["alpha"].device == pf.device
            assert float(sf["alpha"]) == pytest.approx(sr["alpha"], rel=1e-15, abs=0)


def _run(opt, regularizer, solver, backend, steps=6, reload_at=None, dtype=None):
    """capturable run vs reference vs float64 reference; returns the three optimizers."""
    gen, base = _base()
    cap_p, ref_p, truth_p = _params(base, dtype), _params(base, dtype), _params(base, torch.float64)
    cap = _build(rk, opt, cap_p, regularizer, solver, backend=backend, capturable=True)
    ref = _build(ramda_ref, opt, ref_p, regularizer, solver)
    truth = _build(ramda_ref, opt, truth_p, regularizer, solver)
    for k in range(steps):
        if k == steps // 2:  # the final weights show the subproblem's exact zeros
            _set_momentum((cap, ref, truth), 1.0)
        if k == reload_at:
            saved = copy.deepcopy(cap.state_dict())
            cap = _build(rk, opt, cap_p, regularizer, solver, backend=backend, capturable=True)
            cap.load_state_dict(saved)
            _set_momentum((cap,), 1.0)
        _set_grads((cap_p, ref_p, truth_p), gen, k)
        for o in (cap, ref, truth):
            o.step()
    return cap, ref, truth


@pytest.mark.parametrize("backend", WITH_CPU)
@pytest.mark.parametrize("opt,regularizer,solver", list(_cases()))
def test_capturable_matches_reference(backend, opt, regularizer, solver):
    cap, ref, truth = _run(opt, regularizer, solver, backend)
    res = _compare(dict(backend=backend, optimizer=opt, regularizer=regularizer, solver=solver),
                   cap, ref, truth, regularizer)
    _check_counters(cap, ref)
    if regularizer == "group_lasso":  # meaningful only with some, not all, groups zero
        assert 0 < res.zero_groups < res.groups, str(res)


@pytest.mark.parametrize("backend", WITH_CPU)
def test_capturable_mixed_dtypes_and_amsgrad(backend):
    """bf16 and fp32 parameters in one group (fp32 state; two kernel launches, each
    picking its rows of the scalar table) and amsgrad's third state tensor."""
    gen, base = _base(1)
    mixed = lambda: [torch.nn.Parameter(b.to(DEVICE, torch.bfloat16 if i % 2 else torch.float32))
                     for i, b in enumerate(base)]
    ps = [mixed(), mixed(), _params(base, torch.float64)]
    kw = dict(lr=0.02, lambda_=1.5, dims=DIMS, amsgrad=True, weight_decay=0.01)
    opts = [rk.ProxAdamW(ps[0], backend=backend, capturable=True, **kw),
            ramda_ref.ProxAdamW(ps[1], **kw), ramda_ref.ProxAdamW(ps[2], **kw)]
    for k in range(4):
        _set_grads(ps, gen, k)
        for o in opts:
            o.step()
    _compare(dict(backend=backend, case="mixed dtypes, amsgrad"), *opts, "group_lasso")
    _check_counters(opts[0], opts[1])


# ---------------------------------------------------------------------------
# No host reads
# ---------------------------------------------------------------------------

#: Every way a tensor's value reaches the host from Python.
_HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__",
               "__complex__", "__array__", "__format__", "__repr__")


@contextmanager
def _no_host_reads():
    """On CPU a synchronization cannot be seen, so refuse every read of a value
    into Python instead (the proxy for ``torch.cuda.set_sync_debug_mode``)."""
    saved = {name: torch.Tensor.__dict__.get(name) for name in _HOST_READS}

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"host read during a capturable step: Tensor.{name}")
        return read

    try:
        for name in _HOST_READS:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, value)


def test_host_read_proxy_catches_reads():
    """The proxy itself: a non-capturable step (which reads the NaN/Inf screen) is caught."""
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = ramda_ref.RAMDA([p], lambda_=0.1, dims=DIMS)
    p.grad = torch.randn_like(p)
    with pytest.raises(AssertionError, match="host read"):
        with _no_host_reads():
            opt.step()
    with _no_host_reads():
        pass
    assert bool(torch.ones(()))  # restored


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt,regularizer,solver", [("ramda", "group_lasso", "exact"),
                                                    ("ramda", "l1", "pg"),
                                                    ("proxadamw", "group_lasso", "pg"),
                                                    ("rmda", "group_lasso", "exact"),
                                                    ("proxsgd", "l1", "exact")])
def test_step_reads_nothing_on_the_host(backend, opt, regularizer, solver):
    gen, base = _base()
    ps = _params(base)
    o = _build(rk, opt, ps, regularizer, solver, backend=backend, capturable=True)
    o.grad_scale = torch.tensor(4.0, device=DEVICE)  # as GradScaler hands them over
    o.found_inf = torch.tensor(0.0, device=DEVICE)
    for k in range(3):  # the first step creates the state, the second has one more tensor
        _set_grads((ps,), gen, k)
        with _no_host_reads():
            o.step()
    assert all(float(o.state[p]["step"]) == (2 if i == 2 else 3) for i, p in enumerate(ps))


@NEEDS_CUDA
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_does_not_synchronize_on_cuda(backend):
    gen, base = _base()
    ps = _params(base)
    o = _build(rk, "ramda", ps, "group_lasso", "pg", backend=backend, capturable=True)
    _set_grads((ps,), gen, 1)
    o.step()  # builds the state (and the Triton launch plan)
    for p in ps:
        p.grad = torch.randn_like(p)
    o.grad_scale = torch.tensor(2.0, device="cuda")
    o.found_inf = torch.tensor(0.0, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o.step()
        o.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@NEEDS_CUDA
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt,regularizer,solver", [("ramda", "group_lasso", "exact"),
                                                    ("proxadamw", "group_lasso", "pg"),
                                                    ("rmda", "l1", "exact")])
def test_cuda_graph_replay_matches_eager(backend, opt, regularizer, solver):
    """Capture one step (GradScaler's tensors included) and replay it against
    eager capturable steps; a replay with found_inf = 1 changes nothing."""
    gen, base = _base()
    pg, pe = _params(base), _params(base)
    graphed = _build(rk, opt, pg, regularizer, solver, backend=backend, capturable=True)
    eager = _build(rk, opt, pe, regularizer, solver, backend=backend, capturable=True)
    for p in pg:  # static gradients, refilled before each replay
        p.grad = torch.zeros_like(p)
    scale = torch.tensor(8.0, device="cuda")
    found = torch.tensor(0.0, device="cuda")
    graphed.grad_scale, graphed.found_inf = scale, found
    grads = [[torch.randn(p.shape, generator=gen).cuda() for p in pg] for _ in range(8)]

    def feed(k):
        for p, g in zip(pg, grads[k]):
            p.grad.copy_(g * 8.0)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: state and launch plans are built outside the graph
        for k in range(3):
            feed(k)
            graphed.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    for k in range(3, 8):
        feed(k)
        graph.replay()
    before = [p.detach().clone() for p in pg]
    state = copy.deepcopy([graphed.state[p] for p in pg])
    found.fill_(1.0)
    graph.replay()
    for p, b, st in zip(pg, before, state):
        assert_bitwise_equal(p.detach(), b, "param after a replay with found_inf=1")
        assert_state_equal(graphed.state[p], st, "state after a replay with found_inf=1")
    for k in range(8):
        for p, g in zip(pe, grads[k]):
            p.grad = g.clone()
        eager.step()
    torch.cuda.synchronize()
    for p, q in zip(pg, pe):
        assert_close(p, q, rtol=1e-6, atol=1e-7, msg="graph replay vs eager: param")
        for key, value in eager.state[q].items():
            assert_close(graphed.state[p][key], value, rtol=1e-6, atol=1e-7,
                         msg=f"graph replay vs eager: state[{key!r}]")


# ---------------------------------------------------------------------------
# GradScaler's hand-off, non-finite gradients
# ---------------------------------------------------------------------------

def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy([opt.state[p] for p in params])


def _assert_unchanged(opt, params, snap, msg):
    for i, (p, b, st) in enumerate(zip(params, *snap)):
        assert_bitwise_equal(p.detach(), b, f"{msg}: param {i}")
        assert_state_equal(opt.state[p], st, f"{msg}: param {i}")


def _two_groups(opt, params, **kwargs):
    """l1 on the first two tensors (elementwise kernel path), group lasso on the rest."""
    groups = [dict(params=params[:2], regularizer="l1", lambda_=LAMBDAS[opt]["l1"]),
              dict(params=params[2:], dims=DIMS, lambda_=LAMBDAS[opt]["group_lasso"])]
    return getattr(rk, _CLASSES[opt])(groups, **HPARAMS[opt], **kwargs)


@pytest.mark.parametrize("backend", WITH_CPU)
@pytest.mark.parametrize("opt", list(_CLASSES))
def test_found_inf_skips_and_grad_scale_unscales(backend, opt):
    """found_inf=1: params, state and step counters bitwise unchanged.
    found_inf=0, grad_scale=s, gradients g*s: the step of gradients g."""
    gen, base = _base()
    ps, qs = _params(base), _params(base)
    a = _two_groups(opt, ps, backend=backend, capturable=True)
    b = _two_groups(opt, qs, backend=backend, capturable=True)
    for k in range(4):
        _set_grads((ps, qs), gen, k + 1)
        scale = 2.0 ** (10 + k)  # exact: g*s/s == g
        for p in ps:
            p.grad.mul_(scale)
        a.grad_scale = torch.tensor(scale, device=DEVICE)
        a.found_inf = torch.tensor(0.0, device=DEVICE)
        if k == 2:
            snap = _snapshot(a, ps)
            a.found_inf = torch.tensor(1.0, device=DEVICE)
            a.step()
            _assert_unchanged(a, ps, snap, f"{opt}/{backend} found_inf=1")
            a.found_inf = torch.tensor(2.0, device=DEVICE)  # a count over two devices
            a.step()
            _assert_unchanged(a, ps, snap, f"{opt}/{backend} found_inf=2")
            continue
        a.step()
        b.step()
        for p, q in zip(ps, qs):
            assert_bitwise_equal(p.detach(), q.detach(), f"{opt}/{backend} scaled step {k}")
            assert_state_equal(a.state[p], b.state[q], f"{opt}/{backend} scaled step {k}")
    del a.grad_scale, a.found_inf


@pytest.mark.parametrize("backend", WITH_CPU)
def test_grad_scaler_training(backend):
    """torch.amp.GradScaler itself: scaled training with an overflow step equals
    unscaled training without that batch (power-of-two scales divide exactly),
    and the scaler sees the overflow (its scale halves)."""
    torch.manual_seed(0)
    plain = _Net().to(DEVICE)
    scaled = copy.deepcopy(plain)
    opt_p, opt_s = (rk.RAMDA(rk.group_parameters(m, lambda_=0.05), lr=0.05, backend=backend,
                             capturable=True) for m in (plain, scaled))
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0 ** 10, growth_interval=100)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 2, 4, 4, generator=gen).to(DEVICE),
                torch.randn(3, 4, generator=gen).to(DEVICE)) for _ in range(4)]
    loss = lambda net, batch: ((net(batch[0]) - batch[1]) ** 2).mean()
    for k, batch in enumerate(batches):
        if k != 2:
            opt_p.zero_grad()
            loss(plain, batch).backward()
            opt_p.step()
        opt_s.zero_grad()
        scaler.scale(loss(scaled, batch)).backward()
        if k == 2:
            scaled.fc.weight.grad[1, 2] = float("inf")
        scaler.step(opt_s)
        scale = scaler.get_scale()
        scaler.update()
        assert scaler.get_scale() == (scale / 2 if k == 2 else scale)
    for (n, p), q in zip(plain.named_parameters(), scaled.parameters()):
        assert_close(q, p, rtol=1e-6, atol=1e-7, msg=f"{backend}: param {n}")
        for key, value in opt_p.state[p].items():
            assert_close(opt_s.state[q][key], value, rtol=1e-6, atol=1e-7,
                         msg=f"{backend}: {n} state[{key!r}]")


@pytest.mark.parametrize("backend", WITH_CPU)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_nonfinite_gradient_is_skipped_on_the_device(backend, bad):
    """capturable defaults to nonfinite='skip': a NaN/Inf gradient anywhere skips
    the whole step on the device, and training goes on as if it had not happened."""
    gen, base = _base()
    ps, qs, ts = _params(base), _params(base), _params(base, torch.float64)
    a = _build(rk, "ramda", ps, "group_lasso", "exact", backend=backend, capturable=True)
    b = _build(ramda_ref, "ramda", qs, "group_lasso", "exact")
    truth = _build(ramda_ref, "ramda", ts, "group_lasso", "exact")
    assert a.nonfinite == "skip"
    for k in range(4):
        _set_grads((ps, qs, ts), gen, k + 1)
        if k == 1:
            snap = _snapshot(a, ps)
            ps[3].grad[2, 5] = bad
            a.step()
            _assert_unchanged(a, ps, snap, f"{backend} gradient with {bad}")
            continue
        for o in (a, b, truth):
            o.step()
    _compare(dict(backend=backend, case="after a skipped step"), a, b, truth, "group_lasso")
    _check_counters(a, b)


# ---------------------------------------------------------------------------
# state_dict round trips
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", WITH_CPU)
@pytest.mark.parametrize("direction", ["capturable->plain", "plain->capturable"])
@pytest.mark.parametrize("opt", ["ramda", "proxadamw"])
def test_state_dict_converts_counters(backend, direction, opt):
    """A checkpoint loads into either mode: counters become numbers or 0-d tensors
    (the loading optimizer's mode wins), and the continued run matches the
    reference run that never stopped."""
    src_cap = direction == "capturable->plain"
    gen, base = _base()
    ps, qs, ts = _params(base), _params(base), _params(base, torch.float64)
    kw = dict(backend=backend) if src_cap else {}
    first = _build(rk if src_cap else ramda_ref, opt, ps, "group_lasso", "exact",
                   capturable=src_cap, **kw)
    ref = _build(ramda_ref, opt, qs, "group_lasso", "exact")
    truth = _build(ramda_ref, opt, ts, "group_lasso", "exact")
    for k in range(6):
        if k == 3:
            saved = copy.deepcopy(first.state_dict())
            assert all(isinstance(st["step"], torch.Tensor) == src_cap for st in saved["state"].values())
            kw = {} if src_cap else dict(backend=backend)
            first = _build(ramda_ref if src_cap else rk, opt, ps, "group_lasso", "exact",
                           capturable=not src_cap, **kw)
            first.load_state_dict(saved)
            assert first.param_groups[0]["capturable"] == (not src_cap)
            for p in ps:
                st = first.state[p]
                assert isinstance(st["step"], torch.Tensor) == (not src_cap), st["step"]
                if "alpha" in st:
                    assert isinstance(st["alpha"], torch.Tensor) == (not src_cap), st["alpha"]
        _set_grads((ps, qs, ts), gen, k)
        for o in (first, ref, truth):
            o.step()
    _compare(dict(backend=backend, case=direction), first, ref, truth, "group_lasso")
    if src_cap:
        for p, q in zip(ps, qs):
            assert first.state[p]["step"] == ref.state[q]["step"]
            if "alpha" in ref.state[q]:
                assert first.state[p]["alpha"] == pytest.approx(ref.state[q]["alpha"], rel=1e-15)
    else:
        _check_counters(first, ref)


def test_restart_keeps_the_counter_tensors():
    """restart() zeroes the counters in place: a captured graph keeps pointing at them."""
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = ramda_ref.RAMDA([p], lambda_=0.1, dims=DIMS, capturable=True)
    p.grad = torch.randn_like(p)
    opt.step()
    step, alpha = opt.state[p]["step"], opt.state[p]["alpha"]
    opt.restart()
    assert opt.state[p]["step"] is step and opt.state[p]["alpha"] is alpha
    assert float(step) == 0.0 and float(alpha) == 0.0


# ---------------------------------------------------------------------------
# What capturable refuses, and which backend it picks
# ---------------------------------------------------------------------------

def test_refusals_name_the_problem():
    p = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="nonfinite='raise'"):
        ramda_ref.RAMDA([p], capturable=True, nonfinite="raise")
    with pytest.raises(ValueError, match="nuclear"):
        ramda_ref.RAMDA([p], capturable=True, lambda_=0.1, regularizer="nuclear")
    with pytest.raises(ValueError, match="pg_stop='rtol'"):
        ramda_ref.ProxAdamW([p], capturable=True, lambda_=0.1, dims=DIMS, solver="pg",
                            pg_stop="rtol")
    with pytest.raises(ValueError, match="Invalid capturable"):
        ramda_ref.RMDA([p], capturable="yes")
    q = torch.nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match="every param group must agree"):
        ramda_ref.ProxSGD([{"params": [p]}, {"params": [q], "capturable": True}])
    assert ramda_ref.RAMDA([p]).nonfinite == "raise"
    assert ramda_ref.RAMDA([p], capturable=True).nonfinite == "skip"
    with pytest.raises(backends.BackendUnavailableError, match="does not support capturable"):
        rk.RAMDA([p], capturable=True, backend="cuda")
    with pytest.raises(backends.BackendUnavailableError, match="does not support capturable"):
        backends.resolve("cuda", "cpu", capturable=True)
    if _CPU_REASON is None:  # the cpu backend's capturable calls read the host: CPU tensors only
        from ramda_kernels.backends import cpu
        x = torch.zeros(2, 2)
        with pytest.raises(ValueError, match="CPU tensors only"):
            cpu.proxsgd([x], [x], [x], step=[torch.ones((), device="meta")], lr=0.1, momentum=0.1,
                        lambda_=0.0, regularizer="none", dims=None, view=None, reweight=True,
                        capturable=True, found_inf=torch.zeros((), device="meta"))


def test_auto_picks_a_capturable_backend():
    on_cpu = "cpu" if _CPU_REASON is None else "reference"
    assert backends.resolve("auto", "cpu", capturable=True) == on_cpu
    if torch.cuda.is_available() and backends.why_unavailable("triton", "cuda") is None:
        assert backends.resolve("auto", "cuda", capturable=True) == "triton"
    calls = []
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = rk.RAMDA([p], lambda_=0.1, dims=DIMS, capturable=True)
    real = opt._functional

    def spy(name):
        fn = real(name)

        def run(params, *args, **kwargs):
            calls.append(backends.resolve(opt.backend, params[0].device, kwargs["capturable"]))
            return fn(params, *args, **kwargs)
        return run

    opt._functional = spy
    p.grad = torch.randn_like(p)
    opt.step()
    assert calls == [on_cpu]


# ---------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------

_Net = TinyConvNet


def test_compiled_model_trains_without_graph_breaks():
    """torch.compile(model) (aot_eager: the inductor CPU compile is slow here) trains
    with a capturable optimizer exactly like the eager model, and the model's
    forward compiles to one graph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _Net()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager")
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 4, generator=gen))
               for _ in range(3)]
    explain = torch._dynamo.explain(model)(batches[0][0])
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1
    opts = [rk.RAMDA(rk.group_parameters(m, lambda_=0.05), lr=0.05, capturable=True)
            for m in (eager, model)]
    for x, y in batches:
        for net, opt in ((eager, opts[0]), (compiled, opts[1])):
            opt.zero_grad()
            ((net(x) - y) ** 2).mean().backward()
            opt.step()
    for (n, p), q in zip(eager.named_parameters(), model.parameters()):
        assert_close(q, p, rtol=1e-5, atol=1e-6, msg=f"compiled vs eager: {n}")
    torch._dynamo.reset()


def _run_compiled_and_eager(step, compiled, eager, ps, qs, gen, steps: int = 3):
    """``steps`` steps of both optimizers on the same gradients; the compiled
    one's first step runs eagerly (it creates the state), so one compile serves
    the steps after it."""
    for k in range(steps):
        _set_grads((ps, qs), gen, k + 1)
        if k == 0:
            compiled.step()
        else:
            step()
        eager.step()


def test_compiled_reference_step_has_no_graph_breaks():
    """The reference's capturable step itself compiles to graphs with no break
    (NOTE: [capturable solves]: no host reads, so nothing forces one), and the
    compiled steps equal the eager ones."""
    torch._dynamo.reset()
    gen, base = _base()
    ps, qs = _params(base), _params(base)
    groups = lambda params: [{"params": params[3:], "dims": DIMS, "lambda_": 0.3},
                             {"params": params[:3], "regularizer": "l1", "lambda_": 0.1}]
    compiled = ramda_ref.RAMDA(groups(ps), lr=0.1, capturable=True)
    eager = ramda_ref.RAMDA(groups(qs), lr=0.1, capturable=True)
    step = torch.compile(compiled.step, backend="aot_eager", fullgraph=True)  # a break raises
    _run_compiled_and_eager(step, compiled, eager, ps, qs, gen)
    for p, q in zip(ps, qs):
        assert_close(p, q, rtol=1e-6, atol=1e-7, msg="compiled vs eager step")
        for key, value in eager.state[q].items():
            assert_close(compiled.state[p][key], value, rtol=1e-6, atol=1e-7,
                         msg=f"compiled vs eager step: state[{key!r}]")
    torch._dynamo.reset()
