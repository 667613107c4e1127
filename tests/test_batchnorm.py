"""recalibrate_batchnorm: running statistics recomputed from inputs (issue 14 item 10).

The expected statistics are computed directly from the BatchNorm layers'
inputs: the plain average over equal batches of each batch's per-channel mean
and unbiased variance (what ``momentum=None`` accumulates).
"""

import pytest
import torch
from torch import nn

from ramda_kernels.batchnorm import recalibrate_batchnorm


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.drop(self.conv(x)))).mean((2, 3)))


def _x(n=24, seed=0):
    return torch.randn(n, 3, 5, 5, generator=torch.Generator().manual_seed(seed)) * 3 + 1


def test_statistics_are_the_average_of_the_batches_and_dropout_stays_off():
    torch.manual_seed(0)
    model = _Net().train()
    model.bn.running_mean.fill_(100.0)  # stale
    x = _x()
    with torch.no_grad():
        h = model.conv(x)  # the BN's input with dropout off
    parts = h.split(8)
    mean = torch.stack([p.mean((0, 2, 3)) for p in parts]).mean(0)
    var = torch.stack([p.transpose(0, 1).flatten(1).var(1, unbiased=True) for p in parts]).mean(0)
    assert recalibrate_batchnorm(model, x, batch_size=8) == 1
    torch.testing.assert_close(model.bn.running_mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.bn.running_var, var, atol=1e-5, rtol=1e-5)
    assert model.training and model.drop.training and model.bn.momentum == 0.1
    # An iterable of (inputs, targets) pairs gives the same, max_batches cuts it.
    before = model.bn.running_mean.clone()
    recalibrate_batchnorm(model, [(p, None) for p in x.split(8)])
    torch.testing.assert_close(model.bn.running_mean, before, atol=1e-6, rtol=1e-6)
    recalibrate_batchnorm(model, [(p, None) for p in x.split(8)], max_batches=1)
    torch.testing.assert_close(model.bn.running_mean, parts[0].mean((0, 2, 3)), atol=1e-5, rtol=1e-5)


def test_bad_input_leaves_the_statistics_alone():
    model = _Net().eval()
    model.bn.running_mean.fill_(3.0)
    for bad in ([], torch.empty(0, 3, 5, 5)):
        with pytest.raises(ValueError, match="no batches|no inputs"):
            recalibrate_batchnorm(model, bad)
    with pytest.raises(RuntimeError):
        recalibrate_batchnorm(model, [torch.randn(2, 7, 5, 5)])  # wrong channel count: torch's error
    assert bool((model.bn.running_mean == 3.0).all()) and model.bn.momentum == 0.1
    assert not model.training and not model.bn.training
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        recalibrate_batchnorm(model, _x(), batch_size=0)


def test_model_without_batchnorm_is_left_alone():
    model = nn.Sequential(nn.Linear(3, 3))
    assert recalibrate_batchnorm(model, torch.randn(4, 3)) == 0


def test_resnet18_statistics_match_its_batchnorm_inputs():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:  # stale statistics, as after a fast change of the weights
        m.running_mean.uniform_(-5, 5)
        m.running_var.uniform_(5, 10)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.__setitem__(m, a[0].detach())) for m in bns]
    model.train()
    with torch.no_grad():
        model(x)  # a training-mode pass: every BN normalizes with this batch's statistics
    for h in hooks:
        h.remove()
    assert recalibrate_batchnorm(model.eval(), x, batch_size=6) == len(bns) == 20
    for m in bns:
        inp = seen[m].transpose(0, 1).flatten(1)
        torch.testing.assert_close(m.running_mean, inp.mean(1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(m.running_var, inp.var(1, unbiased=True), atol=1e-4, rtol=1e-4)
    assert not model.training
