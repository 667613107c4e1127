"""CUDA backend: ``torch.ops.ramda_kernels.*`` from ``ramda_kernels._C`` built with CUDA.

Same functions and signatures as ``ramda_ref.functional``. One kernel launch
per (call, parameter dtype) on the current stream, driven by a metadata
table cached on the device (csrc/cuda/, NOTE: [CUDA tiling]); nothing in a
step synchronizes with the host. What the op does not take goes to the
reference in the same call (NOTE: [Extension fallbacks] in ``_ext.py``).
Param groups with ``units`` run as one launch per group (the CUDA kernel of
``torch.ops.ramda_kernels.units_``, csrc/cuda/units.h) on their segment table
(NOTE: [Unit segment table] in ``_units.py``); what ``unit_group_problem``
refuses stays on the reference.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _ext, _ops, _units
from ._ext import proxadamw, proxsgd, ramda, rmda
from .cpu import _units_op  # the same op: its CUDA kernel takes CUDA tensors and the CPU table


def why_unavailable(device: torch.device) -> Optional[str]:
    device = torch.device(device)
    reason = _ext.unavailable_reason()
    if reason is not None:
        return reason
    if not _ext.with_cuda():
        note = _ext.build_note()
        return "ramda_kernels._C was built without CUDA" + (f" ({note})" if note else "")
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, not {device.type}"
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    return None


_ops.register("cuda", ramda=ramda, rmda=rmda, proxadamw=proxadamw, proxsgd=proxsgd)
if _ext.EXT is not None and _ext.with_cuda():
    _ops.register_units("cuda", _units.fused_step(_units_op, _ext.CAPABILITIES))

__all__ = ["ramda", "rmda", "proxadamw", "proxsgd", "why_unavailable"]
