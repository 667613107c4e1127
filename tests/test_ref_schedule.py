"""Restarts and schedules (docs/math.md section 6), simulated by hand in numpy."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import ramda_ref as R
from _util import assert_bitwise_equal, assert_close, assert_state_equal

F64 = torch.float64


def _grads(n, shape=(3, 4), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=F64) for _ in range(n)]


def _soft(y, thr):
    return np.sign(y) * np.maximum(np.abs(y) - thr, 0)


class HandRAMDA:
    """RAMDA (adaptive=True) or RMDA (adaptive=False) with l1, one tensor, by hand."""

    def __init__(self, x, lr, c, eps, lam, adaptive):
        self.x, self.lr, self.c, self.eps, self.lam, self.adaptive = x.copy(), lr, c, eps, lam, adaptive
        self.restart()

    def restart(self):
        self.t, self.alpha, self.W0 = 0, 0.0, self.x.copy()
        self.V, self.U = np.zeros_like(self.x), np.zeros_like(self.x)

    def step(self, g):
        self.t += 1
        s = self.lr * math.sqrt(self.t)
        self.alpha += s
        self.V = self.V + s * g
        self.U = self.U + s * g * g
        d = np.cbrt(self.U) + self.eps if self.adaptive else math.sqrt(self.t)
        # argmin <V, W> + 1/2 sum d (W - W0)^2 + alpha lam |W|
        Wt = _soft(self.W0 - self.V / d, self.alpha * self.lam / d)
        self.x = (1 - self.c) * self.x + self.c * Wt


@pytest.mark.parametrize("cls", [R.RAMDA, R.RMDA])
def test_restart_then_steps_by_hand(cls):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, generator=gen, dtype=F64)
    p = torch.nn.Parameter(x0.clone())
    kw = dict(lr=0.1, momentum=0.5, lambda_=0.3, regularizer="l1")
    if cls is R.RAMDA:
        kw["epsilon"] = 1e-3
    opt = cls([p], **kw)
    opt.restart()  # no state yet: nothing to do
    hand = HandRAMDA(x0.numpy(), 0.1, 0.5, 1e-3, 0.3, cls is R.RAMDA)
    for i, g in enumerate(_grads(6)):
        if i == 3:
            opt.restart()
            hand.restart()
        p.grad = g.clone()
        opt.step()
        hand.step(g.numpy())
        assert_close(p, hand.x, rtol=1e-12, atol=1e-15, msg=f"{cls.__name__} step {i}")
    assert opt.state[p]["step"] == 3


@pytest.mark.parametrize("cls", [R.RAMDA, R.RMDA])
def test_stagewise_by_hand(cls):
    """Milestones at epochs 2 and 4: lr *= gamma (and RAMDA's eps), restart; after
    the last one the i-th step (i = 1, 2, ...) uses c = min(c0 sqrt(i), 1)."""
    steps_per_epoch, epochs, milestones, gamma = 3, 8, [2, 4], 0.1
    lr, c0, eps, lam = 0.2, 0.3, 1e-2, 0.05
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 4, generator=gen, dtype=F64)
    p = torch.nn.Parameter(x0.clone())
    kw = dict(lr=lr, momentum=c0, lambda_=lam, regularizer="l1")
    if cls is R.RAMDA:
        kw["epsilon"] = eps
    opt = cls([p], **kw)
    sched = R.StagewiseScheduler(opt, milestones, gamma)
    hand = HandRAMDA(x0.numpy(), lr, c0, eps, lam, cls is R.RAMDA)
    grads = iter(_grads(steps_per_epoch * epochs, seed=3))
    ramp = 0
    seen_c = []
    for epoch in range(1, epochs + 1):
        for _ in range(steps_per_epoch):
            g = next(grads)
            if ramp:
                hand.c = min(c0 * math.sqrt(ramp), 1.0)
                ramp += 1
            p.grad = g.clone()
            opt.step()
            hand.step(g.numpy())
            assert opt.param_groups[0]["momentum"] == pytest.approx(hand.c, rel=1e-15)
            seen_c.append(opt.param_groups[0]["momentum"])
            assert_close(p, hand.x, rtol=1e-11, atol=1e-14, msg=f"epoch {epoch}")
        sched.step()
        if epoch in milestones:
            hand.lr *= gamma
            hand.eps *= gamma
            hand.restart()
            st = opt.state[p]
            assert st["step"] == 0 and st["alpha"] == 0.0
            assert_bitwise_equal(st["initial_point"], p.detach(), "W0 = p")
            assert not st["grad_sum"].any()
            if cls is R.RAMDA:
                assert not st["grad_sum_sq"].any()
                assert opt.param_groups[0]["epsilon"] == pytest.approx(hand.eps, rel=1e-15)
            ramp = 1 if epoch == milestones[-1] else 0
        assert opt.param_groups[0]["lr"] == pytest.approx(hand.lr, rel=1e-15)
        assert sched.get_last_lr() == [opt.param_groups[0]["lr"]]
    # the first step after the last milestone keeps c0, the second takes c0*sqrt(2); c reaches 1
    first = milestones[-1] * steps_per_epoch
    assert seen_c[:first + 1] == [c0] * (first + 1)
    assert seen_c[first + 1] == pytest.approx(c0 * math.sqrt(2), rel=1e-15)
    assert seen_c[-1] == 1.0


def test_stagewise_proxadamw_decays_lr_only():
    p = torch.nn.Parameter(torch.randn(3, 4, dtype=F64))
    opt = R.ProxAdamW([p], lr=0.1, epsilon=1e-6)
    sched = R.StagewiseScheduler(opt, [1], gamma=0.5)
    p.grad = torch.randn_like(p)
    opt.step()
    before = copy.deepcopy(opt.state[p])
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.05
    assert opt.param_groups[0]["epsilon"] == 1e-6, "only RAMDA decays epsilon"
    assert_state_equal(opt.state[p], before, "no restart for ProxAdamW")
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    assert opt.state[p]["step"] == 4


def test_stagewise_validation():
    opt = R.RAMDA([torch.nn.Parameter(torch.zeros(2))])
    for milestones in ([3, 2], [0, 1], [1, 1], [1.5]):
        with pytest.raises(ValueError):
            R.StagewiseScheduler(opt, milestones)
    for gamma in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError):
            R.StagewiseScheduler(opt, [1], gamma)


def test_stagewise_state_dict_resume():
    """Scheduler and optimizer saved mid-ramp and reloaded continue bitwise."""
    def build(x):
        p = torch.nn.Parameter(x.clone())
        opt = R.RAMDA([p], lr=0.1, momentum=0.2, lambda_=0.05, regularizer="l1")
        return p, opt, R.StagewiseScheduler(opt, [1, 2])

    x = torch.randn(3, 4, dtype=F64)
    grads = _grads(12, seed=4)
    p, opt, sched = build(x)
    for i, g in enumerate(grads):
        p.grad = g.clone()
        opt.step()
        if i % 3 == 2:
            sched.step()
        if i == 7:
            saved = copy.deepcopy((p.detach().clone(), opt.state_dict(), sched.state_dict()))
    q, opt2, sched2 = build(saved[0])
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    for i, g in enumerate(grads[8:], start=8):
        q.grad = g.clone()
        opt2.step()
        if i % 3 == 2:
            sched2.step()
    assert_bitwise_equal(q.detach(), p.detach(), "resumed mid-ramp")
    assert_state_equal(opt2.state[q], opt.state[p], "resumed mid-ramp")
    assert opt2.param_groups[0]["momentum"] == opt.param_groups[0]["momentum"]


# ---------------------------------------------------------------------------
# Ordinary torch schedulers
# ---------------------------------------------------------------------------

def test_steplr_changes_the_lr_used():
    """RAMDA with StepLR: s_t = lr_t sqrt(t) with the scheduler's current lr."""
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(3, 4, generator=gen, dtype=F64)
    p = torch.nn.Parameter(x0.clone())
    opt = R.RAMDA([p], lr=0.2, momentum=0.5, epsilon=1e-3, lambda_=0.1, regularizer="l1")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    hand = HandRAMDA(x0.numpy(), 0.2, 0.5, 1e-3, 0.1, True)
    for i, g in enumerate(_grads(6, seed=6)):
        hand.lr = 0.2 * 0.5 ** (i // 2)
        p.grad = g.clone()
        opt.step()
        hand.step(g.numpy())
        assert_close(p, hand.x, rtol=1e-12, atol=1e-15, msg=f"step {i}")
        sched.step()


@pytest.mark.parametrize("cls", [R.ProxSGD, R.ProxAdamW])
def test_lr_scheduler_proxsgd_proxadamw(cls):
    p = torch.nn.Parameter(torch.zeros(5, dtype=F64))
    opt = cls([p], lr=1.0, **({"momentum": 1.0} if cls is R.ProxSGD else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (e + 1))
    for i in range(4):
        before = p.detach().clone()
        p.grad = torch.ones_like(p)
        opt.step()
        # ProxSGD: p -= lr * g; ProxAdamW with a constant gradient: m_hat = g, d ~ 1, p -= lr
        assert_close(before - p.detach(), torch.full((5,), 1.0 / (i + 1), dtype=F64), rtol=1e-6,
                     msg=f"{cls.__name__} step {i}")
        sched.step()


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_ramp_ignores_refused_and_skipped_steps(nonfinite):
    """A step with a NaN gradient (skipped, or refused with an error) is no step of
    the ramp: the run equals the same run without that step, bitwise."""
    def run(bad_at):
        p = torch.nn.Parameter(torch.arange(6, dtype=F64).reshape(2, 3) / 7)
        opt = R.RAMDA([p], lr=0.1, momentum=0.2, lambda_=0.05, regularizer="l1", nonfinite=nonfinite)
        sched = R.StagewiseScheduler(opt, [1])
        cs = []
        for i, g in enumerate(_grads(6, shape=(2, 3), seed=7)):
            if i in bad_at:
                p.grad = torch.full_like(p, float("nan"))
                if nonfinite == "raise":
                    with pytest.raises(R.NonFiniteGradientError):
                        opt.step()
                else:
                    opt.step()
            p.grad = g.clone()
            opt.step()
            cs.append(opt.param_groups[0]["momentum"])
            if i == 1:
                sched.step()  # the last milestone: restart, then the ramp
        return p.detach(), cs

    clean, clean_cs = run(())
    dirty, dirty_cs = run((2, 4))
    assert clean_cs[2] == 0.2 and clean_cs[3] == pytest.approx(0.2 * math.sqrt(2), rel=1e-15)
    assert dirty_cs == clean_cs
    assert_bitwise_equal(dirty, clean, "bad steps must not advance the ramp")
