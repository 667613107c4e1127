"""Every Triton specialization the benchmark shape sets launch fits an sm_90 SM.

Compiles (no GPU: ptxas ships with triton) each distinct launch the backend
makes for bench/param_sets.py's resnet50, gpt2-medium and llama7b-layer
(every optimizer, regularizer, solver, grouping; fp32 and bf16; plain and
capturable) at the launch's own ``num_warps``, and every tile shape of the
unit kernel (compile_check.unit_specializations), and reads registers and
spills from ``ptxas -v``: at most ``MAX_REGISTERS`` per thread and no spill.
Results are cached per kernel source and specialization
(compile_check.resources), so only the first run after a kernel change
compiles (504 + 80 specializations, on every core: 13 min for the 504 on this
project's 2-core machine under load; set ``RAMDA_RESOURCE_CACHE`` to keep the
results apart from the default cache); later runs take seconds.

Variants known to be over the limit are listed in ``KNOWN_OVER`` with their
numbers: the test xfails naming them, and fails on any other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: (substrings that all appear in the variant name, why it is over) for the
#: variants not fixed yet (ptxas sm_90, Triton 3.8; numbers measured at a85f19f
#: for RAMDA, exact fp32 and PG bf16 capturable, the largest of each class).
KNOWN_OVER = [
    (("ONE_CHUNK=True", "BG=32 BE=256 ", "num_warps=16"), "columns tile of 8192 elements"),
    (("ONE_CHUNK=True", "BG=16 BE=512 ", "num_warps=16"), "columns tile of 8192 elements"),
    (("ONE_CHUNK=True", "BG=8 BE=1024 ", "num_warps=16"), "columns tile of 8192 elements"),
    (("ONE_CHUNK=True", "BG=1 BE=8192 ", "num_warps=16"), "rows group of up to 8192 elements"),
    # 8192-element register tiles: 16 elements per thread at 16 warps, where ptxas
    # caps a thread at 128 registers: exact solve 4-28 B spill store, PG 116-152 B;
    # rows whose offsets are decoded per element (ResNet's input-wise 3x3 groups
    # of 4608, two reduced blocks) 408/476 B. Up to 152 B a thread fits in L1 (512
    # threads: 76 KB); the chunked path instead reads 12 B more per element from DRAM
    # for each pass (NOTE: [two-pass plan]), 12-24 B on those groups.
    (("ONE_CHUNK=True", "BG=8 BE=256 ", "ALIGNED=True", "UNIT_RED=True"),
     "rows tile 8 x 256 with the vector layout: 80 registers yet 4/4 B spill (exact fp32; "
     "not register pressure, not analysed)"),
    (("SOLVER=1", "ONE_CHUNK=True", "UNIT_RED=False", "UNIT_KEPT=False"),
     "PG in registers on decoded (non-unit-stride) rows: d, z, the parameter and the "
     "iterate live, offsets decoded per element: 148-152 registers at 8 warps (1x2048, "
     "2x1024), 8/8 B spill at 16 warps (1x4096)"),
    (("SOLVER=1", "ONE_CHUNK=False", "BG=32 BE=64 "),
     "PG chunked columns (32 groups x 64): 128 registers, 92/64 B spill (bf16 capturable)"),
    (("SOLVER=1", "ONE_CHUNK=True", "ALIGNED=False", "UNIT_RED=True"),
     "PG rows tile of several groups whose sizes are not multiples of 4 (no vector "
     "layout, NOTE: [grouped vector loads]: each thread holds one element of every row): "
     "140 registers at 8 warps (8x256)"),
    # Found by the first full sweep of the 552 specializations (fresh clone at
    # 715736f, AMD EPYC); the other optimizers' tiles, not analysed yet:
    (("OPT=1", "ONE_CHUNK=True", "BG=8 BE=256 ", "SCALAR_D=True", "P_DTYPE=bf16"),
     "RMDA bf16 rows tile 8 x 256 (scalar d): 64 registers, 12/20 B spill"),
    (("OPT=2", "SOLVER=0", "ONE_CHUNK=True", "BG=4 BE=512 ", "UNIT_RED=True"),
     "ProxAdamW rows tile 4 x 512: 64 registers, 8/8 B spill (fp32 and bf16)"),
    (("OPT=2", "SOLVER=0", "ONE_CHUNK=True", "BG=1 BE=4096 ", "UNIT_RED=True"),
     "ProxAdamW rows tile 1 x 4096 at 16 warps: 64 registers, 8/4 (fp32) and 12/12 (bf16) B spill"),
    (("OPT=2", "SOLVER=1", "ONE_CHUNK=True", "BG=32 BE=64 ", "CAPTURABLE=True"),
     "ProxAdamW PG columns tile 32 x 64, bf16 capturable: 80 registers, 12/24 B spill"),
    (("OPT=3", "ONE_CHUNK=True", "SCALAR_D=True", "CAPTURABLE=True", "UNIT_KEPT=False"),
     "ProxSGD capturable rows tiles 32 x 64 and 16 x 128 (scalar d): 40 registers, 4/4 B spill"),
    (("ONE_CHUNK=False", "BG=1 BE=2048 ", "P_DTYPE=bf16"),
     "chunked 2048-element rows, bf16 (RAMDA, RMDA, ProxAdamW; exact and PG): 80-128 "
     "registers, 4/4 to 36/56 B spill"),
    (("OPT=2", "ONE_CHUNK=False", "BG=1 BE=2048 ", "NRB=2", "CAPTURABLE=True"),
     "ProxAdamW chunked decoded 2048-element rows, fp32 capturable: 128 registers, 4/4 B spill"),
    # Since rows of short runs are tiled as columns (triton_backend._short_runs,
    # ResNet's channel-wise 3x3 groups; measured at 7e0ca78): no 4-element
    # contiguous axis for the vector layout, offsets decoded over two reduced
    # blocks. The rows register tiles they replaced spilled 408/476 B.
    (("ONE_CHUNK=False", "BG=8 BE=256 ", "NRB=2", "UNIT_KEPT=False"),
     "chunked columns of short runs, 8 x 256: 196-236 registers without spill (RAMDA and "
     "ProxAdamW, exact and PG, fp32 and bf16); 80-128 registers with 8/8 to 16/16 B spill "
     "(RMDA scalar d fp32, ProxAdamW PG bf16)"),
    # The unit kernel (units.py: register tiles of two elements per thread, chunked
    # tiles of one, where 16-32 spilled 5.6-97 KB a thread), measured at 420bce7;
    # ptxas allots these 64 registers (two 512-thread blocks per SM) and spills,
    # where the same code for the other shapes and optimizers takes 74-84 without
    # spill; they run only at a zero threshold (no shrink), the spill an L1 round trip.
    (("KERNEL=units", "OPT=1", "SOLVE=False", "ONE_CHUNK=False", "BU=8 BE=64 "),
     "RMDA chunked unit tile 8 x 64 without the shrink: 64 registers, 28/36 B spill"),
    (("KERNEL=units", "OPT=3", "SOLVE=False", "ONE_CHUNK=False", "BU=16 BE=32 "),
     "ProxSGD chunked unit tile 16 x 32 without the shrink: 64 registers, 24/32 B spill"),
]


def _has_cuda_backend() -> bool:
    try:
        from triton.backends import backends
    except Exception:
        return False
    return "nvidia" in backends


@pytest.mark.skipif(not _has_cuda_backend(), reason="this triton has no CUDA backend (ptxas)")
def test_every_launched_specialization_fits_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "python"), env.get("PYTHONPATH", "")])
    out = tmp_path / "resources.json"
    proc = subprocess.run([sys.executable, "-m", "ramda_kernels.triton_kernels.compile_check",
                           "--resources", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600)
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert len(rows) >= 50, "the shape sets launch far more specializations than that"
    from ramda_kernels.triton_kernels.compile_check import MAX_REGISTERS

    over = [r for r in rows if r["registers"] > MAX_REGISTERS or r["spill_stores"]
            or r["spill_loads"] or r["registers"] < 0]
    text = "\n".join(f"{r['registers']} registers, {r['spill_stores']}/{r['spill_loads']} B spill "
                     f"store/load: {r['variant']}" for r in over)
    unknown = [r for r in over
               if not any(all(k in r["variant"] for k in keys) for keys, _ in KNOWN_OVER)]
    assert not unknown, f"{len(unknown)} of {len(rows)} specializations over budget:\n{text}"
    if over:
        pytest.xfail(f"{len(over)} of {len(rows)} specializations over budget (known):\n{text}")
