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
sharded, under a ``view`` only where every rank's chunk is whole groups: NOTE:
[local groups] in ``distributed.py``) needs nothing from other ranks: its
local shards go to the fast backend like any tensor, seen through the local
view. `distributed.fsdp_shard_placement` shards every grouped tensor that
way. The rest run on the reference with the DTensors themselves, whose
reductions combine a group's norm across ranks: groups that span shards,
nuclear norm, and the PG solver (its stopping tolerance scales with the whole
tensor's size, and l1-PG treats the whole tensor as one group).
``DTENSOR_FALLBACKS`` counts the tensors sent that way, by optimizer.
"""

from __future__ import annotations

from collections import Counter
from typing import List

import torch

from ramda_ref.definitions import DEFINITIONS

from . import backends
from .backends import _ops
from .distributed import is_dtensor as _is_dtensor
from .distributed import local_view

#: Tensors stepped on the reference with DTensor reductions (NOTE: [FSDP2
#: shards]), by optimizer name, since import: a cheap check that a placement
#: keeps every group local.
DTENSOR_FALLBACKS: Counter = Counter()


def _device_of(params):
    return params[0].device if params else "cpu"


def _local(x):
    return x.to_local() if _is_dtensor(x) else x


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
    split = [local_view(p, kwargs) for p in params]
    spanning = [i for i, (ok, _) in enumerate(split) if not ok]
    if spanning and backend not in ("auto", "reference"):
        raise backends.BackendUnavailableError(
            f"backend {backend!r} runs FSDP2 (DTensor) parameters only where every group lies "
            f"inside a shard; {len(spanning)} of them need cross-rank group norms (groups spanning "
            f"the sharded dim, nuclear or the PG solver): use backend='auto' or 'reference'")
    out: List = [None] * len(params)
    # the warm-start sigmas' local parts, flat (NOTE: [sharded sigma] in distributed.py)
    state = DEFINITIONS[name].state
    flat = 1 + state.index("sigma") if "sigma" in state else -1

    def run(idx, impl: str, convert, kw):
        sub = [convert(params[i]) for i in idx]
        sub_args = [[convert(a[i]) for i in idx] if len(a) else [] for a in args]  # [] : a list not given
        if convert is _local and 0 <= flat < len(sub_args):
            sub_args[flat] = [s.view(-1) for s in sub_args[flat]]
        for i, r in zip(idx, _run(name, impl, sub, sub_args, kw)):
            out[i] = r

    by_view = {}  # one call per local view (uneven last shards see another)
    for i, (ok, view) in enumerate(split):
        if ok:
            by_view.setdefault(view, []).append(i)
    for view, idx in by_view.items():
        dev = params[idx[0]].to_local().device
        kw = dict(kwargs, view=view) if "view" in kwargs else kwargs
        run(idx, backends.resolve(backend, dev, capturable), _local, kw)
    if spanning:
        DTENSOR_FALLBACKS[name] += len(spanning)
        run(spanning, backends.resolve("reference", _device_of(params), capturable), lambda x: x,
            kwargs)
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
