"""The optimizers' definitions (ramda_ref.definitions) and the user-facing checks
built on them: signatures, unknown and foreign param-group keys, foreign and
mismatched state dicts, param_names, meta-device steps, the fallback rule."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch

import ramda_kernels as rk
import ramda_ref as R
from ramda_kernels.backends import _rules
from ramda_ref import definitions as D
from _util import assert_bitwise_equal

CLASSES = [R.RAMDA, R.RMDA, R.ProxAdamW, R.ProxSGD]


def _model_param(*shape):
    p = torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(0)))
    p.grad = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    return p


# -- the step scalars against their closed forms (docs/math.md section 1) ------------

@pytest.mark.parametrize("t", [1, 2, 7, 1000])
def test_step_scalars_closed_forms(t):
    lr, lam, alpha = 0.03, 0.2, 1.7
    r = D.RAMDA.scalars(t, alpha, dict(lr=lr, momentum=0.3, epsilon=1e-6, lambda_=lam, pg_eps=1e-3))
    assert r["s"] == lr * math.sqrt(t) and r["tau"] == alpha * lam
    assert r["eps_t"] == pytest.approx(1e-3 * t ** -0.6, rel=1e-15) and r["keep"] == 1 - 0.3
    m = D.RMDA.scalars(t, alpha, dict(lr=lr, momentum=0.3, lambda_=lam))
    assert m["beta"] == math.sqrt(t) and m["thr"] == pytest.approx(alpha * lam / math.sqrt(t), rel=1e-15)
    a = D.PROXADAMW.scalars(t, None, dict(lr=lr, beta1=0.9, beta2=0.99, epsilon=1e-8,
                                          weight_decay=0.1, lambda_=lam, pg_eps=1e-3))
    assert a["step_size"] == pytest.approx(lr / (1 - 0.9 ** t), rel=1e-15)
    assert a["bias2_sqrt"] == pytest.approx(math.sqrt(1 - 0.99 ** t), rel=1e-15)
    assert a["decay"] == 1 - lr * 0.1 and a["tau"] == lr * lam


@pytest.mark.parametrize("d", list(D.DEFINITIONS.values()), ids=list(D.DEFINITIONS))
def test_step_scalars_same_for_numbers_and_tensors(d):
    """The plain and the capturable step share the function: float64 tensors
    of t and alpha give the numbers' float64 values."""
    hp = dict(lr=0.05, momentum=0.2, epsilon=1e-6, lambda_=0.3, pg_eps=1e-3, beta1=0.9,
              beta2=0.999, weight_decay=0.01)
    steps = [1, 3, 50]
    alphas = [0.05, 0.4, 9.0]
    vec = d.scalars(torch.tensor(steps, dtype=torch.float32), torch.tensor(alphas, dtype=torch.float64), hp)
    for i, (t, a) in enumerate(zip(steps, alphas)):
        num = d.scalars(t, a, hp)
        assert set(num) == set(vec)
        for key, value in num.items():
            got = vec[key][i].item() if isinstance(vec[key], torch.Tensor) else vec[key]
            assert got == pytest.approx(value, rel=1e-15, abs=0.0), key


# -- signatures and keys ------------------------------------------------------------

@pytest.mark.parametrize("cls", [rk.RAMDA, rk.RMDA, rk.ProxAdamW, rk.ProxSGD])
def test_public_signatures_show_hyperparameters(cls):
    params = inspect.signature(cls).parameters
    d = cls._definition
    for h in d.hparams:
        assert params[h.name].default == h.default, h.name
    assert params["backend"].default == "auto" and "nonfinite" in params


def test_misspelled_key_is_refused_with_a_suggestion():
    p = _model_param(4, 6)
    with pytest.raises(ValueError, match=r"'lambda'.*did you mean 'lambda_'"):
        R.RAMDA([{"params": [p], "lambda": 5.0, "dims": (1,)}])
    with pytest.raises(TypeError, match=r"keyword argument 'lamda_'.*did you mean 'lambda_'"):
        R.RAMDA([p], lamda_=5.0)
    with pytest.raises(TypeError, match=r"'weight_decay' is a hyperparameter of ProxAdamW"):
        R.RAMDA([p], weight_decay=0.1)


@pytest.mark.parametrize("key,value", [("weight_decay", 0.1), ("betas", (0.9, 0.99))])
def test_foreign_key_names_the_optimizer_that_takes_it(key, value):
    opt = R.RAMDA([_model_param(3)])
    with pytest.raises(ValueError, match=rf"'{key}' is a hyperparameter of ProxAdamW, not of RAMDA"):
        opt.add_param_group({"params": [_model_param(4)], key: value})
    assert len(opt.param_groups) == 1


def test_scheduler_keys_are_accepted():
    p = _model_param(4)
    opt = R.RAMDA([{"params": [p], "initial_lr": 0.01}])
    torch.optim.lr_scheduler.StepLR(opt, 1)  # writes initial_lr itself
    assert opt.param_groups[0]["initial_lr"] == 0.01


def test_add_param_group_fills_in_param_names():
    m = torch.nn.Linear(3, 4)
    opt = R.RAMDA([{"params": [m.weight], "param_names": ["weight"]}])
    opt.add_param_group({"params": [m.bias]})
    assert opt.param_groups[1]["param_names"] == ["param_groups[1][0]"]
    sd = opt.state_dict()  # torch's state_dict needs names on every group
    assert sd["param_groups"][1]["param_names"] == ["param_groups[1][0]"]


# -- state dicts ----------------------------------------------------------------------

def test_torch_adamw_state_dict_is_refused_naming_both():
    p = _model_param(4, 6)
    adamw = torch.optim.AdamW([p])
    adamw.step()
    opt = rk.RAMDA([p], lambda_=0.1, dims=(1,))
    with pytest.raises(ValueError, match=r"comes from torch\.optim\.AdamW, not from RAMDA"):
        opt.load_state_dict(adamw.state_dict())
    assert opt.param_groups[0]["regularizer"] == "group_lasso" and len(opt.state) == 0


def test_proxadamw_state_dict_is_refused_by_ramda():
    p = _model_param(4, 6)
    src = rk.ProxAdamW([p], lambda_=0.1, dims=(1,))
    src.step()
    dst = rk.RAMDA([p], lambda_=0.1, dims=(1,))
    with pytest.raises(ValueError, match=r"comes from ProxAdamW, not from RAMDA"):
        dst.load_state_dict(src.state_dict())
    back = rk.ProxAdamW([p], lambda_=0.1, dims=(1,))
    back.load_state_dict(src.state_dict())  # its own kind still loads


@pytest.mark.parametrize("src_cls, dst_cls", [(rk.RMDA, rk.RAMDA), (R.RMDA, rk.RAMDA),
                                              (rk.ProxSGD, rk.RMDA)])
def test_state_dict_of_an_optimizer_whose_keys_fit_is_refused(src_cls, dst_cls):
    """RMDA's keys are a subset of RAMDA's, so only the saver's name tells them apart."""
    p = _model_param(4, 6)
    src = src_cls([p], lambda_=0.1, dims=(1,))
    src.step()
    dst = dst_cls([p], lambda_=0.1, dims=(1,))
    with pytest.raises(ValueError, match=rf"comes from {src_cls.__name__}, not from {dst_cls.__name__}"):
        dst.load_state_dict(src.state_dict())
    assert len(dst.state) == 0
    same = type(src)([p], lambda_=0.1, dims=(1,))
    same.load_state_dict(src.state_dict())  # its own kind still loads


def test_reference_and_kernels_state_dicts_interchange():
    p = _model_param(4, 6)
    ref = R.RAMDA([p], lambda_=0.1, dims=(1,))
    ref.step()
    fast = rk.RAMDA([p], lambda_=0.1, dims=(1,))
    fast.load_state_dict(ref.state_dict())
    assert fast.state[p]["step"] == 1


@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_state_tensor_mismatch_is_named_on_load(bad):
    p = _model_param(4, 6)
    opt = R.RAMDA([{"params": [p], "param_names": ["fc.weight"], "lambda_": 0.1, "dims": (1,)}])
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["grad_sum"] = (torch.zeros(3, 6) if bad == "shape"
                                  else torch.zeros(4, 6, dtype=torch.int32))
    fresh = R.RAMDA([{"params": [p], "param_names": ["fc.weight"], "lambda_": 0.1, "dims": (1,)}])
    fresh.step()
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in fresh.state[p].items()}
    with pytest.raises(ValueError, match=rf"'fc.weight': the loaded state 'grad_sum' has {bad}"):
        fresh.load_state_dict(sd)
    for key, value in before.items():  # a refused load changed nothing
        if isinstance(value, torch.Tensor):
            assert_bitwise_equal(fresh.state[p][key], value, key)
        else:
            assert fresh.state[p][key] == value


# -- meta tensors -------------------------------------------------------------------

@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
@pytest.mark.parametrize("solver", ["exact", "pg"])
def test_meta_device_step(cls, solver):
    p = torch.nn.Parameter(torch.empty(4, 6, device="meta"))
    p.grad = torch.empty(4, 6, device="meta")
    kw = dict(lambda_=0.1, dims=(1,))
    if cls._definition.solves:
        kw["solver"] = solver
    opt = cls([p], **kw)
    opt.step()
    assert opt.state[p]["step"] == 1
    assert all(v.device.type == "meta" for v in opt.state[p].values() if isinstance(v, torch.Tensor))


# -- the one fallback rule (NOTE: [Fused-backend fallbacks]) --------------------------

def test_whole_call_rule_looks_at_the_threshold():
    assert _rules.whole_call_to_reference("nuclear", "pg", "inexact", 0.1)
    assert not _rules.whole_call_to_reference("nuclear", "pg", "inexact", 0.0)
    assert _rules.whole_call_to_reference("group_lasso", "pg", "rtol", 0.1)
    assert not _rules.whole_call_to_reference("group_lasso", "exact", "rtol", 0.1)


def test_tensor_rule_per_capabilities():
    p = torch.zeros(4, 6)
    g16 = torch.zeros(4, 6, dtype=torch.bfloat16)
    st = [torch.zeros(4, 6)]
    plain, triton = _rules.Capabilities(max_dims=8), _rules.Capabilities(
        mixed_grad_dtype=True, grad_layout_staged=True, strided_groups=True)
    assert "gradient dtype" in _rules.tensor_problem(p, g16, st, plain)
    assert _rules.tensor_problem(p, g16, st, triton) is None
    assert "parameter dtype" in _rules.tensor_problem(p.double(), p.double(), st, triton)
    assert "state dtype" in _rules.tensor_problem(p, p, [st[0].double()], plain)
    t = torch.zeros(6, 4).t()  # strided, dense
    assert _rules.tensor_problem(t, t.clone(), [torch.zeros(6, 4)], plain) is not None
    big = torch.zeros([1] * 9)
    assert "9 dimensions" in _rules.tensor_problem(big, big, [], plain)
    assert _rules.tensor_problem(big, big, [], triton) is None


# -- the extension missing ----------------------------------------------------------

def test_missing_extension_says_not_built(tmp_path):
    """A tree without ramda_kernels._C: the backends say "not built" (it said
    "cannot import name '_C' from partially initialized module")."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "ramda_kernels", tmp_path / "ramda_kernels",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "_build_info.json", "__pycache__"))
    # an editable install of the package elsewhere would otherwise supply its _C
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
            "from ramda_kernels import backends\n"
            "print(backends.why_unavailable('cpu', 'cpu'))\n")
    env = {"PYTHONPATH": f"{tmp_path}:{root / 'python'}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                         capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("not built: "), out.stdout
    assert "circular import" not in out.stdout
