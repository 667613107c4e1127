"""RAMDA's and RMDA's W0 in the parameter's dtype, and the optimizers' state bytes
(issue 16, deliverable 4; docs/math.md section 9).

W0 is a copy of the parameter at the first step or the last restart, so for
bf16 / fp16 parameters it is exactly representable in their dtype: kept
there it takes 2 B instead of 4 and every result stays bitwise what the fp32
form gives. The old fp32 form is checked three ways: the reference run on
fp32 W0 (its functional reads any dtype), checkpoints of the fp32 form
loaded mid-run on every backend, and an fp32 W0 put into the state by hand,
which every fused backend must send to the reference instead of misreading.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

import ramda_kernels as rk
import ramda_ref as R
from ramda_kernels import backends
from ramda_kernels.backends import _rules
from ramda_ref import definitions as D
from _util import assert_bitwise_equal

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import state_bytes as SB  # noqa: E402

HALF = [torch.bfloat16, torch.float16]
ALL = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
BACKENDS = [b for b in ("reference", "cpu", "triton") if backends.why_unavailable(b, "cpu") is None]
#: (optimizer, keywords per param group) of the bitwise runs: the exact solve
#: with its warm start, PG, l1 and RMDA's prox
RUNS = {
    "ramda-exact": ("RAMDA", dict(lr=0.05, momentum=0.3, lambda_=0.05)),
    "ramda-pg": ("RAMDA", dict(lr=0.05, momentum=0.3, lambda_=0.05, solver="pg")),
    "ramda-l1": ("RAMDA", dict(lr=0.05, momentum=0.3, lambda_=0.02, regularizer="l1")),
    "rmda": ("RMDA", dict(lr=0.1, momentum=0.3, lambda_=0.02)),
}
STEPS, RESTART_AFTER = 12, 5


def _params(dtype):
    """Input-wise, output-wise and channel-wise groups, and an unregularized bias."""
    gen = torch.Generator().manual_seed(0)
    shapes = [((24, 20), (0,)), ((18, 12), (1,)), ((6, 4, 3, 3), (0, 2, 3)), ((20,), None)]
    return [(torch.nn.Parameter((0.3 * torch.randn(s, generator=gen)).to(dtype)), d)
            for s, d in shapes]


def _optimizer(cls, kw, params, backend):
    groups = []
    for p, dims in params:
        g = dict(params=[p], **kw)
        if dims is None:
            g["regularizer"] = "none"
        elif g.get("regularizer") != "l1":
            g["dims"] = dims
        groups.append(g)
    return cls(groups, backend=backend) if backend is not None else cls(groups)


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p, _ in params:
        p.grad = ((1 + step % 3) * torch.randn(p.shape, generator=gen)).to(p.dtype)


def _old_form(opt):
    """The state as it was before W0 kept the parameter's dtype: W0 in fp32."""
    for st in opt.state.values():
        if "initial_point" in st:
            st["initial_point"] = st["initial_point"].float()


def _run(case, dtype, backend, *, force_old=False, reload_old_at=()):
    """``STEPS`` steps with a restart after step ``RESTART_AFTER``. ``force_old``:
    W0 put back into fp32 after every state creation and restart (the reference's
    functional reads it so). ``reload_old_at``: after these steps the state dict
    is saved with W0 converted to fp32 and loaded into a new optimizer."""
    name, kw = RUNS[case]
    cls = getattr(rk if backend is not None else R, name)
    params = _params(dtype)
    opt = _optimizer(cls, kw, params, backend)
    for step in range(STEPS):
        _grads(params, step)
        opt.step()
        if step == RESTART_AFTER:
            opt.restart()
        if force_old and step in (0, RESTART_AFTER):
            _old_form(opt)
        if step in reload_old_at:
            saved = copy.deepcopy(opt.state_dict())  # torch's holds the live state dicts
            for st in saved["state"].values():
                st["initial_point"] = st["initial_point"].float()
            opt = _optimizer(cls, kw, params, backend)
            opt.load_state_dict(saved)
            for p, _ in params:
                assert opt.state[p]["initial_point"].dtype == dtype
    return params, opt


def _assert_same_run(a, b, what):
    (pa, oa), (pb, ob) = a, b
    for i, ((p, _), (q, _)) in enumerate(zip(pa, pb)):
        assert_bitwise_equal(p, q, f"{what}: params[{i}]")
        sa, sb = oa.state[p], ob.state[q]
        for key in ("grad_sum", "grad_sum_sq", "sigma"):
            if key in sa or key in sb:
                assert_bitwise_equal(sa[key], sb[key], f"{what}: params[{i}] {key}")
        # by value: one form is fp32, the other the parameter's dtype
        assert torch.equal(sa["initial_point"].double(), sb["initial_point"].double()), what
        assert (sa["step"], sa["alpha"]) == (sb["step"], sb["alpha"]), what


# -- the dtype rule -------------------------------------------------------------

@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("case", list(RUNS) + ["proxadamw", "proxsgd"])
def test_state_dtypes_follow_the_definition(case, dtype):
    name, kw = RUNS.get(case, ({"proxadamw": "ProxAdamW", "proxsgd": "ProxSGD"}.get(case), {}))
    params = _params(dtype)
    first = [p.detach().clone() for p, _ in params]
    opt = _optimizer(getattr(R, name), kw, params, None)
    _grads(params, 0)
    opt.step()
    d = opt._definition
    float_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for (p, _), p0 in zip(params, first):
        for key, value in opt.state[p].items():
            if not isinstance(value, torch.Tensor):
                continue
            want = dtype if key == "initial_point" else float_dtype
            assert value.dtype == want == d.state_dtype(key, dtype), (case, key, value.dtype)
        if "initial_point" in opt.state[p]:
            assert_bitwise_equal(opt.state[p]["initial_point"], p0, f"{case}: W0 is the first p")


# -- bitwise the fp32 form -------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", list(RUNS))
def test_reference_matches_the_fp32_form(case, dtype):
    """The reference on bf16 / fp16 W0 and on fp32 W0 (the form before):
    parameters, V, U and sigma bitwise equal over 12 steps and a restart."""
    new = _run(case, dtype, None)
    old = _run(case, dtype, None, force_old=True)
    assert old[1].state[old[0][0][0]]["initial_point"].dtype == torch.float32
    _assert_same_run(new, old, f"{case} {dtype}")


# the Triton interpreter takes minutes per run: its cases are the exact solve and RMDA
_LOADS = [(c, b) for b in BACKENDS for c in ("ramda-exact", "ramda-pg", "rmda")
          if not (b == "triton" and c == "ramda-pg")]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case,backend", _LOADS)
def test_fp32_form_checkpoints_load_exactly(case, dtype, backend):
    """State dicts of the fp32 form loaded mid-run (before and after the
    restart) convert exactly: the run is bitwise the uninterrupted one."""
    straight = _run(case, dtype, backend)
    reloaded = _run(case, dtype, backend, reload_old_at=(2, 8))
    _assert_same_run(straight, reloaded, f"{case} {dtype} {backend}")


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case,backend", [(c, b) for c, b in _LOADS if b != "reference"
                                          and (b != "triton" or c == "ramda-exact")])
def test_fused_backends_send_an_fp32_w0_to_the_reference(case, dtype, backend):
    """A bf16 parameter with an fp32 W0 put there by hand: the fused backend's
    step is the reference's step (bitwise), not a kernel misreading W0."""
    name, kw = RUNS[case]
    params, fused = _run(case, dtype, backend)
    clones = [(torch.nn.Parameter(p.detach().clone()), d) for p, d in params]
    ref = _optimizer(getattr(R, name), kw, clones, None)
    ref.load_state_dict(fused.state_dict())
    _old_form(fused)
    _old_form(ref)
    _grads(params, STEPS)
    _grads(clones, STEPS)
    fused.step()
    ref.step()
    _assert_same_run((params, fused), (clones, ref), f"{case} {dtype} {backend}")
    assert fused.state[params[0][0]]["initial_point"].dtype == torch.float32


def test_the_rule_checks_each_state_in_its_dtype():
    p = torch.zeros(4, 3, dtype=torch.bfloat16)
    v, u = torch.zeros(4, 3), torch.zeros(4, 3)
    caps = _rules.Capabilities()
    own = _rules.own_dtype_flags(D.RAMDA, ("initial_point", "grad_sum", "grad_sum_sq"))
    assert own == (True, False, False)
    assert _rules.tensor_problem(p, p, [p.clone(), v, u], caps, own_dtype=own) is None
    assert "state dtype torch.float32" in _rules.tensor_problem(p, p, [v.clone(), v, u], caps,
                                                                own_dtype=own)
    assert "state dtype torch.bfloat16" in _rules.tensor_problem(p, p, [p.clone(), p.clone(), u],
                                                                 caps, own_dtype=own)
    # without flags every state is read as fp32 (ProxAdamW, ProxSGD)
    assert "state dtype" in _rules.tensor_problem(p, p, [p.clone()], caps)


# -- loading ------------------------------------------------------------------------

def _one_step(dtype):
    """The reference RAMDA after its first step on `_params`: ``(params, optimizer)``."""
    params = _params(dtype)
    opt = _optimizer(R.RAMDA, RUNS["ramda-exact"][1], params, None)
    _grads(params, 0)
    opt.step()
    return params, opt


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_an_fp32_w0_it_cannot_represent_is_refused(dtype):
    params, opt = _one_step(dtype)
    saved = copy.deepcopy(opt.state_dict())
    before = {k: v.clone() for k, v in opt.state[params[1][0]].items() if isinstance(v, torch.Tensor)}
    w0 = saved["state"][1]["initial_point"].float()
    w0[1, 2] += 2.0 ** -12 * w0[1, 2].abs() + 1e-30  # between two numbers of the dtype
    saved["state"][1]["initial_point"] = w0
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\].*'initial_point'.*"
                                         r"cannot represent.*nothing was loaded"):
        opt.load_state_dict(saved)
    for k, v in before.items():
        assert_bitwise_equal(opt.state[params[1][0]][k], v, f"state {k} after the refused load")
    # out of range for fp16, representable for bf16
    saved["state"][1]["initial_point"] = torch.full_like(w0, 2.0 ** 17)
    if dtype == torch.float16:
        with pytest.raises(ValueError, match="cannot represent"):
            opt.load_state_dict(saved)
    else:
        opt.load_state_dict(saved)
        assert opt.state[params[1][0]]["initial_point"].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_state_dict_round_trips(dtype):
    params, opt = _one_step(dtype)
    saved = opt.state_dict()
    assert saved["state"][0]["initial_point"].dtype == dtype
    other = _optimizer(R.RAMDA, RUNS["ramda-exact"][1], params, None)
    other.load_state_dict(saved)
    for p, _ in params:
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor):
                assert_bitwise_equal(other.state[p][k], v, f"state {k}")


def test_a_restart_writes_w0_in_the_parameter_dtype():
    params, opt = _one_step(torch.bfloat16)
    _old_form(opt)  # an fp32 W0 put there by hand
    opt.restart()
    for p, _ in params:
        assert_bitwise_equal(opt.state[p]["initial_point"], p.detach(), "W0 after restart")


# -- state bytes ------------------------------------------------------------------------

def _expected_bytes(case, dtype, shape):
    """Per element and per group bytes from the definitions: each state key's
    dtype (``Definition.state_dtype``) and whether it is kept per group."""
    label, class_name, kwargs, grouped = case
    if class_name.startswith("torch.optim."):  # AdamW: exp_avg, exp_avg_sq in the param dtype
        return 2 * torch.empty((), dtype=dtype).element_size(), 0
    d = getattr(rk, class_name)._definition
    group = dict(d.defaults, **kwargs)
    group["regularizer"] = "group_lasso" if grouped else "none"
    per_elem = per_group = 0
    for key in d.state_keys(group):
        size = torch.empty((), dtype=d.state_dtype(key, dtype)).element_size()
        if key in d.per_group_state:
            per_group += size
        else:
            per_elem += size
    return per_elem, per_group


#: The issue's numbers, by hand: RAMDA keeps W0 (the parameter's dtype), V and
#: U (fp32); RMDA W0 and V; ProxAdamW m, v (and vmax); ProxSGD its buffer;
#: the exact group-lasso solve one fp32 sigma per group.
BY_HAND = {
    "RAMDA": {torch.float32: 12, torch.bfloat16: 10, torch.float16: 10},
    "RMDA": {torch.float32: 8, torch.bfloat16: 6, torch.float16: 6},
    "ProxAdamW": {torch.float32: 8, torch.bfloat16: 8, torch.float16: 8},
    "ProxAdamW, amsgrad": {torch.float32: 12, torch.bfloat16: 12, torch.float16: 12},
    "ProxSGD": {torch.float32: 4, torch.bfloat16: 4, torch.float16: 4},
    "torch.optim.AdamW": {torch.float32: 8, torch.bfloat16: 4, torch.float16: 4},
}


@pytest.mark.parametrize("dtype", list(SB.DTYPES.values()), ids=str)
@pytest.mark.parametrize("case", SB.CASES, ids=[c[0] for c in SB.CASES])
def test_state_bytes_match_the_definitions(case, dtype):
    shape = (48, 20)
    row = SB.measure(case, dtype, torch.device("cpu"), shape)
    per_elem, per_group = _expected_bytes(case, dtype, shape)
    assert row["per_element"] == per_elem, row
    assert row["per_group"] == per_group, row
    # 0-d counters: torch's AdamW keeps a float32 step tensor, this package numbers
    assert row["per_tensor"] == (4 if case[1] == "torch.optim.AdamW" else 0), row
    base = case[0].split(", group lasso")[0].split(", momentum")[0]
    assert per_elem == BY_HAND[base][dtype]
    assert per_group == (4 if "group lasso" in case[0] else 0)


def test_state_bytes_table_has_every_case():
    text = SB.table(torch.device("cpu"), (16, 8))
    lines = text.splitlines()
    assert len(lines) == 2 + len(SB.CASES)
    ramda = next(l for l in lines if l.startswith("| RAMDA |"))
    assert ramda == "| RAMDA | 12 | 10 | 10 |"
