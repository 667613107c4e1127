"""The authors' stage-wise recipe (docs/math.md section 6) as a scheduler object.

Call ``scheduler.step()`` once at the end of every epoch, like
``torch.optim.lr_scheduler.MultiStepLR``. At a milestone (the epoch count
after the call is in ``milestones``):

* every group's ``lr`` is multiplied by ``gamma``;
* RAMDA and RMDA restart (``t = 0, alpha = 0, W0 = p, V = U = 0``) and
  RAMDA's ``epsilon`` is multiplied by ``gamma`` too.

After the last milestone, RAMDA and RMDA's averaging weight grows each
optimizer step: the ``i``-th step after that milestone (``i = 1, 2, ...``) uses
``c = min(c_0 sqrt(i), 1)``, so the first one still uses ``c_0``, as the
authors' code does (it sets the new ``c`` after each step). The scheduler applies it from a step pre-hook on
the optimizer, so the training loop needs no extra call; a step that is refused
or skipped (non-finite gradients) is not counted. At ``c = 1`` the
returned weights carry the exact zero structure of the subproblem solution.

Sparsity onset: before ``c`` reaches 1 the returned weights are an average
that is almost never exactly zero, so group sparsity appears only about
``1/c_0^2`` steps after the last milestone (100 with ``c_0 = 0.1``), and
never without milestones. ``ramp_steps=R`` sets that length instead:
``c = min(sqrt(i / R), 1)``, which is the default ramp for ``R = 1/c_0^2``
and reaches 1 at the ``R``-th step after the milestone.
`StagewiseScheduler.onset` says when, for messages.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Optional, Sequence

import torch


def ramp_length(c0: float) -> int:
    """Steps after the last milestone until ``c = min(c0 sqrt(i), 1)`` of the
    ``i``-th step reaches 1: the smallest ``k`` with ``c0 sqrt(k) >= 1`` (100 for
    ``c0 = 0.1``)."""
    return max(1, math.ceil(1.0 / (c0 * c0) - 1e-9))  # 1e-9: 1/0.1**2 is 100.00000000000001


class StagewiseScheduler:
    def __init__(self, optimizer: torch.optim.Optimizer, milestones: Sequence[int],
                 gamma: float = 0.1, ramp_steps: Optional[int] = None):
        milestones = list(milestones)
        if any(not isinstance(m, int) or m <= 0 for m in milestones) or milestones != sorted(set(milestones)):
            raise ValueError(f"Invalid milestones: {milestones!r} (expected increasing positive epochs)")
        if not (isinstance(gamma, (int, float)) and 0.0 < gamma <= 1.0):
            raise ValueError(f"Invalid gamma value: {gamma!r} (expected a number in (0, 1])")
        if ramp_steps is not None and (isinstance(ramp_steps, bool) or not isinstance(ramp_steps, int)
                                       or ramp_steps < 1):
            raise ValueError(f"Invalid ramp_steps value: {ramp_steps!r} (expected a positive number of "
                             f"optimizer steps, or None for c0 * sqrt(i))")
        self.optimizer = optimizer
        self.milestones = milestones
        self.gamma = float(gamma)
        #: optimizer steps after the last milestone until c = 1 (None: the c0 sqrt(i) ramp)
        self.ramp_steps = ramp_steps
        self.epoch = 0
        #: ``i`` of the next step once the ramp is on (1 at the last milestone; 0 = off)
        self.ramp_count = 0
        self.restarts = hasattr(optimizer, "restart")
        self.initial_momentum = [g.get("momentum") for g in optimizer.param_groups]
        self._hooks = [optimizer.register_step_pre_hook(self._momentum_ramp),
                       optimizer.register_step_post_hook(self._count_step)]

    def step(self) -> None:
        """End of an epoch: decay and restart at milestones, arm the ramp after the last."""
        self.epoch += 1
        if self.epoch not in self.milestones:
            return
        for group in self.optimizer.param_groups:
            group["lr"] *= self.gamma
            if self.restarts and "epsilon" in group:
                group["epsilon"] *= self.gamma
        if self.restarts:
            self.optimizer.restart()
            if self.epoch == self.milestones[-1]:
                self.ramp_count = 1

    def onset(self) -> Optional[int]:
        """Optimizer steps after the last milestone until ``c`` reaches 1 in every
        group, i.e. until group sparsity can appear; ``None`` when it never does
        (no milestones, or an optimizer without the ramp)."""
        c0s = [c for c in self.initial_momentum if c is not None]
        if not self.milestones or not self.restarts or not c0s:
            return None
        return self.ramp_steps if self.ramp_steps is not None else max(ramp_length(c) for c in c0s)

    def _momentum_ramp(self, optimizer, args, kwargs) -> None:
        if self.ramp_count == 0:
            return
        i = self.ramp_count
        scheduled = {}
        for k, (group, c0) in enumerate(zip(optimizer.param_groups, self.initial_momentum)):
            if c0 is not None:
                c = c0 * math.sqrt(i) if self.ramp_steps is None else math.sqrt(i / self.ramp_steps)
                group["momentum"] = scheduled[k] = min(c, 1.0)
        optimizer._scheduled_momentum = scheduled  # not a change check_momentum_changes warns about

    def _count_step(self, optimizer, args, kwargs) -> None:
        # A refused step raises (no post-hook); a skipped one steps no parameter.
        if self.ramp_count and getattr(optimizer, "last_iterations", True):
            self.ramp_count += 1

    def get_last_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "ramp_count": self.ramp_count, "milestones": self.milestones,
                "gamma": self.gamma, "initial_momentum": self.initial_momentum,
                "ramp_steps": self.ramp_steps}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.ramp_count = state["ramp_count"]
        self.milestones = list(state["milestones"])
        self.gamma = state["gamma"]
        self.initial_momentum = list(state["initial_momentum"])
        self.ramp_steps = state.get("ramp_steps")  # absent in state saved before ramp_steps existed

    def close(self) -> None:
        """Detach the step hooks from the optimizer."""
        for hook in self._hooks:
            hook.remove()


def check_momentum_changes(optimizer: torch.optim.Optimizer) -> None:
    """Warn once per optimizer when a param group's ``momentum`` changed since
    the previous step other than by `StagewiseScheduler`'s ramp.

    In RAMDA and RMDA ``momentum`` is the averaging weight ``c`` of the
    returned iterate (docs/math.md section 1), not heavy-ball momentum: a torch
    scheduler that cycles momentum (``OneCycleLR(cycle_momentum=True)``, the
    default, or ``CyclicLR``) sets it to 0.85-0.95, which averages slowly and
    keeps exact zeros from appearing. Called at the start of every step.
    """
    current = [g.get("momentum") for g in optimizer.param_groups]
    last = getattr(optimizer, "_last_momentum", None)
    optimizer._last_momentum = current
    if last is None or len(last) != len(current) or getattr(optimizer, "_momentum_warned", False):
        return
    scheduled = getattr(optimizer, "_scheduled_momentum", None) or {}
    for k, (before, now) in enumerate(zip(last, current)):
        if before != now and scheduled.get(k) != now:
            optimizer._momentum_warned = True
            warnings.warn(
                f"{type(optimizer).__name__}: param group {k}'s momentum changed from {before!r} to "
                f"{now!r} between steps, not by StagewiseScheduler. Here momentum is the averaging "
                f"weight c of the returned weights, not heavy-ball momentum; a scheduler that cycles "
                f"momentum (OneCycleLR with cycle_momentum=True, CyclicLR) rewrites it: pass "
                f"cycle_momentum=False. (Warned once.)", UserWarning, stacklevel=3)
            return


__all__ = ["StagewiseScheduler", "check_momentum_changes", "ramp_length"]
