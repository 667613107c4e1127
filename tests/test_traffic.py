"""The traffic meter of bench/traffic.py counts what kernels move (fast: tiny kernels).

Each figure is derived by hand from the kernel: a copy moves 4 B in and 4 B
out per fp32 element; a stride-8 fp32 read uses 4 of every 32-byte sector; a
kernel that reads its input twice makes two passes. Then the real fused step
on one small tensor: the flat RAMDA step reads each of its five inputs once
and writes its three outputs once (32 B per fp32 element).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import traffic  # noqa: E402
import ramda_ref.functional as ref  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the meter counts the Triton interpreter's loads and stores")


@triton.jit
def _copy(src, dst, n, STRIDE: tl.constexpr, TWICE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(src + offs * STRIDE, mask=mask)
    if TWICE:
        x += tl.load(src + offs * STRIDE, mask=mask)
    tl.store(dst + offs, x, mask=mask)


def _run(src, dst, n, stride=1, twice=False, block=64):
    meter = traffic.Meter()
    meter.region("src", src)
    meter.region("dst", dst)
    with meter.counting():
        _copy[(triton.cdiv(n, block),)](src, dst, n, STRIDE=stride, TWICE=twice, BLOCK=block)
    return meter


def test_copy_counts_8_bytes_per_element():
    n = 1000  # not a multiple of the block: the masked lanes of the last block count nothing
    src, dst = torch.randn(n), torch.empty(n)
    m = _run(src, dst, n)
    torch.testing.assert_close(dst, src)
    o = m.by_name()
    assert o["src"]["read"] + o["dst"]["written"] == 8 * n
    assert m.passes("src") == (1.0, 0.0) and m.passes("dst") == (0.0, 1.0)
    traffic.check_single_pass(m, ["src", "dst"])
    # 1000 fp32 = 125 sectors each way when the blocks start on sector boundaries
    assert o["src"]["sectors"] == o["dst"]["sectors"] == 125
    assert m.lanes_active == 2 * n and m.lanes == 2 * 64 * 16


def test_strided_read_counts_one_sector_per_element():
    n, stride = 256, 8  # fp32 at a 32-byte stride: every element in its own sector
    src, dst = torch.randn(n * stride), torch.empty(n)
    m = _run(src, dst, n, stride=stride)
    torch.testing.assert_close(dst, src[::stride])
    o = m.by_name()
    assert o["src"]["read"] == 4 * n
    assert o["src"]["sectors"] == n  # efficiency 4 / 32
    assert o["dst"]["sectors"] == n * 4 // 32
    stride2 = 2  # two fp32 of each sector used: half the elements' sectors
    m = _run(torch.randn(n * stride2), dst, n, stride=stride2)
    assert m.by_name()["src"]["sectors"] == n * 4 * stride2 // 32


def test_double_read_fails_the_single_pass_check():
    n = 512
    src, dst = torch.randn(n), torch.empty(n)
    m = _run(src, dst, n, twice=True)
    assert m.passes("src") == (2.0, 0.0)
    with pytest.raises(AssertionError, match="src: 2 read"):
        traffic.check_single_pass(m, ["src", "dst"])


def test_unnamed_memory_is_counted_as_other():
    n = 128
    src, dst = torch.randn(n), torch.empty(n)
    meter = traffic.Meter()
    meter.region("src", src)  # dst left unnamed
    with meter.counting():
        _copy[(2,)](src, dst, n, STRIDE=1, TWICE=False, BLOCK=64)
    assert meter.by_name()["other"]["written"] == 4 * n


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
def test_fused_flat_step_is_one_pass_per_tensor():
    """RAMDA without a regularizer on one dense tensor: one read of g, p, W0, V,
    U and one write of p, V, U, whole sectors (the floor of bench_step.py)."""
    import ramda_kernels
    from ramda_kernels.backends import triton_backend as tb

    p = torch.nn.Parameter(torch.randn(3000))
    opt = ramda_kernels.RAMDA([p], lr=0.1, backend="triton")
    p.grad = torch.randn(3000)
    opt.step()  # builds state and plan
    p.grad = torch.randn(3000)
    meter = traffic.Meter()
    meter.region("param", p)
    meter.region("grad", p.grad)
    state = [k for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and v.numel() == p.numel()]
    for k in state:
        meter.region(k, opt.state[p][k])
    assert len(state) == 3
    with meter.counting():
        opt.step()
    o = meter.by_name()
    moved = sum(o[k]["read"] + o[k]["written"] for k in ["param", "grad"] + state)
    assert moved == 32 * p.numel()
    traffic.check_single_pass(meter, ["param", "grad"] + state)
    tb.clear_cache()


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
def test_chunked_group_step_is_two_passes_plus_one_per_newton_pass(monkeypatch):
    """RAMDA group lasso on rows read in chunks (NOTE: [two-pass plan]): pass 1
    reads g, W0, V, U and writes V, U; every Newton pass reads W0, V, U of the
    groups still iterating; the last pass reads W0, V, U of the nonzero groups
    and p of every group, and writes p. Per group (each row metered on its
    own), W0, V and U are read ``1 + k + 1`` times over for a nonzero group that
    took ``k`` Newton passes and once for a zero group (zero in the reference's
    step; momentum 1 makes p the subproblem's solution). The ``k`` add up to the
    kernel's Newton-step count less the warm starts (``newton_counts``: none
    at step 1), and no group takes more passes than the tiles made. Per
    element: g 4 B, p 4 + 4, V and U written 4 each; the warm-start sigma is
    read once per group and written once per nonzero group."""
    from ramda_kernels.backends import triton_backend as tb

    monkeypatch.setattr(tb, "TILE", 128)
    monkeypatch.setattr(tb, "MAX_BLOCK_E", 64)
    gen = torch.Generator().manual_seed(4)
    n_groups, gsize = 6, 300  # two groups per tile, five chunks of 64 per group
    small = torch.tensor([1.0, 1.0, 1e-3, 1.0, 1e-3, 1e-3])[:, None]  # rows 2, 4, 5 go to zero
    p = torch.randn(n_groups, gsize, generator=gen) * small
    state = [p.clone(), torch.zeros_like(p), torch.zeros_like(p)]
    sigma = torch.zeros(n_groups)
    kwargs = dict(alpha=1.0, lr=0.1, momentum=1.0, epsilon=1e-6, lambda_=0.02,
                  regularizer="group_lasso", dims=(1,), view=None, reweight=True, solver="exact",
                  max_iters=20, rtol=1e-8, pg_stop="inexact", pg_eps=1e-3)
    signal = torch.randn(n_groups, gsize, generator=gen) * small
    for step in (1, 2):
        grad = signal + 0.1 * torch.randn(n_groups, gsize, generator=gen) * small
        expected = [p.clone()]
        ref.ramda(expected, [grad.clone()], *[[s.clone()] for s in state], [sigma.clone()],
                  step=step, **kwargs)
        zero = (expected[0] == 0).all(1)
        assert 0 < int(zero.sum()) < n_groups
        meter = traffic.Meter()
        for name, t in zip(["param", "grad", "sigma"], [p, grad, sigma]):
            meter.region(name, t)
        for name, t in zip(["w0", "v", "u"], state):
            for i in range(n_groups):
                meter.region(f"{name}:{i}", t[i])
        with meter.counting(), tb.newton_counts("cpu") as counts:
            tb.ramda([p], [grad], *[[s] for s in state], [sigma], step=step, **kwargs)
        assert torch.equal(p == 0, expected[0] == 0)
        steps, groups, passes, tiles = counts.tolist()
        assert tiles == 3 and groups > 0
        n = p.numel()
        o = meter.by_name()
        assert (o["grad"]["read"], o["grad"]["written"]) == (4 * n, 0)
        assert (o["param"]["read"], o["param"]["written"]) == (4 * n, 4 * n)
        reads = []
        for i in range(n_groups):
            r = {k: o[f"{k}:{i}"]["read"] / (4 * gsize) for k in ("w0", "v", "u")}
            assert r["w0"] == r["v"] == r["u"] and r["w0"] == int(r["w0"]), (i, r)
            assert o[f"w0:{i}"]["written"] == 0
            assert o[f"v:{i}"]["written"] == o[f"u:{i}"]["written"] == 4 * gsize
            reads.append(int(r["w0"]))
        for i in range(n_groups):
            assert reads[i] == 1 if zero[i] else reads[i] >= 2, (i, reads)
        # a tile (groups 2t, 2t + 1) passes over memory while one of its groups reads
        assert passes == sum(max(2, *reads[t:t + 2]) for t in range(0, n_groups, 2)), reads
        newton = sum(r - 2 for r, z in zip(reads, zero.tolist()) if not z)
        if step == 1:
            assert newton == steps
        else:  # a warm start counts a step and costs no pass
            assert steps - groups <= newton <= steps
        assert o["sigma"]["read"] == 4 * n_groups
        assert o["sigma"]["written"] == 4 * int((~zero).sum())
    tb.clear_cache()


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
def test_short_runs_read_whole_sectors(monkeypatch):
    """Channel-wise 3x3 groups (W[:, i], runs of 9 fp32 at stride 9 * I): as a
    rows tile of one group (576 elements in a 1024-element tile), each run of
    36 B touches two or three sectors (56% used, counted by hand over the
    tile's addresses); as columns of 8 adjacent groups read in chunks of 128
    (`triton_backend._short_runs`), the tile's 8 runs of each output channel
    are 9 whole aligned sectors and only the partial channels at a chunk's
    ends waste part of a sector (94%)."""
    from ramda_kernels.backends import triton_backend as tb

    monkeypatch.setattr(tb, "TILE", 1024)
    monkeypatch.setattr(tb, "MAX_BLOCK_E", 1024)
    gen = torch.Generator().manual_seed(5)
    O, I = 64, 16
    kwargs = dict(alpha=1.0, lr=0.1, momentum=0.1, epsilon=1e-6, lambda_=0.02,
                  regularizer="group_lasso", dims=(0, 2, 3), view=None, reweight=True,
                  solver="exact", max_iters=20, rtol=1e-8, pg_stop="inexact", pg_eps=1e-3)

    def efficiency():
        p = torch.randn(O, I, 3, 3, generator=gen)
        state = [p.clone(), torch.zeros_like(p), torch.zeros_like(p)]
        grad = torch.randn(O, I, 3, 3, generator=gen)
        meter = traffic.Meter()
        for name, t in zip(["param", "grad", "w0", "v", "u"], [p, grad, *state]):
            meter.region(name, t)
        with meter.counting():
            tb.ramda([p], [grad], *[[s] for s in state], [torch.zeros(I)], step=1, **kwargs)
        tb.clear_cache()
        by = meter.by_name()
        issued = sum(by[k]["read"] + by[k]["written"] for k in ["param", "grad", "w0", "v", "u"])
        return issued / (32 * sum(by[k]["sectors"] for k in ["param", "grad", "w0", "v", "u"]))

    assert efficiency() >= 0.9
    monkeypatch.setattr(tb, "SHORT_RUN", 0)  # the rows tiling these groups had before
    assert efficiency() < 0.6


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
def test_unit_kernel_reads_a_zero_unit_once_and_a_nonzero_unit_per_pass():
    """The Triton unit kernel on chunked units (MLP neurons of 1041 elements,
    NOTE: [unit tile]) after three reference steps: at a lambda that zeroes
    every unit the step is at RAMDA's floor (read g, p, W0, V, U once, write p,
    V, U once: 32 B per element), the write pass reading no state of a zero
    unit; at a lambda that zeroes none, W0, V and U are read once per pass
    (pass 1, any Newton passes, the write pass) and V, U written once."""
    for scale, zero in ((1e3, 1.0), (1e-3, 0.0)):
        r = traffic.units_traffic("mlp", 520, 2, "ramda", torch.float32, 3, 1, 4, scale)["units"]
        by = r["by"]
        assert r["zero_units"] == zero
        assert by["grad"] == 4.0 and by["param"] == 8.0, by
        passes = by["state initial_point"] / 4.0
        assert passes == int(passes) and (passes == 1 if zero else passes >= 2), by
        assert by["state grad_sum"] == by["state grad_sum_sq"] == 4.0 * passes + 4.0, by
