"""How a tensor splits into groups (docs/math.md section 3), in plain torch.

`dims` names the dimensions reduced by a group's norm, i.e. the elements of
one group, exactly as the authors' code names them: Linear ``[out, in]`` with
``dims=(0,)`` has one group per input feature. Every tensor here is read in
place through reductions with ``keepdim=True``, so a group's norm has the
tensor's own layout (channels_last included) and broadcasts back onto it.

An optional ``view`` (a shape with at most one -1) is applied first, so that a
dimension can be split, e.g. the rows of a ``[heads * head_dim, in]``
projection viewed as ``(heads, -1, in)`` with ``dims=(1, 2)`` gives one group
per attention head.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

Dims = Optional[Tuple[int, ...]]


def normalize_dims(dims: Sequence[int] | int | None, ndim: int) -> Tuple[int, ...]:
    """Sorted, non-negative, duplicate-free dims for a tensor of rank ``ndim``.

    ``None`` means the whole tensor is one group. Raises ``ValueError`` for a
    dim out of range, a repeated dim, or an empty tuple.
    """
    if ndim == 0:
        raise ValueError("a 0-d tensor has no dimensions to group")
    if dims is None:
        return tuple(range(ndim))
    if isinstance(dims, int):
        dims = (dims,)
    out = []
    for d in dims:
        if not isinstance(d, int) or isinstance(d, bool):
            raise ValueError(f"dims must be integers, got {dims!r}")
        if not -ndim <= d < ndim:
            raise ValueError(f"dim {d} is out of range for a tensor of rank {ndim}")
        out.append(d % ndim)
    if not out:
        raise ValueError("dims must name at least one dimension")
    if len(set(out)) != len(out):
        raise ValueError(f"dims {tuple(dims)!r} repeats a dimension")
    return tuple(sorted(out))


def grouped_view(x: torch.Tensor, view: Optional[Sequence[int]]) -> torch.Tensor:
    """``x`` seen through the param group's ``view`` (no copy), or ``x`` itself."""
    if view is None:
        return x
    return x.view(tuple(view))


def group_size(shape: Sequence[int], dims: Tuple[int, ...]) -> int:
    """Number of elements in one group."""
    return math.prod([shape[d] for d in dims])  # a list: torch.compile traces it, not a generator


def group_weights(shape: Sequence[int], dims: Tuple[int, ...], reweight: bool) -> float:
    """``c_g``: sqrt(|g|) with the paper's reweighting, else 1 (same for every group)."""
    return math.sqrt(group_size(shape, dims)) if reweight else 1.0


def group_norm(x: torch.Tensor, dims: Tuple[int, ...]) -> torch.Tensor:
    """Euclidean norm of every group, shaped to broadcast back onto ``x``."""
    return x.square().sum(dim=dims, keepdim=True).sqrt()


def group_sum(x: torch.Tensor, dims: Tuple[int, ...]) -> torch.Tensor:
    return x.sum(dim=dims, keepdim=True)


def group_max(x: torch.Tensor, dims: Tuple[int, ...]) -> torch.Tensor:
    return x.amax(dim=dims, keepdim=True)


def group_min(x: torch.Tensor, dims: Tuple[int, ...]) -> torch.Tensor:
    return x.amin(dim=dims, keepdim=True)


def zero_groups(x: torch.Tensor, dims: Tuple[int, ...]) -> torch.Tensor:
    """Boolean mask, one entry per group: is every element of the group exactly 0?"""
    return (x != 0).sum(dim=dims, keepdim=True) == 0
