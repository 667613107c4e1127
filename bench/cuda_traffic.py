#!/usr/bin/env python
"""Memory traffic of the CUDA step, counted in the CUDA-on-CPU run (no GPU).

    python bench/cuda_traffic.py                                  # every set, grouping and regularizer
    python bench/cuda_traffic.py --sets resnet50 --regularizers group_lasso:exact
    python bench/cuda_traffic.py --optimizers proxadamw --regularizers group_lasso:exact
    python bench/cuda_traffic.py --optimizers rmda,proxsgd --regularizers group_lasso   # the closed-form shrink
    python bench/cuda_traffic.py --optimizers ramda --regularizers group_lasso:pg

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
* state re-reads (exact group lasso): reads of W0 (RAMDA) or m (ProxAdamW)
  beyond pass 1 per grouped element: 0 for rows held in registers (NOTE:
  [Register rows] in csrc/cuda/kernels.cuh), 1 + k for k Newton passes of the
  two-pass plan (NOTE: [two-pass plan]; a zero group skips the last pass's
  read);
* how steady the measured step is: the median relative change of sigma over
  the groups nonzero in both steps (the moment model of NOTE: [Moment model]
  ends the solve in two passes when it is small), and the share of groups
  zero this step (cheaper: no state read in the last pass).

The launch table (TensorArgs, BlockItems) is not counted: per-block scalars,
cached on a device.

What is scaled down: one OS thread per CUDA thread makes the full models far
too slow, so the shapes are bench/traffic.py's slices (``Model``: each
distinct shape once, weighted by its count, its largest kept dimension cut to
about ``--elements`` elements, same layout and group size; flat tensors 8192
elements), and the per-element figures of the slices are weighted by the
real element counts. The CUDA tiling does not depend on the number of groups
(one block per group, or a chunk of 4096 elements), so a slice runs the same
blocks as the full tensor. Steady state: ``--warmup`` - 1 steps of the
reference (or, ``--warmup-backend cpu``, of the C++ CPU backend), one CUDA
step that leaves the warm-start sigma (docs/math.md section 4), then the
measured step, with fresh gradient noise each step. At the default fifth
step sigma still moves by about half per step (RAMDA's threshold grows with
alpha_t = sum lr sqrt(k)); ``--warmup 300`` measures the 301st, where it moves
by well under 1%.
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


#: Per optimizer: the state tensors the kernels take, in order; the first is
#: re-read by every pass of the exact solve (the "state re-reads" column).
STATES = {"ramda": ("initial_point", "grad_sum", "grad_sum_sq"), "proxadamw": ("exp_avg", "exp_avg_sq"),
          "rmda": ("initial_point", "grad_sum"), "proxsgd": ("momentum_buffer",)}
#: The optimizer whose shrunk model (bench/traffic.py: lr, lambda) RMDA and
#: ProxSGD borrow (RAMDA's averaging, ProxAdamW's plain step).
MODEL_OF = {"ramda": "ramda", "rmda": "ramda", "proxadamw": "proxadamw", "proxsgd": "proxadamw"}


def _hparams(name: str, group, state) -> Dict[str, float]:
    """The functional hyperparameters of one step (RAMDA: alpha advanced to it)."""
    if name in ("ramda", "rmda"):
        t = float(state["step"]) + 1
        alpha = float(state["alpha"]) + group["lr"] * math.sqrt(t)
        hp = dict(lr=group["lr"], momentum=group["momentum"], alpha=alpha)
        return dict(hp, epsilon=group["epsilon"]) if name == "ramda" else hp
    if name == "proxsgd":
        return dict(lr=group["lr"], momentum=group["momentum"])
    b1, b2 = group["betas"]
    return dict(lr=group["lr"], beta1=b1, beta2=b2, epsilon=group["epsilon"], weight_decay=group["weight_decay"])


def cuda_step(lib, opt, sigmas: Dict[int, torch.Tensor], counts=None, name: str = "ramda") -> None:
    """One step of every param group of `opt` (a reference RAMDA or ProxAdamW,
    `name`, whose state it reads and advances) through the CUDA kernels on CPU threads;
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
        hp = _hparams(name, group, st0)
        fields = drv.step_fields(name, reg, solver, t, group.get("lambda_", 0.0), hp,
                                 max_iters=group.get("max_iters", 100), pg_eps=group.get("pg_eps", 1e-3))
        tensors, roles = [], []
        for p in params:
            st = opt.state[p]
            states = [st[k] for k in STATES[name]] + [None] * (3 - len(STATES[name]))
            sg = sigmas.get(p.data_ptr())
            desc, w = drv.tensor_fields(p.data, p.grad, states, name, reg, solver, fields[19],
                                        group.get("dims"), group.get("view"),
                                        reweight=group.get("reweight", True), sigma=sg)
            tensors.append((p.data, p.grad, states, desc, w))
            key = p.data_ptr()
            roles += [(f"param:{key}", p.data), (f"grad:{key}", p.grad)]
            roles += [(f"{n}:{key}", x) for n, x in zip(STATES[name], states)]
            if sg is not None:
                roles.append((f"sigma:{key}", sg))
        if counts is None:
            drv.host_step(lib, fields, tensors)
        else:
            for role, c in drv.metered(lib, roles, lambda: drv.host_step(lib, fields, tensors)).items():
                acc = counts.setdefault(role, [0, 0, 0, 0, 0])
                for k in range(5):
                    acc[k] += c[k]
        for p in params:
            opt.state[p]["step"] += 1
            if name in ("ramda", "rmda"):
                opt.state[p]["alpha"] = torch.as_tensor(hp["alpha"], dtype=torch.float64)


def measure(lib, set_name: str, regularizer: str, solver: str, grouping, warmup: int,
            target: int, name: str = "ramda", warmup_backend: str = "reference") -> Dict[str, Any]:
    import ramda_kernels

    from ramda_ref.definitions import DEFINITIONS

    model = traffic.Model(set_name, MODEL_OF[name], regularizer, solver, grouping, torch.float32, target)
    if not DEFINITIONS[name].solves:  # RMDA, ProxSGD: the closed-form shrink, no solver keys
        for group in model.groups:
            group.pop("solver", None)
    opt = getattr(ramda_kernels, DEFINITIONS[name].title)(model.groups, backend=warmup_backend)
    for _ in range(max(0, warmup - 1)):
        model.new_grads()
        opt.step()
    sigmas = {}
    if regularizer == "group_lasso" and solver == "exact" and DEFINITIONS[name].solves:
        for group in opt.param_groups:
            if group["regularizer"] == "group_lasso":
                sigmas.update({p.data_ptr(): s for p, s in zip(group["params"], _sigmas(group))})
    if warmup > 0:
        model.new_grads()
        cuda_step(lib, opt, sigmas, name=name)  # leaves the warm-start sigma
    model.new_grads()
    counts: Dict[str, List[int]] = {}
    before = {k: s.clone() for k, s in sigmas.items()}
    cuda_step(lib, opt, sigmas, counts, name=name)
    grouped = {p.data_ptr() for g in opt.param_groups if g["regularizer"] == "group_lasso" for p in g["params"]}
    return dict(summarize(counts, model, STATES[name][0], grouped), **sigma_moves(before, sigmas))


def sigma_moves(before: Dict[int, torch.Tensor], after: Dict[int, torch.Tensor]) -> Dict[str, Any]:
    """How far from steady the measured step is: the median relative change
    of sigma over the groups nonzero in both steps, and the share of groups
    that are zero this step (a zero group keeps its sigma and skips the last
    pass's state read, so it makes a step cheaper)."""
    if not before:
        return dict(sigma_move=None, zero_groups=None)
    old = torch.cat([before[k] for k in before])
    new = torch.cat([after[k] for k in before])
    kept = new == old
    both = (old > 0) & ~kept
    move = float((new[both] / old[both] - 1).abs().median()) if bool(both.any()) else float("nan")
    return dict(sigma_move=move, zero_groups=float(kept.float().mean()))


def summarize(counts: Dict[str, List[int]], model, reread: str = "initial_point", grouped=None) -> Dict[str, Any]:
    """Figures of the slices weighted by the real element counts; `grouped`:
    the data_ptrs of the group-lasso tensors (default: those with a sigma),
    whose elements the scratch scales with."""
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
    with_sigma = {int(n.split(":")[1]) for n in counts if n.startswith("sigma:")}
    grouped = with_sigma if grouped is None else grouped
    w0_passes = 0.0  # reads of `reread` (W0, m) of the grouped tensors, in passes weighted by the real elements
    for p in model.params:
        if p.data_ptr() in grouped:
            grouped_slice += p.numel()
            grouped_real += model.weight[p.data_ptr()]
            w0_passes += counts[f"{reread}:{p.data_ptr()}"][0] / (4 * p.numel()) * model.weight[p.data_ptr()]
    elements = sum(model.weight.values())
    r, w, sr, sw, _ = counts.get("scratch", [0] * 5)
    sweeps = w0_passes / grouped_real - 1 if grouped_real and with_sigma else None
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
    p.add_argument("--regularizers", default=",".join(REGS), help="comma list of none, l1, group_lasso:exact, group_lasso:pg "
                   "(RMDA, ProxSGD: group_lasso, their closed-form shrink)")
    p.add_argument("--groupings", help="comma list (default: every grouping of the set)")
    p.add_argument("--warmup", type=int, default=4, help="steps before the measured (steady-state) step")
    p.add_argument("--elements", type=int, default=4096, help="elements per grouped slice (about)")
    p.add_argument("--optimizers", default="ramda", help="comma list of ramda, proxadamw, rmda, proxsgd")
    p.add_argument("--warmup-backend", default="reference", choices=("reference", "cpu"),
                   help="backend of the warm-up steps before the CUDA ones (cpu: the C++ extension, "
                        "~10x faster than the reference here, for --warmup in the hundreds)")
    a = p.parse_args(argv)
    lib = drv.load_lib()
    print("CUDA kernels on CPU threads (csrc/tests/cuda_host), fp32, steady state; bytes issued "
          "per element; passes are read/write over each tensor kind")
    print(f"measured step: {a.warmup + 1}; sigma move: median |sigma / sigma_prev - 1| of the nonzero groups; "
          "zero: share of groups zero this step")
    print("| set | optimizer | reg | grouping | dtype | phase | B/elem | sector eff | state re-reads | sigma move "
          "| zero | passes | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for set_name, name, regularizer, solver, grouping, dt, _ in traffic.configs(
            a.sets.split(","), a.regularizers.split(","), ["fp32"], a.optimizers.split(","), ["steady"],
            a.groupings.split(",") if a.groupings else None):
        t0 = time.time()
        r = measure(lib, set_name, regularizer, solver, grouping, a.warmup, a.elements, name, a.warmup_backend)
        from ramda_ref.definitions import DEFINITIONS

        reg = regularizer if regularizer != "group_lasso" else (
            f"gl-{solver}" if DEFINITIONS[name].solves else "gl-shrink")
        sweeps = f"{r['sweeps']:.2f}" if r["sweeps"] is not None else "-"
        move = f"{r['sigma_move']:.1%}" if r["sigma_move"] is not None else "-"
        zero = f"{r['zero_groups']:.0%}" if r["zero_groups"] is not None else "-"
        print(f"| {set_name} | {name} | {reg} | {grouping or '-'} | {dt} | steady | {r['bytes_per_elem']:.1f} "
              f"| {r['sector_eff']:.0%} | {sweeps} | {move} | {zero} | {traffic._fmt_passes(r['passes'])} "
              f"| {time.time() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
