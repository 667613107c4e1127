"""structure_report against hand-counted zeros (docs/math.md section 7).

Each tensor below has zeros placed by hand; the expected counts are worked
out in the comments, not computed by the code under test.
"""

import pytest
import torch
from torch import nn

import ramda_kernels as rk
from ramda_kernels.report import tensor_structure


def small_model():
    """conv [4, 2, 3, 3] (channel-wise: 2 groups of 36), linear [3, 5]
    (input-wise: 5 groups of 3), plus biases."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(5, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand_like(p) + 0.5)  # no accidental zeros
        model[0].weight[:, 1] = 0          # input channel 1: one whole group, 36 entries
        model[0].weight[0, 0, 0, 0] = 0    # one stray zero in group 0
        model[2].weight[:, 0] = 0          # input features 0 and 3: 2 groups of 3
        model[2].weight[:, 3] = 0
        model[2].weight[1, 4] = 0          # stray zero in group 4
        model[0].bias[0] = 0               # unregularized zero
    return model


def test_rows_and_totals_from_a_model():
    report = rk.structure_report(small_model())
    conv, lin = report.rows
    assert (conv.name, lin.name) == ("0.weight", "2.weight")
    assert conv.dims == (0, 2, 3) and lin.dims == (0,)
    assert (conv.groups, conv.zero_groups, conv.entries, conv.zero_entries) == (2, 1, 72, 37)
    assert conv.unstructured_sparsity == pytest.approx(37 / 72)
    assert conv.group_sparsity == pytest.approx(1 / 2)
    assert conv.weighted_group_sparsity == pytest.approx(36 / 72)
    assert (lin.groups, lin.zero_groups, lin.entries, lin.zero_entries) == (5, 2, 15, 7)
    assert lin.unstructured_sparsity == pytest.approx(7 / 15)
    assert lin.group_sparsity == pytest.approx(2 / 5)
    assert lin.weighted_group_sparsity == pytest.approx(6 / 15)
    t = report.totals
    assert (t.tensors, t.groups, t.zero_groups) == (2, 7, 3)
    assert t.group_sparsity == pytest.approx(3 / 7)
    assert t.weighted_group_sparsity == pytest.approx((36 + 6) / (72 + 15))
    assert t.unstructured_sparsity == pytest.approx((37 + 7) / (72 + 15))
    # all parameters: 72 + 4 (conv bias) + 15 + 3 (linear bias) = 94 entries, 44 + 1 zeros
    assert (t.all_entries, t.all_zero_entries) == (94, 45)
    assert t.unstructured_sparsity_all == pytest.approx(45 / 94)


def test_filter_wise_grouping_changes_the_groups():
    report = rk.structure_report(small_model(), conv="filter")
    conv = report.rows[0]
    # filters [2, 3, 3] of 18 entries: channel 1 is zero in each, channel 0 is not -> none all-zero
    assert (conv.dims, conv.groups, conv.zero_groups) == ((1, 2, 3), 4, 0)
    assert conv.weighted_group_sparsity == 0.0


def test_same_report_from_groups_and_from_an_optimizer():
    model = small_model()
    groups = rk.group_parameters(model, lambda_=1e-3)
    opt = rk.RAMDA(groups)
    a = rk.structure_report(model, groups).as_dict()
    b = rk.structure_report(opt).as_dict()
    c = rk.structure_report(model, opt).as_dict()
    assert a == b == c
    assert a["totals"]["zero_groups"] == 3


def test_plain_groups_without_names_take_the_models_names():
    model = small_model()
    groups = [{"params": [model[2].weight], "dims": (0,)}, {"params": [model[0].weight, model[0].bias]}]
    report = rk.structure_report(model, groups)
    assert [r.name for r in report.rows] == ["2.weight"]  # dims alone means group lasso
    assert report.rows[0].zero_groups == 2
    unnamed = rk.structure_report(torch.optim.SGD(groups, lr=0.1))
    assert unnamed.rows[0].name == "param_groups[0][0]"


def test_view_and_l1_and_nuclear_rows():
    w = torch.ones(6, 4)
    w[2:4] = 0  # viewed as (3, 2, 4) with dims (1, 2): head 1 (rows 2, 3) is zero
    r = tensor_structure("w", w, "group_lasso", dims=(1, 2), view=(3, -1, 4))
    assert (r.groups, r.zero_groups, r.group_entries) == (3, 1, 8)
    assert r.weighted_group_sparsity == pytest.approx(8 / 24)
    w[0, 0] = 0
    r = tensor_structure("w", w, "l1")
    assert (r.groups, r.zero_groups, r.zero_entries) == (24, 9, 9)
    assert r.group_sparsity == pytest.approx(9 / 24)
    r = tensor_structure("w", w, "nuclear")
    assert r.groups is None and r.group_sparsity is None
    assert r.unstructured_sparsity == pytest.approx(9 / 24)


def test_printed_table_names_every_tensor_and_the_totals():
    text = str(rk.structure_report(small_model()))
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["tensor", "shape"]
    row = next(line for line in lines if line.startswith("0.weight"))
    assert "4x2x3x3" in row and "1/2" in row and "50.00%" in row
    total = next(line for line in lines if line.startswith("total"))
    assert "3/7" in total and f"{100 * 3 / 7:.2f}%" in total


def test_empty_groups_give_zero_not_a_division_error():
    report = rk.structure_report(nn.Sequential(nn.LayerNorm(3)))
    assert report.rows == []
    assert report.totals.group_sparsity == 0.0 and report.totals.weighted_group_sparsity == 0.0


def test_bad_argument():
    with pytest.raises(TypeError, match="model, an optimizer or param groups"):
        rk.structure_report(42)


def test_unit_groups_are_counted_as_units():
    """Two tensors a [3, 4], b [2, 3]; unit k = 0, 1, 2 is row k of a with column k
    of b (4 + 2 = 6 entries each, 18 in all)."""
    a = torch.ones(3, 4)
    b = torch.ones(2, 3)
    a[1] = 0
    b[:, 1] = 0          # unit 1: zero in both slices -> a zero unit
    a[2, :2] = 0         # unit 2: partly zero -> not a zero unit
    b[:, 0] = 0          # unit 0: b's slice zero but a's row is not -> not a zero unit
    group = {"params": [a, b], "param_names": ["a", "b"],
             "units": [[(0, 0, k), (1, 1, k)] for k in range(3)]}
    report = rk.structure_report(None, [group])
    t = report.totals
    assert (t.units, t.zero_units, t.unit_entries, t.zero_unit_entries) == (3, 1, 18, 6)
    assert (t.groups, t.zero_groups) == (3, 1)
    assert t.group_sparsity == pytest.approx(1 / 3)
    # zeros: a has 4 + 2, b has 2 + 2 -> 10 of 18 entries
    assert (t.entries, t.zero_entries) == (18, 10)
    assert [r.regularizer for r in report.rows] == ["units", "units"]
    assert "units: 1/3 zero (6/18 entries in zero units)" in str(report)
