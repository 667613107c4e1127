"""Sparsity onset and the ramp length (issue 14 items 9 and 11).

The averaged iterate ``p = (1 - c) p_prev + c z`` of RAMDA is exactly zero in a
group only when ``c = 1`` (or ``p_prev`` was already zero there): with a
lambda so large that every subproblem solution ``z`` is zero, the weights are
``(1-c)^k``-scaled until the ramp reaches 1 and exactly zero from that step on.
"""

import math
import warnings

import pytest
import torch
from torch import nn

import ramda_kernels as rk
from ramda_ref.schedule import check_momentum_changes, ramp_length


def _setup(ramp_steps=None, momentum=0.1, lambda_=1e6):
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False)
    groups = rk.group_parameters(nn.Sequential(model), lambda_=lambda_)
    opt = rk.RAMDA(groups, lr=0.1, momentum=momentum, backend="reference")
    sched = rk.StagewiseScheduler(opt, [1], ramp_steps=ramp_steps)
    return model, opt, sched


def _step(model, opt):
    model.weight.grad = torch.ones_like(model.weight)
    opt.step()


def test_ramp_length_and_onset():
    assert [ramp_length(c) for c in (0.1, 0.2, 0.5, 1.0)] == [100, 25, 4, 1]
    for c in (0.1, 0.3, 0.05):
        k = ramp_length(c)
        assert c * math.sqrt(k) >= 1 > c * math.sqrt(k - 1)   # i = k at the k-th step
    _, opt, sched = _setup()
    assert sched.onset() == 100
    assert rk.StagewiseScheduler(opt, [], ramp_steps=None).onset() is None  # no milestone: never
    assert rk.StagewiseScheduler(opt, [2], ramp_steps=7).onset() == 7


@pytest.mark.parametrize("ramp_steps", [None, 5])
def test_zero_groups_appear_exactly_at_the_end_of_the_ramp(ramp_steps):
    model, opt, sched = _setup(ramp_steps=ramp_steps, momentum=0.5 if ramp_steps is None else 0.1)
    onset = sched.onset()
    assert onset == (4 if ramp_steps is None else 5)
    _step(model, opt)
    sched.step()  # epoch 1 ends: milestone, restart, ramp on
    cs = []
    for k in range(1, onset + 2):
        _step(model, opt)
        cs.append(opt.param_groups[0]["momentum"])
        assert bool(model.weight.any()) == (k < onset), (k, cs)
    if ramp_steps is None:
        assert cs == [min(0.5 * math.sqrt(k), 1.0) for k in range(1, onset + 2)]
    else:
        assert cs == [min(math.sqrt(k / ramp_steps), 1.0) for k in range(1, onset + 2)]
    sched.close()


def test_ramp_steps_is_saved_and_checked():
    _, opt, sched = _setup(ramp_steps=9)
    state = sched.state_dict()
    other = rk.StagewiseScheduler(opt, [1])
    other.load_state_dict(state)
    assert other.ramp_steps == 9
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="Invalid ramp_steps"):
            rk.StagewiseScheduler(opt, [1], ramp_steps=bad)


def test_one_cycle_momentum_warns_once_and_the_stagewise_ramp_does_not():
    model, opt, sched = _setup(lambda_=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(model, opt)
        sched.step()
        for _ in range(4):  # the ramp changes momentum every step: no warning
            _step(model, opt)
    sched.close()
    model, opt, _ = _setup(lambda_=0.0)
    cycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)  # cycle_momentum=True
    with pytest.warns(UserWarning, match=r"momentum changed .* averaging weight c .* cycle_momentum=False") as rec:
        for _ in range(4):
            _step(model, opt)
            cycle.step()
    assert len([w for w in rec if "momentum changed" in str(w.message)]) == 1
    assert check_momentum_changes(opt) is None
