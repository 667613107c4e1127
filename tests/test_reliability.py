"""Reliability (issue 7): determinism, checkpoints across backends, older
checkpoints, and errors that say what is wrong.

* the same inputs on the same backend and device give bitwise the same result,
  run to run;
* a state dict saved with one backend loads into another and the run goes on
  as if uninterrupted (within the backends' tolerance; bitwise on one backend);
* a state dict missing keys of this version loads with a warning and the rule
  of ``ProxOptimizer.load_state_dict``, never silently wrong;
* mixed devices in one param group, integer parameters, dims out of range and
  a regularized 0-d tensor are refused with a message naming the parameter,
  through the backend-choosing classes too (``tests/test_ref_errors.py`` covers
  the reference classes).

Backends: reference, cpu (when built), triton (CPU interpreter, tiny shapes).

    timeout 300 python -m pytest -q tests/test_reliability.py
"""

from __future__ import annotations

import copy
import io
import warnings

import torch

import pytest

import ramda_kernels as rk
import ramda_ref as R
from ramda_kernels import backends
from _util import assert_bitwise_equal, assert_close, assert_state_equal

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # interpreter


def _backend(name):
    reason = backends.why_unavailable(name, "cpu")
    return pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=f"{name}: {reason}"),
                        id=name)


BACKENDS = [_backend(b) for b in ("reference", "cpu", "triton")]
#: name -> (class name, hyperparameters); lambda_ zeroes some groups within 5 steps.
CONFIGS = {
    "ramda": ("RAMDA", dict(lr=0.1, momentum=0.5, lambda_=0.3)),
    "ramda-pg": ("RAMDA", dict(lr=0.1, momentum=0.5, lambda_=0.3, solver="pg", pg_eps=1e-2,
                               max_iters=20)),
    "rmda": ("RMDA", dict(lr=0.1, momentum=0.5, lambda_=0.4)),
    "proxadamw": ("ProxAdamW", dict(lr=0.02, weight_decay=0.01, lambda_=1.0, amsgrad=True)),
    "proxsgd": ("ProxSGD", dict(lr=0.1, momentum=0.5, lambda_=0.8)),
}
#: (shape, dims or "l1", channels_last): a channel-wise Conv2d in channels_last,
#: an output-wise Linear, an l1 bias.
TENSORS = [((4, 3, 2, 2), (0, 2, 3), True), ((5, 7), (1,), False), ((5,), "l1", False)]
STEPS, SAVE_AT = 5, 2


def _params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    out = []
    for shape, _, channels_last in TENSORS:
        x = (0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(torch.nn.Parameter(x))
    return out


def _grads(dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape, _, _ in TENSORS]
            for _ in range(STEPS)]


def _optimizer(backend, config, params):
    cls_name, hp = CONFIGS[config]
    groups = [{"params": [p], "regularizer": "l1"} if dims == "l1" else {"params": [p], "dims": dims}
              for p, (_, dims, _) in zip(params, TENSORS)]
    if backend is None:
        return getattr(R, cls_name)(groups, **hp)
    return getattr(rk, cls_name)(groups, backend=backend, **hp)


def _steps(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone(memory_format=torch.preserve_format)
        opt.step()


def _run(backend, config, dtype=torch.float32):
    params = _params(dtype)
    opt = _optimizer(backend, config, params)
    _steps(opt, params, _grads(dtype))
    return params, opt


def _resumed_run(first, second, config, dtype=torch.float32):
    """SAVE_AT steps with backend ``first``; weights and optimizer through
    torch.save / torch.load; the remaining steps with backend ``second``."""
    grads = _grads(dtype)
    params = _params(dtype)
    opt = _optimizer(first, config, params)
    _steps(opt, params, grads[:SAVE_AT])
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    del opt, params
    buf.seek(0)
    saved = torch.load(buf)
    params = [torch.nn.Parameter(t.clone(memory_format=torch.preserve_format)) for t in saved["params"]]
    opt = _optimizer(second, config, params)
    opt.load_state_dict(saved["opt"])
    _steps(opt, params, grads[SAVE_AT:])
    return params, opt


def _assert_bitwise_runs(a, b, msg):
    (pa, oa), (pb, ob) = a, b
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert_bitwise_equal(y.detach(), x.detach(), f"{msg}: param {i}")
        assert_state_equal(ob.state[y], oa.state[x], f"{msg}: param {i}")


# ---------------------------------------------------------------------------
# (a) determinism, (b) resume across backends
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_deterministic(backend, config):
    dtypes = [torch.float32] if backend == "triton" else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        first = _run(backend, config, dtype)
        _assert_bitwise_runs(first, _run(backend, config, dtype), f"{backend}/{config}/{dtype} run to run")


@pytest.mark.parametrize("config", ["ramda", "proxadamw", "proxsgd"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "reference"])
def test_resume_same_backend_is_bitwise(backend, config):
    """(The reference's own resume is tests/test_ref_state.py.)"""
    _assert_bitwise_runs(_run(backend, config), _resumed_run(backend, backend, config),
                         f"{backend}/{config} resumed")


PAIRS = [pytest.param(a, b, marks=[m for p in (_backend(a), _backend(b)) for m in p.marks], id=f"{a}-to-{b}")
         for a, b in (("reference", "triton"), ("triton", "reference"), ("reference", "cpu"),
                      ("cpu", "reference"))]


@pytest.mark.parametrize("config", ["ramda", "rmda", "proxadamw", "proxsgd"])
@pytest.mark.parametrize("first,second", PAIRS)
def test_resume_across_backends(first, second, config):
    """Saved with one backend, continued with another: the reference's uninterrupted
    run within fp32 tolerance, step counters and alpha exactly."""
    want_p, want_o = _run(None, config)
    got_p, got_o = _resumed_run(first, second, config)
    for i, (w, g) in enumerate(zip(want_p, got_p)):
        msg = f"{first}->{second} {config} param {i}"
        scale = float(w.detach().abs().max())
        assert_close(g, w, rtol=1e-5, atol=1e-6 * scale, msg=msg)
        assert got_o.state[g].keys() == want_o.state[w].keys(), msg
        for key, value in want_o.state[w].items():
            if isinstance(value, torch.Tensor):
                assert_close(got_o.state[g][key], value, rtol=1e-5,
                             atol=1e-6 * float(value.abs().max()), msg=f"{msg} state[{key!r}]")
            else:
                assert got_o.state[g][key] == value, f"{msg} state[{key!r}]"


# ---------------------------------------------------------------------------
# (c) older checkpoints: warn, and never silently wrong
# ---------------------------------------------------------------------------

def _saved(config, steps=3):
    params = _params()
    opt = _optimizer(None, config, params)
    _steps(opt, params, _grads()[:steps])
    values = [p.detach().clone(memory_format=torch.preserve_format) for p in params]
    return values, copy.deepcopy(opt.state_dict())


def _fresh(values, config):
    params = [torch.nn.Parameter(v.clone(memory_format=torch.preserve_format)) for v in values]
    return params, _optimizer(None, config, params)


def _warnings_about(record, text):
    return [str(w.message) for w in record if text in str(w.message)]


def _no_warnings(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_complete_checkpoint_loads_without_warning(config):
    values, sd = _saved(config)
    _, opt = _fresh(values, config)
    _no_warnings(lambda: opt.load_state_dict(sd))


@pytest.mark.parametrize("config,key", [("ramda", "grad_sum_sq"), ("ramda", "alpha"),
                                        ("ramda", "initial_point"), ("rmda", "grad_sum"),
                                        ("proxadamw", "exp_avg_sq"), ("proxsgd", "momentum_buffer"),
                                        ("proxsgd", "step")])
def test_missing_state_key_restarts_that_tensor(config, key):
    """The tensor whose state lacks ``key`` restarts at its next step: it then takes
    the step a fresh optimizer takes from the same weights and gradient, while
    the other tensors continue their runs."""
    values, sd = _saved(config)
    sd["state"][1].pop(key)
    params, opt = _fresh(values, config)
    with pytest.warns(UserWarning) as record:
        opt.load_state_dict(sd)
    assert [str(w.message) for w in record] == [
        f"parameter param_groups[1]['params'][0] (shape {tuple(values[1].shape)}): the loaded state "
        f"has no {key!r}; this tensor's state is dropped and restarts at its next step "
        f"(see {CONFIGS[config][0]}.load_state_dict)"]
    assert params[1] not in opt.state

    full_p, full_o = _fresh(values, config)  # the complete checkpoint, continued
    full_o.load_state_dict(_saved(config)[1])
    one_p, one_o = _fresh(values, config)  # a fresh start
    grads = _grads()[3:4]
    for ps, o in ((params, opt), (full_p, full_o), (one_p, one_o)):
        _steps(o, ps, grads)
    assert opt.state[params[1]]["step"] == 1
    assert_bitwise_equal(params[1].detach(), one_p[1].detach(), "restarted tensor vs a fresh start")
    assert_state_equal(opt.state[params[1]], one_o.state[one_p[1]], "restarted tensor")
    for i in (0, 2):
        assert_bitwise_equal(params[i].detach(), full_p[i].detach(), f"untouched tensor {i}")
        assert_state_equal(opt.state[params[i]], full_o.state[full_p[i]], f"untouched tensor {i}")


def test_missing_max_exp_avg_sq_starts_from_exp_avg_sq():
    values, sd = _saved("proxadamw")
    for st in sd["state"].values():
        st.pop("max_exp_avg_sq")
    params, opt = _fresh(values, "proxadamw")
    with pytest.warns(UserWarning) as record:
        opt.load_state_dict(sd)
    assert len(_warnings_about(record, "no 'max_exp_avg_sq' but amsgrad=True")) == len(record) == 3
    for i, p in enumerate(params):
        st = opt.state[p]
        assert st["step"] == 3
        assert_bitwise_equal(st["max_exp_avg_sq"], sd["state"][i]["exp_avg_sq"], f"param {i}")
    # without amsgrad the key is not needed: no warning
    values, sd = _saved("proxadamw")
    for g in sd["param_groups"]:
        g["amsgrad"] = False
    for st in sd["state"].values():
        st.pop("max_exp_avg_sq")
    _, opt = _fresh(values, "proxadamw")
    _no_warnings(lambda: opt.load_state_dict(sd))
    assert not opt.param_groups[0]["amsgrad"]


@pytest.mark.parametrize("config,key", [("ramda", "pg_eps"), ("ramda", "view"), ("ramda", "reweight"),
                                        ("proxadamw", "amsgrad"), ("rmda", "reweight")])
def test_missing_group_key_gets_the_default(config, key):
    """The default is the loading optimizer's (``defaults``, its constructor's
    arguments), as for a group added with `add_param_group`."""
    values, sd = _saved(config)
    for g in sd["param_groups"]:
        g.pop(key)
    params, opt = _fresh(values, config)
    with pytest.warns(UserWarning) as record:
        opt.load_state_dict(sd)
    for gi in range(len(TENSORS)):
        assert _warnings_about(record, f"param_groups[{gi}] of the loaded state dict has no {key!r}"), \
            [str(w.message) for w in record]
    for g in opt.param_groups:
        assert g[key] == opt.defaults[key]
    # and the run goes on exactly as from the complete checkpoint (the saved
    # values were the defaults)
    full_p, full_o = _fresh(values, config)
    full_o.load_state_dict(_saved(config)[1])
    for ps, o in ((params, opt), (full_p, full_o)):
        _steps(o, ps, _grads()[3:])
    _assert_bitwise_runs((full_p, full_o), (params, opt), f"{config} without {key!r}")


def test_missing_group_key_is_validated_before_loading():
    """A default that does not fit the saved group is an error, not a wrong run:
    the constructor's ``view=(-1,)`` flattens the tensors, so the saved
    group's ``dims=(0, 2, 3)`` is out of range. Nothing is loaded."""
    values, sd = _saved("ramda")
    for g in sd["param_groups"]:
        g.pop("view")
    params = [torch.nn.Parameter(v.contiguous()) for v in values]  # viewable as (-1,)
    opt = R.RAMDA([{"params": [params[0]], "dims": (0,)}, {"params": [params[1]], "dims": (0,)},
                   {"params": [params[2]], "regularizer": "l1"}], view=(-1,), lr=0.5)
    with pytest.warns(UserWarning, match="'view'"), \
            pytest.raises(ValueError, match=r"invalid dims \(0, 2, 3\)"):
        opt.load_state_dict(sd)
    assert len(opt.state) == 0 and [g["lr"] for g in opt.param_groups] == [0.5] * 3


# ---------------------------------------------------------------------------
# (d) errors that name what is wrong
# ---------------------------------------------------------------------------

def test_mixed_devices_in_one_group():
    try:
        other = torch.nn.Parameter(torch.empty(3, 4, device="meta"))
    except (RuntimeError, NotImplementedError) as e:  # pragma: no cover
        pytest.skip(f"cannot make a meta Parameter here: {e}")
    here = torch.nn.Parameter(torch.randn(3, 4))
    for cls in (R.RAMDA, R.ProxAdamW, rk.RMDA, rk.ProxSGD):
        with pytest.raises(ValueError, match=r"'enc\.w'.*meta.*'enc\.v'.*cpu.*one param group per device"):
            cls([{"params": [("enc.v", here), ("enc.w", other)]}])
        opt = cls([here])
        with pytest.raises(ValueError, match="one param group per device"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2)), other]})
        assert len(opt.param_groups) == 1
    # one group per device is fine
    R.RAMDA([{"params": [here]}, {"params": [other]}])


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_parameters_through_backend_classes(backend):
    w, b = torch.nn.Parameter(torch.randn(4, 6)), torch.nn.Parameter(torch.randn(4))
    for cls in (rk.RAMDA, rk.RMDA, rk.ProxAdamW, rk.ProxSGD):
        with pytest.raises(ValueError, match="'steps'.*int64"):
            cls([("steps", torch.zeros(3, dtype=torch.int64))], backend=backend)
        # dims valid for the weight, out of range for the bias of the same group
        with pytest.raises(ValueError, match=r"'fc\.bias' \(shape \(4,\)\): invalid dims"):
            cls([("fc.weight", w), ("fc.bias", b)], dims=(1,), backend=backend)
        with pytest.raises(ValueError, match="'scale'.*0-d"):
            cls([("scale", torch.nn.Parameter(torch.tensor(2.0)))], regularizer="l1", lambda_=0.1,
                backend=backend)
