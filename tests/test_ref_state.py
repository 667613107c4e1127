"""Optimizer state of the reference: dtype policy and exact resume (docs/math.md section 1, 8)."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import ramda_ref as R
from ramda_ref.groups import group_norm, grouped_view, normalize_dims
from _util import assert_bitwise_equal, assert_state_equal

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
STATE_DTYPE = {torch.float32: torch.float32, torch.bfloat16: torch.float32,
               torch.float16: torch.float32, torch.float64: torch.float64}

OPTIMIZERS = {
    "ramda": (R.RAMDA, dict(lr=0.05, momentum=0.3, lambda_=0.05)),
    "ramda_pg": (R.RAMDA, dict(lr=0.05, momentum=0.3, lambda_=0.05, solver="pg")),
    "rmda": (R.RMDA, dict(lr=0.1, momentum=0.3, lambda_=0.05)),
    "proxadamw": (R.ProxAdamW, dict(lr=0.01, lambda_=0.5, weight_decay=0.1)),
    "proxadamw_amsgrad": (R.ProxAdamW, dict(lr=0.01, lambda_=0.5, weight_decay=0.1, amsgrad=True)),
    "proxsgd": (R.ProxSGD, dict(lr=0.1, momentum=0.3, lambda_=0.05)),
}


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3)
        self.fc = torch.nn.Linear(4 * 3 * 3, 5)
        self.empty = torch.nn.Parameter(torch.zeros(0, 3))

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def _groups(net):
    return [
        {"params": [net.conv.weight], "dims": (0, 2, 3)},
        {"params": [net.fc.weight], "dims": (1,)},
        {"params": [net.conv.bias, net.fc.bias, net.empty], "regularizer": "l1"},
    ]


def _batches(n, dtype):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(6, 2, 5, 5, generator=gen).to(dtype), torch.randn(6, 5, generator=gen).to(dtype))
            for _ in range(n)]


def _train(net, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        if net.empty.grad is None:
            net.empty.grad = torch.zeros_like(net.empty)
        opt.step()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dtype(name, dtype):
    cls, kw = OPTIMIZERS[name]
    torch.manual_seed(0)
    net = Net().to(dtype)
    opt = cls(_groups(net), **kw)
    _train(net, opt, _batches(2, dtype))
    want = STATE_DTYPE[dtype]

    def check(o, where):
        assert len(o.state) == 5
        group_of = {p: g for g in o.param_groups for p in g["params"]}
        for p, st in o.state.items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    # W0, a copy of the parameter, keeps its dtype (tests/test_state_bytes.py)
                    expect = dtype if k == "initial_point" else want
                    assert v.dtype == expect, f"{where}: state {k!r} of a {dtype} parameter is {v.dtype}"
                    if k == "sigma":  # one value per group (docs/math.md section 4, item 5)
                        g = group_of[p]
                        x = grouped_view(p, g["view"])
                        assert v.shape == (group_norm(x, normalize_dims(g["dims"], x.dim())).numel(),)
                    else:
                        assert v.shape == p.shape

    check(opt, "after steps")
    torch.manual_seed(0)
    net2 = Net().to(dtype)
    opt2 = cls(_groups(net2), **kw)
    opt2.load_state_dict(opt.state_dict())
    check(opt2, "after load_state_dict")
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt3 = cls(_groups(copy.deepcopy(net2)), **kw)
    opt3.load_state_dict(torch.load(buf))
    check(opt3, "after torch.save / torch.load")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resume_is_bitwise(name, dtype):
    """Save at step k, load into a fresh optimizer over a fresh model copy, continue:
    parameters and state are bitwise those of a run that never stopped."""
    cls, kw = OPTIMIZERS[name]
    batches = _batches(7, dtype)
    k = 3
    torch.manual_seed(0)
    net = Net().to(dtype)
    start = copy.deepcopy(net)
    opt = cls(_groups(net), **kw)
    _train(net, opt, batches)

    torch.manual_seed(0)
    first = copy.deepcopy(start)
    opt_a = cls(_groups(first), **kw)
    _train(first, opt_a, batches[:k])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt_a.state_dict()}, buf)
    del opt_a, first
    buf.seek(0)
    saved = torch.load(buf)
    resumed = Net().to(dtype)
    resumed.load_state_dict(saved["model"])
    opt_b = cls(_groups(resumed), **kw)
    opt_b.load_state_dict(saved["opt"])
    _train(resumed, opt_b, batches[k:])

    for (n, p), q in zip(net.named_parameters(), resumed.parameters()):
        assert_bitwise_equal(q.detach(), p.detach(), f"{name} param {n}")
        assert_state_equal(opt_b.state[q], opt.state[p], f"{name} param {n}")
    assert len(opt_b.state) == len(opt.state)


def test_loaded_state_is_a_copy():
    """load_state_dict must not alias the tensors of the dict it was given."""
    torch.manual_seed(0)
    net = Net()
    opt = R.RAMDA(_groups(net), lambda_=0.01)
    _train(net, opt, _batches(2, torch.float32))
    sd = opt.state_dict()
    net2 = copy.deepcopy(net)
    opt2 = R.RAMDA(_groups(net2), lambda_=0.01)
    opt2.load_state_dict(sd)
    p2 = net2.conv.weight
    before = opt2.state[p2]["grad_sum"].clone()
    _train(net, opt, _batches(1, torch.float32))  # mutates opt's state in place
    assert_bitwise_equal(opt2.state[p2]["grad_sum"], before, "loaded state changed with the source")


def test_load_keeps_hyperparameters_and_alpha():
    torch.manual_seed(0)
    net = Net()
    opt = R.RAMDA(_groups(net), lr=0.03, lambda_=0.01)
    _train(net, opt, _batches(3, torch.float32))
    opt2 = R.RAMDA(_groups(copy.deepcopy(net)), lr=0.5, lambda_=0.0)
    opt2.load_state_dict(opt.state_dict())
    assert [g["lr"] for g in opt2.param_groups] == [0.03] * 3
    assert [g["lambda_"] for g in opt2.param_groups] == [0.01] * 3
    st = next(iter(opt2.state.values()))
    assert st["step"] == 3
    assert st["alpha"] == pytest.approx(0.03 * (1 + 2 ** 0.5 + 3 ** 0.5), rel=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_restart_state(dtype):
    """restart(): t = 0, alpha = 0, W0 = p, V = U = 0 (docs/math.md section 6)."""
    torch.manual_seed(0)
    net = Net().to(dtype)
    opt = R.RAMDA(_groups(net), lambda_=0.01)
    _train(net, opt, _batches(3, dtype))
    opt.restart()
    for p, st in opt.state.items():
        assert st["step"] == 0 and st["alpha"] == 0.0
        assert_bitwise_equal(st["initial_point"], p.detach().to(STATE_DTYPE[dtype]), "W0 = p")
        assert not st["grad_sum"].any() and not st["grad_sum_sq"].any()
        assert st["initial_point"].dtype == STATE_DTYPE[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_low_precision_rounds_once(name, dtype):
    """bf16/fp16 parameters: every step computes in fp32 from fp32 state (W0 widened
    exactly) and rounds once. So each step equals, bitwise, the fp32 step taken from
    the same (rounded) weights and gradient, rounded to the parameter dtype; and the
    state stays equal."""
    cls, kw = OPTIMIZERS[name]
    gen = torch.Generator().manual_seed(1)
    low = torch.nn.Parameter(torch.randn(6, 5, generator=gen).to(dtype))
    ref = torch.nn.Parameter(low.detach().float())
    opt_low = cls([{"params": [low], "dims": (1,)}], **kw)
    opt_ref = cls([{"params": [ref], "dims": (1,)}], **kw)
    for t in range(4):
        g = torch.randn(6, 5, generator=gen).to(dtype)
        low.grad, ref.grad = g, g.float()
        with torch.no_grad():
            ref.copy_(low.float())
        opt_low.step()
        opt_ref.step()
        assert_bitwise_equal(low.detach(), ref.detach().to(dtype), f"{name} step {t + 1}")
        # W0 keeps the parameter's dtype (exactly: it is a copy of the parameter)
        widened = {k: v.float() if k == "initial_point" else v for k, v in opt_low.state[low].items()}
        assert_state_equal(widened, opt_ref.state[ref], f"{name} step {t + 1}")
