"""Backend registry: which implementation runs the math, and why one cannot.

Every backend module exposes ``ramda``, ``rmda``, ``proxadamw`` and
``proxsgd`` with exactly the signatures of ``ramda_ref.functional`` and a
``why_unavailable(device) -> Optional[str]`` that says why it cannot run on
that device here (``None`` when it can), and registers the four with
``_ops.register`` when it is imported. Importing this package never fails
for lack of a compiled extension or of triton: a backend module that cannot
import is recorded with its error and raised only when asked for by name.

``auto`` picks, per call, the first available backend of
``AUTO_ORDER[device.type]``. On CUDA that is Triton, then the CUDA extension,
because the figures do not favour the extension: counted on CPU threads
(bench/cuda_traffic.py against bench/traffic.py, bench/RESULTS.md, RAMDA
group lasso exact fp32 at the 301st step, where sigma moves 0.2% per step)
it issues 36.9 B per element at 84% sector efficiency on LLaMA-7B-layer
input-wise (43.9 B of sectors), as Triton does since it skips zero groups'
reads too (d5518eb: 36.9 B at 84%), and 37.3-37.6 B at 88-89% on ResNet-50
and GPT-2-medium input-wise (42.2-42.4 B of sectors, against Triton's 38.5
and 38.1 B: 35.8 and 35.4 B at 93%); its RMDA/ProxSGD group
shrink and its group-lasso PG run on column tiles on column layouts (and
the shrink on NCHW run tiles: NOTE: [CUDA tiling]; issue 13 in
bench/RESULTS.md: the shrink 100% sector efficiency at the same bytes, PG
36-42% fewer bytes at 72-84%), PG on NCHW channel-wise Conv still one block
per group; no GPU has timed either; and only Triton captures
(CAPTURABLE_BACKENDS).

Capturable steps (``capturable=True``, NOTE: [capturable optimizer] in
``ramda_ref.optim``) run on ``CAPTURABLE_BACKENDS`` only: ``auto`` then picks
from ``AUTO_ORDER`` restricted to them (triton on CUDA, cpu on CPU), and the
cuda backend asked for by name refuses. The cpu backend reads the counters on
the host, which on the CPU waits for nothing (``_ext._capturable_on_host``).

Which functional a backend runs is the table of ``_ops`` (each backend module
registers its four when imported); ``ramda_kernels.functional`` calls it, or
the step op while a capturable step is being compiled (NOTE: [one op per
optimizer] in ``_ops.py``).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, Optional, Tuple

import torch

BACKENDS: Tuple[str, ...] = ("reference", "triton", "cpu", "cuda")
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}
#: Backends whose functionals take capturable=True (device step counters, found_inf).
CAPTURABLE_BACKENDS: Tuple[str, ...] = ("reference", "triton", "cpu")
_MODULES = {
    "reference": "ramda_kernels.backends.reference",
    "triton": "ramda_kernels.backends.triton_backend",
    "cpu": "ramda_kernels.backends.cpu",
    "cuda": "ramda_kernels.backends.cuda",
}
_loaded: Dict[str, ModuleType] = {}
_import_errors: Dict[str, BaseException] = {}


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here; the message says why."""


def check_name(name: str) -> None:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"Invalid backend: {name!r} (expected 'auto' or one of {BACKENDS})")


def _module(name: str) -> Optional[ModuleType]:
    if name in _loaded:
        return _loaded[name]
    if name in _import_errors:
        return None
    try:
        mod = importlib.import_module(_MODULES[name])
    except Exception as e:  # ImportError, or a compiled module failing to load
        _import_errors[name] = e
        return None
    _loaded[name] = mod
    return mod


def why_unavailable(name: str, device: torch.device | str) -> Optional[str]:
    """``None`` if backend ``name`` can run on ``device`` here, else the reason."""
    check_name(name)
    device = torch.device(device)
    mod = _module(name)
    if mod is None:
        err = _import_errors[name]
        return f"failed to import: {type(err).__name__}: {err}"
    return mod.why_unavailable(device)


def resolve(name: str, device: torch.device | str, capturable: bool = False) -> str:
    """The concrete backend that ``name`` means for tensors on ``device``.

    Raises `BackendUnavailableError` (with the saved import or build error)
    when a backend asked for by name cannot run there, or cannot run a
    ``capturable`` step.
    """
    check_name(name)
    device = torch.device(device)
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("reference",)):
            if capturable and candidate not in CAPTURABLE_BACKENDS:
                continue
            if why_unavailable(candidate, device) is None:
                return candidate
        return "reference"
    if capturable and name not in CAPTURABLE_BACKENDS:
        raise BackendUnavailableError(
            f"backend {name!r} does not support capturable=True (no device-side step counters "
            f"or found_inf yet); capturable steps run on {', '.join(map(repr, CAPTURABLE_BACKENDS))}: "
            f"pass backend='auto' (triton on CUDA, cpu on CPU) or one of those")
    reason = why_unavailable(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run on {device}: {reason}")
    return name


def get(name: str, device: torch.device | str, capturable: bool = False) -> ModuleType:
    """The module implementing backend ``name`` (after `resolve`) for ``device``."""
    return _module(resolve(name, device, capturable))


def info() -> Dict[str, Dict[str, Optional[str]]]:
    """For every backend and device type: ``None`` if it runs, else why not."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    table = {}
    for name in BACKENDS:
        table[name] = {dev: why_unavailable(name, dev) for dev in devices}
        if "cuda" not in devices:
            table[name]["cuda"] = "no CUDA device visible to torch"
    return table


__all__ = ["BACKENDS", "AUTO_ORDER", "CAPTURABLE_BACKENDS", "BackendUnavailableError", "check_name", "why_unavailable",
           "resolve", "get", "info"]
