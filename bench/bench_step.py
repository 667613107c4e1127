#!/usr/bin/env python
"""Optimizer step time per backend, with the hardware bound and same-process baselines.

    python bench/bench_step.py --device cpu --quick          # < 2 min on 2 cores
    python bench/bench_step.py --device cuda                 # the full matrix
    python bench/bench_step.py --preset gpu-check            # what bench/gpu_check.sh runs

Sections (``--sections``; all by default):

``step``     backend x optimizer (RAMDA, RMDA, ProxAdamW, ProxSGD) x regularizer
             (none, l1, group lasso per grouping kind, nuclear) x solver (exact,
             pg) x parameter dtype (fp32, bf16, fp16) on named parameter sets
             (bench/param_sets.py). Same tensors, same process:
             ``torch.optim.AdamW(fused=True)`` and ``(foreach=True)``, and the
             reference backend with ``solver="pg"`` (the authors' algorithm).
``solver``   Newton vs proximal-gradient iterations per group to a fixed KKT
             tolerance as the spread of the preconditioner grows, fp32 and fp64,
             on ``ramda_ref.prox`` directly.
``scaling``  step time against the number of tensors at a fixed total size, and
             against the total size.
``units``    (not in the default) RAMDA and ProxAdamW with unit groups (neurons of
             an MLP stack: row of W_i, entry of b_i, column of W_{i+1}; channels of
             a conv + BatchNorm stack: filter, BN entries, next conv's input
             channel) against per-tensor groups of the same tensors (output-wise
             and input-wise), interleaved repeats, with the load average.
``traffic``  (not in the default) bench/traffic.py's memory-traffic table of the
             Triton step (bytes and 32-byte sectors per element, passes over each
             tensor, predicted H100 time vs fused AdamW), counted under the
             Triton interpreter; printed, not written to RESULTS.md.

Bytes: the least a step must move, each input read once and each output
written once. With ``P`` bytes per parameter element (4 fp32, 2 bf16/fp16;
gradients have the parameter's dtype) and fp32 state (docs/math.md section 1, 4 B):

=========  ==========================================  ===============  ======
optimizer  read                     write              bytes / element  fp32
=========  ==========================================  ===============  ======
RAMDA      g, p, W0, V, U           p, V, U            3P + 5*4         32
RMDA       g, p, W0, V              p, V               3P + 3*4         24
ProxAdamW  g, p, m, v               p, m, v            3P + 4*4         28
ProxSGD    g, p, buf                p, buf             3P + 2*4         20
AdamW      g, p, m, v (param dtype) p, m, v            7P               28
=========  ==========================================  ===============  ======

The floor is the same for every regularizer (a group's norm can be reduced
on chip); nuclear norm steps are SVD-bound, so their GB/s only says how far
from memory-bound they are.

Timing: every optimizer takes warm-up steps first (1 on a CPU and for the
reference, 3 on a GPU; state, metadata and compiled kernels are built then;
the last one is timed to size the run); the median of many steps follows,
timed with CUDA events on a GPU and ``time.perf_counter_ns`` on a CPU. The
number of steps adapts to ``--budget`` seconds per measurement;
reference-PG is capped at ``--ref-pg-reps``. Steps change the parameters
(the same gradients are fed every step), which is how training uses them;
each configuration starts from the same initial parameters. On a GPU a set
smaller than L2 (convnet) is timed from cache: its ``%copy`` can pass 100%.
Peak extra memory is measured on CUDA only (``max_memory_allocated`` over
one more step); torch's CPU allocator keeps no peak counter. Benchmarks
measure, they never assert: a configuration that raises is reported with its
error.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import param_sets as ps  # noqa: E402
import report  # noqa: E402

import ramda_kernels  # noqa: E402
from ramda_kernels import backends  # noqa: E402
from ramda_ref import prox as rprox  # noqa: E402
from ramda_ref.groups import group_max, group_norm, grouped_view, normalize_dims  # noqa: E402

OPTIMIZERS = ("ramda", "rmda", "proxadamw", "proxsgd")
CLASSES = {"ramda": "RAMDA", "rmda": "RMDA", "proxadamw": "ProxAdamW", "proxsgd": "ProxSGD"}
REGULARIZERS = ("none", "l1", "group_lasso", "nuclear")
SOLVERS = ("exact", "pg")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HAS_SOLVER = ("ramda", "proxadamw")
BASELINES = ("adamw-fused", "adamw-foreach")

#: state tensors read and written per element (docs/math.md section 1), fp32.
STATE_RW = {"ramda": (3, 2), "rmda": (2, 1), "proxadamw": (2, 2), "proxsgd": (1, 1)}
STATE_BYTES = 4
#: the optimizers' own default learning rates; lambda_ per regularizer picked so
#: that with the unit-scale gradients of param_sets.fill_grads part (not all)
#: of the groups become zero.
HPARAMS = {"ramda": dict(lr=1e-2), "rmda": dict(lr=0.1), "proxadamw": dict(lr=1e-3),
           "proxsgd": dict(lr=0.1)}
LAMBDAS = {
    "ramda": dict(l1=0.3, group_lasso=0.4, nuclear=0.3),
    "rmda": dict(l1=0.3, group_lasso=0.5, nuclear=0.3),
    "proxadamw": dict(l1=1.0, group_lasso=1.5, nuclear=1.0),
    "proxsgd": dict(l1=0.02, group_lasso=0.02, nuclear=0.02),
}

FIELDS = [
    "date", "commit", "device", "device_name", "torch", "triton", "python", "command",
    "section", "set", "optimizer", "backend", "regularizer", "grouping", "solver", "dtype",
    "n_params", "n_tensors", "reps", "ms", "ms_p20", "ms_p80", "bytes_per_step", "gbps",
    "copy_gbps", "frac_copy", "x_fused_adamw", "speedup_ref_pg", "extra_mib", "zero_frac",
    "spread", "groups", "group_size", "kkt_tol", "newton_med", "newton_max", "newton_kkt_max",
    "pg_med", "pg_max", "pg_cap", "pg_converged", "status", "note",
]


def min_bytes(optimizer: str, n: int, dtype: torch.dtype) -> int:
    """Least bytes one step moves over ``n`` parameter elements (see the module docstring)."""
    pb = torch.finfo(dtype).bits // 8
    if optimizer in BASELINES:
        return n * 7 * pb
    reads, writes = STATE_RW[optimizer]
    return n * (3 * pb + (reads + writes) * STATE_BYTES)


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------

class Timer:
    """Median of repeated calls: CUDA events on a GPU, perf_counter_ns on a CPU."""

    def __init__(self, device: torch.device, budget: float, reps: Optional[int], warmup: int):
        self.device, self.budget, self.fixed_reps, self.warmup = device, budget, reps, warmup
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _once(self, fn: Callable[[], Any]) -> float:
        self.sync()
        t0 = time.perf_counter_ns()
        fn()
        self.sync()
        return (time.perf_counter_ns() - t0) / 1e6

    def __call__(self, fn: Callable[[], Any], max_reps: int = 200, min_reps: int = 5,
                 warmup: Optional[int] = None) -> Dict[str, float]:
        warmup = max(1, self.warmup if warmup is None else warmup)
        for _ in range(warmup - 1):
            fn()
        probe = self._once(fn)  # the last warm-up step, timed to size the run
        if self.fixed_reps is not None:
            reps = min(self.fixed_reps, max_reps)
        else:
            fit = int(self.budget * 1e3 / max(probe, 1e-3))
            reps = max(1, min(max_reps, max(fit, min_reps if probe * min_reps <= 4e3 * self.budget else 1)))
        times: List[float] = []
        if self.cuda:
            self.sync()
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
            for start, end in ev:
                start.record()
                fn()
                end.record()
            self.sync()
            times = [s.elapsed_time(e) for s, e in ev]
        else:
            for _ in range(reps):
                t0 = time.perf_counter_ns()
                fn()
                times.append((time.perf_counter_ns() - t0) / 1e6)
        q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
        return {"ms": statistics.median(times), "ms_p20": q[0], "ms_p80": q[-1], "reps": reps}


# ---------------------------------------------------------------------------
# Context: device, versions, commit
# ---------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cpus, {torch.get_num_threads()} threads)"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=10"], cwd=HERE,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("RAMDA_BENCH_COMMIT", "unknown")


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception as e:  # triton missing or broken: say so, don't stop
        return f"none ({type(e).__name__})"


#: time.perf_counter() after which no new measurement starts (``--deadline``).
_DEADLINE = math.inf


def past_deadline() -> bool:
    return time.perf_counter() > _DEADLINE


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Copy bandwidth
# ---------------------------------------------------------------------------

def copy_bandwidth(device: torch.device, timer: Timer, numel: int) -> Dict[str, Any]:
    """GB/s of ``dst.copy_(src)`` on fp32 tensors of ``numel`` elements (bytes read + written)."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src), max_reps=50)
    nbytes = 2 * numel * 4
    del src, dst
    return dict(section="copy", n_params=numel, bytes_per_step=nbytes, gbps=nbytes / t["ms"] / 1e6,
                status="ok", **t)


# ---------------------------------------------------------------------------
# The step matrix
# ---------------------------------------------------------------------------

def solvers_for(optimizer: str, regularizer: str) -> Sequence[str]:
    if optimizer in BASELINES or regularizer == "none":
        return ("-",)
    if regularizer == "nuclear":  # RAMDA/ProxAdamW: always PG with an SVD; RMDA/ProxSGD: closed form
        return ("pg",) if optimizer in HAS_SOLVER else ("-",)
    return SOLVERS if optimizer in HAS_SOLVER else ("-",)


def ref_solver(optimizer: str, regularizer: str) -> str:
    """The solver of the reference-PG baseline row for this configuration."""
    return "pg" if "pg" in solvers_for(optimizer, regularizer) else solvers_for(optimizer, regularizer)[0]


def zero_fraction(opt: torch.optim.Optimizer) -> Optional[float]:
    """All-zero groups / groups (group lasso) or zero entries / entries (l1), over regularized tensors."""
    zero = total = 0
    for g in opt.param_groups:
        reg = g.get("regularizer", "none")
        for p in g["params"]:
            if reg == "group_lasso":
                v = grouped_view(p.detach(), g.get("view"))
                dims = normalize_dims(g.get("dims"), v.dim())
                nz = (v != 0).sum(dim=dims)
                zero += int((nz == 0).sum())
                total += nz.numel()
            elif reg == "l1":
                zero += int((p == 0).sum())
                total += p.numel()
    return zero / total if total else None


class Model:
    """One parameter set in one dtype, with its gradients, reset to the same start for every run."""

    def __init__(self, set_name: str, dtype: torch.dtype, device: torch.device, seed: int):
        self.module = ps.build(set_name, device, dtype, seed)
        self.heads = ps.SETS[set_name].heads
        ps.fill_grads(self.module, seed + 1)
        self.params = list(self.module.parameters())
        self.start = [p.detach().clone() for p in self.params]
        self.numel = sum(p.numel() for p in self.params)

    @torch.no_grad()
    def reset(self) -> None:
        for p, s in zip(self.params, self.start):
            p.copy_(s)


def make_optimizer(model: Model, optimizer: str, backend: str, regularizer: str,
                   grouping: str, solver: str, args) -> torch.optim.Optimizer:
    if optimizer in BASELINES:
        flag = "fused" if optimizer == "adamw-fused" else "foreach"
        return torch.optim.AdamW(model.params, lr=1e-3, weight_decay=1e-2, **{flag: True})
    hp = dict(HPARAMS[optimizer])
    if optimizer in HAS_SOLVER and regularizer != "none":
        hp["solver"] = "pg" if solver == "pg" else "exact"
    if regularizer == "nuclear" and optimizer in HAS_SOLVER:
        hp["max_iters"] = args.nuclear_iters
    lam = LAMBDAS[optimizer].get(regularizer, 0.0)
    groups, _ = ps.param_groups(model.module, regularizer, grouping if grouping != "-" else None,
                                lam, heads=model.heads, **hp)
    return getattr(ramda_kernels, CLASSES[optimizer])(groups, backend=backend)


def run_step(model: Model, set_name: str, dtype_name: str, optimizer: str, backend: str,
             regularizer: str, grouping: str, solver: str, timer: Timer, args) -> Dict[str, Any]:
    row: Dict[str, Any] = dict(section="step", set=set_name, optimizer=optimizer, backend=backend,
                               regularizer=regularizer, grouping=grouping, solver=solver,
                               dtype=dtype_name, n_params=model.numel, n_tensors=len(model.params))
    model.reset()
    opt = None
    try:
        opt = make_optimizer(model, optimizer, backend, regularizer, grouping, solver, args)
        is_ref_pg = backend == "reference" and solver == "pg"
        max_reps = args.ref_pg_reps if is_ref_pg else args.max_reps
        # the reference compiles nothing: one warm-up step builds its state
        row.update(timer(opt.step, max_reps=max_reps, min_reps=1 if is_ref_pg else 5,
                         warmup=1 if backend == "reference" else None))
        nbytes = min_bytes(optimizer, model.numel, DTYPES[dtype_name])
        row.update(bytes_per_step=nbytes, gbps=nbytes / row["ms"] / 1e6, status="ok")
        if timer.cuda:
            timer.sync()
            torch.cuda.reset_peak_memory_stats(timer.device)
            base = torch.cuda.memory_allocated(timer.device)
            opt.step()
            timer.sync()
            row["extra_mib"] = (torch.cuda.max_memory_allocated(timer.device) - base) / 2**20
        if optimizer not in BASELINES:
            row["zero_frac"] = zero_fraction(opt)
    except Exception as e:  # measure, never assert: report and go on
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if args.verbose:
            traceback.print_exc()
    finally:
        del opt
        if timer.cuda:
            torch.cuda.empty_cache()
    return row


def step_matrix(args, device: torch.device, timer: Timer, available: List[str]) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    configs = []
    for set_name in args.sets:
        why = ps.why_unavailable(set_name, device)
        if why is not None:
            rows.append(dict(section="step", set=set_name, status=f"skipped: {why}"))
            continue
        for dtype_name in args.dtypes:
            for b in BASELINES:
                configs.append((set_name, dtype_name, b, "torch", "none", "-", "-"))
            for opt in args.optimizers:
                for reg in args.regularizers:
                    kinds = [k for k in ps.groupings_for(set_name) if k in args.groupings] \
                        if reg == "group_lasso" else ["-"]
                    for kind in kinds:
                        for solver in solvers_for(opt, reg):
                            if solver not in args.solvers and solver != "-":
                                continue
                            for b in available:
                                if b == "reference" and solver == "pg" and args.no_ref_pg:
                                    continue
                                configs.append((set_name, dtype_name, opt, b, reg, kind, solver))
                            # the reference-PG baseline, whatever --backends/--solvers say
                            if solver == "exact" and ref_solver(opt, reg) == "pg" and not args.no_ref_pg:
                                configs.append((set_name, dtype_name, opt, "reference", reg, kind, "pg"))
    configs = list(dict.fromkeys(configs))
    current = None
    model: Optional[Model] = None
    model_error = ""
    for i, (set_name, dtype_name, opt, b, reg, kind, solver) in enumerate(configs, 1):
        label = dict(section="step", set=set_name, optimizer="adamw" if b == "torch" else opt,
                     backend=opt if b == "torch" else b, regularizer=reg, grouping=kind,
                     solver=solver, dtype=dtype_name)
        if past_deadline():
            rows.append(dict(label, status="skipped: --deadline reached"))
            continue
        if current != (set_name, dtype_name):
            model = model_error = None
            if timer.cuda:
                torch.cuda.empty_cache()
            try:
                model = Model(set_name, DTYPES[dtype_name], device, args.seed)
            except Exception as e:  # e.g. out of memory: every row of this set and dtype says so
                model_error = f"error building the set: {type(e).__name__}: {str(e)[:160]}"
            current = (set_name, dtype_name)
        if model is None:
            rows.append(dict(label, status=model_error))
            continue
        if b == "reference" and solver == "pg" and model.numel > args.ref_pg_max_params:
            rows.append(dict(label, n_params=model.numel, n_tensors=len(model.params),
                             status=f"skipped: over --ref-pg-max-params {args.ref_pg_max_params:g}"))
            continue
        if reg == "nuclear" and model.numel > args.nuclear_max_params:
            rows.append(dict(label, n_params=model.numel, n_tensors=len(model.params),
                             status=f"skipped: over --nuclear-max-params {args.nuclear_max_params:g}"))
            continue
        row = run_step(model, set_name, dtype_name, opt, b, reg, kind, solver, timer, args)
        row.update(optimizer=label["optimizer"], backend=label["backend"])
        rows.append(row)
        log(f"[{i}/{len(configs)}] {set_name} {dtype_name} {opt} {b} {reg} {kind} {solver}: "
            + (f"{row['ms']:.3f} ms ({row['reps']} reps)" if row.get("status") == "ok" else row["status"]))
    del model
    return rows


def add_ratios(rows: List[Dict[str, Any]], copy_gbps: Optional[float]) -> None:
    """Fill ``x_fused_adamw``, ``speedup_ref_pg`` and ``frac_copy`` from rows of the same run."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("section") == "step"]
    fused = {(r["set"], r["dtype"]): r["ms"] for r in ok if r["backend"] == "adamw-fused"}
    ref = {(r["set"], r["dtype"], r["optimizer"], r["regularizer"], r["grouping"]): r["ms"]
           for r in ok if r["backend"] == "reference" and r["solver"] == ref_solver(r["optimizer"], r["regularizer"])}
    for r in ok:
        if (r["set"], r["dtype"]) in fused:
            r["x_fused_adamw"] = r["ms"] / fused[(r["set"], r["dtype"])]
        key = (r["set"], r["dtype"], r["optimizer"], r["regularizer"], r["grouping"])
        if r["optimizer"] != "adamw" and key in ref:
            r["speedup_ref_pg"] = ref[key] / r["ms"]
        if copy_gbps and r.get("gbps") is not None:
            r["copy_gbps"] = copy_gbps
            r["frac_copy"] = r["gbps"] / copy_gbps


# ---------------------------------------------------------------------------
# Solver work: Newton vs PG iterations per group
# ---------------------------------------------------------------------------

def solver_study(args, device: torch.device) -> List[Dict[str, Any]]:
    """Iterations per group for Newton (``ramda_ref.prox.exact_group_lasso``, its own
    stopping rule, then checked against the KKT tolerance) and for PG
    (``Z <- group_soft_threshold(Z - theta (d Z - z))`` from ``Z = 0``,
    ``theta = 1/max(d_g)``, stopped per group at the first iteration whose KKT
    residual ``ramda_ref.prox.kkt_residual`` is under the tolerance, capped).

    Groups: ``groups`` rows of ``group_size`` elements, ``d = 10^U(0, log10 spread)``,
    ``z ~ N(0, 1)`` independent of ``d`` (so coordinates with small ``d`` carry
    much of the solution, as in RAMDA's early steps), threshold ``T = 0.5 min_g ||z_g||`` (every group nonzero).
    """
    rows = []
    G, n = args.solver_groups, 512
    dims = (1,)
    for dtype_name, dtype, tol in (("fp32", torch.float32, 1e-5), ("fp64", torch.float64, 1e-9)):
        for spread in args.spreads:
            if past_deadline():
                break
            gen = torch.Generator(device=device).manual_seed(args.seed)
            u = torch.rand((G, n), generator=gen, device=device, dtype=torch.float64)
            d = (10.0 ** (u * math.log10(spread))).to(dtype)
            z = torch.randn((G, n), generator=gen, device=device, dtype=torch.float64).to(dtype)
            T = 0.5 * float(group_norm(z, dims).min())
            t0 = time.perf_counter()
            w, newton = rprox.exact_group_lasso(z, d, T, dims)
            kkt_newton = rprox.kkt_residual(w, z, d, T, dims)
            theta = 1.0 / group_max(d, dims)
            Z = torch.zeros_like(z)
            first = torch.full((G, 1), -1, dtype=torch.int64, device=device)
            cap = args.pg_cap
            for j in range(1, cap + 1):
                Z = rprox.group_soft_threshold(Z - theta * (d * Z - z), theta * T, dims)
                hit = (rprox.kkt_residual(Z, z, d, T, dims) <= tol) & (first < 0)
                first = torch.where(hit, torch.full_like(first, j), first)
                if j % 64 == 0 and bool((first >= 0).all()):
                    break
            conv = first >= 0
            pg = torch.where(conv, first, torch.full_like(first, cap + 1)).double()
            row = dict(section="solver", dtype=dtype_name, spread=spread, groups=G, group_size=n,
                       kkt_tol=tol, newton_med=float(newton.double().median()),
                       newton_max=int(newton.max()), newton_kkt_max=float(kkt_newton.max()),
                       pg_med=float(pg.median()), pg_max=int(pg.max()), pg_cap=cap,
                       pg_converged=float(conv.double().mean()), status="ok")
            if row["newton_kkt_max"] > tol:
                row["note"] = "Newton result above the KKT tolerance"
            rows.append(row)
            log(f"solver {dtype_name} spread {spread:g}: Newton {row['newton_med']:g}/{row['newton_max']} "
                f"PG {row['pg_med']:g}/{row['pg_max']} ({time.perf_counter() - t0:.1f} s)")
    return rows


# ---------------------------------------------------------------------------
# Scaling
# ---------------------------------------------------------------------------

def scaling(args, device: torch.device, timer: Timer, available: List[str]) -> List[Dict[str, Any]]:
    """RAMDA + group lasso (input-wise, exact, fp32) and fused AdamW on ``k``
    tensors of ``[N/k/256, 256]``: vs ``k`` at fixed ``N``, and vs ``N`` at ``k=16``."""
    rows = []
    sweeps = [("tensors", args.scale_total, k) for k in args.scale_tensors]
    sweeps += [("size", N, 16) for N in args.scale_sizes]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for sweep, N, k in sweeps:
        if past_deadline():
            break
        rows_per = max(1, N // k // 256)
        params = []
        for _ in range(k):
            p = torch.nn.Parameter(torch.randn((rows_per, 256), generator=gen, device=device) / 16)
            p.grad = torch.randn((rows_per, 256), generator=gen, device=device)
            params.append(p)
        numel = sum(p.numel() for p in params)
        start = [p.detach().clone() for p in params]
        for b in ["adamw-fused"] + list(available):
            with torch.no_grad():
                for p, s in zip(params, start):
                    p.copy_(s)
            row = dict(section="scaling", set=f"{sweep}:{k}x[{rows_per},256]", optimizer="ramda",
                       backend=b, regularizer="group_lasso", grouping="input", solver="exact",
                       dtype="fp32", n_params=numel, n_tensors=k, note=sweep)
            try:
                if b == "adamw-fused":
                    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
                    row.update(optimizer="adamw", regularizer="none", grouping="-", solver="-")
                else:
                    opt = ramda_kernels.RAMDA([dict(params=params, dims=(0,), lambda_=LAMBDAS["ramda"]["group_lasso"])],
                                              backend=b)
                row.update(timer(opt.step, max_reps=args.max_reps))
                nbytes = min_bytes("adamw-fused" if b == "adamw-fused" else "ramda", numel, torch.float32)
                row.update(bytes_per_step=nbytes, gbps=nbytes / row["ms"] / 1e6, status="ok")
                del opt
            except Exception as e:
                row["status"] = f"error: {type(e).__name__}: {str(e)[:160]}"
            rows.append(row)
            log(f"scaling {row['set']} {b}: " + (f"{row['ms']:.3f} ms" if row.get("status") == "ok" else row["status"]))
        del params, start
        if timer.cuda:
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------
# Unit groups vs per-tensor groups of the same tensors
# ---------------------------------------------------------------------------

def _unit_stack(kind: str, width: int, layers: int, device, gen):
    """``(params, units, per_tensor)``: the tensors of an MLP (``W_i [w, w]``, ``b_i``)
    or conv + BatchNorm stack (``W_i [w, w, 3, 3]``, BN weight and bias), the
    units of the hidden neurons / channels of every other layer, and per-tensor
    groupings of the same tensors (weights grouped, the rest unregularized)."""
    params, units, weights = [], [], []
    for i in range(layers):
        shape = (width, width) if kind == "mlp" else (width, width, 3, 3)
        weights.append(len(params))
        params.append(torch.randn(shape, generator=gen, device=device) / math.sqrt(math.prod(shape[1:])))
        extras = [torch.zeros(width, device=device)] if kind == "mlp" else [
            torch.ones(width, device=device), torch.zeros(width, device=device)]
        params += extras
    per = 2 if kind == "mlp" else 3
    # pairs of layers, as a transformer's MLP: the first one's neurons are units
    # that take the second one's input columns, whose outputs are then not units
    for i in range(0, layers - 1, 2):
        w, nxt = per * i, per * (i + 1)
        for k in range(width):
            units.append([(w, 0, k)] + [(w + j, 0, k) for j in range(1, per)] + [(nxt, 1, k)])
    params = [torch.nn.Parameter(p) for p in params]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device)
    rest = [p for i, p in enumerate(params) if i not in weights]
    ws = [params[i] for i in weights]
    other = (1, 2, 3) if kind == "conv" else (1,)
    inner = (0, 2, 3) if kind == "conv" else (0,)
    per_tensor = {"output-wise": [dict(params=ws, dims=other), dict(params=rest, lambda_=0.0)],
                  "input-wise": [dict(params=ws, dims=inner), dict(params=rest, lambda_=0.0)]}
    return params, units, per_tensor


def _cpu_times(step: Callable[[], Any], reps: int) -> Dict[str, float]:
    """Wall and CPU (all threads of this process) ms per step: the minimum wall
    time and the median CPU time over ``reps`` steps after one warm-up. On a
    shared machine the wall time of a step includes waiting for a core; the CPU
    time counts only the work (and cache misses) of this process."""
    step()
    wall, cpu = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter_ns(), time.process_time_ns()
        step()
        wall.append((time.perf_counter_ns() - w0) / 1e6)
        cpu.append((time.process_time_ns() - c0) / 1e6)
    return dict(wall=min(wall), cpu=statistics.median(cpu))


def units_section(args, device: torch.device, timer: Timer, available: List[str]) -> List[Dict[str, Any]]:
    """Step time of unit groups against per-tensor groups of the same tensors:
    ``--unit-repeats`` interleaved repeats of each grouping; per repeat the
    least wall time and the median CPU time of ``--unit-reps`` steps (`_cpu_times`);
    reported: the medians over the repeats, and the load average."""
    rows = []
    if "cpu" not in available or device.type != "cpu":
        return [dict(section="units", status="skipped: the units section times the cpu backend")]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for kind, width, layers in args.unit_sets:
        params, units, per_tensor = _unit_stack(kind, width, layers, device, gen)
        numel = sum(p.numel() for p in params)
        start = [p.detach().clone() for p in params]
        for optimizer in ("ramda", "proxadamw"):
            cls = getattr(ramda_kernels, CLASSES[optimizer])
            lam = {"ramda": 0.05, "proxadamw": 0.5}[optimizer]
            configs = {"units": [dict(params=params, units=units)], **per_tensor}
            times: Dict[str, List[Dict[str, float]]] = {name: [] for name in configs}
            loads = []
            for _ in range(args.unit_repeats):
                for name, groups in configs.items():
                    with torch.no_grad():
                        for p, s0 in zip(params, start):
                            p.copy_(s0)
                    opt = cls([dict(g) for g in groups], lambda_=lam, **HPARAMS[optimizer], backend="cpu")
                    times[name].append(_cpu_times(opt.step, args.unit_reps))
                    del opt
                loads.append(os.getloadavg()[0])
            load = statistics.median(loads)
            med = {name: {k: statistics.median(x[k] for x in t) for k in ("wall", "cpu")}
                   for name, t in times.items()}
            for name, t in times.items():
                ratio = {k: med["units"][k] / med[name][k] for k in ("wall", "cpu")}
                rep = " ".join(f"{x['wall']:.1f}/{x['cpu']:.1f}" for x in t)
                rows.append(dict(section="units", set=f"{kind} {layers}x{width}", optimizer=optimizer,
                                 backend="cpu", regularizer="group_lasso", grouping=name, solver="exact",
                                 dtype="fp32", n_params=numel, n_tensors=len(params), ms=med[name]["wall"],
                                 cpu_ms=med[name]["cpu"], status="ok", repeats=rep, ratio=ratio,
                                 load=load, units=len(units),
                                 note=f"load {load:.1f}; units/this wall {ratio['wall']:.3f} "
                                      f"cpu {ratio['cpu']:.3f}"))
                log(f"units {kind} {layers}x{width} {optimizer} {name}: wall {med[name]['wall']:.2f} ms, "
                    f"cpu {med[name]['cpu']:.2f} ms (repeats wall/cpu {rep}; load {load:.1f})")
    return rows


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def traffic_section(args) -> None:
    """bench/traffic.py's table (bytes, sectors and passes of the Triton step,
    counted under the interpreter) for the chosen sets, regularizers and dtypes.
    A child process: the interpreter must be chosen before triton is imported."""
    import traffic  # its matrix names only; the child process runs it

    cmd = [sys.executable, str(HERE / "traffic.py")]
    sets = [s for s in (args.sets or traffic.SETS) if s in traffic.SETS]
    cmd += ["--sets", ",".join(sets)]
    if args.regularizers:
        regs = [r for r in traffic.REGS if r.split(":")[0] in args.regularizers]
        cmd += ["--regularizers", ",".join(regs)]
    if args.dtypes:
        cmd += ["--dtypes", ",".join(d for d in args.dtypes if d in traffic.DTYPES)]
    log("traffic: " + shlex.join(cmd))
    subprocess.run(cmd, env={**os.environ, "TRITON_INTERPRET": "1"}, check=False)


def _f(x, spec=".3g", empty="") -> str:
    if x is None or x == "":
        return empty
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, spec)


def render(rows: List[Dict[str, Any]], skipped: Dict[str, str], meta: Dict[str, str]) -> str:
    out = [f"## {meta['device']}: {meta['device_name']}", "",
           f"`{meta['command']}`", "",
           f"{meta['date']}, commit {meta['commit']}, torch {meta['torch']}, triton {meta['triton']}, "
           f"python {meta['python']}", ""]
    copy = [r for r in rows if r.get("section") == "copy" and r.get("status") == "ok"]
    if copy:
        c = copy[0]
        out += [f"Copy bandwidth (`copy_` of {c['n_params'] * 4 / 2**20:.0f} MiB fp32, read + write): "
                f"**{c['gbps']:.1f} GB/s**", ""]
    if skipped:
        out += ["Backends skipped on this device:", ""]
        out += [f"- `{b}`: {why}" for b, why in skipped.items()] + [""]
    step = [r for r in rows if r.get("section") == "step"]
    if step:
        out += ["### Step time", ""]
        body = []
        for r in step:
            ok = r.get("status") == "ok"
            body.append([r.get("set", ""), r.get("optimizer", ""), r.get("regularizer", ""),
                         r.get("grouping", ""), r.get("solver", ""), r.get("dtype", ""),
                         r.get("backend", ""),
                         _f(r.get("ms")), _f(r.get("x_fused_adamw"), ".3g"),
                         _f(r.get("speedup_ref_pg"), ".3g"),
                         _f(r["bytes_per_step"] / r["n_params"], ".0f") if ok else "",
                         _f(r.get("gbps"), ".1f"), _f(r.get("frac_copy"), ".0%"),
                         _f(r.get("extra_mib"), ".1f", "n/a" if ok and meta["device"] == "cpu" else ""),
                         _f(r.get("zero_frac"), ".0%"),
                         "ok" if ok else r.get("status", "")])
        out.append(report.markdown_table(
            ["set", "optimizer", "reg", "grouping", "solver", "dtype", "backend", "ms", "x AdamW",
             "ref-PG/this", "bytes/param", "GB/s", "%copy", "extra MiB", "zero", "status"], body))
        if meta["device"] == "cpu":
            out += ["", "`extra MiB` n/a on CPU: torch's CPU allocator keeps no peak counter "
                        "(tracemalloc does not see it)."]
        out.append("")
    solver = [r for r in rows if r.get("section") == "solver"]
    if solver:
        out += ["### Solver work per group (group lasso, groups of 512)", "",
                "Newton: `exact_group_lasso`'s own stop, then its largest KKT residual; "
                "PG: iterations until the KKT residual is under the tolerance "
                "(`> cap` when some group never got there).", ""]
        body = []
        for r in solver:
            pg_max = f"> {r['pg_cap']}" if r["pg_max"] > r["pg_cap"] else str(r["pg_max"])
            pg_med = f"> {r['pg_cap']}" if r["pg_med"] > r["pg_cap"] else _f(r["pg_med"], "g")
            body.append([r["dtype"], _f(r["spread"], "g"), r["groups"], _f(r["kkt_tol"], "g"),
                         _f(r["newton_med"], "g"), r["newton_max"], _f(r["newton_kkt_max"], ".1e"),
                         pg_med, pg_max, _f(r["pg_converged"], ".0%")])
        out.append(report.markdown_table(
            ["dtype", "d spread", "groups", "KKT tol", "Newton median", "Newton max", "Newton KKT max",
             "PG median", "PG max", "PG converged"], body))
        out.append("")
    scal = [r for r in rows if r.get("section") == "scaling"]
    if scal:
        out += ["### Scaling (RAMDA + group lasso input-wise, exact, fp32; AdamW fused for scale)", ""]
        body = [[r["note"], r["n_tensors"], r["n_params"], r["backend"], _f(r.get("ms")),
                 _f(r.get("gbps"), ".1f"), "ok" if r.get("status") == "ok" else r.get("status")]
                for r in scal]
        out.append(report.markdown_table(["sweep", "tensors", "params", "backend", "ms", "GB/s", "status"], body))
        out.append("")
    units = [r for r in rows if r.get("section") == "units" and r.get("status") == "ok"]
    if units:
        out += ["### Unit groups vs per-tensor groups of the same tensors (cpu backend, fp32, exact)", "",
                "Per repeat (run interleaved): the least wall time and the median CPU time "
                "(all threads) of a step; `wall`, `cpu`: the medians over the repeats; "
                "`units / this`: the units' time over this grouping's (wall, cpu).", ""]
        body = [[r["set"], r["optimizer"], r["grouping"], r["n_params"], r["units"], _f(r["ms"]),
                 _f(r["cpu_ms"]), f"{r['ratio']['wall']:.3f} / {r['ratio']['cpu']:.3f}", r["repeats"],
                 _f(r["load"], ".1f")] for r in units]
        out.append(report.markdown_table(["set", "optimizer", "grouping", "params", "units", "wall ms",
                                          "cpu ms", "units / this", "repeats (wall/cpu ms)", "load avg"],
                                         body))
        out.append("")
    return "\n".join(out)


def plot(rows: List[Dict[str, Any]], path: Path, meta: Dict[str, str]) -> Optional[str]:
    series: Dict[str, List[tuple]] = {}
    points: Dict[str, List[tuple]] = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        if r.get("section") == "scaling" and r.get("note") == "size":
            series.setdefault(r["backend"], []).append((r["n_params"], r["ms"]))
        elif (r.get("section") == "step" and r["dtype"] == "fp32"
              and ((r["optimizer"] == "ramda" and r["regularizer"] == "group_lasso"
                    and r["grouping"] == "input") or r["backend"] == "adamw-fused")):
            label = r["backend"] + ("-pg" if r["solver"] == "pg" else "")
            points.setdefault(label, []).append((r["n_params"], r["ms"], r["set"]))
    return report.plot_step_time(path, f"{meta['device_name']}", series, points)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def _csv_list(choices: Sequence[str]):
    def parse(text: str) -> List[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad} (expected a comma list of {list(choices)})")
        return items
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true",
                   help="convnet, fp32, no nuclear, small solver/scaling sweeps (< 2 min on 2 CPU cores)")
    p.add_argument("--preset", choices=("gpu-check",),
                   help="gpu-check: RAMDA + group lasso exact fp32 on resnet50 and gpt2-medium vs fused "
                        "AdamW, reference-PG on resnet50, small solver/scaling sweeps")
    p.add_argument("--backends", type=_csv_list(backends.BACKENDS), default=list(backends.BACKENDS))
    p.add_argument("--sets", type=_csv_list(tuple(ps.SETS)))
    p.add_argument("--optimizers", type=_csv_list(OPTIMIZERS))
    p.add_argument("--regularizers", type=_csv_list(REGULARIZERS))
    p.add_argument("--groupings", type=_csv_list(ps.GROUPINGS), default=list(ps.GROUPINGS))
    p.add_argument("--solvers", type=_csv_list(SOLVERS), default=list(SOLVERS))
    p.add_argument("--dtypes", type=_csv_list(tuple(DTYPES)))
    p.add_argument("--sections", type=_csv_list(("step", "solver", "scaling", "units", "traffic")),
                   default=["step", "solver", "scaling"])
    p.add_argument("--unit-repeats", type=int, default=5,
                   help="interleaved repeats of each grouping in the units section")
    p.add_argument("--unit-reps", type=int, default=10, help="timed steps per repeat in the units section")
    p.add_argument("--reps", type=int, help="fixed number of timed steps per measurement (default: adaptive)")
    p.add_argument("--warmup", type=int, help="untimed steps before timing (default 1 on CPU, 3 on CUDA)")
    p.add_argument("--budget", type=float, help="seconds of timed steps per measurement")
    p.add_argument("--max-reps", type=int, default=200)
    p.add_argument("--ref-pg-reps", type=int, help="cap on timed steps of reference-PG (default 3; quick 2)")
    p.add_argument("--ref-pg-max-params", type=float, default=60e6,
                   help="skip reference-PG on sets larger than this (default 6e7)")
    p.add_argument("--no-ref-pg", action="store_true", help="leave out the reference-PG baseline")
    p.add_argument("--nuclear-iters", type=int, default=10,
                   help="max_iters of the nuclear-norm PG solve (SVD per iteration; default 10)")
    p.add_argument("--nuclear-max-params", type=float, default=30e6,
                   help="skip the nuclear norm on sets larger than this (an SVD per tensor per PG "
                        "iteration: minutes per step on gpt2-medium; default 3e7)")
    p.add_argument("--pg-cap", type=int, help="PG iteration cap of the solver study")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: torch's; 1 with --quick or --preset on a CPU, where "
                        "a shared machine's load makes multi-threaded timings meaningless)")
    p.add_argument("--deadline", type=float,
                   help="seconds after which no new measurement starts; what is done is still "
                        "written (rows left out say so)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=HERE,
                   help="where results.csv, RESULTS.md and the PNG go (default bench/)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--merge", type=Path, metavar="DIR",
                   help="only fold DIR's results.csv, RESULTS.md sections and plots (e.g. a GPU "
                        "machine's $OUT from bench/gpu_check.sh) into --out-dir, then exit")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing configurations")
    args = p.parse_args(argv)

    cuda = args.device == "cuda"
    if args.preset == "gpu-check":
        args.sets = args.sets or ["resnet50", "gpt2-medium"]
        args.optimizers = args.optimizers or ["ramda"]
        args.regularizers = args.regularizers or ["group_lasso"]
        args.groupings = ["input"] if args.groupings == list(ps.GROUPINGS) else args.groupings
        args.solvers = ["exact"] if args.solvers == list(SOLVERS) else args.solvers
        args.dtypes = args.dtypes or ["fp32"]
        args.ref_pg_max_params = min(args.ref_pg_max_params, 30e6)
    quick = args.quick or args.preset == "gpu-check"
    args.sets = args.sets or (["convnet"] if args.quick else ["convnet", "resnet50", "gpt2-medium"])
    args.optimizers = args.optimizers or list(OPTIMIZERS)
    args.regularizers = args.regularizers or (["none", "l1", "group_lasso"] if args.quick
                                              else list(REGULARIZERS))
    args.dtypes = args.dtypes or (["fp32"] if args.quick else list(DTYPES))
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.budget = args.budget if args.budget is not None else (0.15 if quick else 0.5)
    args.ref_pg_reps = args.ref_pg_reps or (1 if quick else 3)
    if args.threads is None and quick and not cuda:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    args.pg_cap = args.pg_cap or (2000 if quick else 20000)
    args.solver_groups = 32 if (quick and not cuda) else 256
    args.spreads = [1.0, 1e2, 1e4, 1e6] if quick else [1.0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6]
    if cuda:
        args.copy_numel = 2**28
        args.scale_total = 2**24
        args.scale_tensors = [1, 16, 256, 4096] if quick else [1, 4, 16, 64, 256, 1024, 4096]
        args.scale_sizes = [2**16, 2**20, 2**24, 2**27] if quick else [2**k for k in range(16, 29, 2)]
    else:
        args.copy_numel = 2**24
        args.scale_total = 2**18 if quick else 2**22
        args.scale_tensors = [1, 16, 256] if quick else [1, 4, 16, 64, 256, 1024]
        args.scale_sizes = [2**14, 2**17, 2**20] if quick else [2**k for k in range(14, 25, 2)]
    # (kind, width, layers) of the units section
    args.unit_sets = ([("mlp", 512, 4), ("conv", 64, 4)] if quick else
                      [("mlp", 512, 4), ("mlp", 1024, 4), ("conv", 64, 4), ("conv", 128, 4)])
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge is not None:
        for line in report.merge(args.merge, args.out_dir):
            print(line)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible to torch", file=sys.stderr)
        return 2
    command = "python bench/bench_step.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                commit=git_commit(), device=device.type, device_name=device_name(device),
                torch=torch.__version__, triton=triton_version(), python=platform.python_version(),
                command=command)
    timer = Timer(device, args.budget, args.reps, args.warmup)
    if args.deadline is not None:
        global _DEADLINE
        _DEADLINE = time.perf_counter() + args.deadline

    available, skipped = [], {}
    for b in args.backends:
        why = backends.why_unavailable(b, device)
        if why is None:
            available.append(b)
        else:
            skipped[b] = why
    for b, why in skipped.items():
        log(f"skipping backend {b}: {why}")

    rows: List[Dict[str, Any]] = [dict(section="step", backend=b, status=f"skipped: {why}")
                                  for b, why in skipped.items()]
    t0 = time.perf_counter()
    copy_row = copy_bandwidth(device, timer, args.copy_numel)
    rows.append(copy_row)
    log(f"copy bandwidth: {copy_row['gbps']:.1f} GB/s")
    if "step" in args.sections:
        rows += step_matrix(args, device, timer, available)
    if "solver" in args.sections:
        rows += solver_study(args, device)
    if "scaling" in args.sections:
        rows += scaling(args, device, timer, available)
    if "units" in args.sections:
        rows += units_section(args, device, timer, available)
    if "traffic" in args.sections:
        traffic_section(args)
    add_ratios(rows, copy_row["gbps"])
    log(f"total {time.perf_counter() - t0:.1f} s")

    table_rows = [r for r in rows if not (r.get("section") == "step" and "set" not in r
                                          and str(r.get("status", "")).startswith("skipped"))]
    body = render(table_rows, skipped, meta)
    print(body)
    if not args.no_write:
        out = args.out_dir
        report.append_csv(out / "results.csv", [{**meta, **r} for r in rows], FIELDS)
        report.write_device_section(out / "RESULTS.md", meta["device_name"], body)
        png = out / f"step_time_{report.slug(meta['device'] + '_' + meta['device_name'])}.png"
        why = plot(rows, png, meta)
        log(f"wrote {out / 'results.csv'}, {out / 'RESULTS.md'}" + (f", {png}" if why is None else f" (no plot: {why})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
