#!/usr/bin/env python
"""Optimizer step time under FSDP2 on gloo CPU processes (issue 16).

    python bench/bench_fsdp.py                       # GPT-2 small's shapes, 2 processes
    python bench/bench_fsdp.py --layers 2 --steps 3  # a quick look

GPT-2 small's parameter tree (bench/param_sets.py's GPT-2 layout at d=768,
12 layers, vocab 50257, context 1024: 124M parameters; Linear weights
``[out, in]``) with input-wise groups (``dims=(0,)``, the default Linear
grouping) and RAMDA, fp32. Each process shards every block and the root with
``fully_shard`` and times ``opt.step()`` alone (gradients are drawn once, the
forward and backward are not timed; every step is bracketed by barriers and
the slowest rank counts). Modes, all in one run:

``spanning``  FSDP2's default ``Shard(0)``: every input-wise group spans both
              ranks, so the step runs on the reference with DTensor reductions
              (NOTE: [FSDP2 shards] in ramda_kernels/functional.py).
``placed``    ``shard_placement_fn=rk.fsdp_shard_placement(groups)``: the
              groups are local, the fused backend steps the local shards.
``adamw``     ``torch.optim.AdamW`` (foreach) on the same FSDP2 parameters.
``single``    one process, no process group: the fused step on plain tensors
              of one rank's local shapes under the placement (half the
              parameters), the time a perfectly scaling ``placed`` step takes.
``single-x2`` ``single`` in ``--world`` processes at once (no process group,
              the slowest counts): the same work per process and the same
              competition for the cores as ``placed``, without FSDP2.

Every process uses ``--threads`` intra-op threads (1 by default: two
processes on two cores). Prints one table; ``--csv`` appends the rows.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "python"), str(ROOT / "bench")]

import param_sets  # noqa: E402

D, VOCAB, CONTEXT = 768, 50257, 1024


def _model(layers: int):
    """GPT-2 small's tree with param_sets' initialization (``N(0, 1/fan_in)``)."""
    param_sets.SETS["gpt2-small"] = param_sets.ParamSet(lambda: param_sets._gpt2(D, layers, VOCAB, CONTEXT),
                                                        heads=(D, 12))
    return param_sets.build("gpt2-small", torch.device("cpu"), torch.float32)


def _groups(model, lambda_: float):
    import ramda_kernels as rk
    return rk.group_parameters(model, lambda_, linear="input")


def _grads(params, seed: int) -> None:
    """A gradient of each parameter's (local) shape, the same on every run."""
    from ramda_kernels.distributed import is_dtensor
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        local = p.to_local() if is_dtensor(p) else p
        g = torch.randn(local.shape, generator=gen) * 0.01
        if is_dtensor(p):
            from torch.distributed.tensor import DTensor
            g = DTensor.from_local(g, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        p.grad = g


def _time_steps(opt, steps: int, sync) -> list:
    times = []
    for i in range(steps + 1):  # the first step creates the state: not timed
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        if i:
            times.append(time.perf_counter() - t0)
    return times


def _optimizer(mode: str, groups, model):
    import ramda_kernels as rk
    if mode == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    return rk.RAMDA(groups, lr=1e-2, momentum=0.1)


def _worker(rank, world, rendezvous, mode, args, out):
    if mode == "single-x2":
        torch.save(_single(args), f"{out}.{rank}")
        return
    from torch.distributed.fsdp import fully_shard

    import ramda_kernels as rk
    from ramda_kernels import functional
    from ramda_kernels.distributed import rebind

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        model = _model(args.layers)
        groups = _groups(model, args.lambda_)
        place = rk.fsdp_shard_placement(groups) if mode == "placed" else None
        for block in model.h.children():
            fully_shard(block, shard_placement_fn=place)
        fully_shard(model, shard_placement_fn=place)
        opt = _optimizer(mode, rebind(groups, model), model)
        _grads(model.parameters(), seed=rank + 1)
        functional.DTENSOR_FALLBACKS.clear()
        times = _time_steps(opt, args.steps, dist.barrier)
        if args.profile and mode == "placed":
            _profile_step(opt, rank, args.profile)
        slowest = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if rank == 0:
            local = sum(p.to_local().numel() for p in model.parameters())
            torch.save({"times": slowest.tolist(), "local_params": local,
                        "fallbacks": sum(functional.DTENSOR_FALLBACKS.values())}, out)
    finally:
        dist.destroy_process_group()


#: Functions whose calls per step `--profile` counts (substrings of cProfile's
#: ``file:line(function)`` keys): collectives, DTensor/FSDP2 work, our per-tensor Python.
_COUNTED = {"collectives": ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "barrier"),
            "to_local": ("(to_local)",), "from_local": ("(from_local)",),
            "DTensor dispatch": ("_dispatch.py", "(__torch_dispatch__)"),
            "FSDP2 hooks": ("_fsdp_state.py", "_fsdp_param_group.py"),
            "local_view": ("(local_view)",), "fused op": ("(_run)",),
            "finite_flags": ("(finite_flags)",)}


def _profile_step(opt, rank: int, path: str) -> None:
    """One more step under cProfile on each rank: ``path.RANK.txt`` gets the
    calls per step of `_COUNTED` and the 30 functions with the most own time."""
    import cProfile
    import io
    import pstats

    dist.barrier()
    prof = cProfile.Profile()
    prof.enable()
    opt.step()
    prof.disable()
    stats = pstats.Stats(prof)
    counts = {k: 0 for k in _COUNTED}
    times = {k: 0.0 for k in _COUNTED}
    for (file, line, fn), (_, ncalls, _, cum, _) in stats.stats.items():
        key = f"{file}:{line}({fn})"
        for what, needles in _COUNTED.items():
            if any(n in key for n in needles):
                counts[what] += ncalls
                times[what] = max(times[what], cum)
    buf = io.StringIO()
    buf.write(f"rank {rank}: one placed step, {stats.total_tt:.3f} s under cProfile\n")
    for what in _COUNTED:
        buf.write(f"  {what:17s} {counts[what]:7d} calls, largest cumulative {times[what]:.3f} s\n")
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
    with open(f"{path}.{rank}.txt", "w") as f:
        f.write(buf.getvalue())


def _distributed(mode: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        mp.start_processes(_worker, args=(args.world, os.path.join(tmp, "rendezvous"), mode, args, out),
                           nprocs=args.world, join=True, start_method="spawn")
        if mode != "single-x2":
            return torch.load(out)
        runs = [torch.load(f"{out}.{r}") for r in range(args.world)]
        return dict(runs[0], times=[max(ts) for ts in zip(*(r["times"] for r in runs))])


def _single(args) -> dict:
    """The fused step in this process on one rank's local shapes under the placement."""
    import ramda_kernels as rk
    torch.set_num_threads(args.threads)
    model = _model(args.layers)
    groups = _groups(model, args.lambda_)
    place = rk.fsdp_shard_placement(groups, world_size=args.world)
    with torch.no_grad():
        for module in model.modules():  # rank 0's chunk of every parameter, as FSDP2 cuts it
            for name, p in list(module.named_parameters(recurse=False)):
                pl = place(p)
                dim = 0 if pl is None else pl.dim
                chunk = p.chunk(args.world, dim=dim)[0].clone()
                setattr(module, name, torch.nn.Parameter(chunk))
    groups = [dict(g, params=[model.get_parameter(n) for n in g["param_names"]]) for g in groups]
    opt = _optimizer("single", groups, model)
    _grads(model.parameters(), seed=1)
    return {"times": _time_steps(opt, args.steps, lambda: None),
            "local_params": sum(p.numel() for p in model.parameters()), "fallbacks": 0}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode (after one untimed)")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    ap.add_argument("--lambda", dest="lambda_", type=float, default=1e-4)
    ap.add_argument("--modes", default="placed,single,single-x2,adamw,spanning")
    ap.add_argument("--csv", type=Path, default=None)
    ap.add_argument("--profile", default=None, metavar="PATH",
                    help="after the timed placed steps, one step under cProfile per rank: "
                         "PATH.RANK.txt (calls per step of collectives, DTensor conversions, "
                         "FSDP2 hooks, fused-op calls; the top functions by own time)")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    print(f"# bench_fsdp: GPT-2 small shapes ({args.layers} layers), RAMDA input-wise fp32, "
          f"{args.world} gloo processes x {args.threads} thread(s); commit {commit}; CPU {_cpu_name()} "
          f"({os.cpu_count()} cores); load average {os.getloadavg()[0]:.1f}")
    results = {}
    for mode in modes:
        results[mode] = _single(args) if mode == "single" else _distributed(mode, args)
        r = results[mode]
        print(f"{mode:9s} median {statistics.median(r['times']) * 1e3:10.1f} ms  "
              f"(steps {', '.join(f'{t * 1e3:.1f}' for t in r['times'])} ms; "
              f"{r['local_params'] / 1e6:.1f}M params per process; tensors on the DTensor "
              f"reference {r['fallbacks']})", flush=True)
    med = {m: statistics.median(r["times"]) for m, r in results.items()}
    # the targets: spanning / placed >= 10, placed / single <= 1.5
    for a, b in (("spanning", "placed"), ("placed", "single"), ("placed", "single-x2"),
                 ("placed", "adamw")):
        if a in med and b in med:
            print(f"{a} / {b} = {med[a] / med[b]:.2f}")
    if args.csv is not None:
        new = not args.csv.exists()
        with open(args.csv, "a") as f:
            if new:
                f.write("commit,cpu,layers,world,threads,mode,median_s,steps_s\n")
            for m, r in results.items():
                f.write(f"{commit},{_cpu_name()},{args.layers},{args.world},{args.threads},{m},"
                        f"{med[m]:.6f},{' '.join(f'{t:.6f}' for t in r['times'])}\n")


if __name__ == "__main__":
    main()
