"""The CUDA backend (``ramda_kernels._C`` built with CUDA) against the reference.

The same parity cases as tests/test_cpu_backend.py (shared harness
``ramda_kernels.testing``: 10 steps, parameters and state, state_dict reload
at step 5, zero groups), on a CUDA device; plus table-cache reuse and a
check that a step does not synchronize with the host.

These need a real device (the torch op dispatch to CUDA tensors, streams,
host synchronization, the device's own cbrtf and FMA contraction) and skip
with the reason when there is no GPU or the extension was built without
CUDA. The kernels themselves, with the same launch table, run on every
machine in tests/test_cuda_on_cpu.py (CUDA-on-CPU). Nothing CUDA is queried
at import time: the reason is computed by a fixture when the first test runs.

    timeout 900 python -m pytest -q tests/test_cuda_backend.py
"""

from __future__ import annotations

import pytest
import torch

from ramda_ref import definitions as RD
from ramda_kernels import backends
from ramda_kernels.testing import parity_cases, run_parity


@pytest.fixture(scope="module", autouse=True)
def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("cuda backend: needs a CUDA device (dispatch, streams, sync); the kernels "
                    "run on the CPU in tests/test_cuda_on_cpu.py")
    reason = backends.why_unavailable("cuda", "cuda")
    if reason is not None:
        pytest.skip(f"cuda backend: {reason}")


def _case_id(case):
    return "-".join(str(case[k]) for k in ("optimizer", "regularizer", "solver", "dtype", "grouping"))


CASES = list(parity_cases())


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_parity(case):
    res = run_parity(backend="cuda", device="cuda", steps=10, reload_at=5, seed=0, **case)
    assert res.ok, str(res)


def _ramda_step(params, grads, states, **over):
    hp = dict(lr=0.1, momentum=0.5, epsilon=1e-6, lambda_=0.1, pg_eps=1e-3)
    kw = dict(RD.RAMDA.scalars(2, 0.3, hp), regularizer="group_lasso", dims=[0], view=None,
              reweight=True, solver="exact", max_iters=100)
    kw.update(over)
    torch.ops.ramda_kernels.ramda_(params, grads, *states, [], **kw)  # [] : no warm start


def test_repeated_steps_do_not_synchronize():
    """After the first step (which builds and uploads the cached table), a
    step issues no host synchronization (docs/math.md section 8)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(64, 33), (7, 5, 3, 3), (1, 1), (0, 4)]
    params = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
    grads = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
    states = [[p.clone() for p in params], [torch.zeros_like(p) for p in params],
              [torch.zeros_like(p) for p in params]]
    _ramda_step(params, grads, states)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            _ramda_step(params, grads, states)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in params)


def test_current_stream_is_used():
    p = torch.randn(32, 8, device="cuda")
    g = torch.randn(32, 8, device="cuda")
    states = [[p.clone()], [torch.zeros_like(p)], [torch.zeros_like(p)]]
    expected = p.clone()
    import ramda_ref.functional as ref
    ref.ramda([expected], [g.clone()], [states[0][0].clone()], [states[1][0].clone()],
              [states[2][0].clone()], step=2, alpha=0.3, lr=0.1, momentum=0.5, epsilon=1e-6,
              lambda_=0.1, regularizer="group_lasso", dims=[0], view=None, reweight=True,
              solver="exact", max_iters=100, rtol=1e-8, pg_stop="inexact", pg_eps=1e-3)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _ramda_step([p], [g], states)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-6)
