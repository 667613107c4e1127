"""The ``ramda-kernels`` command: info, short train runs, one-line usage errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ramda_kernels.cli import main


def test_info_lists_the_reference_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "ramda_kernels" in out
    assert any(line.split()[:3] == ["reference", "cpu", "yes"] for line in out.splitlines())


def test_info_shows_the_cpu_kernel_isa(capsys, monkeypatch):
    """Issue 14 item 12: the ISA changes results at the rounding level, so info names it."""
    from ramda_kernels import _C

    monkeypatch.delenv("RAMDA_CPU_ISA", raising=False)
    assert main(["info"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("CPU: ")]
    assert len(line) == 1 and f"CPU kernel ISA: {_C.cpu_isa()} (best this CPU has" in line[0]
    monkeypatch.setenv("RAMDA_CPU_ISA", "default")
    assert main(["info"]) == 0
    assert "(forced by RAMDA_CPU_ISA=default)" in capsys.readouterr().out


@pytest.mark.parametrize("command", [[], ["info"], ["validate"], ["train"], ["compact"]])
def test_help_has_no_restructuredtext_quotes(capsys, command):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage: ramda-kernels" in text and "`" not in text


def _train(tmp_path, capsys, *flags):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(out), *flags]) == 0
    return out, capsys.readouterr().out


@pytest.mark.parametrize("task, layers, first_group", [
    ("digits-mlp", ["fc1.weight", "fc2.weight", "fc3.weight"], ["fc1.weight", "fc2.weight", "fc3.weight"]),
    ("digits-convnet", ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"],
     ["conv1.weight", "conv2.weight"]),  # dims (0, 2, 3); the Linears' (0,) are another group
])
def test_train_one_epoch_writes_metrics_and_checkpoint(tmp_path, capsys, task, layers, first_group):
    out, text = _train(tmp_path, capsys, "--task", task)
    assert "epoch 1/1" in text and "test acc" in text and "group sparsity" in text
    assert "final: test accuracy" in text
    metrics = json.loads((out / "ramda.json").read_text())
    assert metrics["config"]["task"] == task and metrics["config"]["optimizer"] == "ramda"
    assert len(metrics["epochs"]) == 1
    assert 0.0 <= metrics["final"]["test_accuracy"] <= 1.0
    assert [r["name"] for r in metrics["structure"]["rows"]] == layers
    ckpt = torch.load(out / "ramda.pt", weights_only=False)
    assert set(layers) <= set(ckpt["model"])
    assert ckpt["optimizer"]["param_groups"][0]["param_names"] == first_group


def test_reported_structure_matches_the_saved_weights(tmp_path, capsys):
    # ProxAdamW writes prox outputs directly, so one epoch with a large lambda already has zero groups.
    out, _ = _train(tmp_path, capsys, "--optimizer", "proxadamw", "--lambda", "0.02", "--seed", "3")
    metrics = json.loads((out / "proxadamw.json").read_text())
    weights = torch.load(out / "proxadamw.pt", weights_only=False)["model"]
    rows = {r["name"]: r for r in metrics["structure"]["rows"]}
    # channel-wise: a group of conv2 [64, 32, 3, 3] is one input channel w[:, i]
    conv2_zero = int((weights["conv2.weight"].abs().sum(dim=(0, 2, 3)) == 0).sum())
    fc1_zero = int((weights["fc1.weight"].abs().sum(dim=0) == 0).sum())  # input features
    assert rows["conv2.weight"]["zero_groups"] == conv2_zero and rows["conv2.weight"]["groups"] == 32
    assert rows["fc1.weight"]["zero_groups"] == fc1_zero and rows["fc1.weight"]["groups"] == 256
    assert conv2_zero + fc1_zero > 0, "lambda was meant to zero some groups"
    total_groups = 1 + 32 + 256 + 128
    zero = sum(r["zero_groups"] for r in rows.values())
    assert metrics["final"]["group_sparsity"] == pytest.approx(zero / total_groups)


def test_same_seed_same_run(tmp_path, capsys):
    finals = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        assert main(["train", "--task", "digits-mlp", "--epochs", "2", "--seed", "5", "--out", str(out)]) == 0
        m = json.loads((out / "ramda.json").read_text())
        finals.append([(e["loss"], e["test_accuracy"]) for e in m["epochs"]])
    capsys.readouterr()
    assert finals[0] == finals[1]


def test_adamw_runs_and_is_scored_on_the_same_groups(tmp_path, capsys):
    out, text = _train(tmp_path, capsys, "--task", "digits-mlp", "--optimizer", "adamw")
    metrics = json.loads((out / "adamw.json").read_text())
    assert metrics["structure"]["totals"]["groups"] == 64 + 128 + 64  # input-wise groups of fc1..fc3


@pytest.mark.parametrize("flags, message", [
    (["--optimizer", "nope"], "invalid choice: 'nope'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--lambda", "x"], "invalid float value: 'x'"),
    (["--milestones", "3,2"], "--milestones must be increasing positive epochs"),
    (["--epochs", "2", "--milestones", "5"], "epoch 5 is after the last epoch (2)"),
    (["--optimizer", "adamw", "--lambda", "0.1"], "--lambda needs a regularized optimizer"),
    (["--backend", "fast"], "Invalid backend: 'fast'"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--device", "nodevice"], "--device"),
    (["--optimizer", "proxadamw", "--momentum", "0.5"], "--momentum does not apply to proxadamw"),
])
def test_bad_flags_give_one_line_and_a_nonzero_exit(capsys, flags, message):
    try:
        rc = main(["train", *flags])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("ramda-kernels"), err
    assert message in err


def test_bad_flag_from_the_installed_command_is_one_line():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "ramda_kernels", "train", "--task", "imagenet"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "invalid choice: 'imagenet'" in proc.stderr
