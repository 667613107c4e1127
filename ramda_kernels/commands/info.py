"""``ramda-kernels info``: every backend, whether it can run here, and why not."""

from __future__ import annotations

HELP = "list the backends and whether each can run on this machine (and why not)"


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    import platform

    import torch

    from ramda_kernels import __version__, backends

    print(f"ramda_kernels {__version__}  torch {torch.__version__}  python {platform.python_version()}")
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
    print(f"CUDA device: {cuda}")
    table = backends.info()
    width = max(len(n) for n in table)
    for name, per_device in table.items():
        for device, reason in per_device.items():
            status = "yes" if reason is None else f"no: {reason}"
            print(f"  {name:<{width}}  {device:<4}  {status}")
    for device in ("cpu", "cuda"):
        if device == "cuda" and not torch.cuda.is_available():
            continue
        print(f"auto on {device}: {backends.resolve('auto', device)}")
    return 0
