"""What a fused backend takes, and what goes to the reference: one rule for all.

NOTE: [Fused-backend fallbacks]
A fused backend (``cpu``, ``cuda``, ``triton``) sends to ``ramda_ref.functional``,
in the same call (their entries in the returned list are the reference's):

* the whole call (`whole_call_to_reference`) when the subproblem's threshold
  is nonzero and the regularizer is ``nuclear`` (an SVD per PG iteration) or
  the solver is PG with ``pg_stop="rtol"`` (a whole-tensor objective per
  iteration, the authors' parity rule); with a zero threshold nothing is
  regularized and the fused elementwise path runs;
* a tensor that `tensor_problem` finds a reason for: a parameter dtype other
  than fp32/bf16/fp16 (fp64 has fp64 state), a gradient dtype the backend
  does not read, state not in its dtype (fp32; W0 of RAMDA and RMDA in the
  parameter's dtype, ``Definition.state_dtype``), a gradient or state on another
  device or (state; the gradient where the backend cannot stage it) with
  other strides than the parameter (per-group state such as ``sigma``, a
  1-D tensor of another shape: not contiguous), a parameter that is not
  dense where the backend needs it dense, or more dimensions than the backend's layouts hold.

A param group with ``units`` (``ramda_ref.units``) is not split: it runs whole
on a backend that registered a unit step when `unit_group_problem` finds no
reason against any of its tensors, and whole on the reference otherwise.

Each backend states what it can do as a `Capabilities`; the rule is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ramda_ref.units import SIGMA_KEY

from ..layout import is_dense, same_layout

#: Parameter dtypes of every fused kernel (state in fp32).
FUSED_DTYPES: Tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Capabilities:
    """What one fused backend reads besides the common case (a dense parameter
    of a fused dtype, its gradient of the same dtype and layout, fp32 state of
    the same layout, all on one device)."""

    #: gradients of another fused dtype than the parameter's
    mixed_grad_dtype: bool = False
    #: gradients whose strides differ from the parameter's (staged by a copy)
    grad_layout_staged: bool = False
    #: non-dense parameters on grouped paths (the group layout addresses them)
    strided_groups: bool = False
    #: most dimensions of a parameter, ``None``: no limit here
    max_dims: Optional[int] = None


def whole_call_to_reference(regularizer: str, solver: str, pg_stop: str, threshold) -> bool:
    """The call-wide half of NOTE: [Fused-backend fallbacks]. ``threshold``: the
    call's subproblem threshold (``tau`` or ``thr``); a tensor counts as nonzero."""
    if isinstance(threshold, (int, float)) and threshold == 0:
        return False
    if regularizer == "nuclear":
        return True
    return regularizer in ("l1", "group_lasso") and solver == "pg" and pg_stop == "rtol"


def tensor_problem(p: torch.Tensor, g: torch.Tensor, states: Sequence[torch.Tensor],
                   caps: Capabilities, *, flat: bool = True,
                   own_dtype: Sequence[bool] = ()) -> Optional[str]:
    """Why a fused backend with ``caps`` cannot take this tensor (``None``: it can).
    ``flat``: the tensor runs an elementwise path (no groups). ``own_dtype``:
    per state (missing: False), whether the kernels read it in the parameter's
    dtype (`own_dtype_flags`) rather than fp32; another dtype (an fp32 W0 of a
    bf16 parameter, say) goes to the reference, which reads any."""
    own = tuple(own_dtype) + (False,) * (len(states) - len(own_dtype))
    if p.dtype not in FUSED_DTYPES:
        return f"parameter dtype {p.dtype}"
    if g.dtype != p.dtype and not (caps.mixed_grad_dtype and g.dtype in FUSED_DTYPES):
        return f"gradient dtype {g.dtype} with a {p.dtype} parameter"
    if caps.max_dims is not None and p.dim() > caps.max_dims:
        return f"{p.dim()} dimensions"
    if g.device != p.device:
        return "gradient on another device"
    if not caps.grad_layout_staged and not same_layout(g, p):
        return "gradient strides differ from the parameter's"
    for s, in_param_dtype in zip(states, own):
        # per-group state (the exact group-lasso solve's sigma): one value per
        # group in the reference's group order, read as a flat array
        per_group = s.shape != p.shape and s.dim() == 1
        if per_group and (s.device != p.device or not s.is_contiguous()):
            return "per-group state on another device or not contiguous"
        if not per_group and (s.device != p.device or not same_layout(s, p)):
            return "state on another device or with other strides"
        if s.dtype != (p.dtype if in_param_dtype else torch.float32):
            return f"state dtype {s.dtype}"
    if (flat or not caps.strided_groups) and not (p.is_contiguous() or is_dense(p)):
        return "parameter is not dense"
    return None


def own_dtype_flags(definition, keys: Sequence[str]) -> Tuple[bool, ...]:
    """Per state key of a call, whether it is kept in the parameter's dtype
    (``Definition.param_dtype_state``): the ``own_dtype`` of `tensor_problem`."""
    return tuple(k in definition.param_dtype_state for k in keys)


def unit_group_problem(definition, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                       states: Sequence[Dict[str, Any]], caps: Capabilities) -> Optional[str]:
    """Why a fused backend with ``caps`` cannot take this unit group whole (``None``:
    it can): any tensor that `tensor_problem` refuses (a unit group is not split),
    tensors on several devices, or a saved ``unit_sigma`` that is not fp32.
    ``definition``: the optimizer's ``ramda_ref.definitions.Definition``; ``states``
    the tensors' optimizer states (their per-tensor ``sigma`` is not read)."""
    device = params[0].device
    for i, (p, g, st) in enumerate(zip(params, grads, states)):
        if p.device != device:
            return f"params[{i}] is on {p.device}, params[0] on {device}"
        keys = [k for k in definition.state if k in st and k != "sigma"]
        why = tensor_problem(p, g, [st[k] for k in keys], caps,
                             own_dtype=own_dtype_flags(definition, keys))
        if why is not None:
            return f"params[{i}]: {why}"
    sigma = states[0].get(SIGMA_KEY) if states else None
    if sigma is not None and (sigma.dtype != torch.float32 or sigma.device != device):
        return f"{SIGMA_KEY} of dtype {sigma.dtype} on {sigma.device}"
    return None


__all__ = ["Capabilities", "FUSED_DTYPES", "whole_call_to_reference", "tensor_problem",
           "own_dtype_flags", "unit_group_problem"]
