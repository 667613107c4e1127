"""Where a tensor's groups lie in memory, for the fused backends.

NOTE: [Group layout]
Every fused backend reads groups in place, in the tensor's own memory layout
(no transposed copy of parameter, gradient or state). `group_layout` reduces
any (tensor, dims) pair to a canonical description:

* the dims are put in memory order (largest stride first) and size-1 dims are
  dropped;
* neighbouring dims with the same role (inside a group = "reduced", indexing
  groups = "kept") that are contiguous with respect to each other are merged;
* what is left is a short list of reduced blocks and a short list of kept
  blocks, each ``(size, stride)`` in elements, in memory order.

Group ``g`` (kept indices decoded from ``g`` over the kept blocks, last block
fastest) starts at ``sum(k_i * kept_stride_i)``; its element ``e`` (decoded the
same way over the reduced blocks) is at that start plus
``sum(r_j * red_stride_j)``. Numbering groups and elements in memory order
means consecutive groups / elements are as close in memory as the layout
allows, so a backend that tiles ``[elements, groups]`` reads contiguous runs.

Two shapes cover almost every real layer after merging:

* "rows": the innermost block is reduced with stride 1 (output-wise Linear,
  filter-wise Conv): each group is a contiguous run; one program (or thread
  block) per group, reading it in chunks, is coalesced.
* "columns": the innermost block is kept with stride 1 (input-wise Linear,
  channel-wise channels_last Conv): neighbouring groups are neighbouring in
  memory; a program takes a tile of adjacent groups and walks their elements
  together, so every load is a contiguous row of the tile.

Backends pick their tiling from `GroupLayout.inner_reduced`. All tensors that
one kernel reads for a parameter (parameter, gradient, state) must share its
strides; `same_layout` checks that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch

from ramda_ref.groups import normalize_dims


@dataclass(frozen=True)
class GroupLayout:
    n_groups: int
    group_size: int
    kept_sizes: Tuple[int, ...]
    kept_strides: Tuple[int, ...]
    red_sizes: Tuple[int, ...]
    red_strides: Tuple[int, ...]

    @property
    def inner_reduced(self) -> bool:
        """True when the innermost memory block belongs to a group ("rows")."""
        if not self.red_strides:
            return False
        if not self.kept_strides:
            return True
        return self.red_strides[-1] < self.kept_strides[-1]


def group_layout(shape: Sequence[int], strides: Sequence[int], dims: Sequence[int]) -> GroupLayout:
    """Canonical group layout of a tensor of ``shape``/``strides`` grouped by ``dims``.

    ``dims`` may be unnormalized (negative). A tensor with no elements gives
    zero groups.
    """
    shape, strides = tuple(shape), tuple(strides)
    ndim = len(shape)
    red = set(normalize_dims(tuple(dims), ndim))
    n_groups = math.prod(s for i, s in enumerate(shape) if i not in red)
    gsize = math.prod(shape[i] for i in red)
    if n_groups == 0 or gsize == 0:
        return GroupLayout(0 if gsize == 0 else n_groups, gsize, (), (), (), ())
    order = sorted((i for i in range(ndim) if shape[i] != 1), key=lambda i: -strides[i])
    blocks = []  # (is_reduced, size, stride), memory order
    for i in order:
        role = i in red
        if blocks and blocks[-1][0] == role and blocks[-1][2] == shape[i] * strides[i]:
            _, size, _ = blocks[-1]
            blocks[-1] = (role, size * shape[i], strides[i])
        else:
            blocks.append((role, shape[i], strides[i]))
    kept = [(s, st) for r, s, st in blocks if not r]
    reds = [(s, st) for r, s, st in blocks if r]
    return GroupLayout(
        n_groups=n_groups, group_size=gsize,
        kept_sizes=tuple(s for s, _ in kept), kept_strides=tuple(st for _, st in kept),
        red_sizes=tuple(s for s, _ in reds), red_strides=tuple(st for _, st in reds))


def is_dense(x: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``numel`` consecutive slots in some order."""
    if x.numel() <= 1:
        return True
    pairs = sorted((st, s) for s, st in zip(x.shape, x.stride()) if s != 1)
    expected = 1
    for st, s in pairs:
        if st != expected:
            return False
        expected *= s
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides on every dim that has more than one element."""
    if a.shape != b.shape:
        return False
    return all(s == 1 or sa == sb for s, sa, sb in zip(a.shape, a.stride(), b.stride()))


__all__ = ["GroupLayout", "group_layout", "is_dense", "same_layout"]
