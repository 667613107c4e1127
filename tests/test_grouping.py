"""group_parameters: the paper's default grouping, overrides, merging, errors.

Expected dims are written out by hand from docs/math.md section 3 (weight layouts
``Linear [out, in]``, ``Conv [out, in, *k]``, ``ConvTranspose [in, out, *k]``).
"""

import pytest
import torch
from torch import nn

import ramda_kernels as rk
from ramda_kernels.grouping import group_parameters


def settings(groups):
    """name -> the group's keys other than params/param_names."""
    out = {}
    for g in groups:
        rest = {k: v for k, v in g.items() if k not in ("params", "param_names")}
        assert len(g["params"]) == len(g["param_names"])
        for name in g["param_names"]:
            assert name not in out, f"{name} is in two groups"
            out[name] = rest
    return out


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3)
        self.c2 = nn.Conv2d(3, 4, 3)
        self.c3 = nn.Conv3d(4, 5, 3)
        self.ct = nn.ConvTranspose2d(5, 6, 3)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(7)
        self.gn = nn.GroupNorm(2, 4)
        self.emb = nn.Embedding(10, 7)
        self.fc1 = nn.Linear(7, 8)
        self.fc2 = nn.Linear(8, 2)


def test_defaults_channel_and_input_wise():
    s = settings(group_parameters(Net(), lambda_=0.5))
    gl = {"regularizer": "group_lasso", "lambda_": 0.5}
    assert s["c1.weight"] == {**gl, "dims": (0, 2)}
    assert s["c2.weight"] == {**gl, "dims": (0, 2, 3)}
    assert s["c3.weight"] == {**gl, "dims": (0, 2, 3, 4)}
    assert s["ct.weight"] == {**gl, "dims": (1, 2, 3)}  # [in, out, kh, kw]: one group per input channel
    assert s["fc1.weight"] == {**gl, "dims": (0,)}
    assert s["fc2.weight"] == {**gl, "dims": (0,)}
    unreg = ["c1.bias", "c2.bias", "c3.bias", "ct.bias", "bn.weight", "bn.bias", "ln.weight",
             "ln.bias", "gn.weight", "gn.bias", "emb.weight", "fc1.bias", "fc2.bias"]
    for name in unreg:
        assert s[name] == {"regularizer": "none"}, name
    assert len(s) == 6 + len(unreg)


def test_filter_and_output_wise():
    s = settings(group_parameters(Net(), conv="filter", linear="output"))
    assert s["c1.weight"]["dims"] == (1, 2)
    assert s["c2.weight"]["dims"] == (1, 2, 3)
    assert s["c3.weight"]["dims"] == (1, 2, 3, 4)
    assert s["ct.weight"]["dims"] == (0, 2, 3)
    assert s["fc1.weight"]["dims"] == (1,)
    assert "lambda_" not in s["fc1.weight"]  # left to the optimizer's argument


def test_groups_with_equal_settings_are_merged_in_model_order():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    groups = group_parameters(model, lambda_=1e-3, lr=0.1)
    assert [g["param_names"] for g in groups] == [["0.weight", "2.weight"], ["0.bias", "2.bias"]]
    assert groups[0]["params"][0] is model[0].weight and groups[0]["params"][1] is model[2].weight
    assert groups[0]["lr"] == 0.1 and groups[1]["lr"] == 0.1
    assert "lambda_" not in groups[1] and "dims" not in groups[1]


def test_overrides_example_from_the_docs():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(64, 3 * 64)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.attn = Attn()
            self.fc1 = nn.Linear(4, 6)
            self.fc2 = nn.Linear(6, 2)

    s = settings(group_parameters(M(), lambda_=1e-3, overrides={
        "fc2": None, nn.Linear: "output", "attn.*": {"dims": (1, 2), "view": (4, -1, 64)}}))
    assert s["fc2.weight"] == {"regularizer": "none"}
    assert s["fc1.weight"]["dims"] == (1,)
    # the pattern matches module "attn.qkv", so it selects its weight only, not its bias
    assert s["attn.qkv.weight"] == {"regularizer": "group_lasso", "dims": (1, 2), "view": (4, -1, 64),
                                    "lambda_": 1e-3}
    assert s["attn.qkv.bias"] == {"regularizer": "none"}
    assert s["conv.weight"]["dims"] == (0, 2, 3)


def test_parameter_pattern_and_order_of_application():
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
    s = settings(group_parameters(model, overrides={
        "*.bias": {"regularizer": "l1", "lambda_": 0.2},  # matches parameter names only
        nn.Linear: "output",
        "1": {"lambda_": 0.7},                            # module pattern updates the type's setting
    }))
    assert s["0.bias"] == {"regularizer": "l1", "lambda_": 0.2}
    assert s["1.bias"] == {"regularizer": "l1", "lambda_": 0.2}
    assert s["0.weight"] == {"regularizer": "group_lasso", "dims": (1,)}
    assert s["1.weight"] == {"regularizer": "group_lasso", "dims": (1,), "lambda_": 0.7}


def test_most_derived_type_wins():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(3, 3), MyLinear(3, 3))
    s = settings(group_parameters(model, overrides={nn.Linear: None, MyLinear: "output"}))
    assert s["0.weight"] == {"regularizer": "none"}
    assert s["1.weight"]["dims"] == (1,)


def test_global_regularizer_and_dim_alias():
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
    s = settings(group_parameters(model, regularizer="l1", overrides={"1": {"dim": 1}}))
    assert s["0.weight"] == {"regularizer": "l1"}
    assert s["1.weight"] == {"regularizer": "l1"}  # the global choice applies unless a dict names one
    s = settings(group_parameters(model, regularizer="none"))
    assert all(v == {"regularizer": "none"} for v in s.values())
    s = settings(group_parameters(model, overrides={"1": {"dim": -1}}))
    assert s["1.weight"]["dims"] == (1,)


def test_shared_parameter_grouped_once():
    a = nn.Linear(4, 4)
    model = nn.Sequential(a, nn.ReLU(), a)
    groups = group_parameters(model)
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == ["0.bias", "0.weight"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(conv="rows"), "Invalid conv grouping"),
    (dict(linear="bogus"), "Invalid linear grouping"),
    (dict(regularizer="l2"), "Invalid regularizer"),
    (dict(lambda_=-1.0), "Invalid lambda_"),
    (dict(overrides={"nothere": None}), r"\['nothere'\] select no parameter"),
    (dict(overrides={"0": {"dims": (2,)}}), r"'0.weight'.*invalid dims"),
    (dict(overrides={"0": {"dims": (0,), "view": (7, -1)}}), r"'0.weight': cannot view"),
    (dict(overrides={"*.bias": "channel"}), r"'0.bias': a grouping word applies to a module's weight"),
    (dict(overrides={3: None}), "Invalid override key"),
    (dict(dims=(0,)), "through overrides"),
])
def test_errors_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_parameters(nn.Sequential(nn.Linear(4, 5)), **kwargs)


def test_view_error_names_the_shape_once():
    with pytest.raises(ValueError) as e:
        group_parameters(nn.Sequential(nn.Linear(4, 5)), overrides={"0": {"dims": (0,), "view": (7, -1)}})
    assert str(e.value) == "parameter '0.weight': cannot view shape (5, 4) (20 elements) as (7, -1)"


def test_grouping_word_on_a_norm_layer_is_an_error():
    with pytest.raises(ValueError, match=r"'0.weight'.*Linear, Conv1D or convolution"):
        group_parameters(nn.Sequential(nn.LayerNorm(4)), overrides={nn.LayerNorm: "channel"})


def test_groups_feed_the_optimizers_and_group_lasso_zeroes_whole_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2))
    groups = group_parameters(model, lambda_=1e9)  # huge lambda: every regularized group is zero
    opt = rk.ProxSGD(groups, lr=0.1)
    model(torch.randn(5, 2, 4, 4)).sum().backward()
    opt.step()
    assert torch.count_nonzero(model[0].weight) == 0
    assert torch.count_nonzero(model[2].weight) == 0
    assert torch.count_nonzero(model[2].bias) > 0  # unregularized
    names = [g["param_names"] for g in opt.state_dict()["param_groups"]]
    assert names == [["0.weight"], ["0.bias", "2.bias"], ["2.weight"]]  # dims differ: two groups


def test_optimizer_errors_name_the_parameter():
    model = nn.Sequential(nn.Linear(4, 5))
    groups = group_parameters(model)
    model[0].weight.grad = torch.full_like(model[0].weight, float("nan"))
    opt = rk.RAMDA(groups)
    with pytest.raises(rk.NonFiniteGradientError, match="'0.weight'"):
        opt.step()


# -- grouping="units" (ramda_kernels/units.py; docs/math.md section 3, "Coupled groups") --

def _members(group):
    """{unit: {(name, dim): sorted indices}} from the units key, by plain expansion."""
    out = []
    for unit in group["units"]:
        m = {}
        for i, dim, (a, b, c) in unit:
            m.setdefault((group["param_names"][i], dim), []).extend(range(a, b, c))
        out.append({k: sorted(v) for k, v in m.items()})
    return out


def test_units_of_a_resnet_are_residual_channels_and_block_channels():
    from ramda_kernels.tasks import DigitsResNet

    model = DigitsResNet(channels=4)
    groups = group_parameters(model, lambda_=1e-3, grouping="units", example_inputs=torch.randn(2, 1, 8, 8))
    (unit_group,) = [g for g in groups if "units" in g]
    members = _members(unit_group)
    assert len(members) == 12  # 4 residual channels + 4 channels inside each of the 2 blocks
    residual = [m for m in members if ("stem.weight", 0) in m]
    assert len(residual) == 4
    for k, m in enumerate(sorted(residual, key=lambda m: m[("stem.weight", 0)])):
        # every writer of channel k (stem, both blocks' last convs) with its BN entries, and
        # the classifier's input k; not the blocks' first convs (their outputs are units)
        assert m == {("stem.weight", 0): [k], ("bn.weight", 0): [k], ("bn.bias", 0): [k],
                     ("block1.conv2.weight", 0): [k], ("block1.bn2.weight", 0): [k],
                     ("block1.bn2.bias", 0): [k], ("block2.conv2.weight", 0): [k],
                     ("block2.bn2.weight", 0): [k], ("block2.bn2.bias", 0): [k],
                     ("fc.weight", 1): [k]}
    for block in ("block1", "block2"):
        inner = [m for m in members if (f"{block}.conv1.weight", 0) in m]
        for k, m in enumerate(sorted(inner, key=lambda m: m[(f"{block}.conv1.weight", 0)])):
            assert m == {(f"{block}.conv1.weight", 0): [k], (f"{block}.bn1.weight", 0): [k],
                         (f"{block}.bn1.bias", 0): [k]}
        assert len(inner) == 4
    # the classifier's outputs and its bias stay: not in any unit, and not regularized
    assert settings(groups)["fc.bias"]["regularizer"] == "none"


def test_units_of_the_charlm_block_are_heads_and_mlp_neurons():
    from ramda_kernels.tasks import CharTransformer

    model = CharTransformer(layers=1, d=16, heads=4, context=8)
    groups = group_parameters(model, lambda_=1e-3, grouping="units",
                              example_inputs=torch.zeros(2, 8, dtype=torch.long))
    (unit_group,) = [g for g in groups if "units" in g]
    members = _members(unit_group)
    heads = [m for m in members if ("blocks.0.attn.q.weight", 0) in m]
    neurons = [m for m in members if ("blocks.0.fc1.weight", 0) in m]
    assert len(heads) == 4 and len(neurons) == 64 and len(members) == 68
    h = heads[1]
    for proj in ("q", "k", "v"):
        assert h[(f"blocks.0.attn.{proj}.weight", 0)] == list(range(4, 8))
        assert h[(f"blocks.0.attn.{proj}.bias", 0)] == list(range(4, 8))
    assert h[("blocks.0.attn.out.weight", 1)] == list(range(4, 8))
    j = neurons[5]
    assert j == {("blocks.0.fc1.weight", 0): [5], ("blocks.0.fc1.bias", 0): [5],
                 ("blocks.0.fc2.weight", 1): [5]}
    # the residual stream goes through LayerNorm, embeddings and the output: no unit
    names = {n for m in members for n, _ in m}
    assert not any(n.startswith(("tok", "pos", "ln", "head", "blocks.0.ln")) for n in names)


def test_units_grouping_errors():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="give example_inputs"):
        group_parameters(model, grouping="units")
    with pytest.raises(ValueError, match="Invalid grouping: 'unit'"):
        group_parameters(model, grouping="unit", example_inputs=torch.randn(1, 1, 4, 4))
    with pytest.raises(ValueError, match="regularizer='l1'"):
        group_parameters(model, grouping="units", regularizer="l1", example_inputs=torch.randn(1, 1, 4, 4))
