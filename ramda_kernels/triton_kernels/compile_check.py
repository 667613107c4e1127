"""Compile the fused step kernel for a CUDA target ahead of time, no GPU needed.

The CPU tests run the kernel under the Triton interpreter, which accepts some
code the compiler rejects; this builds the real thing (TTIR -> PTX -> cubin
with the ptxas that ships in the triton wheel) for every code path, so a
compile error shows on a CPU-only machine::

    python -m ramda_kernels.triton_kernels.compile_check [--arch 90] [--quick]

Exit status 0: every variant compiled; 1: some failed (printed); 2: cannot
check here (the interpreter is on, or triton has no CUDA backend).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Iterator, List

_SCALARS = [("items", "*i64"), ("itab", "*i64"), ("ftab", "*fp32"), ("scratch", "*fp32"),
            ("stab", "*fp32"), ("tau", "fp32"), ("eps_t", "fp32"), ("newton_tol", "fp32"), ("max_iters", "i32")] + [
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
                    CAPTURABLE=False)
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


def compile_variant(constexprs: Dict[str, object], arch: int = 90, num_warps: int = 4):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    from . import step

    fn = step.fused_step_kernel
    signature = {name: "constexpr" for name in fn.arg_names}
    signature.update(dict(_SCALARS))
    src = ASTSource(fn, signature, constexprs=dict(constexprs))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--quick", action="store_true", help="one variant per code path")
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
