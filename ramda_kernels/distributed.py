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
"""

from __future__ import annotations

import math
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


def local_view(p, kwargs: Dict[str, Any]) -> Tuple[bool, Optional[Tuple[int, ...]]]:
    """``(local, view)`` for DTensor ``p`` stepped with functional ``kwargs``:
    whether its groups lie in this rank's shard (NOTE: [FSDP2 shards] in
    ``functional.py``), and the ``view`` its local shard is stepped with.
    The answer depends on shapes and placements only, so every rank agrees."""
    regularizer = kwargs.get("regularizer", "none")
    placements = tuple(p.placements)
    if regularizer == "nuclear" or any(pl.is_partial() for pl in placements):
        return False, None
    if regularizer == "none" or kwargs.get("lambda_", 0.0) == 0.0:
        return True, None  # elementwise: the view changes nothing
    if kwargs.get("solver", "exact") != "exact":
        return False, None
    if regularizer == "l1":
        return True, None
    view = kwargs.get("view")
    sharded = [(i, pl) for i, pl in enumerate(placements) if pl.is_shard()]
    if not sharded:
        return True, view
    if len(sharded) > 1 or type(sharded[0][1]).__name__ != "Shard":
        return False, None  # several sharded mesh dims, or TP's strided shards
    mesh_dim, pl = sharded[0]
    shape = tuple(p.shape)
    j = pl.dim % len(shape)
    if shape[j] <= 1:  # at most one rank holds anything: nothing is split
        return True, view
    if j not in local_dims(shape, view, kwargs.get("dims"), p.device_mesh.size(mesh_dim)):
        return False, None
    if view is None:
        return True, None
    vshape = list(_resolve_view(shape, view))
    a, b = _split_of(shape, vshape)[j]
    vshape[a] = p.to_local().shape[j] // math.prod(vshape[a + 1:b])
    return True, tuple(vshape)


def sigma_layout(p, group: Dict[str, Any]) -> Optional[Tuple[int, int]]:
    """``(local groups, global groups)`` of DTensor ``p``'s warm-start sigma,
    or ``None`` where ``p`` keeps none (docs/math.md section 4, warm-start
    item): its groups span ranks, or they are kept along more than one
    (view) dimension, whose local order is not a chunk of the global one."""
    kwargs = {k: group.get(k) for k in ("regularizer", "lambda_", "solver", "view", "dims")}
    ok, lview = local_view(p, kwargs)
    if not ok:
        return None
    vshape = _resolve_view(p.shape, group.get("view"))
    reduced = set(normalize_dims(group.get("dims"), len(vshape)))
    kept = [i for i in range(len(vshape)) if i not in reduced]
    if len(kept) > 1:
        return None
    local = _resolve_view(p.to_local().shape, lview)
    return (local[kept[0]], vshape[kept[0]]) if kept else (1, 1)


def new_sigma(p, group: Dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    """A zero (cold) sigma of DTensor ``p``: a 1-D DTensor over ``p``'s mesh,
    sharded on mesh dims where ``p`` is sharded, so each rank holds its local
    groups' values and torch.distributed.checkpoint saves every rank's."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    local, total = sigma_layout(p, group)
    placements = [Shard(0) if pl.is_shard() else Replicate() for pl in p.placements]
    data = torch.zeros(local, dtype=dtype, device=p.to_local().device)
    return DTensor.from_local(data, p.device_mesh, placements, run_check=False, shape=(total,),
                              stride=(1,))


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


def finite_flags(grads: Sequence[torch.Tensor], screen: Callable) -> torch.Tensor:
    """``screen`` (one bool per gradient: free of NaN and Inf?) where some
    gradients are DTensors: ``screen`` reads the local shards and one
    all-reduce (min) per mesh dim makes every rank's flags the same, so all
    ranks raise or skip together. Gradients on several meshes go to
    ``screen`` whole (the reference's per-tensor sums are collectives)."""
    meshes = {id(g.device_mesh): g.device_mesh for g in grads if is_dtensor(g)}
    if len(meshes) != 1:
        return screen(grads)
    flags = screen([g.to_local() if is_dtensor(g) else g for g in grads]).to(torch.int32)
    mesh = next(iter(meshes.values()))
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
           "new_sigma", "finite_flags", "gathered_unit_step"]
