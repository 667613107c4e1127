"""bench/bench_step.py runs and writes what it promises (shapes of the output, never times)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import bench_step  # noqa: E402
import param_sets  # noqa: E402
import report  # noqa: E402

from ramda_kernels import backends  # noqa: E402


def _run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python"),
                                                       os.environ.get("PYTHONPATH", "")]))
    # The test suite runs with TRITON_INTERPRET=1; a benchmark of the Triton
    # interpreter measures nothing and takes minutes, so leave it out here.
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, str(BENCH / "bench_step.py"), "--device", "cpu", "--quick",
           "--sets", "convnet", "--optimizers", "ramda", "--regularizers", "group_lasso",
           "--groupings", "input", "--reps", "2", "--pg-cap", "20", "--threads", "1",
           "--out-dir", str(tmp_path), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = _run(out)
    assert proc.returncode == 0, f"bench failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    with (out / "results.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = reader.fieldnames
    return out, proc, header, rows


def test_table_printed(quick_run):
    _, proc, _, _ = quick_run
    out = proc.stdout
    for section in ("### Step time", "### Solver work per group", "### Scaling", "Copy bandwidth"):
        assert section in out, f"{section!r} missing from the printed report:\n{out[:2000]}"
    header = next(line for line in out.splitlines() if line.startswith("| set |"))
    for col in ("ms", "x AdamW", "ref-PG/this", "bytes/param", "GB/s", "%copy", "extra MiB"):
        assert f"| {col} |" in header, f"column {col!r} missing from {header!r}"
    step_lines = [line for line in out.split("### Step time")[1].split("###")[0].splitlines()
                  if line.startswith("| convnet")]
    backends_seen = {line.split("|")[7].strip() for line in step_lines}
    assert {"adamw-fused", "adamw-foreach", "reference"} <= backends_seen, step_lines


def test_csv_rows(quick_run):
    _, _, header, rows = quick_run
    assert header == bench_step.FIELDS
    meta = {k: {r[k] for r in rows} for k in ("date", "commit", "device", "torch", "command")}
    assert meta["device"] == {"cpu"} and all(len(v) == 1 and "" not in v for v in meta.values()), meta
    sections = {r["section"] for r in rows}
    assert sections == {"copy", "step", "solver", "scaling"}, sections
    step = [r for r in rows if r["section"] == "step" and r["status"] == "ok"]
    solvers = {(r["backend"], r["solver"]) for r in step if r["optimizer"] == "ramda"}
    assert ("reference", "exact") in solvers and ("reference", "pg") in solvers, solvers
    for r in step:
        assert float(r["ms"]) > 0 and int(r["reps"]) >= 1
        assert int(r["n_params"]) == param_sets.n_params("convnet") == 431080
        assert r["x_fused_adamw"] != "" and r["frac_copy"] != ""
        if r["optimizer"] == "ramda":
            assert int(r["bytes_per_step"]) == 32 * 431080  # fp32 RAMDA: 32 B per parameter
            assert r["speedup_ref_pg"] != ""
    # every backend is either measured or listed as skipped with its reason
    for b in backends.BACKENDS:
        why = backends.why_unavailable(b, "cpu")
        mine = [r for r in rows if r["backend"] == b]
        if b == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            # _run leaves the interpreter out, so the benchmark sees triton as unavailable
            assert any(r["status"].startswith("skipped: ") for r in mine), (b, mine)
        elif why is None:
            assert any(r["status"] == "ok" for r in mine), b
        else:
            assert any(r["status"] == f"skipped: {why}" for r in mine), (b, why)
    solver = [r for r in rows if r["section"] == "solver"]
    assert {r["dtype"] for r in solver} == {"fp32", "fp64"}
    assert all(int(r["pg_cap"]) == 20 and r["newton_max"] != "" for r in solver)


def test_results_md_and_plot(quick_run):
    out, _, _, rows = quick_run
    text = (out / "RESULTS.md").read_text()
    name = rows[0]["device_name"]
    assert text.count(f"<!-- device: {name} -->") == 1
    assert "python bench/bench_step.py --device cpu --quick" in text
    pngs = list(out.glob("step_time_cpu_*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_csv_append_and_device_sections(tmp_path):
    fields = ["a", "b"]
    report.append_csv(tmp_path / "r.csv", [{"a": 1, "b": 2}], fields)
    report.append_csv(tmp_path / "r.csv", [{"a": 3, "b": 4}], fields)
    report.append_csv(tmp_path / "r.csv", [{"a": 5, "c": 6}], ["a", "c"])  # new column: union
    with (tmp_path / "r.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["a", "b", "c"]
    assert [(r["a"], r["b"], r["c"]) for r in rows] == [("1", "2", ""), ("3", "4", ""), ("5", "", "6")]

    md = tmp_path / "RESULTS.md"
    report.write_device_section(md, "gpu X", "## gpu X\nold")
    report.write_device_section(md, "cpu Y", "## cpu Y\nkept")
    report.write_device_section(md, "gpu X", "## gpu X\nnew")
    text = md.read_text()
    assert "new" in text and "old" not in text and "kept" in text
    assert text.count("<!-- device: gpu X -->") == 1

    other = tmp_path / "other"
    other.mkdir()
    report.write_device_section(other / "RESULTS.md", "gpu Z", "## gpu Z\nfrom the GPU machine")
    report.append_csv(other / "results.csv", [{"a": 7, "b": 8}], fields)
    done = report.merge(other, tmp_path)
    assert len(done) == 2
    text = md.read_text()
    assert "from the GPU machine" in text and "kept" in text and "new" in text


def test_min_bytes():
    import torch

    n = 10
    assert bench_step.min_bytes("ramda", n, torch.float32) == 32 * n
    assert bench_step.min_bytes("ramda", n, torch.bfloat16) == 26 * n
    assert bench_step.min_bytes("rmda", n, torch.float32) == 24 * n
    assert bench_step.min_bytes("proxadamw", n, torch.float16) == 22 * n
    assert bench_step.min_bytes("proxsgd", n, torch.float32) == 20 * n
    assert bench_step.min_bytes("adamw-fused", n, torch.bfloat16) == 14 * n


def test_param_set_sizes():
    assert param_sets.n_params("convnet") == 431_080
    assert param_sets.n_params("resnet50") == 25_557_032  # torchvision's resnet50()
    assert param_sets.n_params("gpt2-medium") == 354_823_168  # HF gpt2-medium, tied lm_head


def test_heads_grouping_runs(capsys):
    """One group per attention head through the param-group ``view`` key (gpt2's layout at toy size)."""
    import torch

    model = param_sets.build("gpt2-tiny", torch.device("cpu"), torch.float32)
    groups, _ = param_sets.param_groups(model, "group_lasso", "heads", 0.1,
                                        heads=param_sets.SETS["gpt2-tiny"].heads)
    by_name = {n: (g.get("view"), g.get("dims")) for g in groups for n in g["param_names"]}
    assert by_name["h.0.attn.c_attn.weight"] == ((12, 16, 64), (1, 2))  # q, k, v: 3 x 4 output heads
    assert by_name["h.0.attn.c_proj.weight"] == ((64, 4, 16), (0, 2))   # 4 input heads
    assert by_name["h.0.mlp.c_fc.weight"] == (None, (0,))
    assert by_name["wte.weight"] == (None, None)

    rc = bench_step.main(["--device", "cpu", "--quick", "--sets", "gpt2-tiny", "--optimizers", "ramda",
                          "--regularizers", "group_lasso", "--groupings", "heads", "--sections", "step",
                          "--backends", "reference", "--reps", "1", "--no-write",
                          "--threads", str(torch.get_num_threads())])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| gpt2-tiny | ramda")]
    assert {(r[5].strip(), r[7].strip()) for r in rows} == {("exact", "reference"), ("pg", "reference")}
    assert all(r[4].strip() == "heads" and r[-2].strip() == "ok" for r in rows), rows


@pytest.mark.parametrize("set_name,grouping", [("convnet", "input"), ("convnet", "output"),
                                               ("resnet50", "output"), ("gpt2-tiny", "heads")])
def test_fallback_grouping_matches_group_parameters(set_name, grouping):
    """bench/param_sets.py's own grouping (used where ramda_kernels.group_parameters is
    missing) gives every parameter the same regularizer, dims and view."""
    import torch

    with torch.device("meta"):
        model = param_sets.SETS[set_name].build()
    heads = param_sets.SETS[set_name].heads
    ours = param_sets._direct_groups(model, "group_lasso", grouping == "output",
                                     param_sets._heads_overrides(*heads) if heads and grouping == "heads" else {},
                                     0.1, {})
    theirs, who = param_sets.param_groups(model, "group_lasso", grouping, 0.1, heads=heads)
    assert who == "ramda_kernels.group_parameters"
    key = lambda groups: {n: (g["regularizer"], g.get("dims"), g.get("view"))
                          for g in groups for n in g["param_names"]}
    assert key(ours) == key(theirs)
