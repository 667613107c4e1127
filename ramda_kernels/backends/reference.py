"""The pure-torch reference (``ramda_ref.functional``): runs anywhere torch runs."""

from __future__ import annotations

from typing import Optional

import torch

from ramda_ref.functional import proxadamw, proxsgd, ramda, rmda

from . import _ops


def why_unavailable(device: torch.device) -> Optional[str]:
    return None


_ops.register("reference", ramda=ramda, rmda=rmda, proxadamw=proxadamw, proxsgd=proxsgd)

__all__ = ["ramda", "rmda", "proxadamw", "proxsgd", "why_unavailable"]
