"""Compile the fused step kernel for a CUDA target ahead of time, no GPU needed.

The CPU tests run the kernel under the Triton interpreter, which accepts some
code the compiler rejects; this builds the real thing (TTIR -> PTX -> cubin
with the ptxas that ships in the triton wheel) for every code path, so a
compile error shows on a CPU-only machine::

    python -m ramda_kernels.triton_kernels.compile_check [--arch 90] [--quick]
    python -m ramda_kernels.triton_kernels.compile_check --resources [--json out.json]

``--resources`` compiles every specialization the backend launches for the
benchmark shape sets, at the launch's own ``num_warps``, and reports
registers per thread and spills from ``ptxas -v`` (fails above
``MAX_REGISTERS`` or on any spill).

Exit status 0: every variant compiled; 1: some failed (printed); 2: cannot
check here (the interpreter is on, or triton has no CUDA backend).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Iterator, List

_SCALARS = [("items", "*i64"), ("itab", "*i64"), ("ftab", "*fp32"), ("scratch", "*fp32"),
            ("stab", "*fp32"), ("counters", "*i32"), ("tau", "fp32"), ("eps_t", "fp32"), ("newton_tol", "fp32"), ("max_iters", "i32")] + [
    (f"h{i}", "fp32") for i in range(8)]


def variants(quick: bool = False) -> Iterator[Dict[str, object]]:
    """One constexpr set per code path: optimizer x (flat none / flat l1 / grouped
    exact or PG, one chunk or many), bf16 and fp32 parameters; the capturable
    switch (scalars from the device table) on the flat and grouped paths."""
    import triton.language as tl

    for opt in (0, 1, 2, 3):
        scalar_d = opt in (1, 3)
        base = dict(OPT=opt, AMSGRAD=opt == 2, P_DTYPE=tl.bfloat16, G_DTYPE=tl.bfloat16, NKB=2,
                    NRB=2, SCALAR_D=scalar_d, ALIGNED=True, UNIT_KEPT=False, UNIT_RED=False,
                    CAPTURABLE=False, COUNT=False)
        yield dict(base, REG=1, SOLVER=0, FLAT=True, ONE_CHUNK=True, BG=1024, BE=1, NKB=1, NRB=1)
        yield dict(base, REG=1, SOLVER=0, FLAT=True, ONE_CHUNK=True, BG=1024, BE=1, NKB=1, NRB=1,
                   CAPTURABLE=True)
        if not quick:
            yield dict(base, REG=0, SOLVER=0, FLAT=True, ONE_CHUNK=True, BG=1024, BE=1, NKB=1,
                       NRB=1, P_DTYPE=tl.float32, G_DTYPE=tl.float32, ALIGNED=False)
        for one_chunk in (True, False):
            # one chunk: "rows" (unit reduced stride); many: "columns" (unit kept stride)
            shape = (dict(BG=8, BE=256, NRB=1, UNIT_RED=True) if one_chunk
                     else dict(BG=32, BE=32, NKB=1, UNIT_KEPT=True))
            yield dict(base, REG=2, SOLVER=0, FLAT=False, ONE_CHUNK=one_chunk, **shape)
            if not scalar_d:
                yield dict(base, REG=2, SOLVER=1, FLAT=False, ONE_CHUNK=one_chunk, **shape)
                yield dict(base, REG=2, SOLVER=1, FLAT=False, ONE_CHUNK=one_chunk, **shape,
                           CAPTURABLE=True)
                if not quick:
                    yield dict(base, REG=1, SOLVER=1, FLAT=False, ONE_CHUNK=one_chunk, BG=1,
                               BE=1024, NKB=1, NRB=1)


#: The unit kernel's runtime arguments (units.run_units' launch), by type.
_UNIT_SCALARS = [("ttab", "*i64"), ("rows", "*i64"), ("ustart", "*i64"), ("usize", "*i64"),
                 ("n_units", "i32"), ("frows", "*i64"), ("fstart", "*i64"), ("fsize", "*i64"),
                 ("n_pieces", "i32"), ("thr", "*fp32"), ("sigma_ptr", "*fp32"),
                 ("newton_tol", "fp32")] + [(f"h{i}", "fp32") for i in range(8)]

#: kernel name -> (module, kernel attribute, runtime argument types); a
#: specialization's constexprs name its kernel with ``KERNEL`` (default "step").
_KERNELS = {"step": ("step", "fused_step_kernel", _SCALARS),
            "units": ("units", "units_step_kernel", _UNIT_SCALARS)}


def _kernel_of(constexprs: Dict[str, object]):
    name = constexprs.get("KERNEL", "step")
    return name, {k: v for k, v in constexprs.items() if k != "KERNEL"}


def compile_variant(constexprs: Dict[str, object], arch: int = 90, num_warps: int = 4):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    kernel, constexprs = _kernel_of(constexprs)
    module, attr, scalars = _KERNELS[kernel]
    fn = getattr(importlib.import_module(f"{__package__}.{module}"), attr)
    signature = {name: "constexpr" for name in fn.arg_names}
    signature.update(dict(scalars))
    src = ASTSource(fn, signature, constexprs=dict(constexprs))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))


def ptxas_resources(compiled, arch: int = 90) -> Dict[str, int]:
    """Registers per thread and spill bytes of a compiled kernel, from ``ptxas -v``
    on its PTX (the numbers the driver would report at load time; no GPU)."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        arch_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        log = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch_name}", src,
                              "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(registers=int(regs.group(1)) if regs else -1,
                spill_stores=int(spills.group(1)) if spills else -1,
                spill_loads=int(spills.group(2)) if spills else -1)


def launch_specializations(param_groups, optimizer: str, dtype) -> List[tuple]:
    """``(constexprs, num_warps)`` of every launch the Triton backend makes for
    these param groups (dicts with ``params``, which may be meta tensors, and
    their settings) in parameter dtype ``dtype``, plain and capturable: the
    backend's own tile choice (``triton_backend._specialization``), no tensor
    allocated. Tensors are taken as 16-byte aligned, as fresh allocations are."""
    from ..backends import triton_backend as tb

    opt = tb._OPT[optimizer]
    scalar_d = optimizer in ("rmda", "proxsgd")
    out = []
    for g in param_groups:
        regularizer = g.get("regularizer", "none")
        tau = 1.0 if g.get("lambda_", 0.0) > 0 else 0.0
        reg, solver, flat = tb._mode(regularizer, g.get("solver", "exact"), tau, scalar_d)
        stats = []
        for p in g["params"]:
            lay = None if flat else tb._layout(p, reg, g.get("dims"), g.get("view"))
            stats.append(tb._TileStats(p.numel(), lay))
        for members in tb.size_classes(stats, flat):  # one launch per size class
            constexprs, warps = tb._specialization(opt, reg, solver, flat, scalar_d,
                                                   bool(g.get("amsgrad", False)), dtype, dtype,
                                                   [stats[i] for i in members], True)
            for capturable in (False, True):
                out.append((dict(constexprs, CAPTURABLE=capturable, COUNT=False), warps))
    return out


def bench_set_specializations(sets=("resnet50", "gpt2-medium", "llama7b-layer"),
                              dtypes=None) -> List[tuple]:
    """The distinct launch specializations of bench/param_sets.py's shape sets
    (this repository's checkout only): every optimizer, regularizer (none, l1,
    group lasso with either solver), grouping and kernel dtype."""
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    import param_sets as ps

    seen: Dict[tuple, tuple] = {}
    for name in sets:
        with torch.device("meta"):
            model = ps.SETS[name].build()
        for optimizer in ("ramda", "rmda", "proxadamw", "proxsgd"):
            for regularizer, solver in (("none", "exact"), ("l1", "exact"), ("l1", "pg"),
                                        ("group_lasso", "exact"), ("group_lasso", "pg")):
                has_solver = optimizer in ("ramda", "proxadamw")
                if solver == "pg" and not has_solver:
                    continue
                hp = dict(solver=solver) if has_solver and regularizer != "none" else {}
                groupings = ps.groupings_for(name) if regularizer == "group_lasso" else (None,)
                for grouping in groupings:
                    groups, _ = ps.param_groups(model, regularizer, grouping, 0.1,
                                                heads=ps.SETS[name].heads, **hp)
                    for dtype in dtypes or (torch.float32, torch.bfloat16, torch.float16):
                        for c, w in launch_specializations(groups, optimizer, dtype):
                            key = (tuple(sorted((k, str(v)) for k, v in c.items())), w)
                            seen.setdefault(key, (c, w))
    return list(seen.values())


def unit_specializations() -> List[tuple]:
    """The ``(constexprs, num_warps)`` the unit kernel is launched with
    (units.tile_shape for every largest and median unit size and unit count),
    at each chunk width ``BE`` the one of the most units ``BU``, for every
    optimizer, with the solve on and off: a launch of fewer units per tile
    runs a smaller tile of the same code. The kernel handles every parameter
    dtype at run time, so dtype is not a specialization."""
    from . import units as U

    sizes = [1 << k for k in range((4 * U.REGISTER_E).bit_length())]
    largest: Dict[tuple, int] = {}  # (ONE_CHUNK, BE) -> the most units a tile of them holds
    for i, longest in enumerate(sizes):
        for median in sizes[:i + 1]:
            for units in (1, 2, 4, 1 << 20):
                one_chunk, bu, be = U.tile_shape(longest, median, units)
                largest[one_chunk, be] = max(bu, largest.get((one_chunk, be), 0))
    shapes = {(one_chunk, bu, be) for (one_chunk, be), bu in largest.items()}
    out = []
    for one_chunk, bu, be in sorted(shapes):
        for opt, name in enumerate(("ramda", "rmda", "proxadamw", "proxsgd")):
            for amsgrad in ((False, True) if name == "proxadamw" else (False,)):
                for solve in (False, True):
                    out.append((dict(KERNEL="units", OPT=opt, AMSGRAD=amsgrad,
                                     SCALAR_D=name in ("rmda", "proxsgd"), SOLVE=solve,
                                     ONE_CHUNK=one_chunk, BU=bu, BE=be),
                                U.NUM_WARPS))
    return out


#: Registers per thread above which a variant fails the resource check: 128
#: leaves two 256-thread blocks per SM on sm_90's 64K registers.
MAX_REGISTERS = 128


def _cache_path() -> str:
    return os.environ.get("RAMDA_RESOURCE_CACHE", os.path.join(
        os.path.expanduser("~"), ".cache", "ramda_kernels", "ptx_resources.json"))


def _cache_key(constexprs: Dict[str, object], num_warps: int, arch: int) -> str:
    """Kernel source, triton version, target and specialization: a result is
    reused only for the exact same compile. The step kernel's key is the one
    it had before the unit kernel was checked too (its cached results stay)."""
    import hashlib

    import triton

    kernel, _ = _kernel_of(constexprs)
    source = _source("step") + (_source("units") if kernel == "units" else b"")
    spec = repr(sorted((k, str(v)) for k, v in constexprs.items())) + f"|w{num_warps}|sm{arch}"
    return hashlib.sha256(source + triton.__version__.encode() + spec.encode()).hexdigest()


_SOURCE: Dict[str, bytes] = {}


def _source(module: str) -> bytes:
    """A kernel module's code as imported, without comments and docstrings
    (an edit to those compiles the same kernel), read once: an edit made while
    a sweep runs must not label the old kernel's numbers with the new code.
    The unit kernel's key takes step.py's too: it calls step.py's helpers. Of
    units.py only what the device code is made of counts (imports, ``tl.constexpr``
    constants, ``@triton.jit`` functions), so that its host side (tile choice,
    tables) can change without recompiling every unit specialization."""
    if module not in _SOURCE:
        import ast
        import importlib
        import inspect

        tree = ast.parse(inspect.getsource(importlib.import_module(f"{__package__}.{module}")))
        if module != "step":
            def device(node) -> bool:
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    return True
                if isinstance(node, ast.Assign):
                    return "constexpr" in ast.dump(node.value)
                return isinstance(node, ast.FunctionDef) and any(
                    "jit" in ast.dump(d) for d in node.decorator_list)
            tree.body = [node for node in tree.body if device(node)]
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
                body[0] = ast.Pass()
        _SOURCE[module] = ast.dump(tree).encode()
    return _SOURCE[module]


def _compile_resources(constexprs: Dict[str, object], num_warps: int, arch: int) -> Dict[str, int]:
    return ptxas_resources(compile_variant(constexprs, arch, num_warps), arch)


def _compiled(missing: Dict[str, tuple], arch: int, workers: int) -> Iterator[tuple]:
    """``(key, resources)`` of each ``key -> (constexprs, num_warps)`` of
    ``missing``, as they finish: here, or in ``workers`` spawned processes."""
    if workers <= 1 or len(missing) <= 1:
        for key, (c, w) in missing.items():
            yield key, _compile_resources(c, w, arch)
        return
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(
            min(len(missing), workers), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_compile_resources, c, w, arch): key
                   for key, (c, w) in missing.items()}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.result()


def _save_cache(path: str, cache: Dict[str, object]) -> None:
    import json

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(cache, f)
    os.replace(path + ".tmp", path)


def resources(specs, arch: int = 90, log=None, workers: int = 1) -> List[Dict[str, object]]:
    """Compile every ``(constexprs, num_warps)`` of ``specs`` and read its
    registers and spills (``ptxas_resources``), reusing the results cached at
    ``$RAMDA_RESOURCE_CACHE`` (default ``~/.cache/ramda_kernels/ptx_resources.json``).
    ``workers`` > 1 compiles the uncached ones in that many spawned processes
    (each compile is single-threaded); the caller's main module must then be
    importable (a script guarded by ``if __name__ == "__main__"``, or ``-m``)."""
    import json

    path = _cache_path()
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    keys = [_cache_key(constexprs, warps, arch) for constexprs, warps in specs]
    missing = {}
    for key, spec in zip(keys, specs):
        if key not in cache:
            missing.setdefault(key, spec)
    save_every = max(1, workers)  # a result per worker between saves of the cache
    for done, (key, result) in enumerate(_compiled(missing, arch, workers), start=1):
        cache[key] = result
        if log is not None:
            print(f"compiled {done} of {len(missing)}", file=log, flush=True)
        if done % save_every == 0 or done == len(missing):
            _save_cache(path, cache)
    out = []
    for key, (constexprs, warps) in zip(keys, specs):
        name = " ".join(f"{k}={getattr(v, 'name', v)}" for k, v in constexprs.items())
        row = dict(variant=f"{name} num_warps={warps}", **cache[key])
        if log is not None:
            print(f"{row['registers']:4d} regs {row['spill_stores']:5d}/{row['spill_loads']:<5d} "
                  f"spill B  {row['variant']}", file=log, flush=True)
        out.append(row)
    return out


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--quick", action="store_true", help="one variant per code path")
    parser.add_argument("--resources", action="store_true",
                        help="registers and spills of every launch specialization of "
                             "bench/param_sets.py's shape sets (fp32, bf16) instead")
    parser.add_argument("--json", help="with --resources: write the rows to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("TRITON_INTERPRET is set: the kernel is interpreted, nothing to compile")
        return 2
    try:
        from triton.backends import backends as available
        if "nvidia" not in available:
            print("this triton has no CUDA backend")
            return 2
    except Exception as e:  # an older layout of triton.backends
        print(f"cannot inspect triton's backends: {e}")
        return 2
    if args.resources:
        import json

        import torch

        specs = bench_set_specializations(dtypes=(torch.float32, torch.bfloat16)) + unit_specializations()
        # a cold cache compiles for about 45 min on one core: use them all
        rows = resources(specs, args.arch, log=sys.stdout, workers=len(os.sched_getaffinity(0)))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        bad = [r for r in rows if r["registers"] > MAX_REGISTERS or r["spill_stores"]
               or r["spill_loads"] or r["registers"] < 0]
        print(f"{len(rows)} specializations, {len(bad)} over {MAX_REGISTERS} registers or spilling")
        return 1 if bad else 0
    failed = 0
    for c in variants(args.quick):
        name = " ".join(f"{k}={getattr(v, 'name', v)}" for k, v in c.items())
        try:
            compiled = compile_variant(c, args.arch)
            ok = "cubin" in compiled.asm
            print(f"{'ok  ' if ok else 'FAIL'} {name}")
            failed += not ok
        except Exception as e:
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
