"""The optimizers users import: the reference classes plus a ``backend`` choice.

Validation, state and bookkeeping are the reference's (``ramda_ref.optim``);
only the function that runs the math changes. ``backend`` is an attribute of
the optimizer, not a param-group key, so a state dict saved with one backend
loads into an optimizer using another.
"""

from __future__ import annotations

import functools
import inspect
import math

import ramda_ref

from . import backends, distributed, functional
from .backends import _ext, _ops


class _BackendChoice:
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # the reference class's signature (ramda_ref.definitions) plus ``backend``
        sig = cls._init_signature
        params = list(sig.parameters.values())
        backend = inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="auto")
        cls.__signature__ = sig.replace(parameters=params[:-1] + [backend, params[-1]])

    def __init__(self, *args, backend: str = "auto", **kwargs):
        backends.check_name(backend)
        self.backend = backend
        super().__init__(*args, **kwargs)
        if backend != "auto":
            devices = {p.device for g in self.param_groups for p in g["params"]}
            for device in devices:  # capturable: every group agrees (ramda_ref.optim)
                backends.resolve(backend, device, self._capturable())

    def _functional(self, name):
        return functools.partial(getattr(functional, name), backend=self.backend)

    # -- warm-start sigma of FSDP2 (DTensor) parameters (docs/math.md section 4,
    # warm-start item): a 1-D DTensor of the local groups where they are local

    def _keeps_sigma(self, p, group) -> bool:
        return not distributed.is_dtensor(p) or distributed.sigma_layout(p, group) is not None

    def _group_count(self, p, group) -> int:
        if distributed.is_dtensor(p):
            return math.prod(distributed.sigma_layout(p, group)[1])
        return super()._group_count(p, group)

    def _new_sigma(self, p, group):
        if distributed.is_dtensor(p):
            return distributed.new_sigma(p, group, ramda_ref.functional.state_dtype(p))
        return super()._new_sigma(p, group)

    def _ensure_sigma(self, group, params) -> None:
        super()._ensure_sigma(group, [p for p in params if not distributed.is_dtensor(p)])
        for p in params:  # a sigma of another layout (unsharded, other groups) restarts
            if not distributed.is_dtensor(p):
                continue
            layout = distributed.sigma_layout(p, group)
            if layout is None:
                continue
            sig = self.state[p].get("sigma")
            if not (distributed.is_dtensor(sig) and tuple(sig.shape) == layout[1]
                    and tuple(sig.to_local().shape) == layout[0]):
                self.state[p]["sigma"] = self._new_sigma(p, group)

    def _step_bucket(self, group, params, t, alpha, **capture):
        """As the reference's, but a bucket mixing DTensors that keep a sigma
        with ones that do not steps as two calls, so that the first warm-start."""
        if capture or "sigma" not in self._state_keys(group) or not any(
                distributed.is_dtensor(p) for p in params):
            return super()._step_bucket(group, params, t, alpha, **capture)
        self._ensure_sigma(group, params)
        warm = [p for p in params if "sigma" in self.state[p]]
        if not warm or len(warm) == len(params):
            return super()._step_bucket(group, params, t, alpha)
        cold = [p for p in params if "sigma" not in self.state[p]]
        iters = {}
        for part in (warm, cold):
            iters.update(zip(map(id, part), super()._step_bucket(group, part, t, alpha)))
        return [iters[id(p)] for p in params]

    def _unit_step(self, params):
        # param groups with ``units``: the backend's fused unit step where it has
        # one; for FSDP2's DTensors the same step on the local shards of the units
        # each rank holds whole, the rest gathered and stepped whole on every rank
        # (NOTE: [local units] in distributed.py), so a sharded run equals the
        # unsharded one
        step = _ops.unit_kernel(backends.resolve(self.backend, params[0].device))
        if not any(distributed.is_dtensor(p) for p in params):
            return step

        def sharded(definition, group, params, states, grads, t, alpha, hp):
            def gathered(n):
                functional.DTENSOR_FALLBACKS[f"{definition.name} units"] += n
            return distributed.sharded_unit_step(step, definition, group, params, states, grads,
                                                 t, alpha, hp, gathered)
        return sharded

    #: The NaN/Inf gradient screen: the C++ extension's one pass on CPU
    #: gradients, the reference's otherwise (ramda_kernels.backends._ext), on
    #: the local shards of DTensor gradients with one all-reduce of the flags.
    _finite_flags = staticmethod(functools.partial(distributed.finite_flags, screen=_ext.finite_flags))


class RAMDA(_BackendChoice, ramda_ref.RAMDA):
    __doc__ = ramda_ref.RAMDA.__doc__


class RMDA(_BackendChoice, ramda_ref.RMDA):
    __doc__ = ramda_ref.RMDA.__doc__


class ProxAdamW(_BackendChoice, ramda_ref.ProxAdamW):
    __doc__ = ramda_ref.ProxAdamW.__doc__


class ProxSGD(_BackendChoice, ramda_ref.ProxSGD):
    __doc__ = ramda_ref.ProxSGD.__doc__


__all__ = ["RAMDA", "RMDA", "ProxAdamW", "ProxSGD"]
