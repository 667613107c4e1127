"""Property tests (hypothesis): random shapes, groupings, layouts, dtypes,
hyperparameters and gradient scales, judged by the parity harness's rule
(``ramda_kernels.testing.compare_runs``): after a few steps the
result under test is within 4x the same-dtype reference's own error against a
float64 reference run (plus a few ulps), state included, and the same groups
are zero except groups on the threshold.

* the reference on a permuted or non-dense (sliced) layout against itself on
  the contiguous layout: layout must not change the math;
* each fast backend available on CPU (triton under the interpreter, cpu when
  built) on a permuted layout against the reference on the same layout.

Shapes: rank 1-4, sizes 1-9, one or two tensors per param group, any
non-empty ``dims``; the exact solver (PG's iteration count may differ by one
between backends at its stopping boundary, see tests/test_cpu_backend.py).
Examples are derandomized (the same ones every run) unless
``RAMDA_HYPOTHESIS_RANDOM=1``.

    timeout 300 python -m pytest -q tests/test_property.py
"""

from __future__ import annotations

import math
import os

import torch

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ramda_kernels as rk
import ramda_ref as R
from ramda_kernels import backends
from ramda_kernels.testing import LAMBDAS, ParityResult, compare_runs, record_scales

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # interpreter

_SETTINGS = dict(deadline=None, derandomize=not os.environ.get("RAMDA_HYPOTHESIS_RANDOM"),
                 suppress_health_check=[HealthCheck.too_slow], database=None)
_CLASSES = {"ramda": "RAMDA", "rmda": "RMDA", "proxadamw": "ProxAdamW", "proxsgd": "ProxSGD"}
_LR = {"ramda": (1e-3, 0.3), "rmda": (1e-3, 0.5), "proxadamw": (1e-4, 0.05), "proxsgd": (1e-3, 0.5)}
STEPS = 3


def _log_uniform(low, high):
    return st.floats(math.log(low), math.log(high)).map(math.exp)


@st.composite
def cases(draw, layouts=("contiguous", "permuted")):
    rank = draw(st.integers(1, 4))
    sizes = st.lists(st.integers(1, 9), min_size=rank, max_size=rank).map(tuple)
    shapes = draw(st.lists(sizes, min_size=1, max_size=2))
    opt = draw(st.sampled_from(list(_CLASSES)))
    reg = draw(st.sampled_from(("none", "l1", "group_lasso")))
    grad_scale = draw(_log_uniform(1e-4, 1e4))
    # lambda_ around the harness's choice, scaled with the gradients so that the
    # zero structure stays interesting at every gradient scale
    lam = 0.0 if reg == "none" else LAMBDAS[opt][reg] * grad_scale * draw(_log_uniform(0.1, 3.0))
    hp = dict(lr=draw(_log_uniform(*_LR[opt])), lambda_=lam)
    if opt == "proxadamw":
        hp.update(weight_decay=draw(st.sampled_from((0.0, 0.01, 0.1))), amsgrad=draw(st.booleans()))
    else:
        hp.update(momentum=draw(st.floats(0.05, 1.0)))
    dims = None
    if reg == "group_lasso":
        dims = tuple(draw(st.sets(st.integers(0, rank - 1), min_size=1)))
    return dict(opt=opt, reg=reg, hp=hp, dims=dims, shapes=shapes, grad_scale=grad_scale,
                dtype=draw(st.sampled_from(("fp32", "bf16"))),
                layouts=[draw(st.sampled_from(layouts)) for _ in shapes],
                perms=[draw(st.permutations(range(rank))) for _ in shapes],
                seed=draw(st.integers(0, 2 ** 31 - 1)))


def _in_layout(x: torch.Tensor, layout: str, perm) -> torch.Tensor:
    """``x``'s values in a tensor laid out as asked: ``permuted`` is a contiguous
    tensor of the permuted shape permuted back (channels_last is one such);
    ``sliced`` is every other element of a tensor twice as large in each dim."""
    if layout == "permuted":
        inverse = sorted(range(len(perm)), key=lambda i: perm[i])
        out = torch.empty([x.shape[i] for i in perm], dtype=x.dtype).permute(inverse)
    elif layout == "sliced":
        big = torch.full([2 * s for s in x.shape], float("nan"), dtype=x.dtype)
        out = big[tuple(slice(1, None, 2) for _ in x.shape)]
    else:
        out = torch.empty(x.shape, dtype=x.dtype)
    return out.copy_(x)


def _run(case, backend):
    """(fast, ref, truth) optimizers after STEPS steps: ``backend`` on the case's
    layouts (``None``: the reference), the reference on contiguous tensors when
    ``backend`` is None and on the same layouts otherwise, and the reference in
    float64 on contiguous tensors; and the largest magnitude every parameter and
    state tensor of the float64 run had (``compare_runs``'s ``floor_scales``)."""
    gen = torch.Generator().manual_seed(case["seed"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[case["dtype"]]
    values = []
    for shape in case["shapes"]:
        col = torch.rand(shape[:1] + (1,) * (len(shape) - 1), generator=gen, dtype=torch.float64)
        values.append((0.5 * torch.randn(shape, generator=gen, dtype=torch.float64) * col).to(dtype))
    laid = [_in_layout(v, lay, perm) for v, lay, perm in zip(values, case["layouts"], case["perms"])]
    fast_p = [torch.nn.Parameter(t) for t in laid]
    if backend is None:
        ref_p = [torch.nn.Parameter(v.clone()) for v in values]
    else:
        ref_p = [torch.nn.Parameter(t.clone(memory_format=torch.preserve_format)) for t in laid]
    truth_p = [torch.nn.Parameter(v.double()) for v in values]

    def build(module, params, **kw):
        group = dict(params=params, regularizer=case["reg"], **case["hp"])
        if case["dims"] is not None:
            group["dims"] = case["dims"]
        return getattr(module, _CLASSES[case["opt"]])([group], **kw)

    fast = build(R, fast_p) if backend is None else build(rk, fast_p, backend=backend)
    ref, truth = build(R, ref_p), build(R, truth_p)
    scales = record_scales(truth)
    for k in range(STEPS):
        if k == STEPS - 1:  # the last step without averaging: p shows W~'s exact zeros
            for opt in (fast, ref, truth):
                for g in opt.param_groups:
                    if "momentum" in g:
                        g["momentum"] = 1.0
        for i, shape in enumerate(case["shapes"]):
            g = case["grad_scale"] * torch.randn(shape, generator=gen, dtype=torch.float64)
            for ps in (fast_p, ref_p, truth_p):
                ps[i].grad = torch.empty_like(ps[i]).copy_(g)
        for opt in (fast, ref, truth):
            opt.step()
        record_scales(truth, scales)
    return fast, ref, truth, scales


def _check(case, backend):
    fast, ref, truth, scales = _run(case, backend)
    res = compare_runs(ParityResult(dict(backend=backend or "reference-layout", **case)), fast, ref,
                       truth, case["reg"], case["dims"], floor_scales=scales)
    assert res.ok, str(res)


@settings(max_examples=40, **_SETTINGS)
@given(case=cases(layouts=("contiguous", "permuted", "sliced")))
def test_reference_layout_against_fp64(case):
    _check(case, None)


def _fast_backend(name, examples):
    reason = backends.why_unavailable(name, "cpu")

    @pytest.mark.skipif(reason is not None, reason=f"{name}: {reason}")
    @settings(max_examples=examples, **_SETTINGS)
    @given(case=cases())
    def test(case):
        _check(case, name)

    test.__name__ = f"test_{name}_against_reference"
    test.__doc__ = f"The {name} backend on dense layouts against the reference on the same layouts."
    return test


test_cpu_against_reference = _fast_backend("cpu", 40)
test_triton_against_reference = _fast_backend("triton", 15)
