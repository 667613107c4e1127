"""Unit groups on the Triton backend (ramda_kernels/triton_kernels/units.py; docs/math.md
section 3, "Coupled groups", and section 4) against the reference (python/ramda_ref/units.py),
under TRITON_INTERPRET=1 on CPU tensors.

The cases and the comparison are tests/test_units_fused.py's (`_problem`: six tensors of
fp32 / bf16 / fp16, plain, transposed and channels_last, units spanning 1 to 6 of them;
`_run`: a state_dict reload midway; `_check`: the harness's tolerance rule per tensor and
state, ``unit_sigma`` included, zero units exactly zero), with the optimizers built on the
triton backend. Steps are fewer than there: the interpreter pays per operation."""

import copy

import pytest
import torch
from torch import nn

import ramda_kernels as rk
import test_units_fused as F
from ramda_kernels import testing as T
from ramda_kernels.backends import triton_backend as tb
from ramda_ref import units as U

pytestmark = pytest.mark.skipif(tb.why_unavailable(torch.device("cpu")) is not None,
                                reason="triton does not run CPU tensors here")


class _OnTriton:
    """``ramda_kernels`` with every optimizer built on the triton backend."""

    def __getattr__(self, name):
        cls = getattr(rk, name)
        return lambda groups, backend=None, **kw: cls(groups, backend="triton", **kw)


@pytest.fixture
def on_triton(monkeypatch):
    monkeypatch.setattr(F, "rk", _OnTriton())


@pytest.fixture
def counts(monkeypatch):
    """Launches of the unit kernel, of the per-tensor kernel, and reference unit steps."""
    from ramda_kernels.triton_kernels import units as KU

    calls = {"units": 0, "per_tensor": 0, "reference": 0}
    kernel = KU.units_step_kernel

    class Counted:
        def __getitem__(self, grid):
            calls["units"] += 1
            return kernel[grid]

    monkeypatch.setattr(KU, "units_step_kernel", Counted())
    launch = tb._launch
    monkeypatch.setattr(tb, "_launch", lambda *a, **k: (calls.__setitem__(
        "per_tensor", calls["per_tensor"] + 1), launch(*a, **k))[1])
    step = U.step
    monkeypatch.setattr(U, "step", lambda *a, **k: (calls.__setitem__(
        "reference", calls["reference"] + 1), step(*a, **k))[1])
    return calls


def _norm(params, units):
    return U.normalize_units(units, [p.shape for p in params])


def _tile_paths(KU):
    """Which tile paths (``one_chunk``: units in registers) the cached launch tables took."""
    return {t.one_chunk for per_device in KU._TABLES.values() for t in per_device.values()}


@pytest.mark.parametrize("name, registers, chunk", [(n, True, None) for n in F.NAMES] +
                         [("RAMDA", False, None), ("ProxAdamW", False, None),
                          ("RMDA", False, 16), ("ProxAdamW", False, 16)])
def test_units_match_the_reference(on_triton, counts, monkeypatch, name, registers, chunk):
    """Units in registers (`_problem`'s fit) and, with no unit held, in chunks
    re-read per Newton step (NOTE: [unit tile]); 16-element chunks put many
    chunks in one row and several rows in one chunk, which the row cursor of
    `_lanes` must walk in order."""
    from ramda_kernels.triton_kernels import units as KU

    monkeypatch.setattr(KU, "_TABLES", type(KU._TABLES)())
    if registers:  # 7 units of up to 256 elements: fewer than MIN_UNITS fit one 512-element tile
        monkeypatch.setattr(KU, "MIN_UNITS", 1)
    else:
        monkeypatch.setattr(KU, "REGISTER_E", 0)
    if chunk:
        monkeypatch.setattr(KU, "BLOCK_E", chunk)
    params, units = F._problem(0)
    norm = _norm(params, units)
    assert {len({i for i, _, _ in u}) for u in norm} == set(range(1, 7))
    fast, ref, truth = F._run(name, params, units, steps=6, reload_at=3)
    res = T.ParityResult({"name": name})
    zeros = F._check(res, fast, ref, truth, norm)
    assert res.ok, str(res)
    assert 0 < zeros < len(norm), zeros  # zero and nonzero units compared
    # one launch per step, nothing per tensor, the reference's unit step only for `ref` and `truth`
    assert counts == {"units": 6, "per_tensor": 0, "reference": 12}
    assert _tile_paths(KU) == {registers}
    if name in ("RAMDA", "ProxAdamW"):
        sigma = fast.state[fast.param_groups[0]["params"][0]][U.SIGMA_KEY]
        assert sigma.dtype == torch.float32 and sigma.shape == (len(norm),)


@pytest.mark.parametrize("name", ["RAMDA", "ProxAdamW"])
def test_units_match_the_reference_with_amsgrad_and_without_reweighting(on_triton, name):
    params, units = F._problem(2)
    extra = {"amsgrad": True} if name == "ProxAdamW" else {"reweight": False}
    lam = F.LAMBDA[name] * (1.0 if name == "ProxAdamW" else 7.0)  # c_g = 1: about sqrt(size) less
    fast, ref, truth = F._run(name, params, units, steps=5, reload_at=3, lam=lam, **extra)
    res = T.ParityResult({"name": name})
    F._check(res, fast, ref, truth, _norm(params, units))
    assert res.ok, str(res)


def test_zero_lambda_leaves_every_element_unregularized(on_triton):
    params, units = F._problem(3)
    fast, ref, truth = F._run("RAMDA", params, units, steps=3, reload_at=2, lam=0.0)
    res = T.ParityResult({})
    zeros = F._check(res, fast, ref, truth, _norm(params, units))
    assert res.ok and zeros == 0, str(res)
    assert U.SIGMA_KEY not in fast.state[fast.param_groups[0]["params"][0]]


def test_unit_sigma_is_saved_reloaded_and_kept_by_zero_units():
    """The warm start (docs/math.md section 4): each nonzero unit's sigma is written
    (the reference's, within the root floor: `test_units_match_the_reference`), saved in
    the state dict, reloaded as saved, and a unit that turns zero keeps its previous one."""
    params, units = F._problem(1)
    ps = F._clone(params)
    group = {"params": ps, "units": units, "lambda_": F.LAMBDA["ProxAdamW"], **F.HP["ProxAdamW"]}
    opt = rk.ProxAdamW([group], backend="triton")
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * F._ramp(p)).to(p.dtype)
        opt.step()
    sigma = opt.state[ps[0]][U.SIGMA_KEY]
    assert bool((sigma > 0).any())
    saved = copy.deepcopy(opt.state_dict())
    again = rk.ProxAdamW([dict(group)], backend="triton")
    again.load_state_dict(saved)
    assert torch.equal(again.state[ps[0]][U.SIGMA_KEY], sigma)
    before = sigma.clone()
    again.param_groups[0]["lambda_"] = 1e3  # every unit zero next step
    for p in ps:
        p.grad = torch.zeros_like(p)
    again.step()
    norm = _norm(params, units)
    assert all(float(F._union(ps, u).abs().max()) == 0 for u in norm)
    assert torch.equal(again.state[ps[0]][U.SIGMA_KEY], before)


@pytest.mark.parametrize("kind, name", [("resnet", "RAMDA"), ("gpt2", "ProxAdamW")])
def test_units_of_real_models_match_the_reference(on_triton, monkeypatch, kind, name):
    """test_units_fused's case of units from ``group_parameters(grouping="units")`` (a
    tiny ResNet with channels_last convolutions, GPT-2) on the triton backend."""
    from ramda_kernels.triton_kernels import units as KU

    # fewer, larger tiles: the interpreter pays per operation
    monkeypatch.setattr(KU, "REGISTER_TILE", 65536)
    monkeypatch.setattr(KU, "_TABLES", type(KU._TABLES)())
    F.test_units_of_real_models_match_the_reference(kind, name)


@pytest.mark.parametrize("n_tensors", [1, 3, 12])
def test_one_launch_per_group_whatever_the_tensor_count(counts, n_tensors):
    gen = torch.Generator().manual_seed(n_tensors)
    params = [nn.Parameter(torch.randn(5, 2 + i, generator=gen)) for i in range(n_tensors)]
    group = {"params": params, "lambda_": 0.05,
             "units": [[(i, 0, k) for i in range(n_tensors)] for k in range(4)]}  # row 4 free
    opt = rk.ProxAdamW([group], backend="triton")
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    assert counts == {"units": 2, "per_tensor": 0, "reference": 0}


def test_groups_the_kernel_does_not_take_run_on_the_reference(counts):
    """A gradient with other strides than its parameter (`_rules.unit_group_problem` with
    the unit step's capabilities): the whole group steps on the reference, with its result."""
    torch.manual_seed(0)
    base = [torch.randn(4, 3, 3, 3), torch.randn(4, 5)]
    units = [[(0, 0, k), (1, 0, k)] for k in range(4)]
    runs = []
    for backend in ("triton", "reference"):
        ps = [nn.Parameter(base[0].clone().to(memory_format=torch.channels_last)),
              nn.Parameter(base[1].clone())]
        opt = rk.RAMDA([{"params": ps, "units": units, "lambda_": 0.1}], backend=backend)
        for s in range(2):
            gen = torch.Generator().manual_seed(s)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)  # contiguous
            opt.step()
        runs.append(ps)
    assert counts["units"] == 0 and counts["per_tensor"] == 0
    for a, b in zip(*runs):
        assert torch.equal(a, b)
