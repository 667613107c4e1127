"""The step ops: one ``torch.library`` op per optimizer, its schema generated
from ``ramda_ref.definitions``, and the table of what each backend runs.

``ramda_kernels::{ramda,rmda,proxadamw,proxsgd}_step`` take the functional's
arguments (the state lists, marked mutated unless the definition says the
step only reads them; the step counters as tensor lists; every hyperparameter
keyword; ``found_inf`` / ``grad_scale``) after a ``str backend``. Their fake
implementation does nothing (the steps write in place and return nothing);
their implementation looks the backend's functional up in `KERNELS`, where
each backend module registers its four with `register` when it is imported,
and runs the reference's where a backend registered none.

NOTE: [one op per optimizer]
Two or three backends serve each device (reference and cpu on CPU; triton,
cuda and reference on CUDA), so a dispatch key cannot say which one the
optimizer was built with. The op takes the resolved backend name as its first
argument instead: the graph records it, and one Python kernel per op looks
the functional up in `KERNELS`. Only capturable calls made while
``torch.compile`` traces take the op (`call`): there the backends' own code
(launch plans cached by data pointers, per-tensor fallback splits) cannot be
traced, and the op keeps the step one opaque in-place node, so a compiled
step holds exactly one op per functional call on every backend. Everywhere
else the functional runs straight from `KERNELS` (`kernel`): the same table,
without the dispatcher's conversion of every tensor list on each step, and
with the iteration counts the op cannot return. A non-capturable call never
takes the op: its Python step counters would be baked into the graph.

Adding a hyperparameter, a counter or a state list to a `Definition` changes
the schema with it; nothing here names one.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from ramda_ref import definitions as _D
from ramda_ref import functional as _ref

from . import _ext  # noqa: F401  (loads ramda_kernels._C, which defines the namespace in C++)

#: backend name -> {optimizer name: functional}; filled by `register`.
KERNELS: Dict[str, Dict[str, Callable]] = {}
#: backend name -> its step of param groups with ``units`` (signature of
#: ``ramda_ref.units.step``); filled by `register_units`.
UNIT_KERNELS: Dict[str, Callable] = {}
_LIBRARY = torch.library.Library("ramda_kernels", "FRAGMENT")
#: schema types of Python defaults (`_D.HParam.schema_type` overrides)
_TYPES = {bool: "bool", int: "int", float: "float", str: "str"}
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_ARGUMENTS: Dict[str, Tuple["_D.Definition", Tuple[Tuple[str, str], ...]]] = {}


def register(backend: str, **functionals: Callable) -> None:
    """Backend ``backend`` runs ``functionals[name]`` for optimizer ``name``
    (called by each backend module when it is imported)."""
    unknown = set(functionals) - set(_D.NAMES)
    if unknown:
        raise ValueError(f"register({backend!r}): no optimizer named {sorted(unknown)} "
                         f"(expected some of {_D.NAMES})")
    KERNELS.setdefault(backend, {}).update(functionals)


def register_units(backend: str, step: Callable) -> None:
    """Backend ``backend`` runs param groups with ``units`` with ``step``
    (``ramda_kernels.backends._units.fused_step``)."""
    UNIT_KERNELS[backend] = step


def unit_kernel(backend: str) -> Callable:
    """The unit-group step of backend ``backend``, else the reference's
    (``ramda_ref.units.step``)."""
    from ramda_ref import units

    return UNIT_KERNELS.get(backend) or units.step


def kernel(name: str, backend: str) -> Callable:
    """The functional backend ``backend`` registered for optimizer ``name``,
    else the reference's (the op's default implementation)."""
    return KERNELS.get(backend, {}).get(name) or getattr(_ref, name)


# -- the schema, from the definition --------------------------------------------

def _hparam_types(h: "_D.HParam") -> List[Tuple[str, str]]:
    """``(functional keyword, schema type)`` for each keyword ``h`` becomes."""
    if not h.functional:
        return []
    if h.schema_type is not None:
        return [(name, h.schema_type) for name in h.functional]
    defaults = h.default if len(h.functional) > 1 else (h.default,)
    out = []
    for name, value in zip(h.functional, defaults):
        kind = _TYPES.get(type(value))
        if kind is None:
            raise TypeError(f"HParam {h.name!r}: no schema type for a default of type "
                            f"{type(value).__name__}; give the HParam a schema_type")
        out.append((name, kind))
    return out


def arguments(d: "_D.Definition") -> Tuple[Tuple[str, str], ...]:
    """The op's keyword-only arguments after the tensor lists: ``(name, type)``
    (computed once per definition: `op_args` runs on every compiled step)."""
    cached = _ARGUMENTS.get(d.name)
    if cached is None or cached[0] is not d:
        counters = tuple((c, "Tensor[]") for c in d.counters)
        hparams = tuple(pair for h in d.hparams for pair in _hparam_types(h))
        cached = _ARGUMENTS[d.name] = (d, counters + hparams + (("found_inf", "Tensor?"),
                                                                ("grad_scale", "Tensor?")))
    return cached[1]


def schema(d: "_D.Definition") -> str:
    """The op's schema (without its name), generated from ``d``."""
    mutated = iter(_LETTERS)
    lists = [f"Tensor({next(mutated)}!)[] params", "Tensor[] grads"]
    for key, arg in zip(d.state, d.state_args):
        mark = "" if key in d.read_only_state else f"({next(mutated)}!)"
        lists.append(f"Tensor{mark}[] {arg}")
    keywords = [f"{kind} {name}" for name, kind in arguments(d)]
    return f"(str backend, {', '.join(lists)}, *, {', '.join(keywords)}) -> ()"


def op_name(d: "_D.Definition") -> str:
    return f"{d.name}_step"


def _op_value(kind: str, value):
    """``value`` in the form the dispatcher takes for a ``kind`` argument."""
    if kind == "Tensor[]":
        return list(value)  # a 1-D tensor of per-tensor counters, or a list of 0-d ones
    if kind == "int[]?" and value is not None:
        return [int(value)] if isinstance(value, int) else [int(v) for v in value]
    return value


def _define(d: "_D.Definition"):
    name = op_name(d)
    _LIBRARY.define(name + schema(d))

    def implementation(backend, params, grads, *lists, **kwargs):
        kernel(d.name, backend)(params, grads, *lists, capturable=True, **kwargs)

    _LIBRARY.impl(name, implementation, "CompositeExplicitAutograd")
    # in-place steps that return nothing: a fake tensor has nothing to compute
    torch.library.register_fake(f"ramda_kernels::{name}", lib=_LIBRARY)(
        lambda *args, **kwargs: None)
    return getattr(torch.ops.ramda_kernels, name).default


#: optimizer name -> its op (an OpOverload)
OPS = {d.name: _define(d) for d in _D.DEFINITIONS.values()}


def op_args(name: str, backend: str, lists, kwargs: dict) -> Tuple[object, list, dict]:
    """``(op, args, kwargs)`` for functional ``name``'s capturable call on
    ``backend``: ``lists`` are its tensor lists in order (params, grads, state),
    ``kwargs`` its keywords (``capturable`` among them or not)."""
    d = _D.DEFINITIONS[name]
    # a missing keyword the schema requires is a KeyError naming it; optional ones default to None
    op_kwargs = {arg: _op_value(kind, kwargs.get(arg) if kind.endswith("?") else kwargs[arg])
                 for arg, kind in arguments(d)}
    return OPS[name], [backend] + [list(x) for x in lists], op_kwargs


def call(name: str, backend: str, lists, kwargs: dict) -> List[Optional[torch.Tensor]]:
    """Run functional ``name``'s capturable call on ``backend`` through its op
    (NOTE: [one op per optimizer]); one ``None`` per tensor (no iteration counts)."""
    op, args, op_kwargs = op_args(name, backend, lists, kwargs)
    op(*args, **op_kwargs)
    return [None] * len(lists[0])


__all__ = ["KERNELS", "OPS", "UNIT_KERNELS", "register", "register_units", "unit_kernel", "kernel", "schema", "arguments", "op_name", "op_args",
           "call"]
