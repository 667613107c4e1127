"""``ramda-kernels validate``: runs, prints its table, and its exit status means something."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ramda_kernels import backends, cli

ROOT = Path(__file__).resolve().parents[1]


def test_validate_quick_passes_here():
    # a subprocess: a hung kernel ends that process (--case-timeout), not the test run
    proc = subprocess.run([sys.executable, "-m", "ramda_kernels", "validate", "--device", "cpu",
                           "--quick", "--optimizers", "ramda", "--case-timeout", "120"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    header = next(line for line in out.splitlines() if line.startswith("backend "))
    for col in ("param err", "state err", "zero groups", "mismatches", "result"):
        assert col in header
    assert "FAIL" not in out and "all pass" in out
    fast = [b for b in backends.BACKENDS if b != "reference" and backends.why_unavailable(b, "cpu") is None]
    for b in backends.BACKENDS:
        why = backends.why_unavailable(b, "cpu")
        if b != "reference" and why is not None:
            assert f"skipped {b}: {why}" in out
    checked = fast or ["reference"]  # no fast backend: the reference through the dispatch
    for b in checked:
        assert f"{b} on cpu:" in out
        rows = [line for line in out.splitlines() if line.startswith(b + " ") and "ramda" in line]
        assert rows and all(line.rstrip().endswith("PASS") for line in rows)


def test_validate_named_backend_that_cannot_run(capsys):
    missing = [b for b in backends.BACKENDS if backends.why_unavailable(b, "cpu") is not None]
    if not missing:
        pytest.skip("every backend runs on this machine's CPU")
    rc = cli.main(["validate", "--device", "cpu", "--backends", missing[0]])
    out = capsys.readouterr().out
    assert rc == 2
    assert f"skipped {missing[0]}: {backends.why_unavailable(missing[0], 'cpu')}" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_validate_cuda_without_a_gpu(capsys):
    assert cli.main(["validate", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().out


def test_validate_unknown_name_is_an_argument_error():
    with pytest.raises(SystemExit):
        cli.main(["validate", "--backends", "tpu"])
