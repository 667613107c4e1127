"""Pure-torch reference of RAMDA, RMDA, ProxAdamW and ProxSGD (the math is docs/math.md).

A readable per-tensor loop: the test oracle for every fast backend of
``ramda_kernels`` and its portable fallback. Imports only torch.
"""

from . import functional, groups, prox
from .functional import state_dtype
from .optim import NonFiniteGradientError, ProxAdamW, ProxOptimizer, ProxSGD, RAMDA, RMDA
from .prox import exact_group_lasso, kkt_residual, solve_subproblem
from .schedule import StagewiseScheduler

__all__ = [
    "RAMDA", "RMDA", "ProxAdamW", "ProxSGD", "ProxOptimizer", "StagewiseScheduler",
    "NonFiniteGradientError", "functional", "groups", "prox", "state_dtype",
    "exact_group_lasso", "kkt_residual", "solve_subproblem",
]
