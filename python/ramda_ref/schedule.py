"""The authors' stage-wise recipe (SPEC section 6) as a scheduler object.

Call ``scheduler.step()`` once at the end of every epoch, like
``torch.optim.lr_scheduler.MultiStepLR``. At a milestone (the epoch count
after the call is in ``milestones``):

* every group's ``lr`` is multiplied by ``gamma``;
* RAMDA and RMDA restart (``t = 0, alpha = 0, W0 = p, V = U = 0``) and
  RAMDA's ``epsilon`` is multiplied by ``gamma`` too.

After the last milestone, RAMDA and RMDA's averaging weight grows each
optimizer step: ``c = min(c_0 sqrt(i), 1)`` with ``i = 2, 3, ...`` counting the
steps since that milestone. The scheduler applies it from a step pre-hook on
the optimizer, so the training loop needs no extra call; a step that is refused
or skipped (non-finite gradients) is not counted. At ``c = 1`` the
returned weights carry the exact zero structure of the subproblem solution.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Sequence

import torch


class StagewiseScheduler:
    def __init__(self, optimizer: torch.optim.Optimizer, milestones: Sequence[int],
                 gamma: float = 0.1):
        milestones = list(milestones)
        if any(not isinstance(m, int) or m <= 0 for m in milestones) or milestones != sorted(set(milestones)):
            raise ValueError(f"Invalid milestones: {milestones!r} (expected increasing positive epochs)")
        if not (isinstance(gamma, (int, float)) and 0.0 < gamma <= 1.0):
            raise ValueError(f"Invalid gamma value: {gamma!r} (expected a number in (0, 1])")
        self.optimizer = optimizer
        self.milestones = milestones
        self.gamma = float(gamma)
        self.epoch = 0
        #: ``i`` of the last step taken once the ramp is on (1 at the last milestone; 0 = off)
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

    def _momentum_ramp(self, optimizer, args, kwargs) -> None:
        if self.ramp_count == 0:
            return
        for group, c0 in zip(optimizer.param_groups, self.initial_momentum):
            if c0 is not None:
                group["momentum"] = min(c0 * math.sqrt(self.ramp_count + 1), 1.0)

    def _count_step(self, optimizer, args, kwargs) -> None:
        # A refused step raises (no post-hook); a skipped one steps no parameter.
        if self.ramp_count and getattr(optimizer, "last_iterations", True):
            self.ramp_count += 1

    def get_last_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "ramp_count": self.ramp_count, "milestones": self.milestones,
                "gamma": self.gamma, "initial_momentum": self.initial_momentum}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.ramp_count = state["ramp_count"]
        self.milestones = list(state["milestones"])
        self.gamma = state["gamma"]
        self.initial_momentum = list(state["initial_momentum"])

    def close(self) -> None:
        """Detach the step hooks from the optimizer."""
        for hook in self._hooks:
            hook.remove()


__all__ = ["StagewiseScheduler"]
