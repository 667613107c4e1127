#!/usr/bin/env python
"""Memory traffic of the CUDA unit-group kernel against per-tensor groups of the
same tensors, counted in the CUDA-on-CPU run (no GPU).

    python bench/cuda_units_traffic.py                       # MLP 4x512, RAMDA fp32
    python bench/cuda_units_traffic.py --width 128 --layers 2

The tensors are bench/bench_step.py's unit stack (``_unit_stack("mlp")``: ``W_i
[w, w]`` and ``b_i``; the units are the neurons of every other layer: row of
``W_i``, entry of ``b_i``, column of ``W_{i+1}``), the per-tensor groupings its
output-wise and input-wise groups of the weights (the rest unregularized). The
unit groups run the unit kernel (csrc/cuda/units.cuh, tests/test_cuda_units.py's
driver), the per-tensor groups the fused step kernel (csrc/cuda/kernels.cuh,
bench/cuda_traffic.py's driver), both under the stand-in's meter (NOTE: [Counted
global memory] in csrc/tests/cuda_host/cuda_runtime.h), at steady state:
``--warmup`` steps (at least one reference step, then one on the stand-in that
leaves the warm-start sigma), then the measured step.
Reported over every element of the stack: bytes issued per element (loads +
stores of the active lanes, sigma and scratch included) and the sector
efficiency (those bytes over 32 x the distinct 32-byte sectors of each
warp-level instruction). The launch tables (TensorArgs, items, segment rows)
are not counted: per-block scalars, cached on a device.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import cuda_traffic  # noqa: E402  (the per-tensor CUDA step on the stand-in)
import test_cuda_on_cpu as drv  # noqa: E402
import test_cuda_units as tu  # noqa: E402  (the unit kernel on the stand-in)
from bench_step import _unit_stack  # noqa: E402

SECTOR = 32


def _figures(counts, elements):
    other = counts.pop("other", [0] * 5)
    if other[0] + other[1]:
        raise AssertionError(f"{other[0] + other[1]} bytes outside every registered tensor")
    issued = sum(c[0] + c[1] for c in counts.values())
    sectors = sum(c[2] + c[3] for c in counts.values())
    return dict(bytes_per_elem=issued / elements, sector_eff=issued / (SECTOR * sectors))


def _grads(params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float32)


def units_run(lib, params, units, lam, warmup, seed):
    """The unit kernel: the cpu backend's unit step routed to the stand-in."""
    import ramda_kernels as rk
    from ramda_kernels.backends import _ext, _ops, _units
    import ramda_kernels.backends.cpu  # noqa: F401  (registers its unit step first)

    op = tu.StandIn(lib)
    saved = _ops.UNIT_KERNELS.get("cpu")
    _ops.UNIT_KERNELS["cpu"] = _units.fused_step(op, _ext.CAPABILITIES)
    try:
        opt = rk.RAMDA([{"params": params, "units": units, "lambda_": lam}], backend="cpu")
        gen = torch.Generator().manual_seed(seed)
        for _ in range(warmup):
            _grads(params, gen)
            opt.step()
        op.counts = {}
        _grads(params, gen)
        opt.step()
        assert op.calls == warmup + 1
        return op.counts
    finally:
        _ops.UNIT_KERNELS["cpu"] = saved


def per_tensor_run(lib, params, groups, lam, warmup, seed):
    """The fused step kernel on the same tensors (a reference RAMDA whose state
    cuda_traffic.cuda_step reads and advances)."""
    import ramda_ref

    for g in groups:
        g.setdefault("lambda_", lam)
    opt = ramda_ref.RAMDA(groups)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(max(1, warmup - 1)):  # at least one: cuda_step reads the state it made
        _grads(params, gen)
        opt.step()
    sigmas = {}
    for group in opt.param_groups:
        if group["lambda_"] != 0:
            sigmas.update({p.data_ptr(): s for p, s in zip(group["params"], drv.sigma_like(
                group["params"], group["dims"], group.get("view")))})
    if warmup > 0:
        _grads(params, gen)
        cuda_traffic.cuda_step(lib, opt, sigmas)
    _grads(params, gen)
    counts = {}
    cuda_traffic.cuda_step(lib, opt, sigmas, counts)
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lambda", dest="lam", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    lib = tu.load_units_lib()
    gen = torch.Generator().manual_seed(args.seed)
    params, units, per_tensor = _unit_stack("mlp", args.width, args.layers, torch.device("cpu"), gen)
    elements = sum(p.numel() for p in params)
    rows = []
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    rows.append(_row("units", _figures(units_run(lib, fresh, units, args.lam, args.warmup, args.seed), elements)))
    for name, groups in per_tensor.items():
        fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
        index = {id(p): i for i, p in enumerate(params)}
        mine = [dict({k: v for k, v in g.items() if k != "params"}, params=[fresh[index[id(p)]] for p in g["params"]])
                for g in copy.copy(groups)]
        rows.append(_row(name, _figures(per_tensor_run(lib, fresh, mine, args.lam, args.warmup, args.seed),
                                        elements)))
    print(f"MLP {args.layers}x{args.width}, RAMDA fp32 group lasso exact, {elements} elements, "
          f"{len(units)} units of {2 * args.width + 1} elements")
    print(f"{'grouping':<12} {'B/elem':>8} {'sector eff':>10}")
    for name, f in rows:
        print(f"{name:<12} {f['bytes_per_elem']:8.2f} {f['sector_eff']:10.3f}")
    return 0


def _row(name, f):
    print(f"{name}: {f['bytes_per_elem']:.2f} B/elem, sector efficiency {f['sector_eff']:.3f}", file=sys.stderr,
          flush=True)
    return name, f


if __name__ == "__main__":
    sys.exit(main())
