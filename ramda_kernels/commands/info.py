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
    print(cpu_line())
    return 0


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else platform's) and core count."""
    import os
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical cores"


def cpu_line() -> str:
    """The CPU and the instruction set its kernels use. The ISA changes results
    at the rounding level (a vector width changes the order of sums), so any
    quoted figure depends on it; RAMDA_CPU_ISA=avx2/default forces a lower one."""
    import os

    try:
        from ramda_kernels import _C

        isa = _C.cpu_isa()
    except (ImportError, AttributeError) as e:
        isa = f"unknown (C++ extension not loaded: {type(e).__name__})"
    forced = os.environ.get("RAMDA_CPU_ISA")
    how = f"forced by RAMDA_CPU_ISA={forced}" if forced else "best this CPU has; RAMDA_CPU_ISA=avx2|default lowers it"
    return f"CPU: {cpu_model()}; CPU kernel ISA: {isa} ({how})"
