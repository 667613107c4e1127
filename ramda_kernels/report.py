"""How much structure a model has: the docs/math.md section 7 metrics, per tensor and in total.

``structure_report(model)`` (default grouping of `group_parameters`),
``structure_report(model, groups)`` (param groups or an optimizer) or
``structure_report(optimizer)`` gives a `StructureReport`:

* unstructured sparsity = exactly-zero entries / entries;
* group sparsity = all-zero groups / groups;
* weighted group sparsity = entries in all-zero groups / grouped entries.

One row per regularized tensor. For ``group_lasso`` the groups are the
param group's ``dims`` (after its ``view``); for ``l1`` every entry is a
group of one; ``nuclear`` tensors have no groups and only count towards
unstructured sparsity. A param group with ``units`` (docs/math.md section 3,
"Coupled groups") gives one row per tensor (regularizer ``"units"``, no
groups of its own) and counts its units: a unit is zero when every element
of every one of its slices is; the totals' ``units`` / ``zero_units`` /
``unit_entries`` / ``zero_unit_entries`` hold them and they count as groups
in the group sparsities. Totals sum over the rows, so group sparsity and
weighted group sparsity are taken over regularized tensors as the paper
reports them; ``unstructured_sparsity_all`` also counts unregularized
parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import nn

from ramda_ref.groups import group_size, grouped_view, normalize_dims, zero_groups

from .grouping import group_parameters, named_parameters_of


@dataclasses.dataclass(frozen=True)
class TensorStructure:
    """Structure of one regularized tensor. ``groups`` is ``None`` for ``nuclear``."""

    name: str
    shape: tuple
    regularizer: str
    dims: Optional[tuple]
    entries: int
    zero_entries: int
    groups: Optional[int]
    zero_groups: Optional[int]
    group_entries: Optional[int]

    @property
    def unstructured_sparsity(self) -> float:
        return self.zero_entries / self.entries if self.entries else 0.0

    @property
    def group_sparsity(self) -> Optional[float]:
        if self.groups is None:
            return None
        return self.zero_groups / self.groups if self.groups else 0.0

    @property
    def weighted_group_sparsity(self) -> Optional[float]:
        if self.groups is None:
            return None
        return self.zero_groups * self.group_entries / self.entries if self.entries else 0.0

    def as_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(unstructured_sparsity=self.unstructured_sparsity, group_sparsity=self.group_sparsity,
                 weighted_group_sparsity=self.weighted_group_sparsity)
        return d


@dataclasses.dataclass(frozen=True)
class StructureTotals:
    tensors: int
    entries: int               # entries of the regularized tensors
    zero_entries: int
    groups: int                # over tensors that have groups
    zero_groups: int
    grouped_entries: int
    zero_group_entries: int
    all_entries: int           # every parameter in the report, regularized or not
    all_zero_entries: int
    units: int = 0             # unit groups (also counted in groups / zero_groups)
    zero_units: int = 0
    unit_entries: int = 0
    zero_unit_entries: int = 0

    @property
    def unstructured_sparsity(self) -> float:
        return self.zero_entries / self.entries if self.entries else 0.0

    @property
    def group_sparsity(self) -> float:
        return self.zero_groups / self.groups if self.groups else 0.0

    @property
    def weighted_group_sparsity(self) -> float:
        return self.zero_group_entries / self.grouped_entries if self.grouped_entries else 0.0

    @property
    def unstructured_sparsity_all(self) -> float:
        return self.all_zero_entries / self.all_entries if self.all_entries else 0.0

    def as_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(unstructured_sparsity=self.unstructured_sparsity, group_sparsity=self.group_sparsity,
                 weighted_group_sparsity=self.weighted_group_sparsity,
                 unstructured_sparsity_all=self.unstructured_sparsity_all)
        return d


class StructureReport:
    """Rows (`TensorStructure`, one per regularized tensor) and `StructureTotals`;
    ``str(report)`` is a table."""

    def __init__(self, rows: List[TensorStructure], totals: StructureTotals):
        self.rows = rows
        self.totals = totals

    def as_dict(self) -> Dict[str, Any]:
        return {"rows": [r.as_dict() for r in self.rows], "totals": self.totals.as_dict()}

    def __repr__(self) -> str:
        t = self.totals
        return (f"StructureReport({t.tensors} tensors, group sparsity {t.group_sparsity:.4f}, "
                f"weighted {t.weighted_group_sparsity:.4f}, unstructured {t.unstructured_sparsity:.4f})")

    def __str__(self) -> str:
        def pct(x):
            return "-" if x is None else f"{100 * x:6.2f}%"

        header = ("tensor", "shape", "dims", "zero/groups", "unstructured", "group", "weighted")
        lines = []
        for r in self.rows:
            dims = str(r.dims) if r.regularizer == "group_lasso" else r.regularizer  # or "units"
            groups = "-" if r.groups is None else f"{r.zero_groups}/{r.groups}"
            lines.append((r.name, "x".join(map(str, r.shape)) or "()", dims, groups,
                          pct(r.unstructured_sparsity), pct(r.group_sparsity),
                          pct(r.weighted_group_sparsity)))
        t = self.totals
        total = ("total", f"{t.entries} entries", "", f"{t.zero_groups}/{t.groups}",
                 pct(t.unstructured_sparsity), pct(t.group_sparsity), pct(t.weighted_group_sparsity))
        widths = [max(len(row[i]) for row in [header, total, *lines]) for i in range(len(header))]

        def fmt(row):
            return "  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths))).rstrip()

        rule = "-" * len(fmt(header))
        out = [fmt(header), rule, *map(fmt, lines), rule, fmt(total)]
        out.append(f"unstructured sparsity over all {t.all_entries} parameter entries: "
                   f"{pct(t.unstructured_sparsity_all).strip()}")
        if t.units:
            out.append(f"units: {t.zero_units}/{t.units} zero ({t.zero_unit_entries}/"
                       f"{t.unit_entries} entries in zero units)")
        return "\n".join(out)


def _groups_of(obj, groups) -> List[Dict[str, Any]]:
    if isinstance(groups, torch.optim.Optimizer):
        return groups.param_groups
    if groups is not None:
        return list(groups)
    if isinstance(obj, torch.optim.Optimizer):
        return obj.param_groups
    raise TypeError(f"structure_report needs a model, an optimizer or param groups, got {type(obj).__name__}")


@torch.no_grad()
def unit_counts(group: Dict[str, Any]) -> Dict[str, int]:
    """``units``, ``zero_units``, ``unit_entries`` and ``zero_unit_entries`` of a
    param group with ``units`` (normalized here if it is not yet)."""
    from ramda_ref import units as U

    params = list(group["params"])
    normalized = U.normalize_units(group[U.UNITS_KEY], [tuple(p.shape) for p in params],
                                   group.get("param_names"))
    lay = U.layout_of({**group, "params": params, U.UNITS_KEY: normalized})
    nonzero = U._gather([(p.detach() != 0) for p in params], lay, torch.float32)
    zero = nonzero.sum(1) == 0
    sizes = lay.sizes.to(torch.long)
    return dict(units=lay.units, zero_units=int(zero.sum()), unit_entries=int(sizes.sum()),
                zero_unit_entries=int(sizes[zero.cpu()].sum()))


@torch.no_grad()
def tensor_structure(name: str, p: torch.Tensor, regularizer: str, dims=None, view=None
                     ) -> TensorStructure:
    """The metrics of one tensor grouped by ``dims`` after ``view`` (as in a param group)."""
    x = p.detach()
    entries = x.numel()
    zero_entries = int((x == 0).sum())
    ngroups = nzero = gentries = None
    norm_dims = None
    if regularizer == "group_lasso":
        x = grouped_view(x, view)
        norm_dims = normalize_dims(dims, x.dim())
        mask = zero_groups(x, norm_dims)
        gentries = group_size(x.shape, norm_dims)
        ngroups, nzero = mask.numel(), int(mask.sum())
    elif regularizer == "l1":
        ngroups, nzero, gentries = entries, zero_entries, 1
    # "units": the units span tensors and are counted per param group (unit_counts)
    return TensorStructure(name=name, shape=tuple(p.shape), regularizer=regularizer, dims=norm_dims,
                           entries=entries, zero_entries=zero_entries, groups=ngroups,
                           zero_groups=nzero, group_entries=gentries)


def structure_report(model_or_optimizer, groups: Optional[Iterable[Dict[str, Any]]] = None,
                     **grouping) -> StructureReport:
    """Structure of ``model_or_optimizer``'s regularized tensors (docs/math.md section 7).

    With a model, the grouping comes from ``groups`` (param groups such as
    `group_parameters` returns, or an optimizer), else from
    ``group_parameters(model, **grouping)``. With an optimizer, from its
    ``param_groups``. Names come from the groups' ``param_names`` or, failing
    that, from the model's parameter names.
    """
    obj = model_or_optimizer
    if isinstance(obj, nn.Module) and groups is None:
        groups = group_parameters(obj, **grouping)
    elif grouping:
        raise TypeError(f"grouping arguments {sorted(grouping)} apply only to a model without groups")
    groups = _groups_of(obj, groups)
    model_names = {}
    if isinstance(obj, nn.Module):
        model_names = {id(p): n for n, p in obj.named_parameters(remove_duplicate=True)}
    rows = []
    all_entries = all_zero = 0
    units = dict(units=0, zero_units=0, unit_entries=0, zero_unit_entries=0)
    for group in groups:
        if group.get("units") is not None:
            for key, n in unit_counts(group).items():
                units[key] += n
    for fallback, p, group in named_parameters_of(groups):
        name = fallback if group.get("param_names") else model_names.get(id(p), fallback)
        all_entries += p.numel()
        all_zero += int((p.detach() == 0).sum())
        reg = group.get("regularizer")
        if reg is None:  # the optimizers' default: group lasso when dims are given
            reg = "group_lasso" if group.get("dims", group.get("dim")) is not None else "none"
        if group.get("units") is not None:
            reg = "units"
        if reg == "none":
            continue
        dims = group.get("dims", group.get("dim"))
        rows.append(tensor_structure(name, p, reg, dims, group.get("view")))
    grouped = [r for r in rows if r.groups is not None]
    totals = StructureTotals(
        tensors=len(rows), entries=sum(r.entries for r in rows),
        zero_entries=sum(r.zero_entries for r in rows),
        groups=sum(r.groups for r in grouped) + units["units"],
        zero_groups=sum(r.zero_groups for r in grouped) + units["zero_units"],
        grouped_entries=sum(r.entries for r in grouped) + units["unit_entries"],
        zero_group_entries=sum(r.zero_groups * r.group_entries for r in grouped)
        + units["zero_unit_entries"],
        all_entries=all_entries, all_zero_entries=all_zero, **units)
    return StructureReport(rows, totals)


__all__ = ["structure_report", "StructureReport", "TensorStructure", "StructureTotals", "tensor_structure",
           "unit_counts"]
