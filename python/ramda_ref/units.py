"""Unit groups: group lasso whose groups span several tensors (docs/math.md section 3,
"Coupled groups"), in plain torch.

A param group with the key ``units`` regularizes, instead of per-tensor
``dims`` groups, a list of *units*; each unit is a list of *slices* of the
group's tensors::

    "units": [
        [(0, 0, 3), (1, 0, 3), (2, 1, 3)],        # row 3 of params[0], entry 3 of
                                                  # params[1], column 3 of params[2]
        [(0, 0, (8, 16)), (3, 1, (0, 12, 3))],    # rows 8..15; columns 0, 3, 6, 9
        ...
    ]

A slice is ``(tensor, dim, index)``: ``tensor`` the position of the tensor in
the group's ``params``, ``dim`` one of its dimensions (logical, whatever the
memory layout), and ``index`` an ``int``, a ``range`` or a tuple ``(start,
stop)`` / ``(start, stop, step)`` of indices along ``dim``; the slice is every
element whose index along ``dim`` is among them. Units never overlap (an
element is in at most one unit, once); elements in no unit are not
regularized. `normalize_units` checks all of that and returns the units as
tuples ``(tensor, dim, (start, stop, step))``.

The subproblem over a unit is the one of docs/math.md section 4 over the
union of its slices, with ``c_g = sqrt(total size)`` (``reweight=True``) or 1:
`solve_units` gathers each unit's ``z`` and ``d`` into one row of a padded
``[units, longest]`` matrix (padding ``z = 0``, ``d`` = the row's max, which
changes no norm, sum, max or min of the row) and runs the exact Newton solve
(``prox.exact_group_lasso`` over the rows, warm start included) on them; RMDA and ProxSGD (one scalar ``d``) shrink the union's norm.

Warm start (docs/math.md section 4, the warm-start item): the sigma each
unit ended with is kept in the state of the group's first tensor as
``state["unit_sigma"]`` (one value per unit, in the order of ``units``, in
the dtype the solve runs in; 0 or absent means none). It is saved in
``state_dict``, cleared by ``restart()``, and a zero unit keeps its previous
value.

The optimizer's step runs a unit group in one call over the whole group
(every tensor needs a gradient and the same step count): `step` here, or the
fused step of a backend that has one (``ProxOptimizer._unit_step``; the C++
CPU backend, ``ramda_kernels/backends/_units.py``). They are solved exactly
(``solver="exact"``), not in capturable steps.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import definitions as D
from .groups import group_norm
from .prox import exact_group_lasso

#: The param-group key that carries the unit membership.
UNITS_KEY = "units"
#: The state key (of the group's first tensor) that holds one sigma per unit.
SIGMA_KEY = "unit_sigma"

Slice = Tuple[int, int, Tuple[int, int, int]]


def _index_range(index, size: int, where: str) -> Tuple[int, int, int]:
    """``(start, stop, step)`` of an index spec along a dimension of ``size``."""
    if isinstance(index, bool):
        raise ValueError(f"{where}: index {index!r} is a bool, not an index")
    if isinstance(index, int):
        if not 0 <= index < size:
            raise ValueError(f"{where}: index {index} is out of range for a dimension of size {size}")
        return (index, index + 1, 1)
    if isinstance(index, range):
        index = (index.start, index.stop, index.step)
    if not (isinstance(index, (tuple, list)) and len(index) in (2, 3)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in index)):
        raise ValueError(f"{where}: index {index!r} is not an int, a range or (start, stop[, step])")
    start, stop, step = (*index, 1) if len(index) == 2 else index
    if step <= 0:
        raise ValueError(f"{where}: step {step} must be positive")
    if not 0 <= start < stop <= size:
        raise ValueError(f"{where}: range ({start}, {stop}) is empty or out of range for a "
                         f"dimension of size {size}")
    return (start, stop, step)


def normalize_units(units, shapes: Sequence[Sequence[int]], names: Optional[Sequence[str]] = None
                    ) -> Tuple[Tuple[Slice, ...], ...]:
    """Check a ``units`` param-group value against the group's tensor ``shapes``
    (``names`` for messages) and return it as tuples ``(tensor, dim, (start, stop,
    step))``. Raises ``ValueError`` for a malformed slice, a tensor not in the
    group, a dim or index out of range, an empty unit, or overlapping units."""
    names = list(names) if names is not None else [f"params[{i}]" for i in range(len(shapes))]
    if isinstance(units, (str, bytes, dict)) or not hasattr(units, "__iter__"):
        raise ValueError(f"'units' must be a list of units (lists of slices), got {type(units).__name__}")
    out = []
    for k, unit in enumerate(units):
        if isinstance(unit, (str, bytes, dict)) or not hasattr(unit, "__iter__"):
            raise ValueError(f"unit {k}: expected a list of (tensor, dim, index) slices, got {unit!r}")
        slices = []
        for sl in unit:
            where = f"unit {k}, slice {sl!r}"
            if not (isinstance(sl, (tuple, list)) and len(sl) == 3):
                raise ValueError(f"{where}: expected (tensor, dim, index)")
            i, dim, index = sl
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(shapes):
                raise ValueError(f"{where}: tensor {i!r} is not in the param group, which has "
                                 f"{len(shapes)} tensor(s)")
            shape = tuple(shapes[i])
            if not isinstance(dim, int) or isinstance(dim, bool) or not -len(shape) <= dim < len(shape):
                raise ValueError(f"{where}: dim {dim!r} is out of range for {names[i]} of shape {shape}")
            dim %= len(shape)
            slices.append((i, dim, _index_range(index, shape[dim], f"{where} of {names[i]}")))
        if not slices:
            raise ValueError(f"unit {k} has no slice")
        out.append(tuple(slices))
    if not out:
        raise ValueError("'units' is empty: put tensors with no unit in an unregularized group")
    out = tuple(out)
    _layout(out, tuple(tuple(s) for s in shapes), tuple(names))  # raises on overlaps
    return out


class _Layout:
    """Where each unit's elements are: per tensor, the flat (logical, row-major)
    indices of its elements in units (``pos``) and their places in the padded
    ``[units, longest]`` matrix (``slot``); ``mask`` marks the real places."""

    def __init__(self, sizes: List[int], pos: List[torch.Tensor], slot: List[torch.Tensor]):
        self.sizes = torch.tensor(sizes, dtype=torch.float64)
        self.units, self.longest = len(sizes), max(sizes)
        self.pos, self.slot = pos, slot
        self.mask = (torch.arange(self.longest).unsqueeze(0) < self.sizes.unsqueeze(1))
        self._devices: Dict[torch.device, Tuple] = {}

    def on(self, device: torch.device):
        """``(pos, slot, mask)`` on ``device`` (copied once per device)."""
        if device not in self._devices:
            self._devices[device] = ([p.to(device) for p in self.pos], [s.to(device) for s in self.slot],
                                     self.mask.to(device))
        return self._devices[device]


@functools.lru_cache(maxsize=64)
def _layout(units: Tuple[Tuple[Slice, ...], ...], shapes: Tuple[Tuple[int, ...], ...],
            names: Tuple[str, ...]) -> _Layout:
    owner = [torch.full(shape, -1, dtype=torch.long) for shape in shapes]
    pos: List[List[torch.Tensor]] = [[] for _ in shapes]
    slot: List[List[torch.Tensor]] = [[] for _ in shapes]
    members = []
    for k, unit in enumerate(units):
        elems = []
        for i, dim, (start, stop, step) in unit:
            idx = torch.arange(start, stop, step)
            flat = torch.arange(math.prod(shapes[i])).reshape(shapes[i]).index_select(dim, idx).reshape(-1)
            taken = owner[i].view(-1)[flat]
            if bool((taken >= 0).any()):
                other = int(taken[taken >= 0][0])
                raise ValueError(f"units {other} and {k} overlap in {names[i]}: an element may "
                                 f"belong to one unit only" if other != k else
                                 f"unit {k} names an element of {names[i]} twice")
            owner[i].view(-1)[flat] = k
            elems.append((i, flat))
        members.append(elems)
    sizes = [sum(f.numel() for _, f in elems) for elems in members]
    longest = max(sizes)
    for k, elems in enumerate(members):
        offset = 0
        for i, flat in elems:
            pos[i].append(flat)
            slot[i].append(torch.arange(offset, offset + flat.numel()) + k * longest)
            offset += flat.numel()
    cat = lambda parts: torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)  # noqa: E731
    return _Layout(sizes, [cat(p) for p in pos], [cat(s) for s in slot])


def layout_of(group: Dict[str, Any]) -> _Layout:
    """The layout of a param group whose ``units`` are normalized."""
    params = group["params"]
    names = group.get("param_names") or [f"params[{i}]" for i in range(len(params))]
    return _layout(group[UNITS_KEY], tuple(tuple(p.shape) for p in params), tuple(names))


def validate_group(group: Dict[str, Any], where: str) -> None:
    """Check a param group with ``units`` and normalize them in place."""
    problems = []
    if group.get("regularizer") not in (None, "group_lasso"):
        problems.append(f"regularizer={group['regularizer']!r} (units are group-lasso groups)")
    if group.get("dims") is not None or group.get("view") is not None:
        problems.append("'dims'/'view' (a unit group's groups are its units)")
    if group.get("solver", "exact") != "exact":
        problems.append(f"solver={group['solver']!r} (unit groups are solved exactly)")
    if group.get("capturable", False):
        problems.append("capturable=True (the unit solve reads the host)")
    if problems:
        raise ValueError(f"{where}: a param group with 'units' cannot have {'; '.join(problems)}")
    group["regularizer"] = "group_lasso"
    params = group["params"]
    try:
        group[UNITS_KEY] = normalize_units(group[UNITS_KEY], [tuple(p.shape) for p in params],
                                           group.get("param_names"))
    except ValueError as e:
        raise ValueError(f"{where}: invalid 'units': {e}") from None


# ---------------------------------------------------------------------------
# The solve over the union (docs/math.md section 4)
# ---------------------------------------------------------------------------

def _gather(xs: Sequence[torch.Tensor], lay: _Layout, dtype, fill=0.0) -> torch.Tensor:
    pos, slot, _ = lay.on(xs[0].device)
    out = torch.full((lay.units * lay.longest,), fill, dtype=dtype, device=xs[0].device)
    for x, p, s in zip(xs, pos, slot):
        out[s] = x.reshape(-1)[p].to(dtype)
    return out.view(lay.units, lay.longest)


def _scatter(rows: torch.Tensor, outside: Sequence[torch.Tensor], lay: _Layout) -> List[torch.Tensor]:
    """Per tensor: ``outside`` (its value off the units), with the units' elements
    taken from ``rows``; flat, in logical order."""
    pos, slot, _ = lay.on(rows.device)
    flat = rows.reshape(-1)
    out = []
    for x, p, s in zip(outside, pos, slot):
        y = x.reshape(-1).clone()
        y[p] = flat[s].to(y.dtype)
        out.append(y)
    return out


def _thresholds(tau, lay: _Layout, reweight: bool, dtype, device) -> torch.Tensor:
    """``T = tau * c_g`` per unit, ``[units, 1]``, with ``c_g = sqrt(unit size)`` or 1."""
    c = lay.sizes.sqrt() if reweight else torch.ones_like(lay.sizes)
    return (tau * c).to(dtype=dtype, device=device).unsqueeze(1)


def exact_rows(z: torch.Tensor, d: torch.Tensor, thr: torch.Tensor,
               sigma_prev: Optional[torch.Tensor] = None):
    """Exact group lasso with one group per row of ``z``, ``d`` (``[K, n]``) and
    threshold ``thr`` (``[K, 1]``), warm-started from ``sigma_prev`` (``[K]``, 0:
    none): ``prox.exact_group_lasso`` over ``dims=(1,)``, whose warm start is
    docs/math.md section 4, item 5. Returns ``(w, sigma, iterations)``; ``sigma``
    is ``sigma_prev`` (0 without one) on zero rows."""
    K = z.shape[0]
    prev = (torch.zeros(K, dtype=z.dtype, device=z.device) if sigma_prev is None
            else sigma_prev.to(dtype=z.dtype, device=z.device).reshape(K))
    w, iters, sigma = exact_group_lasso(z, d, thr, (1,), sigma=prev)
    return w, sigma.reshape(K), iters.reshape(K)


def solve_units(zs: Sequence[torch.Tensor], ds: Sequence[torch.Tensor], tau, lay: _Layout,
                reweight: bool, sigma_prev: Optional[torch.Tensor] = None):
    """Minimize ``sum(1/2 d w^2 - z w) + tau sum_g c_g ||w_g||`` over all tensors
    of a unit group at once. Returns ``(ws, sigma, iterations)``: ``ws`` flat
    per tensor (``z/d`` off the units), ``sigma`` and iterations per unit."""
    dtype = _solve_dtype(zs)
    outside = [z / d for z, d in zip(zs, ds)]
    if tau == 0:
        return outside, sigma_prev, None
    _, _, mask = lay.on(zs[0].device)
    Z = _gather(zs, lay, dtype)
    Dm = _gather(ds, lay, dtype)
    row_max = torch.where(mask, Dm, torch.zeros_like(Dm)).amax(1, keepdim=True)  # d > 0
    Dm = torch.where(mask, Dm, row_max)
    w, sigma, iters = exact_rows(Z, Dm, _thresholds(tau, lay, reweight, dtype, Z.device), sigma_prev)
    return _scatter(w, outside, lay), sigma, iters


def shrink_units(ys: Sequence[torch.Tensor], thr, lay: _Layout, reweight: bool) -> List[torch.Tensor]:
    """The scalar-``d`` prox over the units: ``y_g max(||y_g|| - thr c_g, 0) / ||y_g||``."""
    if thr == 0:
        return [y.reshape(-1) for y in ys]
    Y = _gather(ys, lay, _solve_dtype(ys))
    T = _thresholds(thr, lay, reweight, Y.dtype, Y.device)
    norm = group_norm(Y, (1,))
    scale = torch.clamp(norm - T, min=0) / torch.where(norm > 0, norm, torch.ones_like(norm))
    return _scatter(Y * scale, ys, lay)


def _solve_dtype(xs: Sequence[torch.Tensor]) -> torch.dtype:
    """fp64 when any tensor's state is fp64, else fp32."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


# ---------------------------------------------------------------------------
# One step of a unit group (the state update of ramda_ref.functional, per tensor)
# ---------------------------------------------------------------------------

def check_step(group: Dict[str, Any], params: Sequence[torch.Tensor], states: Sequence[Dict],
               where: str) -> None:
    """Refuse, before anything changes, a step the unit solve cannot take: it
    needs every tensor of the group, at one step count, and a saved sigma of
    the right length."""
    if len(params) != len(group["params"]):
        names = group.get("param_names") or [f"{where}['params'][{i}]"
                                             for i in range(len(group["params"]))]
        missing = [n for p, n in zip(group["params"], names) if p.grad is None]
        raise ValueError(f"{where}: a param group with 'units' steps all its tensors together, "
                         f"but {', '.join(map(repr, missing))} have no gradient (give them a zero "
                         f"gradient, or leave them out of the group)")
    steps = {st["step"] for st in states if st}
    if len(steps) > 1:
        raise ValueError(f"{where}: the tensors of a param group with 'units' have taken "
                         f"different numbers of steps ({sorted(steps)}); they step together")
    sigma = states[0].get(SIGMA_KEY) if states else None
    units = len(group[UNITS_KEY])
    if sigma is not None and (not isinstance(sigma, torch.Tensor) or sigma.shape != (units,)):
        shape = tuple(sigma.shape) if isinstance(sigma, torch.Tensor) else type(sigma).__name__
        raise ValueError(f"{where}: state {SIGMA_KEY!r} has shape {shape}, the group "
                         f"has {units} units")


def step(definition: D.Definition, group: Dict[str, Any], params: Sequence[torch.Tensor],
         states: Sequence[Dict[str, torch.Tensor]], grads: Sequence[torch.Tensor], t, alpha,
         hp: Dict[str, Any]) -> List[Optional[torch.Tensor]]:
    """One step of a unit group: each tensor's state update and its ``z``, ``d``
    as in ``ramda_ref.functional``, the solve over the units, each tensor's write.
    Returns the per-unit iterations for every tensor (``None`` for closed forms)."""
    lay = layout_of(group)
    sc = definition.scalars(t, alpha, hp)
    reweight = group["reweight"]
    name = definition.name
    if name in ("rmda", "proxsgd"):
        ys, xs = [], []
        for p, g, st in zip(params, grads, states):
            if name == "rmda":
                v = st["grad_sum"]
                v.add_(g.to(v.dtype), alpha=sc["s"])
                ys.append(st["initial_point"] - v / sc["beta"])
            else:
                buf = st["momentum_buffer"]
                buf.mul_(sc["keep"]).add_(g.to(buf.dtype), alpha=sc["c"])
                ys.append(p.to(buf.dtype) - sc["lr"] * buf)
            xs.append(p.to(ys[-1].dtype))
        ws = shrink_units(ys, sc["thr"], lay, reweight)
        for p, x, w in zip(params, xs, ws):
            new = sc["keep"] * x + sc["c"] * w.view(x.shape) if name == "rmda" else w.view(x.shape)
            p.copy_(new)
        return [None] * len(params)
    zs, ds, xs = [], [], []
    for p, g, st in zip(params, grads, states):
        if name == "ramda":
            v, u, w0 = st["grad_sum"], st["grad_sum_sq"], st["initial_point"]
            g = g.to(v.dtype)
            v.add_(g, alpha=sc["s"])
            u.addcmul_(g, g, value=sc["s"])
            d = u.pow(1.0 / 3.0) + sc["epsilon"]
            zs.append(d * w0 - v)
            xs.append(p.to(v.dtype))
        else:
            m, v = st["exp_avg"], st["exp_avg_sq"]
            g = g.to(m.dtype)
            x = p.to(m.dtype) * sc["decay"]
            m.mul_(sc["beta1"]).add_(g, alpha=sc["one_minus_beta1"])
            v.mul_(sc["beta2"]).addcmul_(g, g, value=sc["one_minus_beta2"])
            if group["amsgrad"]:
                if "max_exp_avg_sq" not in st:  # amsgrad switched on during the run
                    st["max_exp_avg_sq"] = v.clone()
                torch.maximum(st["max_exp_avg_sq"], v, out=st["max_exp_avg_sq"])
                v = st["max_exp_avg_sq"]
            d = v.sqrt() / sc["bias2_sqrt"] + sc["epsilon"]
            zs.append(d * x - sc["step_size"] * m)
            xs.append(x)
        ds.append(d)
    ws, sigma, iters = solve_units(zs, ds, sc["tau"], lay, reweight, states[0].get(SIGMA_KEY))
    if sigma is not None:
        states[0][SIGMA_KEY] = sigma
    for p, x, w in zip(params, xs, ws):
        p.copy_(sc["keep"] * x + sc["c"] * w.view(x.shape) if name == "ramda" else w.view(x.shape))
    return [iters] * len(params)


__all__ = ["UNITS_KEY", "SIGMA_KEY", "normalize_units", "validate_group", "exact_rows",
           "solve_units", "shrink_units", "step", "check_step", "layout_of"]
