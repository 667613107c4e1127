"""``torch.amp.GradScaler`` with the optimizers (issue 7): the scaler hands the
optimizer ``grad_scale`` / ``found_inf`` (``_step_supports_amp_scaling``) and
the step unscales, or skips, itself.

The oracle is the same training without a scaler: a power-of-two loss scale
scales every gradient exactly, so unscaled training must match it (to 1e-6;
in practice bitwise). Runs every backend available on CPU (the Triton one
under ``TRITON_INTERPRET=1``).

    timeout 300 python -m pytest -q tests/test_amp.py
"""

from __future__ import annotations

import copy

import torch

import pytest

import ramda_kernels as rk
from ramda_kernels import backends
from _util import TinyConvNet, assert_bitwise_equal, assert_close, assert_state_equal

BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(backends.why_unavailable(b, "cpu") is not None,
                                                     reason=f"{b}: {backends.why_unavailable(b, 'cpu')}"))
            for b in ("reference", "cpu", "triton")]
OPTIMIZERS = {
    "ramda": (rk.RAMDA, dict(lr=0.05, momentum=0.3, lambda_=0.05)),
    "proxadamw": (rk.ProxAdamW, dict(lr=0.01, lambda_=0.5, weight_decay=0.1)),
}
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # interpreter


Net = TinyConvNet


def _groups(net):
    return [{"params": [net.conv.weight], "dims": (0, 2, 3)},
            {"params": [net.fc.weight], "dims": (1,)},
            {"params": [net.conv.bias, net.fc.bias], "regularizer": "l1"}]


def _setup(name, backend, dtype=torch.float32):
    cls, kw = OPTIMIZERS[name]
    torch.manual_seed(0)
    plain = Net().to(dtype)
    scaled = copy.deepcopy(plain)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 2, 4, 4, generator=gen).to(dtype), torch.randn(3, 4, generator=gen).to(dtype))
               for _ in range(5)]
    return (plain, cls(_groups(plain), backend=backend, **kw),
            scaled, cls(_groups(scaled), backend=backend, **kw), batches)


def _loss(net, batch):
    x, y = batch
    return ((net(x) - y) ** 2).mean()


def _plain_step(net, opt, batch, clip=None):
    opt.zero_grad()
    _loss(net, batch).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
    opt.step()


def _assert_same_training(plain, opt_p, scaled, opt_s, msg):
    for (n, p), q in zip(plain.named_parameters(), scaled.parameters()):
        assert_close(q, p, rtol=1e-6, atol=1e-7, msg=f"{msg}: param {n}")
        sp, ss = opt_p.state[p], opt_s.state[q]
        assert sp.keys() == ss.keys(), msg
        for key, value in sp.items():
            if isinstance(value, torch.Tensor):
                assert_close(ss[key], value, rtol=1e-6, atol=1e-7, msg=f"{msg}: {n} state[{key!r}]")
            else:
                assert ss[key] == pytest.approx(value, rel=1e-12), f"{msg}: {n} state[{key!r}]"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_scaled_training_matches_unscaled(name, backend):
    plain, opt_p, scaled, opt_s, batches = _setup(name, backend)
    # growth every 2 good steps: the run sees the scales 2^10, 2^11, 2^12
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    for batch in batches:
        _plain_step(plain, opt_p, batch)
        opt_s.zero_grad()
        scale = scaler.get_scale()
        scaler.scale(_loss(scaled, batch)).backward()
        scaler.step(opt_s)
        scaler.update()
        # the user's .grad keeps its scaled values (the step unscales a copy)
        assert_close(scaled.fc.weight.grad, plain.fc.weight.grad * scale, rtol=1e-6, atol=0,
                     msg="scaled .grad")
        assert not hasattr(opt_s, "grad_scale") and not hasattr(opt_s, "found_inf")
    assert scaler.get_scale() == 2.0 ** 12, "no step may have been reported as overflowing"
    _assert_same_training(plain, opt_p, scaled, opt_s, f"{name}/{backend}")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_scaled_training_bf16_parameters(name):
    plain, opt_p, scaled, opt_s, batches = _setup(name, "reference", torch.bfloat16)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for batch in batches:
        _plain_step(plain, opt_p, batch)
        opt_s.zero_grad()
        scaler.scale(_loss(scaled, batch)).backward()
        scaler.step(opt_s)
        scaler.update()
    for p, q in zip(plain.parameters(), scaled.parameters()):  # exact scaling: bitwise
        assert_bitwise_equal(q.detach(), p.detach(), f"{name} bf16 param")
        assert_state_equal(opt_s.state[q], opt_p.state[p], f"{name} bf16")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_explicit_unscale_then_clip_is_not_unscaled_twice(name):
    """``scaler.unscale_(opt)`` (for clipping) divides ``.grad`` in place and the
    scaler then passes ``grad_scale=None``: the step must not divide again."""
    plain, opt_p, scaled, opt_s, batches = _setup(name, "reference")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for batch in batches:
        _plain_step(plain, opt_p, batch, clip=0.5)
        opt_s.zero_grad()
        scaler.scale(_loss(scaled, batch)).backward()
        scaler.unscale_(opt_s)
        torch.nn.utils.clip_grad_norm_(scaled.parameters(), 0.5)
        scaler.step(opt_s)
        scaler.update()
    _assert_same_training(plain, opt_p, scaled, opt_s, f"{name} unscale_+clip")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_overflow_step_is_skipped(name, backend, bad):
    """An inf/NaN gradient under the scaler: no error (even with nonfinite='raise'),
    parameters and state (step counters included) bitwise unchanged, the scale
    halves, and training goes on as if that batch had not been there."""
    plain, opt_p, scaled, opt_s, batches = _setup(name, backend)
    assert opt_s.nonfinite == "raise"
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=100)
    skip = 2
    for k, batch in enumerate(batches):
        if k != skip:
            _plain_step(plain, opt_p, batch)
        opt_s.zero_grad()
        scaler.scale(_loss(scaled, batch)).backward()
        if k == skip:
            scaled.fc.weight.grad[1, 2] = bad
            before = [p.detach().clone() for p in scaled.parameters()]
            state = copy.deepcopy({i: opt_s.state[p] for i, p in enumerate(scaled.parameters())})
        scaler.step(opt_s)
        scale = scaler.get_scale()
        scaler.update()
        if k == skip:
            for i, p in enumerate(scaled.parameters()):
                assert_bitwise_equal(p.detach(), before[i], f"param {i} after a skipped step")
                assert_state_equal(opt_s.state[p], state[i], f"param {i} after a skipped step")
            assert scaler.get_scale() == scale / 2
    assert all(st["step"] == len(batches) - 1 for st in opt_s.state.values())
    _assert_same_training(plain, opt_p, scaled, opt_s, f"{name}/{backend} after a skipped step")


def test_plain_step_after_scaler_is_not_scaled():
    """Once ``scaler.step`` returns, a plain ``opt.step()`` uses the raw gradients."""
    plain, opt_p, scaled, opt_s, batches = _setup("ramda", "reference")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for batch in batches[:2]:
        _plain_step(plain, opt_p, batch)
        opt_s.zero_grad()
        scaler.scale(_loss(scaled, batch)).backward()
        scaler.step(opt_s)
        scaler.update()
    for batch in batches[2:]:
        _plain_step(plain, opt_p, batch)
        _plain_step(scaled, opt_s, batch)
    _assert_same_training(plain, opt_p, scaled, opt_s, "plain steps after scaled ones")
