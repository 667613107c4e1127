"""``compact_model`` / ``ramda-kernels compact``: smaller models with equal outputs.

Zero groups are set by hand so that the expected sizes can be counted on paper:
a channel-wise zero group ``conv2.weight[:, c]`` removes output channel ``c`` of
conv1; input-wise zero groups of fc1 remove a conv2 channel only when all
``2*2`` features it feeds through flatten are zero; an input-wise zero group
``fc2.weight[:, j]`` removes neuron ``j`` of fc1.
"""

import os

import pytest
import torch
from torch import nn

from ramda_kernels import cli, tasks
from ramda_kernels.compact import CompactionError, compact_model, load_compact, verify

ATOL = 1e-5


def _convnet(seed=0):
    torch.manual_seed(seed)
    return tasks.get("digits-convnet").model()


def _inputs(shape, n=64, seed=1):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


def _assert_same_outputs(a, b, x):
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), atol=ATOL, rtol=1e-5)


def _convnet_params(c1, c2, hidden):
    """Parameter count of DigitsConvNet with c1/c2 channels and ``hidden`` neurons."""
    return ((1 * 9 + 1) * c1 + (c1 * 9 + 1) * c2 + (c2 * 4 + 1) * hidden + (hidden + 1) * 10)


def test_param_count_formula_matches_task_model():
    assert sum(p.numel() for p in _convnet().parameters()) == _convnet_params(32, 64, 128)


def test_convnet_zero_groups_are_removed_exactly():
    model = _convnet()
    conv2_zero = [0, 3, 4, 17, 31]     # conv2 channel-wise groups -> conv1 channels
    fc1_zero_channels = [2, 5, 63]     # all 4 flattened features -> conv2 channels
    fc1_partial = 10                   # 3 of its 4 features zero: channel stays
    fc2_zero = [1, 2, 50, 127]         # fc2 input-wise groups -> fc1 neurons
    with torch.no_grad():
        model.conv2.weight[:, conv2_zero] = 0
        for c in fc1_zero_channels:
            model.fc1.weight[:, 4 * c:4 * c + 4] = 0
        model.fc1.weight[:, 4 * fc1_partial:4 * fc1_partial + 3] = 0
        model.fc2.weight[:, fc2_zero] = 0
    x = _inputs((1, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    small, report = compact_model(model, x[:2], eval_inputs=x)

    c1, c2, h = 32 - len(conv2_zero), 64 - len(fc1_zero_channels), 128 - len(fc2_zero)
    assert (small.conv1.out_channels, small.conv2.in_channels) == (c1, c1)
    assert (small.conv2.out_channels, small.fc1.in_features) == (c2, 4 * c2)
    assert (small.fc1.out_features, small.fc2.in_features, small.fc2.out_features) == (h, h, 10)
    expected = _convnet_params(c1, c2, h)
    assert sum(p.numel() for p in small.parameters()) == expected
    assert (report.params_before, report.params_after) == (_convnet_params(32, 64, 128), expected)
    assert report.units_removed == len(conv2_zero) + len(fc1_zero_channels) + len(fc2_zero)
    # MACs per sample: conv 8x8 and 4x4 outputs, 3x3 kernels.
    assert report.flops_after == 64 * c1 * 9 + 16 * c2 * c1 * 9 + 4 * c2 * h + h * 10
    assert report.max_abs_diff is not None and report.max_abs_diff <= ATOL
    assert [c.zero_inputs_left for c in report.layers] == [0, 0, 3, 0]  # the partial channel
    _assert_same_outputs(model, small, x)
    for k, v in model.state_dict().items():  # the original is left alone
        assert torch.equal(v, before[k]), k
    # The kept slices are the original's: conv1 keeps the channels not zeroed in conv2.
    keep1 = [c for c in range(32) if c not in conv2_zero]
    torch.testing.assert_close(small.conv1.weight, model.conv1.weight[keep1], atol=0, rtol=0)


def test_model_without_zero_groups_keeps_its_size():
    model = _convnet(seed=3)
    x = _inputs((1, 8, 8))
    small, report = compact_model(model, x[:2], eval_inputs=x)
    assert report.params_after == report.params_before == _convnet_params(32, 64, 128)
    assert report.units_removed == 0
    assert [(c.units_before, c.units_after) for c in report.layers] == [(32, 32), (64, 64), (128, 128), (10, 10)]
    _assert_same_outputs(model, small, x)


def test_output_layer_and_network_input_are_never_pruned():
    torch.manual_seed(0)
    model = tasks.get("digits-mlp").model()
    with torch.no_grad():
        model.fc1.weight[:, :20] = 0        # input-wise groups of fc1 = pixels: the network input
        model.fc3.weight[3] = 0             # a whole output row of the last layer
        model.fc3.bias[3] = 0
        model.fc3.weight[:, [0, 7]] = 0     # fc3 input-wise -> fc2 neurons 0 and 7
    x = _inputs((64,))
    small, report = compact_model(model, x[:2], eval_inputs=x)
    assert small.fc1.in_features == 64 and small.fc3.out_features == 10
    assert (small.fc2.out_features, small.fc3.in_features) == (62, 62)
    assert [c.zero_inputs_left for c in report.layers] == [20, 0, 0]
    _assert_same_outputs(model, small, x)


def test_all_unused_units_keep_one():
    model = _convnet()
    with torch.no_grad():
        model.fc2.weight.zero_()
    x = _inputs((1, 8, 8))
    small, report = compact_model(model, x[:2], eval_inputs=x)
    assert small.fc1.out_features == 1 and report.kept_last_units == 1
    _assert_same_outputs(model, small, x)


class _ResNetish(nn.Module):
    """BatchNorm, a residual add (conv0 and conv1 outputs coupled), a global mean
    pool and an output computed after the last layer."""

    def __init__(self):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.mid = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        h = torch.relu(self.bn0(self.conv0(x)))
        h = h + torch.relu(self.bn1(self.conv1(h)))
        return self.fc(torch.relu(self.mid(h)).mean((2, 3))) * 2.0


def test_residual_channel_needs_every_consumer_zero():
    torch.manual_seed(0)
    model = _ResNetish()
    with torch.no_grad():
        for bn in (model.bn0, model.bn1):  # non-trivial running statistics
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
        # Channel 2 of the residual stream: read by conv1 and mid -> removable.
        model.conv1.weight[:, 2] = 0
        model.mid.weight[:, 2] = 0
        # Channel 5: only mid ignores it, conv1 still reads it -> stays.
        model.mid.weight[:, 5] = 0
        # fc ignores mid's channel 4 -> removable.
        model.fc.weight[:, 4] = 0
    x = _inputs((3, 6, 6))
    small, _ = compact_model(model, x[:2], eval_inputs=x)
    assert (small.conv0.out_channels, small.bn0.num_features, small.conv1.out_channels,
            small.bn1.num_features, small.mid.in_channels) == (7, 7, 7, 7, 7)
    assert (small.mid.out_channels, small.fc.in_features, small.fc.out_features) == (5, 5, 5)
    _assert_same_outputs(model, small, x)


class _WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


def test_units_mixed_by_layernorm_are_kept():
    torch.manual_seed(0)
    model = _WithLayerNorm()
    with torch.no_grad():
        model.fc2.weight[:, :4] = 0  # unused by fc2, but LayerNorm's statistics use them
    x = _inputs((8,))
    small, report = compact_model(model, x[:2], eval_inputs=x)
    assert small.fc1.out_features == 16
    assert any(s.startswith("fc1") for s in report.skipped), report.skipped
    _assert_same_outputs(model, small, x)


def test_verify_notices_a_wrong_model():
    model = _convnet()
    with torch.no_grad():
        model.conv2.weight[:, :4] = 0
    x = _inputs((1, 8, 8))
    small, _ = compact_model(model, x[:2])
    with torch.no_grad():
        small.fc2.bias[0] += 1e-4  # above atol + rtol*|logit| for these small logits
    with pytest.raises(CompactionError, match="differs"):
        verify(model, small, x)


def _write_checkpoint(path, model, task="digits-convnet"):
    """A checkpoint in ``ramda-kernels train``'s format (config dict + state_dict)."""
    torch.save({"config": {"task": task, "optimizer": "ramda", "epochs": 1},
                "torch": torch.__version__, "model": model.state_dict(), "final": {}}, path)


def test_command_end_to_end(tmp_path, capsys):
    model = _convnet()
    with torch.no_grad():
        model.conv2.weight[:, [1, 2]] = 0
        model.fc2.weight[:, [0, 5, 6]] = 0
    ckpt = tmp_path / "ramda.pt"
    _write_checkpoint(ckpt, model)
    out = tmp_path / "small"
    threads = torch.get_num_threads()
    assert cli.main(["compact", str(ckpt), "--out", str(out), "--repeats", "1", "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads
    printed = capsys.readouterr().out
    assert "parameters" in printed and "MACs" in printed and "CPU time" in printed
    assert sorted(os.listdir(out)) == ["compact.json", "compact.pt"]
    import json

    report = json.loads((out / "compact.json").read_text())
    assert report["threads"] == 1
    assert report["params_after"] == _convnet_params(30, 64, 125)
    assert report["params_before"] == _convnet_params(32, 64, 128)
    assert report["seconds_before"] > 0 and report["seconds_after"] > 0
    small = load_compact(str(out / "compact.pt"))
    assert sum(p.numel() for p in small.parameters()) == _convnet_params(30, 64, 125)
    _assert_same_outputs(model, small, tasks.get("digits-convnet").load().x_test)


@pytest.mark.parametrize("case", ["missing", "garbage", "unknown-task", "no-model", "wrong-shapes",
                                  "bad-threads"])
def test_command_bad_checkpoint_is_one_line(tmp_path, capsys, case):
    path = tmp_path / "ckpt.pt"
    extra = []
    if case == "bad-threads":
        _write_checkpoint(path, _convnet())
        extra = ["--threads", "0"]
    elif case == "wrong-shapes":
        _write_checkpoint(path, tasks.get("digits-mlp").model())  # labelled digits-convnet
    elif case == "garbage":
        path.write_text("not a checkpoint")
    elif case == "unknown-task":
        _write_checkpoint(path, _convnet(), task="no-such-task")
    elif case == "no-model":
        torch.save({"config": {"task": "digits-convnet"}}, path)
    assert cli.main(["compact", str(path), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("ramda-kernels compact: error: ") and "Traceback" not in err
    assert not (tmp_path / "o").exists()


class _TwoOutputs(nn.Module):
    """Returns fc1's output itself as well as the logits computed from it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = self.fc1(x)
        return h, self.fc2(torch.relu(h))


def test_units_of_a_returned_tensor_are_kept():
    torch.manual_seed(0)
    model = _TwoOutputs()
    with torch.no_grad():
        model.fc2.weight[:, :4] = 0  # unused by fc2, but returned to the caller
    x = _inputs((8,))
    small, report = compact_model(model, x[:2], eval_inputs=x)
    assert small.fc1.out_features == 16
    assert "fc1: is a model output" in report.skipped


def test_constant_units_fold_into_linear_biases():
    """Output-wise / filter-wise zero groups: a zero weight row makes a unit the
    constant act(bias); Linear consumers absorb it, a Conv consumer cannot unless it is 0."""
    model = _convnet()
    with torch.no_grad():
        model.conv1.weight[[0, 1, 2]] = 0  # read by conv2 (zero padding): kept if relu(bias) != 0
        model.conv1.bias[[0, 1]] = 0.5
        model.conv1.bias[2] = -1.0         # relu(-1) = 0: an exactly zero map, removed
        model.conv2.weight[[3, 8, 9]] = 0  # read by fc1 through flatten: folded
        model.conv2.bias[8] = -1.0         # relu(-1) = 0: folded too, nothing to add
        model.fc1.weight[[5, 6]] = 0       # read by fc2: folded
        model.fc1.bias[5] = 0.7
    x = _inputs((1, 8, 8))
    small, report = compact_model(model, x[:2], eval_inputs=x)
    assert (small.conv1.out_channels, small.conv2.out_channels, small.fc1.out_features) == (31, 61, 126)
    assert report.folded_units == 6 and report.constant_units == 2
    assert sum(p.numel() for p in small.parameters()) == _convnet_params(31, 61, 126)
    _assert_same_outputs(model, small, x)

    unfolded, report = compact_model(model, x[:2], fold_constants=False)
    assert sum(p.numel() for p in unfolded.parameters()) == _convnet_params(32, 64, 128)
    assert report.folded_units == 0 and report.constant_units == 8


class _InputAdded(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x) + x))


def test_units_added_to_the_network_input_are_kept():
    torch.manual_seed(0)
    model = _InputAdded()
    with torch.no_grad():
        model.fc1.weight[2] = 0     # fc1 unit 2 = bias, but x[:, 2] is added after it
        model.fc2.weight[:, 3] = 0  # unused, but x keeps its 8 features: h + x needs 8
    x = _inputs((8,))
    small, report = compact_model(model, x[:2], eval_inputs=x)
    assert small.fc1.out_features == 8 and report.folded_units == 0
    assert any("outside the graph" in s for s in report.skipped), report.skipped
    _assert_same_outputs(model, small, x)


def test_fold_refuses_a_unit_that_is_not_constant():
    from ramda_kernels.compact import _fold_constants

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[0] = 1.0  # unit 0 = relu(sum(x) + b) varies with x
    bias = model[2].bias.clone()
    x = _inputs((4,), n=8)
    assert _fold_constants(model, x, {0: [(model[2], 0)]}) == []
    assert torch.equal(model[2].bias, bias)
    with torch.no_grad():
        model[0].weight[0] = 0
        model[0].bias[0] = 0.5
    assert _fold_constants(model, x, {0: [(model[2], 0)]}) == [0]
    assert not model[2].weight[:, 0].any()


class _Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw, self.bn = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.bn(self.dw(torch.relu(self.conv(x)))))
        return self.fc(torch.relu(self.pw(h)).mean((2, 3)))


def test_depthwise_channel_goes_with_its_input_channel():
    torch.manual_seed(0)
    model = _Depthwise()
    with torch.no_grad():
        model.pw.weight[:, [1, 6]] = 0  # pointwise ignores channels 1, 6 of the depthwise stage
        model.bn.running_mean.uniform_(-1, 1)
    x = _inputs((3, 5, 5))
    small, _ = compact_model(model, x[:2], eval_inputs=x)
    assert (small.conv.out_channels, small.dw.in_channels, small.dw.out_channels, small.dw.groups,
            small.bn.num_features, small.pw.in_channels) == (6, 6, 6, 6, 6, 6)
    _assert_same_outputs(model, small, x)


def test_command_on_a_real_train_checkpoint(tmp_path, capsys):
    """The checkpoint ``ramda-kernels train`` writes (one short epoch) compacts."""
    pytest.importorskip("ramda_kernels.commands.train")
    assert cli.main(["train", "--epochs", "1", "--batch-size", "256", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    out = tmp_path / "compact"
    assert cli.main(["compact", str(tmp_path / "ramda.pt"), "--out", str(out), "--repeats", "0"]) == 0
    assert "outputs equal" in capsys.readouterr().out
    small = load_compact(str(out / "compact.pt"))
    model = tasks.get("digits-convnet").model()
    model.load_state_dict(torch.load(tmp_path / "ramda.pt", weights_only=False)["model"])
    _assert_same_outputs(model, small, tasks.get("digits-convnet").load().x_test)


class _Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 5, 3, padding=1)
        self.c = nn.Conv2d(11, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16, 3)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return self.fc(torch.relu(self.c(h)).flatten(1))


def test_concatenated_channels_map_back_to_their_producers():
    torch.manual_seed(0)
    model = _Concat()
    with torch.no_grad():
        model.c.weight[:, [0, 2, 6, 9, 10]] = 0  # a's channels 0, 2; b's channels 0, 3, 4
    x = _inputs((3, 4, 4))
    small, _ = compact_model(model, x[:2], eval_inputs=x)
    assert (small.a.out_channels, small.b.out_channels, small.c.in_channels) == (4, 2, 6)
    torch.testing.assert_close(small.b.weight, model.b.weight[[1, 2]], atol=0, rtol=0)
    _assert_same_outputs(model, small, x)


def test_transformer_mlp_on_3d_input_compacts_like_on_2d():
    """Issue 14 item 2: a Linear on [N, T, F] runs view -> addmm -> view; the
    addmm is the consumer's own product, not an op that mixes units."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    with torch.no_grad():
        model[2].weight[:, :20] = 0
    for shape in ((8,), (5, 8)):
        x = _inputs(shape, n=6)
        small, report = compact_model(model, x[:2], eval_inputs=x)
        assert (small[0].out_features, small[2].in_features) == (12, 12), (shape, report.skipped)
        assert report.skipped == ["2: is a model output"]
        _assert_same_outputs(model, small, x)


def test_charlm_mlp_neurons_are_removed():
    """Issue 14 item 2: charlm's fc1 neurons whose fc2 input groups are zero go."""
    torch.manual_seed(0)
    model = tasks.CharTransformer()
    with torch.no_grad():
        model.blocks[1].fc2.weight[:, :100] = 0
        model.blocks[0].fc2.weight[:, [5, 6, 7]] = 0
    x = torch.randint(0, 256, (6, 64), generator=torch.Generator().manual_seed(1))
    small, report = compact_model(model, x[:2], eval_inputs=x)
    assert (small.blocks[0].fc1.out_features, small.blocks[1].fc1.out_features) == (253, 156)
    assert (small.blocks[0].fc2.in_features, small.blocks[1].fc2.in_features) == (253, 156)
    assert report.units_removed == 103
    assert report.max_abs_diff <= ATOL
    heads = {c.name: (c.units_before, c.units_after) for c in report.layers if c.name.endswith("attn")}
    assert heads == {"blocks.0.attn": (4, 4), "blocks.1.attn": (4, 4)}, report.layers


class _TupleOut(nn.Module):
    """Returns a tuple with a non-tensor (a cache-like object) and a dict, as Hugging Face models do."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        logits = self.fc2(torch.relu(self.fc1(x)))
        return logits, object(), {"extra": None, "logits2": logits * 2}


def test_tuple_and_dict_outputs_are_accepted():
    torch.manual_seed(0)
    model = _TupleOut()
    with torch.no_grad():
        model.fc2.weight[:, [1, 4, 9]] = 0
    x = _inputs((8,))
    small, report = compact_model(model, x[:2], eval_inputs=x)
    assert small.fc1.out_features == 13 and report.units_removed == 3
    assert report.max_abs_diff <= ATOL


# -- zero unit groups (group_parameters(grouping="units")) ------------------

class _ResNet(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.fc = nn.Linear(c * 16, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(h + self.b2(self.c2(torch.relu(self.b1(self.c1(h))))))
        return self.fc(h.flatten(1))


def _zero_units(group, which):
    """Set every element of the units ``which`` of a unit param group to zero."""
    with torch.no_grad():
        for k in which:
            for i, dim, (a, b, c) in group["units"][k]:
                p = group["params"][i]
                idx = [slice(None)] * p.dim()
                idx[dim] = slice(a, b, c)
                p[tuple(idx)] = 0


def _macs_resnet(c_res, c_in, c=6):
    """Multiply-adds per 4x4 sample: stem (1 -> c_res), c1 (c_res -> c_in), c2 (c_in -> c_res), fc."""
    return 16 * 9 * (1 * c_res + c_res * c_in + c_in * c_res) + 16 * c_res * 10


@pytest.mark.parametrize("residual, inner", [(1, 0), (0, 2), (2, 3)])
def test_zero_units_of_a_resnet_are_removed_with_equal_outputs(residual, inner):
    from ramda_kernels.grouping import group_parameters

    torch.manual_seed(0)
    model = _ResNet()
    x = _inputs((1, 4, 4))
    model.train()
    model(x)  # nonzero running statistics: a zero unit must stay zero through BatchNorm
    (group,) = [g for g in group_parameters(model, lambda_=1e-3, grouping="units", example_inputs=x)
                if "units" in g]
    res = [k for k, u in enumerate(group["units"])
           if group["param_names"][u[0][0]] in ("c2.weight", "stem.weight")]
    inn = [k for k, u in enumerate(group["units"]) if group["param_names"][u[0][0]] == "c1.weight"]
    _zero_units(group, res[:residual] + inn[:inner])
    small, report = compact_model(model, x, eval_inputs=x)
    _assert_same_outputs(model, small, x)
    assert report.flops_before == _macs_resnet(6, 6)
    assert report.flops_after == _macs_resnet(6 - residual, 6 - inner)
    assert small.stem.out_channels == 6 - residual and small.c1.out_channels == 6 - inner
    assert small.fc.in_features == 16 * (6 - residual)


def test_charlm_heads_are_removed_and_replayed(tmp_path):
    """Issue 15 item 3: a charlm head whose output-projection columns are zero
    goes with its q, k, v rows; the saved model rebuilds from the task."""
    from ramda_kernels.compact import load_compact, save_compact

    torch.manual_seed(0)
    model = tasks.CharTransformer()  # d 64, 4 heads of 16
    with torch.no_grad():
        model.blocks[0].attn.out.weight[:, 16:32] = 0
        model.blocks[1].attn.out.weight[:, 0:16] = 0
        model.blocks[1].attn.out.weight[:, 48:64] = 0
        model.blocks[1].attn.out.weight[:, 20] = 0  # part of a head: stays
    x = torch.randint(0, 256, (6, 64), generator=torch.Generator().manual_seed(1))
    small, report = compact_model(model, x[:2], eval_inputs=x)
    a0, a1 = small.blocks[0].attn, small.blocks[1].attn
    assert (a0.heads, a1.heads) == (3, 2)
    assert (a0.q.out_features, a0.k.out_features, a0.v.out_features, a0.out.in_features) == (48,) * 4
    assert (a1.q.out_features, a1.out.in_features) == (32, 32)
    assert report.max_abs_diff <= ATOL
    changes = {c.name: (c.kind, c.units_before, c.units_after) for c in report.layers}
    assert changes["blocks.1.attn"] == ("Attention heads", 4, 2), changes
    path = tmp_path / "charlm.pt"
    save_compact(str(path), small, task="charlm", example_shape=(2, 64), example_dtype=torch.int64)
    again = load_compact(str(path))
    assert again.blocks[1].attn.heads == 2
    torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)
