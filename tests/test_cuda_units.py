"""The CUDA unit-group kernel (csrc/cuda/units.cuh; NOTE: [CUDA unit blocks] in
csrc/cuda/units.h) executed on the CPU, against the reference.

The kernel and the launch table the op uploads (csrc/cuda/units.h: lay_out_units)
run on CPU threads under the stand-in for the CUDA runtime (NOTE: [CUDA on CPU] in
csrc/tests/cuda_host/cuda_runtime.h): one thread per CUDA thread, barriers for
__syncthreads and warp shuffles, blocks in a shuffled order (a new seed every
step), scratch NaN-filled. The stand-in takes the place of the cpu backend's unit
step (``_units.fused_step`` over it), so the optimizers, the segment table, the
state reload and the harness's comparison are those of tests/test_units_fused.py
(its case builders and tolerance rule): parameters and state against
python/ramda_ref/units.py, ``unit_sigma`` (the warm start, docs/math.md section
4) with the root floor, the zero units the reference's.

Cases: units spanning 1 to 6 tensors of fp32, bf16 and fp16 (plain, channels_last,
transposed) for the four optimizers; units of 1, 13, 37, 700, 1031 (over one
256-thread block) and 5000 elements (over the kernel's register rows: the
streamed passes, RMDA / ProxSGD through the NaN-filled scratch) in fp32, three
of them in bf16 and in fp16;
lambda 0 (every element unregularized); the counted traffic of a unit-grouped
MLP. A dropped __syncthreads is caught by ThreadSanitizer in ctest
(cuda_units_tsan_flags_missing_barrier), which sees the missing happens-before
edge on every run; a comparison of results catches it only when the threads
happen to interleave badly, so it is not a test here."""

import ctypes
import math

import pytest
import torch

from ramda_kernels import testing as T
from ramda_kernels.backends import _ext, _ops, _units
from ramda_ref import units as U

from test_cuda_on_cpu import DTYPE, load_lib, metered
from test_units_fused import LAMBDA, _check, _problem, _run

pytestmark = pytest.mark.skipif(_ext.EXT is None, reason="the C++ extension is not built (the optimizers' host side)")

DESC_FIELDS = 7


def load_units_lib():
    """The stand-in library (test_cuda_on_cpu.load_lib) with the unit entry point typed."""
    h = load_lib()
    h.ramda_cuda_host_units_step.restype = ctypes.c_int
    h.ramda_cuda_host_units_step.argtypes = [
        ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    return h


@pytest.fixture(scope="module")
def lib():
    return load_units_lib()


class StandIn:
    """The ``run_op`` of ``_units.fused_step`` on the stand-in: the CUDA op's
    arguments as CPU buffers; a new block order every call. With ``counts`` (a
    dict), the meter's figures of every call are added to it per role
    (``test_cuda_on_cpu.metered``: read, written, sectors read, sectors written, bytes)."""

    def __init__(self, lib, drop_sync=0, counts=None):
        self.lib, self.drop_sync, self.calls, self.counts = lib, drop_sync, 0, counts

    def __call__(self, name, params, grads, lists, sigma, table, scalars, amsgrad, reweight):
        desc = []
        for i, (p, g) in enumerate(zip(params, grads)):
            desc += [p.data_ptr(), g.data_ptr(), *[lst[i].data_ptr() if lst else 0 for lst in lists],
                     p.numel(), DTYPE[p.dtype]]
        c_desc = (ctypes.c_int64 * len(desc))(*desc)
        c_scalars = (ctypes.c_double * len(scalars))(*scalars)
        seg, start, free = table.segments, table.unit_start, table.free
        err = ctypes.create_string_buffer(512)

        def run():
            rc = self.lib.ramda_cuda_host_units_step(
                name.encode(), c_scalars, len(scalars), int(amsgrad), int(reweight), len(params), c_desc,
                seg.data_ptr(), seg.shape[0], start.data_ptr(), start.numel() - 1, free.data_ptr(),
                free.shape[0], sigma.data_ptr() if sigma is not None else None, 1000 + self.calls,
                self.drop_sync, err, 512)
            assert rc == 0, err.value.decode()

        self.calls += 1
        if self.counts is None:
            return run()
        roles = [(f"param:{i}", p) for i, p in enumerate(params)] + [(f"grad:{i}", g) for i, g in enumerate(grads)]
        roles += [(f"state{r}:{i}", x) for r, lst in enumerate(lists) for i, x in enumerate(lst)]
        roles += [("sigma", sigma)] if sigma is not None else []
        for key, c in metered(self.lib, roles, run).items():
            acc = self.counts.setdefault(key, [0] * 5)
            for k in range(5):
                acc[k] += c[k]


@pytest.fixture
def stand_in(lib, monkeypatch):
    """Routes the cpu backend's unit groups to the stand-in (the CUDA backend's capabilities)."""
    import ramda_kernels.backends.cpu  # noqa: F401  (registers its unit step first)

    def install(drop_sync=0, counts=None):
        op = StandIn(lib, drop_sync, counts)
        monkeypatch.setitem(_ops.UNIT_KERNELS, "cpu", _units.fused_step(op, _ext.CAPABILITIES))
        return op
    return install


def _compare(name, params, units, steps=8, reload_at=4, lam=None, **extra):
    fast, ref, truth = _run(name, params, units, steps=steps, reload_at=reload_at, lam=lam, **extra)
    res = T.ParityResult({"name": name})
    zeros = _check(res, fast, ref, truth, U.normalize_units(units, [p.shape for p in params]))
    return res, zeros, fast


@pytest.mark.parametrize("name", ["RAMDA", "ProxAdamW", "RMDA", "ProxSGD"])
@pytest.mark.parametrize("seed", [0, 1])
def test_units_match_the_reference(stand_in, name, seed):
    op = stand_in()
    params, units = _problem(seed)
    norm = U.normalize_units(units, [p.shape for p in params])
    assert {len({i for i, _, _ in u}) for u in norm} == set(range(1, 7))
    assert {p.dtype for p in params} == {torch.float32, torch.bfloat16, torch.float16}
    res, zeros, fast = _compare(name, params, units)
    assert op.calls == 8  # every step on the stand-in, one launch each
    assert res.ok, str(res)
    assert 0 < zeros < len(norm), zeros
    if name in ("RAMDA", "ProxAdamW"):
        sigma = fast.state[fast.param_groups[0]["params"][0]][U.SIGMA_KEY]
        assert sigma.shape == (len(norm),) and bool((sigma > 0).any())


def test_amsgrad_and_unweighted_units_match_the_reference(stand_in):
    stand_in()
    params, units = _problem(2)
    for name, extra, lam in (("ProxAdamW", {"amsgrad": True}, LAMBDA["ProxAdamW"]),
                             ("RAMDA", {"reweight": False}, 7.0 * LAMBDA["RAMDA"])):
        res, _, _ = _compare(name, params, units, lam=lam, **extra)
        assert res.ok, str(res)


def _sized(n, dtype, seed=0):
    """Three tensors (rows of A, columns of B, entries of a bias) and four units
    of n elements each (n = 1: the bias entry alone); unit 4 is in no unit."""
    gen = torch.Generator().manual_seed(seed)
    a = (n - 1) // 2 if n > 1 else 0
    b = n - 1 - a
    ramp = torch.logspace(-1.5, 0.5, 5, dtype=torch.float64)
    params = [torch.randn(5, max(a, 1), generator=gen, dtype=torch.float64) * ramp[:, None],
              (torch.randn(5, max(b, 1), generator=gen, dtype=torch.float64) * ramp[:, None]).t(),
              torch.randn(5, generator=gen, dtype=torch.float64) * ramp]
    units = [([(0, 0, k)] if a else []) + ([(1, 1, k)] if b else []) + [(2, 0, k)] for k in range(4)]
    return [p.to(dtype) for p in params], units


#: every size in fp32, each 16-bit type on three sizes (one over a block, one over the register rows)
SIZES = [(n, "fp32") for n in (1, 13, 37, 700, 1031, 5000)] + [
    (13, "bf16"), (1031, "bf16"), (5000, "bf16"), (37, "fp16"), (700, "fp16"), (5000, "fp16")]


@pytest.mark.parametrize("n, dtype", SIZES)
def test_unit_sizes_match_the_reference(stand_in, n, dtype):
    stand_in()
    params, units = _sized(n, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    assert int(_units.build_table(U.normalize_units(units, [p.shape for p in params]),
                                  [p.shape for p in params], [p.stride() for p in params]).sizes[0]) == n
    names = ("RAMDA", "ProxAdamW", "RMDA", "ProxSGD") if n == 5000 else ("RAMDA", "ProxAdamW")
    for name in names:
        # lambda scaled so that some units are zero and some not at every size
        lam = LAMBDA[name] * (0.5 if n > 1 else 0.3)
        res, zeros, _ = _compare(name, params, units, steps=4, reload_at=2, lam=lam)
        assert res.ok, f"{name}: {res}"


def test_zero_lambda_leaves_every_element_unregularized(stand_in):
    stand_in()
    params, units = _problem(3)
    res, zeros, fast = _compare("RAMDA", params, units, lam=0.0)
    assert res.ok and zeros == 0, str(res)
    assert U.SIGMA_KEY not in fast.state[fast.param_groups[0]["params"][0]]


def test_counted_traffic_of_row_units_is_the_floor(lib, stand_in):
    """One RAMDA fp32 step, units of two tensors' rows (register rows) and a free
    row and bias (elementwise): every element is read once (grad, W0, V, U and the
    parameter, which the averaging reads) and written once (V, U, parameter):
    32 B, in whole sectors (a warp's 32 lanes read 128 contiguous bytes); sigma is
    read once per warp (8 per unit) and written by each nonzero unit."""
    import ramda_kernels as rk

    counts = {}
    stand_in(counts=counts)
    gen = torch.Generator().manual_seed(0)
    ramp = torch.logspace(-1.5, 0.5, 8, dtype=torch.float64)[:, None]
    params = [torch.nn.Parameter((torch.randn(8, 64, generator=gen, dtype=torch.float64) * ramp).float())
              for _ in range(2)] + [torch.nn.Parameter(torch.randn(8, generator=gen))]
    units = [[(0, 0, k), (1, 0, k)] for k in range(7)]  # row 7 and the bias in no unit
    # momentum 1: the parameter is the subproblem's solution, zero on a zero unit
    opt = rk.RAMDA([{"params": params, "units": units, "lambda_": 2.0, "momentum": 1.0}], backend="cpu")
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    sigma = counts.pop("sigma")
    counts.pop("other") == [0, 0, 0, 0, 0] or pytest.fail(f"accesses outside the tensors: {counts}")
    assert counts.pop("scratch")[:4] == [0, 0, 0, 0]
    per_elem = {"param": 8, "grad": 4, "state0": 4, "state1": 8, "state2": 8}
    for key, (r, w, sr, sw, size) in counts.items():
        assert r + w == per_elem[key.split(":")[0]] * size // 4, key
        assert 32 * (sr + sw) == r + w, key
    nonzero = sum(bool(torch.cat([params[0][k], params[1][k]]).ne(0).any()) for k in range(7))
    assert 0 < nonzero < 7
    assert sigma[0] == 8 * 4 * 7 and sigma[1] == 4 * nonzero
