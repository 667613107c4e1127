"""One functional entry per optimizer, shared by every backend.

``ramda_kernels.functional.ramda(..., backend="auto")`` takes exactly the
arguments of ``ramda_ref.functional.ramda`` (see there for the math and the
conventions) plus ``backend``, and runs them on the chosen implementation.
With ``capturable=True`` only the backends of ``backends.CAPTURABLE_BACKENDS``
run it (``auto`` picks among them).
"""

from __future__ import annotations

from . import backends


def _device_of(params):
    return params[0].device if params else "cpu"


def _is_dtensor(x) -> bool:
    return type(x).__name__ == "DTensor" and hasattr(x, "placements")


def _dispatch(name: str, params, backend: str, capturable: bool = False):
    if params and _is_dtensor(params[0]):
        # FSDP2 shards: a group may span ranks, and only the reference's DTensor
        # reductions combine its norm across them (tests/test_distributed.py).
        if backend not in ("auto", "reference"):
            raise backends.BackendUnavailableError(
                f"backend {backend!r} does not take DTensor (FSDP2) parameters yet; "
                f"use backend='auto' or 'reference'")
        backend = "reference"
    return getattr(backends.get(backend, _device_of(params), capturable), name)


def ramda(params, *args, backend: str = "auto", **kwargs):
    fn = _dispatch("ramda", params, backend, kwargs.get("capturable", False))
    return fn(params, *args, **kwargs)


def rmda(params, *args, backend: str = "auto", **kwargs):
    fn = _dispatch("rmda", params, backend, kwargs.get("capturable", False))
    return fn(params, *args, **kwargs)


def proxadamw(params, *args, backend: str = "auto", **kwargs):
    fn = _dispatch("proxadamw", params, backend, kwargs.get("capturable", False))
    return fn(params, *args, **kwargs)


def proxsgd(params, *args, backend: str = "auto", **kwargs):
    fn = _dispatch("proxsgd", params, backend, kwargs.get("capturable", False))
    return fn(params, *args, **kwargs)


__all__ = ["ramda", "rmda", "proxadamw", "proxsgd"]
