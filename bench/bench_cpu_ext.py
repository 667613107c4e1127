"""CPU step time of the C++ extension backend on ResNet-50's parameters.

Times, in one process on the same parameters and gradients (fp32):

* ``torch.optim.AdamW(fused=True)`` (the baseline the ``cpu`` backend must
  stay within 1.5x of);
* RAMDA on the ``cpu`` backend, channel-wise group lasso (Conv2d
  ``dims=(0,2,3)``, Linear ``dims=(0,)``), ``solver="exact"`` and ``"pg"``;
* RAMDA on the ``reference`` backend with ``solver="pg"`` (and ``"exact"``).

Reports the median ms per step (``time.perf_counter`` around ``step()``,
after warm-up steps that also build the state). The fast optimizers' steps are
interleaved round by round (AdamW, RAMDA exact, RAMDA pg, AdamW, ...) so that a
shared machine's changing load hits all of them alike. Also reported: the
minimal bytes a step must move (RAMDA: read p, g, W0, V, U and write p, V, U =
32 B/element; AdamW: 28 B/element), the resulting GB/s, and the ratio to
AdamW. On a machine shared with other jobs, two OpenMP threads can be descheduled
mid-barrier and the 2-thread times swing by 10x from run to run; ``--threads
1`` gives repeatable ratios there. Usage::

    python bench/bench_cpu_ext.py [--steps 10] [--ref-steps 2] [--threads 2] [--lambda 0.4]

``--lambda`` defaults to bench_step.py's group-lasso value for RAMDA, at which
about half of the elements lie in zero groups, as in the README's table (the solver skips
zero groups; 1e-4, the old default, leaves almost every group iterating).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import param_sets  # noqa: E402

import ramda_kernels  # noqa: E402


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _time_steps(opt, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _ramda(model, backend: str, solver: str, lam: float):
    groups, _ = param_sets.param_groups(model, "group_lasso", "input", lam, solver=solver)
    return ramda_kernels.RAMDA(groups, lr=1e-2, backend=backend)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--ref-steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lambda", dest="lam", type=float, default=0.4)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--skip-pg", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    device = torch.device("cpu")
    model = param_sets.build("resnet50", device, torch.float32)
    param_sets.fill_grads(model)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    snapshot = [p.detach().clone() for p in params]

    def restore():
        with torch.no_grad():
            for p, s in zip(params, snapshot):
                p.copy_(s)

    rows = []

    def row(name, ms, bytes_per_elem, base=None):
        gbs = n * bytes_per_elem / (ms * 1e-3) / 1e9
        rows.append((name, ms, gbs, (ms / base) if base else None))

    # Each optimizer steps its own copy of the parameters (same values, same grads).
    def copy_params():
        out = []
        for p in params:
            q = torch.nn.Parameter(p.detach().clone())
            q.grad = p.grad.clone()
            out.append(q)
        return out

    adamw_params = copy_params()
    fast = {
        "torch.optim.AdamW(fused=True)": (torch.optim.AdamW(adamw_params, lr=1e-3, fused=True), 28),
        "RAMDA cpu exact": (_ramda(model, "cpu", "exact", args.lam), 32),
    }
    if not args.skip_pg:
        model_pg = param_sets.build("resnet50", device, torch.float32)
        param_sets.fill_grads(model_pg)
        fast["RAMDA cpu pg"] = (_ramda(model_pg, "cpu", "pg", args.lam), 32)
    times = {name: [] for name in fast}
    for opt, _ in fast.values():
        for _ in range(2):
            opt.step()
    for _ in range(args.steps):
        for name, (opt, _) in fast.items():
            t0 = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["torch.optim.AdamW(fused=True)"]) * 1e3
    for name, (_, bpe) in fast.items():
        ms = statistics.median(times[name]) * 1e3
        row(name, ms, bpe, None if name.startswith("torch") else base)
    cpu_exact = statistics.median(times["RAMDA cpu exact"]) * 1e3
    del fast
    ref_pg = None
    if not args.skip_reference:
        restore()
        ref_pg = _time_steps(_ramda(model, "reference", "pg", args.lam), args.ref_steps, 1)
        row("RAMDA reference pg", ref_pg, 32, base)
        restore()
        ref_exact = _time_steps(_ramda(model, "reference", "exact", args.lam), args.ref_steps, 1)
        row("RAMDA reference exact", ref_exact, 32, base)

    print(f"# ResNet-50 ({n:,} fp32 params, {len(params)} tensors), {args.threads} threads, "
          f"{platform.machine()} ({ramda_kernels.backends._ext.EXT.cpu_isa()} kernels), "
          f"torch {torch.__version__}, "
          f"commit {_commit()}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print("| step | ms | GB/s (minimal bytes) | x AdamW fused |")
    print("|---|---:|---:|---:|")
    for name, ms, gbs, ratio in rows:
        print(f"| {name} | {ms:.1f} | {gbs:.1f} | {'' if ratio is None else f'{ratio:.2f}'} |")
    if ref_pg is not None:
        print(f"\nRAMDA cpu exact vs reference pg: {ref_pg / cpu_exact:.1f}x faster")


if __name__ == "__main__":
    main()
