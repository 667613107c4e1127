"""FSDP2 shard placements that keep every group on one rank.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every parameter on dim
0 by default. An input-wise Linear group (``dims=(0,)``) or a channel-wise
Conv group (``dims=(0, 2, 3)``) then spans every rank, and the step has to
run on the reference with DTensor reductions (NOTE: [FSDP2 shards] in
``ramda_kernels/functional.py``). `fsdp_shard_placement` returns a
``shard_placement_fn`` that shards each grouped tensor on a dimension its
groups keep instead, so that each rank's shard holds whole groups and the
fused backend steps the local shards::

    groups = rk.group_parameters(model, lambda_=1e-3)
    placement = rk.fsdp_shard_placement(groups)
    for block in model.blocks:
        fully_shard(block, shard_placement_fn=placement)
    fully_shard(model, shard_placement_fn=placement)
    opt = rk.RAMDA(rk.distributed.rebind(groups, model), lr=1e-2)

NOTE: [local groups]
A DTensor's groups are local when no mesh dimension shards a dimension the
groups reduce. Under a ``view`` a tensor dimension ``j`` that the view splits
into view dims ``(a, b, ...)`` is local when view dim ``a`` (the outer one) is
kept and every rank's chunk of dim ``j`` is a whole number of ``b * ...``
blocks; the local shard is then seen through the view with ``a`` shrunk to
the chunk (the *local view*). FSDP2 chunks like ``torch.chunk`` (sizes
``ceil(n / world)``, the last ones smaller or empty, padded in storage but
never in ``to_local()``) and refuses uneven chunks on a dim other than 0, so
the placement picks among the kept dims that are dim 0 or divisible by the
world size, the one with the most groups along it.

NOTE: [sharded sigma]
The warm start's sigma of a local DTensor has the shape of the kept dims,
sharded on the kept dim that the parameter's shard splits: a shard of
``[out, in, kh, kw]`` with per-filter groups (``dims=(2, 3)``) on ``Shard(1)``
holds groups ``[out, in / world]``, which are not a contiguous run of the
global row-major order but are one DTensor shard of the ``[out, in]`` sigma.
The fused step reads the local part flat (it is contiguous); DCP saves and
loads it by global index, onto any world size.

NOTE: [local units]
A unit group (``units``, docs/math.md section 3, coupled groups) of DTensors
on a 1-D mesh: a unit whose every slice lies along its tensor's sharded dim
inside one rank's chunk is that rank's, which steps it on the local shards
with the backend's own unit step (the units renumbered, their indices
shifted into the shard). Units and tensors are separable, so the rest, the
units that cut across shards (e.g. a GPT-2 head's q, k and v columns of
``c_attn``) and every unit touching a tensor they touch, gather those
tensors and step whole on every rank (`gathered_unit_step`). The per-unit
sigma stays one plain tensor equal on every rank: each rank writes its own
units' values and one all-reduce (a sum of one nonzero term) fills the rest.
Every rank must own a unit, else all is gathered (a rank with none would
step its shard unregularized).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ramda_ref.groups import normalize_dims
from ramda_ref.units import UNITS_KEY


def is_dtensor(x) -> bool:
    return type(x).__name__ == "DTensor" and hasattr(x, "placements")


def _resolve_view(shape: Sequence[int], view: Optional[Sequence[int]]) -> Tuple[int, ...]:
    shape = tuple(int(n) for n in shape)
    if view is None:
        return shape
    view = [int(v) for v in view]
    if view.count(-1) == 1:
        known = math.prod(v for v in view if v != -1)
        view[view.index(-1)] = math.prod(shape) // known if known else 0
    return tuple(view)


def _split_of(shape: Sequence[int], view: Sequence[int]) -> Dict[int, Tuple[int, int]]:
    """For each tensor dim (of size > 1) that the view splits into consecutive
    view dims, its view range ``(a, b)``; view dims of size 1 are skipped and
    a merge of several tensor dims into one view dim ends the map."""
    out: Dict[int, Tuple[int, int]] = {}
    a = 0
    for j, n in enumerate(shape):
        if n == 1:
            continue
        while a < len(view) and view[a] == 1:
            a += 1
        b, prod = a, 1
        while b < len(view) and prod < n:
            prod *= view[b]
            b += 1
        if prod != n:
            break
        out[j] = (a, b)
        a = b
    return out


def _chunk(n: int, world: int) -> int:
    """The chunk size of ``torch.chunk`` (and FSDP2) for ``n`` over ``world``."""
    return -(-n // world) if world > 0 else n


def local_dims(shape: Sequence[int], view, dims, world: int) -> Dict[int, int]:
    """``{tensor dim: groups along it}`` for every dim whose ``torch.chunk``
    over ``world`` ranks leaves each rank whole groups (NOTE: [local groups])."""
    vshape = _resolve_view(shape, view)
    reduced = set(normalize_dims(dims, len(vshape)))
    out = {}
    for j, (a, b) in _split_of(shape, vshape).items():
        if a not in reduced and _chunk(shape[j], world) % math.prod(vshape[a + 1:b]) == 0:
            out[j] = vshape[a]
    return out


def _regularized_groups(group: Dict[str, Any]) -> bool:
    """Whether ``group``'s tensors have groups a shard could split (group
    lasso, exact solver, lambda_ > 0); the rest steps element by element or
    on the reference whatever the placement."""
    return (group.get("regularizer", "group_lasso" if group.get("dims") is not None else "none")
            == "group_lasso" and group.get("dims") is not None
            and group.get("lambda_", 1.0) != 0 and group.get("solver", "exact") == "exact")


def _frozen(x):
    """``x`` hashable: lists and tuples (dims, views) as tuples."""
    return tuple(_frozen(v) for v in x) if isinstance(x, (list, tuple)) else x


def local_view(p, kwargs: Dict[str, Any]) -> Tuple[bool, Optional[Tuple[int, ...]]]:
    """``(local, view)`` for DTensor ``p`` stepped with functional ``kwargs``:
    whether its groups lie in this rank's shard (NOTE: [FSDP2 shards] in
    ``functional.py``), and the ``view`` its local shard is stepped with.
    The answer depends on shapes and placements only, so every rank agrees;
    it is cached on them (this runs for every tensor at every step)."""
    return _local_view(*_layout_key(p, kwargs))


def _layout_key(p, kwargs: Dict[str, Any]) -> tuple:
    """What `local_view` and `sigma_layout` depend on: shapes, placements, mesh
    shape and the grouping keys."""
    lambda_ = kwargs.get("lambda_")
    return (tuple(p.shape), tuple(p.to_local().shape), tuple(p.placements),
            tuple(p.device_mesh.shape), kwargs.get("regularizer") or "none",
            lambda_ is None or bool(lambda_ == 0.0), kwargs.get("solver") or "exact",
            _frozen(kwargs.get("view")), _frozen(kwargs.get("dims")))


@functools.lru_cache(maxsize=4096)
def _local_view(shape, local_shape, placements, mesh_shape, regularizer, no_lambda, solver, view,
                dims) -> Tuple[bool, Optional[Tuple[int, ...]]]:
    if regularizer == "nuclear" or any(pl.is_partial() for pl in placements):
        return False, None
    if regularizer == "none" or no_lambda:
        return True, None  # elementwise: the view changes nothing
    if solver != "exact":
        return False, None
    if regularizer == "l1":
        return True, None
    sharded = [(i, pl) for i, pl in enumerate(placements) if pl.is_shard()]
    if not sharded:
        return True, view
    if len(sharded) > 1 or type(sharded[0][1]).__name__ != "Shard":
        return False, None  # several sharded mesh dims, or TP's strided shards
    mesh_dim, pl = sharded[0]
    j = pl.dim % len(shape)
    if shape[j] <= 1:  # at most one rank holds anything: nothing is split
        return True, view
    if j not in local_dims(shape, view, dims, mesh_shape[mesh_dim]):
        return False, None
    if view is None:
        return True, None
    vshape = list(_resolve_view(shape, view))
    a, b = _split_of(shape, vshape)[j]
    vshape[a] = local_shape[j] // math.prod(vshape[a + 1:b])
    return True, tuple(vshape)


def sigma_layout(p, group: Dict[str, Any]) -> Optional[Tuple[Tuple[int, ...], Tuple[int, ...],
                                                               Optional[int]]]:
    """``(local shape, global shape, sharded dim)`` of DTensor ``p``'s warm-start
    sigma, or ``None`` where ``p`` keeps none (docs/math.md section 4,
    warm-start item): its groups span ranks. The sigma has the shape of the
    kept (view) dims, one value per group in the reference's row-major group
    order, and is sharded on the kept dim that holds ``p``'s shard (``sharded
    dim``; ``None`` when no kept dim is split), so that each rank's part is
    its local groups in their local row-major order, however many dims the
    groups keep (NOTE: [sharded sigma])."""
    return _sigma_layout(*_layout_key(p, group))


@functools.lru_cache(maxsize=4096)
def _sigma_layout(shape, local_shape, placements, mesh_shape, regularizer, no_lambda, solver, view,
                  dims):
    ok, lview = _local_view(shape, local_shape, placements, mesh_shape, regularizer, no_lambda,
                            solver, view, dims)
    if not ok:
        return None
    vshape = _resolve_view(shape, view)
    reduced = set(normalize_dims(dims, len(vshape)))
    kept = [i for i in range(len(vshape)) if i not in reduced]
    if not kept:
        return (1,), (1,), None
    local = _resolve_view(local_shape, lview)
    split = _split_of(shape, vshape)
    at = None
    for pl in placements:
        if pl.is_shard() and pl.dim % len(shape) in split:
            a = split[pl.dim % len(shape)][0]
            at = kept.index(a) if a in kept else None
    return tuple(local[i] for i in kept), tuple(vshape[i] for i in kept), at


def new_sigma(p, group: Dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    """A zero (cold) sigma of DTensor ``p`` (`sigma_layout`): a DTensor over
    ``p``'s mesh, sharded where ``p`` is, so each rank holds its local groups'
    values and torch.distributed.checkpoint saves (and reshards on load) by
    global index."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    local, total, at = sigma_layout(p, group)
    placements = [Shard(0 if at is None else at) if pl.is_shard() else Replicate()
                  for pl in p.placements]
    data = torch.zeros(local, dtype=dtype, device=p.to_local().device)
    stride = tuple(math.prod(total[i + 1:]) for i in range(len(total)))
    return DTensor.from_local(data, p.device_mesh, placements, run_check=False, shape=total,
                              stride=stride)


def _write_local(x, full: torch.Tensor) -> None:
    """Copy this rank's part of ``full`` (the global value) into DTensor ``x``'s shard."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, x.device_mesh, x.placements)
    x.to_local().copy_(full[tuple(slice(o, o + n) for o, n in zip(offset, shape))])


def gathered_unit_step(step, definition, group, params, states, grads, t, alpha, hp):
    """``step`` (``ramda_ref.units.step`` or a backend's unit step) of a unit group whose tensors are
    DTensors: every rank gathers the whole tensors, their gradients and state,
    runs the same solve and writes back its own shard. A unit's slices cut
    across every shard, so its norms need all of them; the reference's
    gather-and-index has no DTensor form. The per-unit sigma stays one plain
    tensor, equal on every rank (torch.distributed.checkpoint saves it once)."""
    def full(x):
        return x.full_tensor() if is_dtensor(x) else x

    full_params = [full(p) for p in params]
    full_states = [{k: full(v) for k, v in st.items()} for st in states]
    iters = step(definition, group, full_params, full_states, [full(g) for g in grads], t, alpha, hp)
    for p, f in zip(params, full_params):
        _write_local(p, f)
    for st, f in zip(states, full_states):
        for k, v in f.items():
            if is_dtensor(st.get(k)):
                _write_local(st[k], v)
            else:
                st[k] = v
    return iters


#: Unit-group plans by ``id(units)`` (NOTE: [local units]); each entry holds its
#: ``units`` so the id is not reused while it is cached.
_UNIT_PLANS: "OrderedDict[int, Tuple[Any, tuple, Any]]" = OrderedDict()


class _UnitPlan:
    """One rank's split of a unit group (NOTE: [local units]): ``local`` the
    tensor positions stepped on their local shards with ``local_units``
    (renumbered, indices shifted into the shard) and ``local_ids`` their
    positions in ``units``; ``spanning`` / ``spanning_units`` / ``spanning_ids``
    the rest, gathered."""

    def __init__(self, n_units, local, local_units, local_ids, spanning, spanning_units,
                 spanning_ids):
        self.local, self.local_units, self.local_ids = local, local_units, local_ids
        self.spanning, self.spanning_units, self.spanning_ids = spanning, spanning_units, spanning_ids
        gone = set(spanning_ids)
        #: every rank's local units: the ones the all-reduce of sigma fills
        self.reduced_ids = [u for u in range(n_units) if u not in gone]


def _renumber(units, ids, tensors, shift) -> tuple:
    pos = {i: k for k, i in enumerate(tensors)}
    return tuple(tuple((pos[i], dim, (a - shift(i, dim), b - shift(i, dim), st))
                       for i, dim, (a, b, st) in units[u]) for u in ids)


def unit_plan(group: Dict[str, Any], params: Sequence, grads: Sequence) -> _UnitPlan:
    """This rank's `_UnitPlan` of unit group ``group`` whose ``params`` are
    DTensors (NOTE: [local units]); cached on the units, shapes and placements."""
    units = group[UNITS_KEY]
    if not all(is_dtensor(p) for p in params):
        return _make_unit_plan(units, params, False)
    mesh = params[0].device_mesh
    key = (tuple(tuple(p.shape) for p in params), tuple(tuple(p.placements) for p in params),
           tuple(mesh.shape), tuple(mesh.get_coordinate() or ()),
           all(is_dtensor(g) and g.placements == p.placements for p, g in zip(params, grads)),
           all(p.device_mesh == mesh for p in params))
    hit = _UNIT_PLANS.get(id(units))
    if hit is not None and hit[0] is units and hit[1] == key:
        return hit[2]
    plan = _make_unit_plan(units, params, key[-2] and key[-1] and mesh.ndim == 1)
    _UNIT_PLANS[id(units)] = (units, key, plan)
    while len(_UNIT_PLANS) > 64:
        _UNIT_PLANS.popitem(last=False)
    return plan


def _make_unit_plan(units, params, shardable: bool) -> _UnitPlan:
    everything = _UnitPlan(len(units), [], (), [], list(range(len(params))), units,
                           list(range(len(units))))
    if not shardable:
        return everything
    world = params[0].device_mesh.size(0)
    rank = params[0].device_mesh.get_coordinate()[0]
    sharded = {}  # tensor -> (dim, chunk) of its one Shard placement
    for i, p in enumerate(params):
        (pl,) = p.placements
        if type(pl).__name__ == "Shard":
            sharded[i] = (pl.dim % p.dim(), _chunk(p.shape[pl.dim], world))

    def owner(unit) -> Optional[int]:
        ranks = set()
        for i, dim, (a, b, st) in unit:
            if i not in sharded or sharded[i][0] != dim or b <= a:
                return None  # a slice across the shards, or of a replicated tensor
            c = sharded[i][1]
            ranks |= {a // c, (a + (b - 1 - a) // st * st) // c}
        return ranks.pop() if len(ranks) == 1 else None

    owners = [owner(u) for u in units]
    # a tensor that a spanning unit touches is gathered whole: so are its other units
    touched = [{i for i, _, _ in u} for u in units]
    spanning_t = set()
    changed = True
    while changed:
        changed = False
        for u, o in enumerate(owners):
            if (o is None or touched[u] & spanning_t) and not touched[u] <= spanning_t:
                spanning_t |= touched[u]
                changed = True
    span_ids = [u for u, o in enumerate(owners) if o is None or touched[u] & spanning_t]
    local_t = [i for i in range(len(params)) if i not in spanning_t]
    gone = set(span_ids)
    by_rank = [[u for u, o in enumerate(owners) if o == r and u not in gone]
               for r in range(world)]
    if not local_t or not all(by_rank):  # a rank without units would step nothing regularized
        return everything
    ids = by_rank[rank]
    shift = lambda i, dim: rank * sharded[i][1]  # noqa: E731
    spanning = sorted(spanning_t)
    return _UnitPlan(len(units), local_t, _renumber(units, ids, local_t, shift), ids, spanning,
                     _renumber(units, span_ids, spanning, lambda i, dim: 0), span_ids)


def sharded_unit_step(step, definition, group, params, states, grads, t, alpha, hp,
                      gathered: Callable[[int], None]) -> List:
    """``step`` (a backend's unit step) of a unit group whose tensors are
    DTensors (NOTE: [local units]): the units whose slices lie in one rank's
    shards step there on the local tensors, the rest by `gathered_unit_step`
    on the tensors they touch (``gathered(n)`` is told how many); one
    all-reduce makes the per-unit sigma whole and equal on every rank."""
    from ramda_ref.units import SIGMA_KEY

    plan = unit_plan(group, params, grads)
    sigma = states[0].get(SIGMA_KEY)
    new_sigma = None if sigma is None else sigma.clone()
    iters = [None] * len(params)

    def run(idx, units, ids, convert, runner):
        sub_states = [{k: convert(v) for k, v in states[i].items() if k != SIGMA_KEY} for i in idx]
        if sigma is not None:
            sub_states[0][SIGMA_KEY] = sigma[ids]
        sub = dict(group, params=[convert(params[i]) for i in idx], units=units)
        if "param_names" in group:
            sub["param_names"] = [group["param_names"][i] for i in idx]
        out = runner(definition, sub, sub["params"], sub_states, [convert(grads[i]) for i in idx],
                     t, alpha, hp)
        for i, st, it in zip(idx, sub_states, out):
            iters[i] = it
            for k, v in st.items():  # state the step created (amsgrad switched on)
                if k != SIGMA_KEY and k not in states[i]:
                    states[i][k] = _like(params[i], v) if convert is not _identity else v
        return sub_states[0].get(SIGMA_KEY)

    sc = definition.scalars(t, alpha, hp)
    solves = definition.solves and sc[definition.threshold] != 0
    if plan.local:
        local = run(plan.local, plan.local_units, plan.local_ids, _to_local, step)
        if solves:  # each unit is one rank's: the sum is its value, exactly
            full = local.new_zeros(len(group[UNITS_KEY]))
            full[plan.local_ids] = local
            torch.distributed.all_reduce(full, group=params[0].device_mesh.get_group(0))
            if new_sigma is None or new_sigma.dtype != full.dtype:
                new_sigma = full
            else:
                new_sigma[plan.reduced_ids] = full[plan.reduced_ids]
    if plan.spanning:
        gathered(len(plan.spanning))
        span = run(plan.spanning, plan.spanning_units, plan.spanning_ids, _identity,
                   lambda *a: gathered_unit_step(step, *a))
        if span is not None:
            if new_sigma is None:
                new_sigma = torch.zeros(len(group[UNITS_KEY]), dtype=span.dtype, device=span.device)
            new_sigma[plan.spanning_ids] = span.to(new_sigma.dtype)
    if new_sigma is not None:
        states[0][SIGMA_KEY] = new_sigma
    return iters


def _identity(x):
    return x


def _to_local(x):
    return x.to_local() if is_dtensor(x) else x


def _like(p, local: torch.Tensor):
    """``local`` (this rank's shard of a state tensor of ``p``) as a DTensor like ``p``."""
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=p.stride())


def finite_flags(grads: Sequence[torch.Tensor], screen: Callable) -> torch.Tensor:
    """``screen`` (one bool per gradient: free of NaN and Inf?) where some
    gradients are DTensors: ``screen`` reads the local shards and one
    all-reduce (min) per mesh dim makes every rank's flags the same, so all
    ranks raise or skip together. Gradients on several meshes go to
    ``screen`` whole (the reference's per-tensor sums are collectives)."""
    # by equality, not identity: each fully_shard call makes its own DeviceMesh object
    meshes = {g.device_mesh for g in grads if is_dtensor(g)}
    if len(meshes) != 1:
        return screen(grads)
    flags = screen([g.to_local() if is_dtensor(g) else g for g in grads]).to(torch.int32)
    mesh = next(iter(meshes))
    for d in range(mesh.ndim):
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN, group=mesh.get_group(d))
    return flags.bool()


def _unit_dims(group: Dict[str, Any]) -> Dict[int, set]:
    dims: Dict[int, set] = {}
    for unit in group[UNITS_KEY]:
        for i, dim, _ in unit:
            dims.setdefault(i, set()).add(dim % group["params"][i].dim())
    return dims


def fsdp_shard_placement(param_groups: Iterable[Dict[str, Any]], world_size: Optional[int] = None
                         ) -> Callable[[nn.Parameter], Optional[Any]]:
    """A ``shard_placement_fn`` for ``fully_shard`` that keeps groups local
    (NOTE: [local groups]).

    ``param_groups`` are the groups the optimizer will get, with the model's
    parameters before sharding (``group_parameters``' output, or any list of
    dicts with ``params``). For each parameter the function returns:

    * a grouped tensor (group lasso, exact solver, ``lambda_ > 0``):
      ``Shard(j)`` for the kept dim ``j`` with the most groups along it among
      those FSDP2 can shard over ``world_size`` ranks (dim 0 or divisible by
      it; under a ``view``, only where each rank's chunk is whole groups):
      input-wise Linear ``[out, in]`` -> ``Shard(1)``, output-wise ->
      ``Shard(0)``, channel-wise Conv -> ``Shard(1)``; ``None`` where no dim
      qualifies (its groups span ranks and step on the reference);
    * a tensor of a unit group (``units``): ``Shard(d)`` when every unit
      slice of it lies along one dim ``d`` that FSDP2 can shard, else ``None``;
    * anything else: ``None`` (FSDP2's default, ``Shard(0)``).

    ``world_size`` defaults to the default process group's, read when the
    function is called (inside ``fully_shard``). A parameter that is in no
    group raises ``ValueError``: an optimizer built from these groups would
    not step it, and a placement for it would be a guess.
    """
    from torch.distributed.tensor import Shard

    groups = list(param_groups)
    where: Dict[int, Tuple[Dict[str, Any], int]] = {}
    for gi, group in enumerate(groups):
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"param_groups[{gi}] is {type(group).__name__}, not a dict with 'params'")
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        group = dict(group, params=params)
        for i, p in enumerate(params):
            if is_dtensor(p):
                raise ValueError(f"param_groups[{gi}]['params'][{i}] is already a DTensor: build "
                                 f"the placement from the groups of the unsharded model")
            if id(p) in where:
                raise ValueError(f"param_groups[{gi}]['params'][{i}] is also in param_groups"
                                 f"[{where[id(p)][0]['_index']}]: a parameter belongs to one group")
            where[id(p)] = (dict(group, _index=gi), i)

    def placement(param: nn.Parameter):
        if id(param) not in where:
            raise ValueError(f"fsdp_shard_placement: a parameter of shape {tuple(param.shape)} is in "
                             f"none of the {len(groups)} param groups given: build the placement "
                             f"from groups that cover every parameter fully_shard shards "
                             f"(group_parameters(model) does)")
        group, i = where[id(param)]
        world = world_size if world_size is not None else torch.distributed.get_world_size()
        shape = tuple(param.shape)
        if group.get(UNITS_KEY) is not None:
            dims = _unit_dims(group).get(i, set())
            if len(dims) == 1:
                (d,) = dims
                if d == 0 or shape[d] % world == 0:
                    return Shard(d)
            return None
        if not _regularized_groups(group):
            return None
        # FSDP2 shards a dim other than 0 only evenly; a dim of size 1 is not worth it
        candidates = [(j, n) for j, n in local_dims(shape, group.get("view"), group.get("dims"),
                                                    world).items()
                      if shape[j] > 1 and (j == 0 or shape[j] % world == 0)]
        if not candidates:
            return None
        # most groups along the dim; ties to the lower dim (dim 0 is FSDP2's own)
        return Shard(max(candidates, key=lambda c: (c[1], -c[0]))[0])

    return placement


def rebind(param_groups: Iterable[Dict[str, Any]], model: nn.Module) -> List[Dict[str, Any]]:
    """``param_groups`` with each parameter replaced by the model's parameter of
    the same name (``param_names``), e.g. the DTensor parameters ``fully_shard``
    put in place of the ones the groups were built from."""
    out = []
    for gi, group in enumerate(param_groups):
        names = group.get("param_names")
        if names is None:
            raise ValueError(f"param_groups[{gi}] has no 'param_names' to find its parameters by "
                             f"(group_parameters gives them)")
        out.append(dict(group, params=[model.get_parameter(n) for n in names]))
    return out


__all__ = ["fsdp_shard_placement", "rebind", "is_dtensor", "local_dims", "local_view", "sigma_layout",
           "new_sigma", "finite_flags", "gathered_unit_step", "unit_plan", "sharded_unit_step"]
