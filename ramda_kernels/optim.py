"""The optimizers users import: the reference classes plus a ``backend`` choice.

Validation, state and bookkeeping are the reference's (``ramda_ref.optim``);
only the function that runs the math changes. ``backend`` is an attribute of
the optimizer, not a param-group key, so a state dict saved with one backend
loads into an optimizer using another.
"""

from __future__ import annotations

import functools
import inspect

import ramda_ref

from . import backends, functional
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

    def _unit_step(self, params):
        # param groups with ``units``: the backend's fused unit step, if it has one
        return _ops.unit_kernel(backends.resolve(self.backend, params[0].device))

    #: The NaN/Inf gradient screen: the C++ extension's one pass on CPU
    #: gradients, the reference's otherwise (ramda_kernels.backends._ext).
    _finite_flags = staticmethod(_ext.finite_flags)


class RAMDA(_BackendChoice, ramda_ref.RAMDA):
    __doc__ = ramda_ref.RAMDA.__doc__


class RMDA(_BackendChoice, ramda_ref.RMDA):
    __doc__ = ramda_ref.RMDA.__doc__


class ProxAdamW(_BackendChoice, ramda_ref.ProxAdamW):
    __doc__ = ramda_ref.ProxAdamW.__doc__


class ProxSGD(_BackendChoice, ramda_ref.ProxSGD):
    __doc__ = ramda_ref.ProxSGD.__doc__


__all__ = ["RAMDA", "RMDA", "ProxAdamW", "ProxSGD"]
