"""``ramda-kernels validate``: runs, prints its table, and its exit status means something."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ramda_kernels import backends, cli

ROOT = Path(__file__).resolve().parents[1]


def _validate(*args: str) -> subprocess.CompletedProcess:
    # a subprocess: a hung kernel ends that process (--case-timeout), not the test run
    return subprocess.run([sys.executable, "-m", "ramda_kernels", "validate", "--device", "cpu",
                           "--case-timeout", "120", *args],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)


def _rows(out: str, backend: str):
    """The table rows of ``backend`` (the last cell is PASS or FAIL)."""
    rows = [line.split() for line in out.splitlines() if line.startswith(backend + " ")]
    return [r for r in rows if r[-1] in ("PASS", "FAIL")]


def test_validate_quick_reference_passes():
    proc = _validate("--quick", "--backends", "reference", "--optimizers", "ramda")
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    header = next(line for line in out.splitlines() if line.startswith("backend "))
    for col in ("param err", "state err", "zero groups", "mismatches", "result"):
        assert col in header
    rows = _rows(out, "reference")
    assert len(rows) >= 10 and all(r[-1] == "PASS" for r in rows)
    assert {r[2] for r in rows} == {"none", "l1", "group_lasso", "nuclear"}
    assert {r[3] for r in rows} == {"exact", "pg"}
    assert "reference on cpu:" in out and "all pass" in out


def test_validate_quick_every_backend_here():
    """The default run checks every fast backend available on this CPU (or, with none,
    the reference through the dispatch), lists the others with their reason, and
    exits 1 exactly when a case fails. Whether a backend passes is that backend's
    business (its own parity tests); this checks the command keeps its word."""
    proc = _validate("--quick", "--optimizers", "rmda")
    out = proc.stdout
    assert proc.returncode in (0, 1), out[-4000:] + proc.stderr[-4000:]
    fast = [b for b in backends.BACKENDS
            if b != "reference" and backends.why_unavailable(b, "cpu") is None]
    for b in backends.BACKENDS:
        why = backends.why_unavailable(b, "cpu")
        if b != "reference" and why is not None:
            assert f"skipped {b}: {why}" in out
    failed = False
    for b in fast or ["reference"]:
        rows = _rows(out, b)
        assert rows and all(r[1] == "rmda" for r in rows)
        failed |= any(r[-1] == "FAIL" for r in rows)
        assert f"{b} on cpu: {sum(r[-1] == 'PASS' for r in rows)}/{len(rows)} cases pass" in out
    assert proc.returncode == (1 if failed else 0)
    assert ("FAIL" in out.splitlines()[-1]) == failed


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
