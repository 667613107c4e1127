#!/usr/bin/env python
"""Memory traffic of the CUDA step, counted in the CUDA-on-CPU run (no GPU).

    python bench/cuda_traffic.py                                  # every set, grouping and regularizer
    python bench/cuda_traffic.py --sets resnet50 --regularizers group_lasso:exact

The unchanged kernels of csrc/cuda run on CPU threads under the stand-in for
the CUDA runtime (csrc/tests/cuda_host, driven as tests/test_cuda_on_cpu.py
drives it), whose meter counts every global load and store per warp-level
instruction (NOTE: [Counted global memory] in cuda_runtime.h). Reported per
configuration, in bench/traffic.py's terms:

* bytes issued per element (loads + stores of the active lanes);
* sector efficiency: those bytes over 32 x the distinct 32-byte sectors of
  each instruction;
* passes over each tensor kind (read / write), the scratch's per element of
  the grouped tensors;
* state re-reads (exact group lasso): reads of W0 beyond pass 1 per grouped
  element: 0 for rows held in registers (NOTE: [Register rows] in
  csrc/cuda/kernels.cuh), 1 + k for k Newton passes of the two-pass plan
  (NOTE: [two-pass plan]; a zero group skips the last pass's read).

The launch table (TensorArgs, BlockItems) is not counted: per-block scalars,
cached on a device.

What is scaled down: one OS thread per CUDA thread makes the full models far
too slow, so the shapes are bench/traffic.py's slices (``Model``: each
distinct shape once, weighted by its count, its largest kept dimension cut to
about ``--elements`` elements, same layout and group size; flat tensors 8192
elements), and the per-element figures of the slices are weighted by the
real element counts. The CUDA tiling does not depend on the number of groups
(one block per group, or a chunk of 4096 elements), so a slice runs the same
blocks as the full tensor. Steady state: ``--warmup`` - 1 reference steps, one
CUDA step that leaves the warm-start sigma (docs/math.md section 4), then the
measured step, with fresh gradient noise each step.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import param_sets as ps  # noqa: E402
import traffic  # noqa: E402  (its shrunk models and report format)
import test_cuda_on_cpu as drv  # noqa: E402  (the ctypes driver of the stand-in)

SETS = traffic.SETS
REGS = ("none", "l1", "group_lasso:exact")
SECTOR = 32


def _sigmas(group) -> List[torch.Tensor]:
    return drv.sigma_like(group["params"], group["dims"], group.get("view"))


def cuda_step(lib, opt, sigmas: Dict[int, torch.Tensor], counts=None) -> None:
    """One RAMDA step of every param group of `opt` (a reference RAMDA whose
    state it reads and advances) through the CUDA kernels on CPU threads;
    `counts` (role -> [read, written, sectors r, sectors w, size]) collects
    the meter's figures, keyed "role:data_ptr"."""
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        reg = group["regularizer"]
        solver = group.get("solver", "exact")
        st0 = opt.state[params[0]]
        t = float(st0["step"]) + 1
        alpha = float(st0["alpha"]) + group["lr"] * math.sqrt(t)
        hp = dict(lr=group["lr"], momentum=group["momentum"], epsilon=group["epsilon"], alpha=alpha)
        fields = drv.step_fields("ramda", reg, solver, t, group.get("lambda_", 0.0), hp,
                                 max_iters=group.get("max_iters", 100), pg_eps=group.get("pg_eps", 1e-3))
        tensors, roles = [], []
        for p in params:
            st = opt.state[p]
            states = [st["initial_point"], st["grad_sum"], st["grad_sum_sq"]]
            sg = sigmas.get(p.data_ptr())
            desc, w = drv.tensor_fields(p.data, p.grad, states, "ramda", reg, solver, fields[19],
                                        group.get("dims"), group.get("view"),
                                        reweight=group.get("reweight", True), sigma=sg)
            tensors.append((p.data, p.grad, states, desc, w))
            key = p.data_ptr()
            roles += [(f"param:{key}", p.data), (f"grad:{key}", p.grad)]
            roles += [(f"{n}:{key}", x) for n, x in zip(("initial_point", "grad_sum", "grad_sum_sq"), states)]
            if sg is not None:
                roles.append((f"sigma:{key}", sg))
        if counts is None:
            drv.host_step(lib, fields, tensors)
        else:
            for name, c in drv.metered(lib, roles, lambda: drv.host_step(lib, fields, tensors)).items():
                acc = counts.setdefault(name, [0, 0, 0, 0, 0])
                for k in range(5):
                    acc[k] += c[k]
        for p in params:
            opt.state[p]["step"] += 1
            opt.state[p]["alpha"] = torch.as_tensor(alpha, dtype=torch.float64)


def measure(lib, set_name: str, regularizer: str, solver: str, grouping, warmup: int,
            target: int) -> Dict[str, Any]:
    import ramda_kernels

    model = traffic.Model(set_name, "ramda", regularizer, solver, grouping, torch.float32, target)
    opt = ramda_kernels.RAMDA(model.groups, backend="reference")
    for _ in range(max(0, warmup - 1)):
        model.new_grads()
        opt.step()
    sigmas = {}
    if regularizer == "group_lasso" and solver == "exact":
        for group in opt.param_groups:
            if group["regularizer"] == "group_lasso":
                sigmas.update({p.data_ptr(): s for p, s in zip(group["params"], _sigmas(group))})
    if warmup > 0:
        model.new_grads()
        cuda_step(lib, opt, sigmas)  # leaves the warm-start sigma
    model.new_grads()
    counts: Dict[str, List[int]] = {}
    cuda_step(lib, opt, sigmas, counts)
    return summarize(counts, model)


def summarize(counts: Dict[str, List[int]], model) -> Dict[str, Any]:
    """Figures of the slices weighted by the real element counts."""
    roles: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # read, written, size
    issued = sectors = 0.0
    grouped_slice = grouped_real = 0.0
    for name, (r, w, sr, sw, size) in counts.items():
        if ":" not in name:
            continue
        role, ptr = name.split(":")
        p = next(q for q in model.params if q.data_ptr() == int(ptr))
        scale = model.weight[p.data_ptr()] / p.numel()
        issued += (r + w) * scale
        sectors += (sr + sw) * scale
        rb = roles[role]
        rb[0] += r * scale
        rb[1] += w * scale
        rb[2] += size * scale
    grouped = {int(n.split(":")[1]) for n in counts if n.startswith("sigma:")}
    w0_passes = 0.0  # W0 reads of the grouped tensors, in passes weighted by the real elements
    for p in model.params:
        if p.data_ptr() in grouped:
            grouped_slice += p.numel()
            grouped_real += model.weight[p.data_ptr()]
            w0_passes += counts[f"initial_point:{p.data_ptr()}"][0] / (4 * p.numel()) * model.weight[p.data_ptr()]
    elements = sum(model.weight.values())
    r, w, sr, sw, _ = counts.get("scratch", [0] * 5)
    sweeps = w0_passes / grouped_real - 1 if grouped_real else None
    if r + w:
        # the scratch scales with the grouped tensors' elements
        shrink = grouped_real / grouped_slice if grouped_slice else 1.0
        issued += (r + w) * shrink
        sectors += (sr + sw) * shrink
        per = grouped_slice * 4  # bytes of one fp32 slot over the grouped slices
        roles["scratch"] = [r * shrink, w * shrink, per * shrink]
    o = counts.get("other", [0] * 5)
    if o[0] + o[1]:
        raise AssertionError(f"{o[0] + o[1]} bytes outside every registered tensor")
    passes = {k: (v[0] / v[2], v[1] / v[2]) for k, v in roles.items() if v[2]}
    return dict(elements=elements, bytes_per_elem=issued / elements,
                sector_eff=issued / (SECTOR * sectors) if sectors else float("nan"),
                passes=passes, sweeps=sweeps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--regularizers", default=",".join(REGS), help="comma list of none, l1, group_lasso:exact")
    p.add_argument("--groupings", help="comma list (default: every grouping of the set)")
    p.add_argument("--warmup", type=int, default=4, help="steps before the measured (steady-state) step")
    p.add_argument("--elements", type=int, default=4096, help="elements per grouped slice (about)")
    a = p.parse_args(argv)
    lib = drv.load_lib()
    print("CUDA kernels on CPU threads (csrc/tests/cuda_host), RAMDA fp32, steady state; bytes issued "
          "per element; passes are read/write over each tensor kind")
    print("| set | reg | grouping | dtype | phase | B/elem | sector eff | state re-reads | passes | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for set_name, _, regularizer, solver, grouping, dt, _ in traffic.configs(
            a.sets.split(","), a.regularizers.split(","), ["fp32"], ["ramda"], ["steady"],
            a.groupings.split(",") if a.groupings else None):
        t0 = time.time()
        r = measure(lib, set_name, regularizer, solver, grouping, a.warmup, a.elements)
        reg = regularizer if regularizer != "group_lasso" else f"gl-{solver}"
        sweeps = f"{r['sweeps']:.2f}" if r["sweeps"] is not None else "-"
        print(f"| {set_name} | {reg} | {grouping or '-'} | {dt} | steady | {r['bytes_per_elem']:.1f} "
              f"| {r['sector_eff']:.0%} | {sweeps} | {traffic._fmt_passes(r['passes'])} "
              f"| {time.time() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
