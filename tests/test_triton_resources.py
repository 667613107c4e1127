"""Every Triton specialization the benchmark shape sets launch fits an sm_90 SM.

Compiles (no GPU: ptxas ships with triton) each distinct launch the backend
makes for bench/param_sets.py's resnet50, gpt2-medium and llama7b-layer
(every optimizer, regularizer, solver, grouping; fp32 and bf16; plain and
capturable) at the launch's own ``num_warps``, and reads registers and spills
from ``ptxas -v``: at most ``MAX_REGISTERS`` per thread and no spill. Results
are cached per kernel source and specialization (compile_check.resources), so
only the first run after a kernel change compiles (about 160 variants, 5 s
each on 2 shared cores); later runs take seconds.

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
#: variants not fixed yet (ptxas sm_90, Triton 3.8; numbers from fp32 RAMDA).
KNOWN_OVER = [
    (("FLAT=False ONE_CHUNK=False",),
     "chunked grouped path (NOTE: [two-pass plan]): 128-148 registers for the exact solve "
     "(columns tiles BG=32 BE=64 at 8 warps: 148); some bf16 and capturable variants spill"),
    (("FLAT=False ONE_CHUNK=True",),
     "grouped tiles held in registers (size classes up to 8192 elements, warm start): "
     "143-207 registers at 8 warps (rows BG=8 BE=256: 205), and at 16 warps ptxas caps "
     "a thread at 128 and some spill (columns BG=32 BE=128: 36/40 B spill store/load)"),
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
