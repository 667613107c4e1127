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
