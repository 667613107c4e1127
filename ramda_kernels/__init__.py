"""ramda_kernels: fused RAMDA, RMDA, ProxAdamW and ProxSGD for structured networks.

    import ramda_kernels as rk
    groups = rk.group_parameters(model, lambda_=1e-3)      # channel-wise / input-wise groups
    opt = rk.RAMDA(groups, lr=1e-2, backend="auto")
    ...
    print(rk.structure_report(model))
"""

from ramda_ref import NonFiniteGradientError, StagewiseScheduler

from . import backends, distributed, functional
from .backends import BackendUnavailableError
from .batchnorm import recalibrate_batchnorm
from .distributed import fsdp_shard_placement
from .grouping import group_parameters
from .optim import RAMDA, RMDA, ProxAdamW, ProxSGD
from .report import StructureReport, structure_report

__version__ = "0.1.0"

__all__ = [
    "RAMDA", "RMDA", "ProxAdamW", "ProxSGD", "StagewiseScheduler", "NonFiniteGradientError",
    "BackendUnavailableError", "backends", "functional", "distributed", "fsdp_shard_placement",
    "__version__",
    "group_parameters", "structure_report", "StructureReport", "recalibrate_batchnorm",
]
