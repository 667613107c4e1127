"""One functional entry per optimizer, shared by every backend.

``ramda_kernels.functional.ramda(..., backend="auto")`` takes exactly the
arguments of ``ramda_ref.functional.ramda`` (see there for the math and the
conventions) plus ``backend``, and runs them on the chosen implementation.
With ``capturable=True`` only the backends of ``backends.CAPTURABLE_BACKENDS``
run it (``auto`` picks among them).

NOTE: [FSDP2 shards]
DTensor parameters (FSDP2's ``fully_shard``) are split per tensor. A tensor
whose every group lies inside this rank's shard (no regularizer; l1 with the
exact solver; group lasso or its closed-form shrink whose reduced dims are not
sharded; no ``view``) needs nothing from other ranks: its local shards go to
the fast backend like any tensor. The rest run on the reference with the
DTensors themselves, whose reductions combine a group's norm across ranks:
groups that span shards, ``view`` groupings, nuclear norm, and the PG solver
(its stopping tolerance scales with the whole tensor's size, and l1-PG
treats the whole tensor as one group).
"""

from __future__ import annotations

from typing import List

import torch

from ramda_ref.groups import normalize_dims

from . import backends
from .backends import _ops


def _device_of(params):
    return params[0].device if params else "cpu"


def _is_dtensor(x) -> bool:
    return type(x).__name__ == "DTensor" and hasattr(x, "placements")


def _local(x):
    return x.to_local() if _is_dtensor(x) else x


def _inside_shard(p, kwargs) -> bool:
    """Whether every group of DTensor ``p`` lies in this rank's shard (NOTE: [FSDP2 shards])."""
    regularizer = kwargs.get("regularizer", "none")
    if kwargs.get("view") is not None or regularizer == "nuclear":
        return False
    if any(pl.is_partial() for pl in p.placements):
        return False
    if regularizer == "none" or kwargs.get("lambda_", 0.0) == 0.0:
        return True
    if kwargs.get("solver", "exact") != "exact":
        return False
    if regularizer == "l1":
        return True
    reduced = set(normalize_dims(kwargs.get("dims"), p.dim()))
    return not any(pl.is_shard() and pl.dim % p.dim() in reduced for pl in p.placements)


def _run(name: str, backend: str, params, args, kwargs) -> List:
    """Functional ``name`` of the resolved ``backend``: its step op while a
    capturable call is being compiled, else its registered functional (NOTE:
    [one op per optimizer] in ``backends/_ops.py``)."""
    if kwargs.get("capturable", False) and torch.compiler.is_compiling():
        return _ops.call(name, backend, [params, *args], kwargs)
    return _ops.kernel(name, backend)(params, *args, **kwargs)


def _call(name: str, params, args, kwargs, backend: str) -> List:
    capturable = kwargs.get("capturable", False)
    if not params or not _is_dtensor(params[0]):
        return _run(name, backends.resolve(backend, _device_of(params), capturable), params, args,
                    kwargs)
    inside = [_inside_shard(p, kwargs) for p in params]
    local = [i for i, ok in enumerate(inside) if ok]
    spanning = [i for i, ok in enumerate(inside) if not ok]
    if spanning and backend not in ("auto", "reference"):
        raise backends.BackendUnavailableError(
            f"backend {backend!r} runs FSDP2 (DTensor) parameters only where every group lies "
            f"inside a shard; {len(spanning)} of them need cross-rank group norms (groups spanning "
            f"the sharded dim, view, nuclear or the PG solver): use backend='auto' or 'reference'")
    out: List = [None] * len(params)

    def run(idx, impl: str, convert):
        sub = [convert(params[i]) for i in idx]
        sub_args = [[convert(a[i]) for i in idx] if len(a) else [] for a in args]  # [] : a list not given
        for i, r in zip(idx, _run(name, impl, sub, sub_args, kwargs)):
            out[i] = r

    if local:
        dev = params[local[0]].to_local().device
        run(local, backends.resolve(backend, dev, capturable), _local)
    if spanning:
        run(spanning, backends.resolve("reference", _device_of(params), capturable), lambda x: x)
    return out


def ramda(params, *args, backend: str = "auto", **kwargs):
    return _call("ramda", params, args, kwargs, backend)


def rmda(params, *args, backend: str = "auto", **kwargs):
    return _call("rmda", params, args, kwargs, backend)


def proxadamw(params, *args, backend: str = "auto", **kwargs):
    return _call("proxadamw", params, args, kwargs, backend)


def proxsgd(params, *args, backend: str = "auto", **kwargs):
    return _call("proxsgd", params, args, kwargs, backend)


__all__ = ["ramda", "rmda", "proxadamw", "proxsgd"]
