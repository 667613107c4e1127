"""Invalid input to the reference optimizers: what raises, what the message names,
and that a refused step changed nothing."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import ramda_ref as R
from _util import assert_bitwise_equal, assert_state_equal

ALL = [R.RAMDA, R.RMDA, R.ProxAdamW, R.ProxSGD]
WITH_SOLVER = [R.RAMDA, R.ProxAdamW]
WITH_MOMENTUM = [R.RAMDA, R.RMDA, R.ProxSGD]
NAN = float("nan")


def _p(*shape, dtype=torch.float32):
    return torch.nn.Parameter(torch.randn(*shape, dtype=dtype))


# (classes, keyword arguments) that must be refused
BAD_HPARAMS = [
    (ALL, dict(lr=-0.1)),
    (ALL, dict(lr=NAN)),
    (ALL, dict(lr=math.inf)),
    (WITH_MOMENTUM, dict(momentum=0.0)),
    (WITH_MOMENTUM, dict(momentum=1.5)),
    (WITH_MOMENTUM, dict(momentum=-0.1)),
    (WITH_MOMENTUM, dict(momentum=NAN)),
    (ALL, dict(lambda_=-1.0)),
    (ALL, dict(lambda_=NAN)),
    (ALL, dict(lambda_=math.inf)),
    (WITH_SOLVER, dict(epsilon=0.0)),
    (WITH_SOLVER, dict(epsilon=-1e-8)),
    (WITH_SOLVER, dict(epsilon=NAN)),
    ([R.ProxAdamW], dict(betas=(1.0, 0.999))),
    ([R.ProxAdamW], dict(betas=(0.9, -0.1))),
    ([R.ProxAdamW], dict(betas=(0.9, NAN))),
    ([R.ProxAdamW], dict(betas=(0.9,))),
    ([R.ProxAdamW], dict(weight_decay=-0.1)),
    ([R.ProxAdamW], dict(amsgrad="yes")),
    (WITH_SOLVER, dict(max_iters=0)),
    (WITH_SOLVER, dict(max_iters=2.5)),
    (WITH_SOLVER, dict(solver="newton")),
    (WITH_SOLVER, dict(pg_stop="never")),
    (WITH_SOLVER, dict(pg_eps=0.0)),
    (WITH_SOLVER, dict(rtol=-1.0)),
    (ALL, dict(regularizer="l2")),
    (ALL, dict(dims=(2,))),        # out of range for a 2-d weight
    (ALL, dict(dims=(-3,))),
    (ALL, dict(dims=(0, 0))),
    (ALL, dict(dims=())),
    (ALL, dict(reweight=1)),
    (ALL, dict(regularizer="group_lasso", dims=(1,), view=(7, -1))),  # cannot view [4, 6] as (7, -1)
]
CASES = [(cls, kw) for classes, kw in BAD_HPARAMS for cls in classes]
IDS = [f"{cls.__name__}-{kw}" for cls, kw in CASES]


@pytest.mark.parametrize("cls,kw", CASES, ids=IDS)
def test_invalid_hyperparameters_constructor(cls, kw):
    with pytest.raises(ValueError):
        cls([_p(4, 6)], **kw)


@pytest.mark.parametrize("cls,kw", CASES, ids=IDS)
def test_invalid_hyperparameters_add_param_group(cls, kw):
    good = _p(3)
    opt = cls([good])
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [_p(4, 6)], **kw})
    assert len(opt.param_groups) == 1, "a refused group must not stay in param_groups"
    # the refused parameter can still be added correctly afterwards
    opt.add_param_group({"params": [_p(4, 6)]})


@pytest.mark.parametrize("cls", ALL)
def test_regularizer_on_0d_tensor(cls):
    for reg in ("l1", "group_lasso", "nuclear"):
        with pytest.raises(ValueError, match="0-d"):
            cls([("scale", torch.nn.Parameter(torch.tensor(1.0)))], regularizer=reg, lambda_=0.1)
    opt = cls([torch.nn.Parameter(torch.tensor(1.0))])  # fine unregularized
    with pytest.raises(ValueError, match="0-d"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.tensor(2.0))], "regularizer": "l1"})


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_unsupported_param_dtype(cls, dtype):
    t = torch.zeros(3, dtype=dtype)
    with pytest.raises(ValueError, match="'counter'"):
        cls([("counter", t)])
    opt = cls([_p(3)])
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [t]})


def test_unknown_keyword():
    with pytest.raises(TypeError):
        R.RAMDA([_p(3)], lamda=0.1)


# ---------------------------------------------------------------------------
# Bad gradients: named, raised before anything changes
# ---------------------------------------------------------------------------

def _two_group_opt(cls, nonfinite="raise"):
    torch.manual_seed(0)
    a, b = _p(4, 5), _p(6, dtype=torch.float64)
    c = _p(3, 2)
    kw = dict(lambda_=0.01) if cls is not R.ProxAdamW else dict(lambda_=0.5)
    opt = cls([{"params": [("layer1.weight", a), ("layer1.bias", b)], "dims": (0,)},
               {"params": [("layer2.weight", c)], "regularizer": "l1"}], nonfinite=nonfinite, **kw)
    for p in (a, b, c):
        p.grad = torch.randn_like(p)
    opt.step()  # create state, so "unchanged" covers it too
    for p in (a, b, c):
        p.grad = torch.randn_like(p)
    return opt, (a, b, c)


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(
        {i: dict(opt.state[p]) for i, p in enumerate(params)}), copy.deepcopy(opt.param_groups[0]["lr"])


def _assert_unchanged(opt, params, snap):
    values, states, _ = snap
    for i, p in enumerate(params):
        assert_bitwise_equal(p.detach(), values[i], f"param {i}")
        assert_state_equal(opt.state[p], states[i], f"param {i}")


def _bad_grads():
    def nan(p):
        g = torch.randn_like(p)
        g.view(-1)[1] = NAN
        return g

    def inf(p):
        g = torch.randn_like(p)
        g.view(-1)[0] = -math.inf
        return g

    def sparse(p):
        return torch.randn_like(p).to_sparse()

    def complex_(p):
        p.grad_dtype = None  # allow a gradient of another dtype
        return torch.randn(p.shape, dtype=torch.complex64)

    return {"nan": nan, "inf": inf, "sparse": sparse, "complex": complex_}


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("kind", ["nan", "inf", "sparse", "complex"])
@pytest.mark.parametrize("where", [1, 2], ids=["first-group", "second-group"])
def test_bad_gradient_raises_before_any_change(cls, kind, where):
    opt, params = _two_group_opt(cls)
    a, b, c = params
    bad, name = (b, "layer1.bias") if where == 1 else (c, "layer2.weight")
    bad.grad = _bad_grads()[kind](bad)
    snap = _snapshot(opt, params)
    with pytest.raises((RuntimeError, ValueError), match=name.replace(".", r"\.")) as info:
        opt.step()
    if kind in ("nan", "inf"):
        assert isinstance(info.value, R.NonFiniteGradientError)
    _assert_unchanged(opt, params, snap)


@pytest.mark.parametrize("cls", ALL)
def test_unnamed_parameter_is_located(cls):
    p, q = _p(3), _p(2, 2)
    opt = cls([{"params": [p]}, {"params": [q]}])
    p.grad, q.grad = torch.ones_like(p), torch.full_like(q, NAN)
    with pytest.raises(R.NonFiniteGradientError, match=r"param_groups\[1\]\['params'\]\[0\]"):
        opt.step()


@pytest.mark.parametrize("cls", ALL)
def test_nonfinite_skip_changes_nothing(cls):
    opt, params = _two_group_opt(cls, nonfinite="skip")
    params[2].grad.view(-1)[0] = math.inf
    snap = _snapshot(opt, params)
    opt.step()
    _assert_unchanged(opt, params, snap)
    # and the next good step goes on from there
    params[2].grad = torch.randn_like(params[2])
    opt.step()
    assert opt.state[params[0]]["step"] == 2


def test_invalid_nonfinite_policy():
    with pytest.raises(ValueError):
        R.RAMDA([_p(3)], nonfinite="ignore")


@pytest.mark.parametrize("cls", ALL)
def test_zero_size_parameter(cls):
    """An empty tensor (alone or beside others) steps without error and without change."""
    e, w = torch.nn.Parameter(torch.zeros(0, 3)), _p(2, 3)
    opt = cls([{"params": [e], "dims": (0,), "lambda_": 0.1}])
    e.grad = torch.zeros_like(e)
    opt.step()
    opt.add_param_group({"params": [w], "dims": (1,), "lambda_": 0.1})
    w.grad = torch.randn_like(w)
    opt.step()
    assert e.shape == (0, 3) and torch.isfinite(w).all()


@pytest.mark.parametrize("cls", ALL)
def test_param_names_group_key_names_the_parameter(cls):
    a, b = _p(3), _p(2, 2)
    opt = cls([{"params": [a, b], "param_names": ["enc.w", "enc.v"]}])
    a.grad, b.grad = torch.ones_like(a), torch.randn_like(b).to_sparse()
    before = [a.detach().clone(), b.detach().clone()]
    with pytest.raises(RuntimeError, match=r"'enc\.v'.*sparse"):
        opt.step()
    assert_bitwise_equal(a.detach(), before[0], "a")
    assert len(opt.state) == 0, "no state may be created by a refused step"


@pytest.mark.parametrize("cls", ALL)
def test_dim_alias(cls):
    """The authors' ``dim`` means ``dims``; giving both is refused, not silently resolved."""
    a = cls([_p(4, 6)], dim=(0,), lambda_=0.1)
    assert a.param_groups[0]["dims"] == (0,) and a.param_groups[0]["regularizer"] == "group_lasso"
    with pytest.raises(ValueError, match="not both"):
        cls([_p(4, 6)], dims=(1,), dim=(0,))
    with pytest.raises(ValueError, match="not both"):
        a.add_param_group({"params": [_p(2, 2)], "dims": (1,), "dim": (0,)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_huge_finite_gradient_is_not_mistaken_for_inf(dtype):
    """The CPU screen sums each gradient; a sum that overflows must not count as Inf."""
    big = torch.finfo(dtype).max / 2
    p = torch.nn.Parameter(torch.zeros(4, 3, dtype=dtype))
    p.grad = torch.full((4, 3), big, dtype=dtype)  # finite, but its sum is not
    opt = R.ProxSGD([p], lr=1e-30 if dtype == torch.float32 else 1e-6)
    opt.step()  # must not raise
    assert opt.state[p]["step"] == 1
    p.grad[1, 2] = float("nan")
    with pytest.raises(R.NonFiniteGradientError):
        opt.step()


def test_lambda_without_groups_warns():
    """lambda_ > 0 with neither dims nor regularizer regularizes nothing: say so."""
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.warns(UserWarning, match="not regularized"):
        R.RAMDA([p], lambda_=1e-3)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        R.RAMDA([p], lambda_=1e-3, regularizer="l1")
        R.RAMDA([{"params": [p], "regularizer": "none", "lambda_": 1e-3}])


@pytest.mark.parametrize("group, problem", [
    (dict(dims=(3,)), "invalid dims"),
    (dict(dims=(0,), view=(7, -1)), "cannot be viewed as"),
])
def test_grouping_errors_name_the_shape_once(group, problem):
    """An unnamed parameter's message carries its shape once, named or not."""
    p = torch.nn.Parameter(torch.zeros(5, 4))
    with pytest.raises(ValueError, match=problem) as e:
        R.RAMDA([dict(params=[p], lambda_=0.1, **group)])
    assert str(e.value).count("(5, 4)") == 1, str(e.value)
