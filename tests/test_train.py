"""``ramda-kernels train``: charlm, --compare, --model/--data, reproducibility (short CPU runs)."""

import json
import textwrap

import pytest
import torch

from ramda_kernels.cli import main


def _run(*flags):
    try:
        return main(["train", *flags])
    except SystemExit as e:
        return e.code


def test_charlm_short_run_reports_perplexity_and_head_groups(tmp_path, capsys):
    out = tmp_path / "lm"
    assert _run("--task", "charlm", "--epochs", "1", "--max-batches", "3", "--out", str(out)) == 0
    text = capsys.readouterr().out
    assert "test ppl" in text and "optimizer" in text and "final: test perplexity" in text
    m = json.loads((out / "ramda.json").read_text())
    e = m["epochs"][0]
    assert 1.0 < e["test_perplexity"] < 256.0  # better than nothing, no worse than uniform over bytes
    assert 0.0 < e["optimizer_share"] < 1.0 and e["optimizer_seconds"] <= e["step_seconds"]
    rows = {r["name"]: r for r in m["structure"]["rows"]}
    assert rows["blocks.0.attn.q.weight"]["groups"] == 4  # one per head: rows of q
    assert rows["blocks.0.attn.out.weight"]["groups"] == 4  # one per head: columns of out
    assert rows["blocks.0.fc1.weight"]["groups"] == 64  # input-wise
    assert not any(name.startswith(("tok.", "pos.")) for name in rows)  # embeddings unregularized
    assert (out / "ramda.png").stat().st_size > 0


def test_charlm_checkpoint_compacts_or_declines_without_crashing(tmp_path, capsys):
    out = tmp_path / "lm"
    assert _run("--task", "charlm", "--epochs", "1", "--max-batches", "2", "--out", str(out)) == 0
    capsys.readouterr()
    rc = main(["compact", str(out / "ramda.pt"), "--out", str(tmp_path / "c")])
    text = capsys.readouterr().out
    assert rc == 0 and "not compacted:" in text  # attention heads: says why not


def test_compare_two_optimizers_writes_one_table_and_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert _run("--task", "digits-mlp", "--compare", "ramda,adamw", "--epochs", "1", "--max-batches", "5",
                "--out", str(out)) == 0
    text = capsys.readouterr().out
    md = (out / "compare.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ramda") or ln.startswith("| adamw")]
    assert len(rows) == 2 and "group sparsity" in md and "optimizer time" in md
    assert rows[0] in text  # the table is printed too
    for name in ("compare.png", "ramda.png", "adamw.png", "ramda.json", "adamw.json"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "adamw.json").read_text())["config"]["lr"] == 1e-3  # its own default


def test_compare_groupings_side_by_side_with_compaction(tmp_path, capsys):
    """Issue 15 item 4: OPT:GROUPING entries, each with its own files and row;
    --compact adds what compaction kept, from the run's own trained model."""
    from ramda_kernels import tasks
    from ramda_kernels.compact import count_flops, count_params

    out = tmp_path / "cmp"
    assert _run("--task", "digits-resnet", "--compare", "ramda:default,ramda:units,adamw", "--compact",
                "--epochs", "1", "--max-batches", "3", "--out", str(out)) == 0
    text = capsys.readouterr().out
    md = (out / "compare.md").read_text()
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
            for ln in md.splitlines() if ln.startswith("| ramda") or ln.startswith("| adamw")}
    groupings = {k.split(" ")[0]: v[0] for k, v in rows.items()}
    assert groupings == {"ramda-default": "task default", "ramda-units": "units", "adamw": "task default"}
    assert "multiply-adds after compact" in md and md.splitlines()[2] in text
    model = tasks.DigitsResNet()
    x = torch.zeros(2, 1, 8, 8)
    for name in ("ramda-default", "ramda-units", "adamw"):
        m = json.loads((out / f"{name}.json").read_text())
        c = m["compaction"]
        assert c["flops_before"] == count_flops(model, x) and c["params_before"] == count_params(model)
        assert c["flops_after"] <= c["flops_before"] and c["seconds_before"] > 0
        assert (out / f"{name}.pt").stat().st_size > 0
    assert json.loads((out / "ramda-units.json").read_text())["config"]["grouping"] == "units"


def test_user_model_and_data_from_a_module(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_rk_task.py").write_text(textwrap.dedent("""
        import torch
        from ramda_kernels.tasks import Data

        def model():
            return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

        def data():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(100, 4, generator=g)
            y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
            return Data(x[:80], y[:80], x[80:], y[80:])

        def not_data():
            return 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    assert _run("--model", "my_rk_task:model", "--data", "my_rk_task:data", "--epochs", "1",
                "--out", str(out)) == 0
    m = json.loads((out / "ramda.json").read_text())
    assert [r["name"] for r in m["structure"]["rows"]] == ["0.weight", "2.weight"]
    assert m["config"]["model"] == "my_rk_task:model"
    capsys.readouterr()
    # a path works as well as a module name
    assert _run("--model", f"{tmp_path / 'my_rk_task.py'}:model", "--data", "my_rk_task:data",
                "--epochs", "1", "--out", str(out)) == 0
    capsys.readouterr()
    assert _run("--model", "my_rk_task:model", "--data", "my_rk_task:not_data", "--epochs", "1",
                "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "returned int, expected ramda_kernels.tasks.Data" in err


@pytest.mark.parametrize("flags, message", [
    (["--compare", "ramda,nope"], "--compare: unknown optimizer 'nope'"),
    (["--compare", "ramda,ramda"], "--compare needs distinct"),
    (["--compare", "ramda:units,ramda:units"], "--compare needs distinct"),
    (["--compare", "ramda:default,ramda:nope"], "--compare: unknown grouping 'nope' in 'ramda:nope'"),
    (["--compare", "ramda,adamw", "--lr", "0.1"], "--lr cannot be combined with --compare"),
    (["--compare", "ramda", "--optimizer", "adamw"], "--optimizer cannot be combined with --compare"),
    (["--model", "nocolon"], "--model must be MODULE:FUNCTION"),
    (["--model", "no_such_module_rk:f"], "--model: cannot import 'no_such_module_rk'"),
    (["--data", "json:no_such_function"], "--data: module 'json' has no function 'no_such_function'"),
    (["--model", "/no/such/file.py:f"], "--model: no such file"),
    (["--max-batches", "-1"], "--max-batches must be >= 0"),
])
def test_bad_flags_give_one_line(capsys, flags, message):
    assert _run(*flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ramda-kernels train: error:"), err
    assert message in err


def test_same_seed_and_backend_give_identical_metrics(tmp_path, capsys):
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        assert _run("--task", "charlm", "--epochs", "2", "--max-batches", "3", "--milestones", "1",
                    "--seed", "7", "--out", str(out)) == 0
        m = json.loads((out / "ramda.json").read_text())
        runs.append([{k: v for k, v in e.items() if "seconds" not in k and k != "optimizer_share"}
                     for e in m["epochs"]] + [m["structure"]])
    capsys.readouterr()
    assert runs[0] == runs[1]
    assert torch.load(tmp_path / "run0" / "ramda.pt", weights_only=False)["config"]["seed"] == 7


def test_compact_takes_a_user_model_checkpoint(tmp_path, capsys, monkeypatch):
    """Issue 14 item 4: a --model checkpoint compacts (it was refused before)."""
    from ramda_kernels.compact import load_compact

    (tmp_path / "my_rk_model2.py").write_text(
        "import torch\ndef model():\n    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert _run("--task", "digits-mlp", "--model", "my_rk_model2:model", "--epochs", "1",
                "--max-batches", "2", "--out", str(out)) == 0
    ckpt = torch.load(out / "ramda.pt", weights_only=False)
    with torch.no_grad():  # plant 5 unused hidden neurons: fc2's input groups 0..4
        ckpt["model"]["2.weight"][:, :5] = 0
    torch.save(ckpt, out / "ramda.pt")
    capsys.readouterr()
    assert main(["compact", str(out / "ramda.pt"), "--out", str(tmp_path / "c"), "--repeats", "0"]) == 0
    text = capsys.readouterr().out
    assert "outputs equal" in text and "model_fn=<my_rk_model2:model>" in text
    report = json.loads((tmp_path / "c" / "compact.json").read_text())
    assert report["model"] == "my_rk_model2:model" and report["units_removed"] == 5
    with pytest.raises(ValueError, match="pass model_fn="):
        load_compact(str(tmp_path / "c" / "compact.pt"))
    import my_rk_model2

    small = load_compact(str(tmp_path / "c" / "compact.pt"), model_fn=my_rk_model2.model)
    assert small[0].out_features == 27 and small[2].in_features == 27
    full = my_rk_model2.model()
    full.load_state_dict(ckpt["model"])
    full.eval()
    x = torch.rand(16, 64)
    torch.testing.assert_close(small(x), full(x), atol=1e-5, rtol=1e-5)
    # The same --model flag as train's names (or replaces) the model's function.
    assert main(["compact", str(out / "ramda.pt"), "--model", "no_such_mod_rk:model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot import 'no_such_mod_rk'" in err


def test_task_overrides_do_not_apply_to_a_user_model(tmp_path, capsys, monkeypatch):
    """Issue 14 item 5: charlm's head-group patterns name charlm's layers, not the user's."""
    (tmp_path / "my_rk_lm.py").write_text(
        "import torch\ndef model():\n    return torch.nn.Sequential(torch.nn.Embedding(256, 16), "
        "torch.nn.Linear(16, 256))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for extra in ([], ["--grouping", "input"]):
        out = tmp_path / f"run{len(extra)}"
        assert _run("--task", "charlm", "--model", "my_rk_lm:model", "--epochs", "1", "--max-batches", "1",
                    "--out", str(out), *extra) == 0, capsys.readouterr().err
        rows = json.loads((out / "ramda.json").read_text())["structure"]["rows"]
        assert [(r["name"], r["groups"]) for r in rows] == [("1.weight", 16)]
    capsys.readouterr()


_BN_MODEL = """
import torch
from torch import nn

def model():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 16, 10))
"""


def test_train_and_compact_recalibrate_batchnorm(tmp_path, capsys, monkeypatch):
    """Issue 14 item 10: the saved BatchNorm statistics are the ones of the final
    weights (recomputed on the sample train names), unless --no-recalibrate-bn."""
    from ramda_kernels import tasks
    from ramda_kernels.batchnorm import recalibrate_batchnorm
    from ramda_kernels.commands.train import RECALIBRATE_BATCHES

    (tmp_path / "my_rk_bn.py").write_text(_BN_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_rk_bn

    runs = {}
    for flag in ([], ["--no-recalibrate-bn"]):
        out = tmp_path / f"run{len(flag)}"
        assert _run("--model", "my_rk_bn:model", "--epochs", "1", "--max-batches", "3", "--batch-size", "32",
                    "--out", str(out), *flag) == 0
        text = capsys.readouterr().out
        assert ("are recalibrated on" in text) == (not flag) and ("not recalibrated" in text) == bool(flag)
        state = torch.load(out / "ramda.pt", weights_only=False)["model"]
        runs["off" if flag else "on"] = state
    # Same weights either way (training uses batch statistics), different running statistics.
    assert torch.equal(runs["on"]["0.weight"], runs["off"]["0.weight"])
    assert not torch.allclose(runs["on"]["1.running_mean"], runs["off"]["1.running_mean"])
    x = tasks.get("digits-convnet").load().x_train
    sample = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:RECALIBRATE_BATCHES * 32]]
    model = my_rk_bn.model()
    model.load_state_dict(runs["off"])
    recalibrate_batchnorm(model, sample, batch_size=32)
    torch.testing.assert_close(runs["on"]["1.running_mean"], model[1].running_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(runs["on"]["1.running_var"], model[1].running_var, atol=1e-6, rtol=1e-6)
    # compact recalibrates too (it says so), and keeps the checkpoint's with the flag.
    for flag in ([], ["--no-recalibrate-bn"]):
        assert main(["compact", str(tmp_path / "run1" / "ramda.pt"), "--out", str(tmp_path / f"c{len(flag)}"),
                     "--repeats", "0", *flag]) == 0
        assert ("recalibrated BatchNorm" in capsys.readouterr().out) == (not flag)


def test_sparsity_onset_is_printed_and_ramp_steps_moves_it(tmp_path, capsys):
    """Issue 14 item 11: 3 steps per epoch, milestone 1, 2 epochs: the default ramp
    (100 steps for c0 0.1) ends after the run, --ramp-steps 2 at step 3 + 2 = 5 of 6."""
    common = ["--task", "digits-mlp", "--epochs", "2", "--milestones", "1", "--max-batches", "3",
              "--lambda", "1.0"]
    assert _run(*common, "--out", str(tmp_path / "a")) == 0
    text = capsys.readouterr().out
    assert ("sparsity onset: groups can become exactly zero 100 optimizer steps after the last milestone "
            "(epoch 1), at step 103 of 6; this run ends 97 steps before that") in text
    assert json.loads((tmp_path / "a" / "ramda.json").read_text())["final"]["group_sparsity"] == 0.0
    assert _run(*common, "--ramp-steps", "2", "--out", str(tmp_path / "b")) == 0
    text = capsys.readouterr().out
    assert "2 optimizer steps after the last milestone (epoch 1), at step 5 of 6\n" in text
    assert json.loads((tmp_path / "b" / "ramda.json").read_text())["final"]["group_sparsity"] > 0.5
    assert _run("--ramp-steps", "0") == 2
    assert "--ramp-steps must be at least 1" in capsys.readouterr().err
    assert _run(*common, "--milestones", "", "--out", str(tmp_path / "c")) == 0
    assert "sparsity onset: never" in capsys.readouterr().out


def _result(optimizer, accuracy, sparsity, model=None):
    from ramda_kernels.commands.train import Config, Result

    cfg = Config(task="digits-convnet", optimizer=optimizer, regularizer="group_lasso", grouping=None,
                 lambda_=1e-3, lr=0.1, momentum=None, epochs=len(accuracy), milestones=[], backend="auto",
                 device="cpu", seed=0, batch_size=64, out="x", model=model)
    history = [{"epoch": e + 1, "test_accuracy": a, "group_sparsity": g}
               for e, (a, g) in enumerate(zip(accuracy, sparsity))]
    return Result(cfg, None, None, None, None, history, None)


def test_plot_defects_are_fixed():
    """Issue 14 item 12: title of a --model run, whole-number epoch ticks,
    0% lines that stay apart, an accuracy axis that shows a one-point difference."""
    import matplotlib.pyplot as plt

    from ramda_kernels.commands.train import figure, run_label

    user = _result("ramda", [0.5, 0.9, 0.95], [0, 0, 0], model="mine.py:net")
    assert run_label(user.config) == "mine.py:net on digits-convnet data"
    runs = [_result("ramda", [0.10, 0.90, 0.96, 0.97], [0, 0, 0, 0]),
            _result("adamw", [0.12, 0.91, 0.97, 0.98], [0, 0, 0, 0])]
    fig = figure(runs, "t")
    acc, sparsity = fig.axes
    for ax in (acc, sparsity):
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 4]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    styles = {(ln.get_linestyle(), ln.get_marker()) for ln in sparsity.get_lines()}
    assert len(styles) == 2  # equal 0% lines are drawn differently
    lo, hi = acc.get_ylim()
    assert lo > 50 and hi < 100 and "zoomed" in acc.get_ylabel()  # 96-98% readable, not 10-98%
    plt.close(fig)


def test_units_grouping_on_digits_resnet_counts_units(tmp_path, capsys):
    out = tmp_path / "res"
    assert _run("--task", "digits-resnet", "--grouping", "units", "--epochs", "1", "--max-batches", "2",
                "--out", str(out)) == 0
    m = json.loads((out / "ramda.json").read_text())
    totals = m["structure"]["totals"]
    # 32 residual channels (stem, both blocks' second convs, fc columns) + 32 inner channels
    # in each of the two blocks
    assert totals["units"] == 96
    assert {r["regularizer"] for r in m["structure"]["rows"]} == {"units"}
    assert "units: " in capsys.readouterr().out
