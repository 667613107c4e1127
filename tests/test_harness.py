"""The parity harness must notice a backend that is wrong: otherwise every
backend test built on it could pass vacuously."""

import types

import pytest
import torch

import ramda_ref.functional as ref_functional
from ramda_kernels import backends
from ramda_kernels.backends import _ops
from ramda_ref.definitions import NAMES
from ramda_kernels.testing import parity_cases, run_parity


def _fake_backend(monkeypatch, mutate):
    """Install a backend named 'triton' that runs the reference, then ``mutate``s the result."""

    def wrap(name):
        def fn(params, *args, **kwargs):
            out = getattr(ref_functional, name)(params, *args, **kwargs)
            with torch.no_grad():
                mutate(params, args)
            return out
        return fn

    functionals = {n: wrap(n) for n in NAMES}
    monkeypatch.setitem(backends._loaded, "triton",
                        types.SimpleNamespace(why_unavailable=lambda device: None, **functionals))
    monkeypatch.setitem(_ops.KERNELS, "triton", functionals)


def test_reference_against_itself_passes(monkeypatch):
    _fake_backend(monkeypatch, lambda params, args: None)
    res = run_parity("triton", "ramda", "group_lasso", "exact", "fp32", "conv2d-channel")
    assert res.ok, str(res)
    assert 0 < res.zero_groups < res.groups, "the case should zero some groups, not all or none"


def test_parameter_error_is_caught(monkeypatch):
    def nudge(params, args):
        for p in params:
            p.mul_(1 + 1e-4)
    _fake_backend(monkeypatch, nudge)
    res = run_parity("triton", "ramda", "none", "exact", "fp32", "linear-output")
    assert not res.ok and res.max_param_err > 1e-5, str(res)


def test_state_error_is_caught(monkeypatch):
    def nudge_state(params, args):
        args[1][0].add_(1e-3)  # initial_points (W0) of the first tensor
    _fake_backend(monkeypatch, nudge_state)
    res = run_parity("triton", "ramda", "none", "exact", "fp32", "linear-output")
    assert not res.ok and "state" in str(res), str(res)


def test_zero_group_mismatch_is_caught(monkeypatch):
    def unzero(params, args):
        for p in params:
            p[p == 0] = 0.05  # revive every zeroed group/entry
    _fake_backend(monkeypatch, unzero)
    res = run_parity("triton", "proxsgd", "group_lasso", "exact", "fp32", "linear-input")
    assert not res.ok and res.zero_group_mismatches > 0, str(res)


def test_low_precision_bound_is_relative_to_the_references_own_error(monkeypatch):
    def one_ulp_bias(params, args):
        for p in params:
            if p.dtype == torch.bfloat16:
                p.mul_(1 + 2 ** -6)  # two bf16 ulps every step: drifts far beyond rounding
    _fake_backend(monkeypatch, one_ulp_bias)
    res = run_parity("triton", "proxsgd", "none", "exact", "bf16", "linear-output")
    assert not res.ok, str(res)


def _nudge_nonzero_by_starting_scale(ulps):
    """Move every nonzero parameter entry by ``ulps`` fp32 ulps of the tensor's
    starting scale (max |W0|: RAMDA's initial point is the initial parameter)."""
    def nudge(params, args):
        for p, w0 in zip(params, args[1]):
            if p.numel():
                p.add_(torch.where(p != 0, ulps * torch.finfo(p.dtype).eps * w0.abs().max(), 0.0))
    return nudge


@pytest.mark.parametrize("ulps, passes", [(1.0, True), (30.0, False)])
def test_floor_is_relative_to_the_starting_scale(monkeypatch, ulps, passes):
    # Most groups of this case shrink far below the starting scale (RAMDA's
    # parameters are computed from W0 and the dual averages, of that scale), so
    # one ulp of it is rounding while thirty are an error.
    _fake_backend(monkeypatch, _nudge_nonzero_by_starting_scale(ulps))
    res = run_parity("triton", "ramda", "group_lasso", "exact", "fp32", "conv1d-channel")
    assert res.zero_groups > res.groups // 2, "the case should zero most groups"
    assert res.ok == passes, str(res)


@pytest.mark.parametrize("quick", [True, False])
def test_cases_cover_the_matrix(quick):
    cases = list(parity_cases(quick=quick))
    seen = {(c["optimizer"], c["regularizer"], c["solver"]) for c in cases}
    for opt in ("ramda", "proxadamw"):
        for reg in ("l1", "group_lasso"):
            assert (opt, reg, "pg") in seen and (opt, reg, "exact") in seen
    groupings = {c["grouping"] for c in cases if c["regularizer"] == "group_lasso"}
    assert "conv2d-channels-last" in groupings
    if not quick:
        assert {"linear-input", "linear-output", "conv2d-channel", "conv2d-filter", "conv1d-channel",
                "conv3d-channel", "heads"} <= groupings
        assert {c["dtype"] for c in cases} >= {"fp32", "bf16", "fp16", "mixed"}


def test_several_groupings_are_compared_each_by_its_own_groups(monkeypatch):
    """Several groupings as param groups of one optimizer (the Triton tests'
    cases): the reference against itself passes with some groups zero in each,
    and reviving the zero groups of the last param group only is caught."""
    groupings = ["linear-input", "conv2d-filter"]
    _fake_backend(monkeypatch, lambda params, args: None)
    res = run_parity("triton", "ramda", "group_lasso", "pg", "mixed", groupings,
                     hparams=dict(pg_eps=1e-2, max_iters=20))
    assert res.ok and 0 < res.zero_groups < res.groups, str(res)
    assert res.case["grouping"] == "linear-input+conv2d-filter" and res.case["pg_eps"] == 1e-2

    def unzero_4d(params, args):
        for p in params:
            if p.dim() == 4:
                p[p == 0] = 0.05
    _fake_backend(monkeypatch, unzero_4d)
    res = run_parity("triton", "ramda", "group_lasso", "pg", "mixed", groupings,
                     hparams=dict(pg_eps=1e-2, max_iters=20))
    assert not res.ok and res.zero_group_mismatches > 0, str(res)
    assert all("(8, 3, 3, 3)" in f or "(7, 5, 1, 1)" in f or "(1, 1, 1, 1)" in f or "(2, 41, 5, 5)" in f
               for f in res.failures), res.failures
