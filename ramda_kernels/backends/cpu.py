"""C++ CPU backend: ``torch.ops.ramda_kernels.*`` from the compiled ``ramda_kernels._C``.

Same functions and signatures as ``ramda_ref.functional``. One op call per
functional call runs every tensor (any mix of fp32/bf16/fp16) with threads
across groups (csrc/cpu/kernels_impl.h, NOTE: [Tiling per layout]); what the
op does not take goes to the reference in the same call (NOTE: [Extension
fallbacks] in ``_ext.py``). Fused entries of the returned list are ``None``.
Capturable calls read their counters on the host, which on the CPU waits for
nothing (``_ext._capturable_on_host``). Param groups with ``units`` run as one
op call per group (``torch.ops.ramda_kernels.units_``, csrc/cpu/units.h) on
their segment table (NOTE: [Unit segment table] in ``_units.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _ext, _ops, _units
from ._ext import proxadamw, proxsgd, ramda, rmda


def why_unavailable(device: torch.device) -> Optional[str]:
    device = torch.device(device)
    reason = _ext.unavailable_reason()
    if reason is not None:
        return reason
    if device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, not {device.type}"
    return None


def _units_op(name, params, grads, lists, sigma, table, scalars, amsgrad, reweight):
    torch.ops.ramda_kernels.units_(name, params, grads, *lists, sigma, table.segments,
                                   table.unit_start, table.free, scalars, amsgrad, reweight)


_ops.register("cpu", ramda=ramda, rmda=rmda, proxadamw=proxadamw, proxsgd=proxsgd)
if _ext.EXT is not None:
    _ops.register_units("cpu", _units.fused_step(_units_op, _ext.CAPABILITIES))

__all__ = ["ramda", "rmda", "proxadamw", "proxsgd", "why_unavailable"]
