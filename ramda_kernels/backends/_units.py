"""Unit groups on the fused backends: the segment table and the fused step.

A param group with ``units`` (``ramda_ref.units``; docs/math.md section 3,
"Coupled groups") is one call per step on a backend that registered a unit
step (`_ops.register_units`): every tensor's state update and ``z``, ``d``,
the exact solve over each unit's union of slices, every tensor's write.

NOTE: [Unit segment table]
Per unit, its slices as *segments* in memory, rows of an int64 ``[S, 6]``
tensor::

    (tensor, offset, count, stride, outer_count, outer_stride)

the elements ``offset + o * outer_stride + i * stride`` (``o < outer_count``,
``i < count``) of ``params[tensor]``, offsets in elements from its data
pointer. A slice ``(tensor, dim, (start, stop, step))`` is a box over the
tensor's dims (``dim`` cut to the range, stride times ``step``); its blocks
are put in memory order (largest stride first, size-1 dims dropped) and
merged where contiguous relative to each other, as the group layout does
(NOTE: [Group layout] in ``ramda_kernels/layout.py``). The innermost block is
``(count, stride)``, the next ``(outer_count, outer_stride)`` and any further
block is spelled out as one row per index: a row, a column, a head's rows,
a k x k convolution's input channel (plain or channels_last) are one row
each. A unit's rows are ``unit_start[u]:unit_start[u + 1]``, sorted by
(tensor, offset). ``free`` (int64 ``[F, 3]``: tensor, offset, count) lists the
stride-1 runs of elements in no unit, which are unregularized (``w = z/d``).
Offsets are relative to each tensor's data pointer, so the table goes stale
only with the units, the shapes or the strides, which key its cache; a
parameter moved to new memory keeps its table.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ramda_ref import definitions as _D
from ramda_ref import units as _U

from ._rules import Capabilities, unit_group_problem

#: Columns of a segment row (NOTE: [Unit segment table]).
SEGMENT_COLUMNS = ("tensor", "offset", "count", "stride", "outer_count", "outer_stride")
#: The step scalars the unit op takes, per optimizer, in order (``float[] scalars``).
OP_SCALARS: Dict[str, Tuple[str, ...]] = {
    "ramda": ("s", "epsilon", "keep", "c", "tau"),
    "rmda": ("s", "beta", "keep", "c", "thr"),
    "proxadamw": ("decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "bias2_sqrt",
                  "epsilon", "step_size", "tau"),
    "proxsgd": ("keep", "c", "lr", "thr"),
}
_CACHE_SIZE = 64


class SegmentTable:
    """The segment table of one unit group's layout (NOTE: [Unit segment table])."""

    def __init__(self, segments: np.ndarray, unit_start: np.ndarray, free: np.ndarray,
                 sizes: np.ndarray):
        self.segments = torch.from_numpy(segments)
        self.unit_start = torch.from_numpy(unit_start)
        self.free = torch.from_numpy(free)
        #: elements per unit (float64: ``c_g = sqrt(size)`` as the reference takes it)
        self.sizes = torch.from_numpy(sizes)
        self.units = len(sizes)
        self._devices: Dict[torch.device, Tuple[torch.Tensor, ...]] = {}

    def on(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(segments, unit_start, free)`` on ``device`` (copied once per device)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.segments, self.unit_start, self.free
        if device not in self._devices:
            self._devices[device] = tuple(x.to(device) for x in (self.segments, self.unit_start, self.free))
        return self._devices[device]


def _slice_rows(shape: Sequence[int], strides: Sequence[int], dim: int,
                rng: Tuple[int, int, int]) -> List[Tuple[int, int, int, int, int]]:
    """The rows ``(offset, count, stride, outer_count, outer_stride)`` of one slice."""
    start, stop, step = rng
    blocks = []
    for d, (size, st) in enumerate(zip(shape, strides)):
        if d == dim:
            size, st = len(range(start, stop, step)), st * step
        if size != 1:
            blocks.append((size, st))
    blocks.sort(key=lambda b: -b[1])  # memory order, outermost first
    merged: List[Tuple[int, int]] = []
    for size, st in blocks:
        if merged and merged[-1][1] == size * st:
            merged[-1] = (merged[-1][0] * size, st)
        else:
            merged.append((size, st))
    if not merged:
        merged = [(1, 1)]
    (count, stride), (outer_count, outer_stride) = merged[-1], (merged[-2] if len(merged) > 1 else (1, 0))
    offsets = [start * strides[dim]]
    for size, st in merged[:-2]:
        offsets = [o + k * st for o in offsets for k in range(size)]
    return [(o, count, stride, outer_count, outer_stride) for o in offsets]


def build_table(units, shapes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]]) -> SegmentTable:
    """The segment table of normalized ``units`` over dense tensors of ``shapes`` and ``strides``."""
    rows, unit_start, sizes = [], [0], []
    covered = [np.zeros(math.prod(s), dtype=bool) for s in shapes]
    for unit in units:
        mine = []
        for i, dim, rng in unit:
            mine += [(i, *r) for r in _slice_rows(shapes[i], strides[i], dim, rng)]
        mine.sort(key=lambda r: (r[0], r[1]))
        for i, off, n, st, no, so in mine:
            idx = off + np.arange(no)[:, None] * so + np.arange(n)[None, :] * st
            covered[i][idx.reshape(-1)] = True
        rows += mine
        unit_start.append(len(rows))
        sizes.append(sum(r[2] * r[4] for r in mine))
    free = []
    for i, cov in enumerate(covered):
        edges = np.diff(np.concatenate(([0], (~cov).astype(np.int8), [0])))
        for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
            free.append((i, int(a), int(b - a)))
    return SegmentTable(np.asarray(rows, dtype=np.int64).reshape(-1, 6),
                        np.asarray(unit_start, dtype=np.int64),
                        np.asarray(free, dtype=np.int64).reshape(-1, 3),
                        np.asarray(sizes, dtype=np.float64))


_TABLES: "OrderedDict[int, Tuple[Any, tuple, tuple, SegmentTable]]" = OrderedDict()


def table_of(group: Dict[str, Any], params: Sequence[torch.Tensor]) -> SegmentTable:
    """The cached segment table of a param group whose ``units`` are normalized
    (keyed on the units object, the shapes and the strides)."""
    units = group[_U.UNITS_KEY]
    shapes = tuple(tuple(p.shape) for p in params)
    strides = tuple(tuple(p.stride()) for p in params)
    hit = _TABLES.get(id(units))
    # the entry holds `units`, so its id is not reused while it is cached
    if hit is not None and hit[0] is units and hit[1] == shapes and hit[2] == strides:
        _TABLES.move_to_end(id(units))
        return hit[3]
    table = build_table(units, shapes, strides)
    _TABLES[id(units)] = (units, shapes, strides, table)
    while len(_TABLES) > _CACHE_SIZE:
        _TABLES.popitem(last=False)
    return table


def fused_step(run_op, caps: Capabilities):
    """A unit step with the signature of ``ramda_ref.units.step`` that runs
    ``run_op(name, params, grads, state_lists, unit_sigma, table, scalars, amsgrad,
    reweight)`` (one op call per group) when the group qualifies (``_rules.unit_group_problem``),
    and the reference's step otherwise."""

    def step(definition: "_D.Definition", group: Dict[str, Any], params: Sequence[torch.Tensor],
             states: Sequence[Dict[str, Any]], grads: Sequence[torch.Tensor], t, alpha,
             hp: Dict[str, Any]) -> List[Optional[torch.Tensor]]:
        name = definition.name
        if name == "proxadamw" and group["amsgrad"]:
            for st in states:  # amsgrad switched on during the run, as the reference does
                if "max_exp_avg_sq" not in st:
                    st["max_exp_avg_sq"] = st["exp_avg_sq"].clone()
        if unit_group_problem(definition, params, grads, states, caps) is not None:
            return _U.step(definition, group, params, states, grads, t, alpha, hp)
        sc = definition.scalars(t, alpha, hp)
        table = table_of(group, params)
        sigma = states[0].get(_U.SIGMA_KEY)
        solves = definition.solves and sc[definition.threshold] != 0
        if solves and sigma is None:
            sigma = states[0][_U.SIGMA_KEY] = torch.zeros(table.units, dtype=torch.float32,
                                                          device=params[0].device)
        keys = [k for k in definition.state if k != "sigma"]
        lists = [[st[k] for st in states] if k in states[0] else [] for k in keys]
        lists += [[]] * (3 - len(lists))
        scalars = [float(sc[k]) for k in OP_SCALARS[name]]
        run_op(name, list(params), list(grads), lists, sigma if solves else None, table, scalars,
               bool(group.get("amsgrad", False)), bool(group["reweight"]))
        return [None] * len(params)

    return step


__all__ = ["SEGMENT_COLUMNS", "OP_SCALARS", "SegmentTable", "build_table", "table_of",
           "fused_step"]
