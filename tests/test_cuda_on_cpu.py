"""The CUDA kernels (csrc/cuda) executed on the CPU, against the reference.

The unchanged kernel bodies and the launch table of csrc/cuda/plan.h (what
the device backend uploads) run on CPU threads under the stand-in for the
CUDA runtime in csrc/tests/cuda_host (NOTE: [CUDA on CPU] there): one thread
per CUDA thread, barriers for __syncthreads and warp shuffles, blocks in a
shuffled order, scratch pre-filled with NaN. The library is built by CMake
(target ramda_cuda_host, no torch) into build/native-tests when `make test`
has configured it, else into build/cuda-host on first use, and
loaded with ctypes; the test passes CPU tensors and the per-call scalars the
bindings compute (csrc/bindings.cpp), runs one step and compares parameters
and state with python/ramda_ref:

* exact group lasso on rows, columns, NCHW and channels_last channel-wise,
  a heads view, strided (transposed, permuted) tensors and groups of 1, 13,
  37, 700 and 1031 (> one 256-thread block) elements;
* every optimizer and solver (exact, PG, closed form) on channels_last,
  16-bit parameters on grouped paths, none / l1 / whole-tensor PG in fp32,
  bf16 and fp16;
* the RMDA / ProxSGD shrink and PG on column tiles (input-wise Linear,
  channels_last Conv) and the shrink on run tiles (NCHW channel-wise), in
  fp32, bf16 and fp16, with some groups zero;
* the zero groups exactly zero, the same bits for two block orders, and the
  stand-in's 16-bit conversions against torch's;
* the meter (NOTE: [Counted global memory]): bytes and sectors of an
  elementwise step, of row groups and of column and run tiles (exact,
  shrink, PG), derived from the addresses;
* the warm start of the exact solve (docs/math.md section 4, item 5): the
  written sigma is T/||w_g||, zero groups keep theirs, bad starts still
  solve, a start at the root saves Newton sweeps, and a tensor whose groups
  the kernels number differently from the reference is refused.

The KKT residuals of the exact solve and the ThreadSanitizer runs (which
must flag a dropped __syncthreads) are the native test
csrc/tests/test_cuda_host.cpp, run by ctest.

Real-device behaviour (streams, graph capture, the device's own cbrtf and
FMA contraction) stays in tests/test_cuda_backend.py.
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess

import pytest
import torch

import ramda_ref.functional as ref
from ramda_ref.definitions import DEFINITIONS
from ramda_kernels.testing import GROUPINGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `make test` has configured build/native-tests (the same CMake project) already.
BUILD = next((d for d in (os.path.join(ROOT, "build", "native-tests"), os.path.join(ROOT, "build", "cuda-host"))
              if os.path.exists(os.path.join(d, "CMakeCache.txt"))), os.path.join(ROOT, "build", "cuda-host"))
OPTIM = {"ramda": 0, "rmda": 1, "proxadamw": 2, "proxsgd": 3}
REG = {"none": 0, "l1": 1, "group_lasso": 2}
SOLVER = {"exact": 0, "pg": 1}
DTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_DIMS = 8
TENSOR_FIELDS = 10 + 3 * MAX_DIMS


@pytest.fixture(scope="module")
def lib():
    return load_lib()


def load_lib():
    """Build (incrementally) and load the CUDA-on-CPU library."""
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake is needed to build the CUDA-on-CPU library (csrc/tests/cuda_host)")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    env = dict(os.environ, RAMDA_TESTS_ONLY="1")
    if not os.path.exists(os.path.join(BUILD, "CMakeCache.txt")):
        subprocess.run(["cmake", "-S", ROOT, "-B", BUILD, *gen], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", BUILD, "--target", "ramda_cuda_host"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    so = [f for f in os.listdir(BUILD) if f.startswith("libramda_cuda_host")]
    assert so, f"no libramda_cuda_host in {BUILD}"
    h = ctypes.CDLL(os.path.join(BUILD, so[0]))
    h.ramda_cuda_host_meter_start.argtypes = [ctypes.c_int, ctypes.c_void_p]
    h.ramda_cuda_host_meter_read.argtypes = [ctypes.c_void_p]
    h.ramda_cuda_host_step.restype = ctypes.c_int
    h.ramda_cuda_host_step.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                       ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                                       ctypes.c_char_p, ctypes.c_int]
    assert h.ramda_cuda_host_fields(0) == 21 and h.ramda_cuda_host_fields(1) == TENSOR_FIELDS
    return h


# --- the per-call scalars and per-tensor metadata, as csrc/bindings.cpp computes them

HP = {
    "ramda": dict(lr=0.1, momentum=0.5, epsilon=1e-6, alpha=0.3),
    "rmda": dict(lr=0.1, momentum=0.5, alpha=0.3),
    "proxadamw": dict(lr=0.02, beta1=0.9, beta2=0.999, epsilon=1e-8, weight_decay=0.01),
    "proxsgd": dict(lr=0.1, momentum=0.5),
}
LAMBDA = {"ramda": 0.4, "rmda": 0.5, "proxadamw": 1.5, "proxsgd": 1.0}
#: lambda_ of the zero-group checks (momentum 1): some groups zero, not all.
ZERO_LAMBDA = {"ramda": 1.2, "rmda": 2.0, "proxsgd": 2.0, "proxadamw": 20.0}


#: StepArgs slots (module.cpp's field order) of the named per-step scalars of
#: ramda_ref.definitions; ProxAdamW's epsilon sits in its AdamCoeffs block.
_SLOTS = {"s": 5, "epsilon": 6, "keep": 7, "c": 8, "beta": 9, "lr": 10, "decay": 11,
          "tau": 19, "thr": 19, "eps_t": 20}
_ADAM_SLOTS = {"beta1": 12, "one_minus_beta1": 13, "beta2": 14, "one_minus_beta2": 15,
               "bias2_sqrt": 16, "epsilon": 17, "step_size": 18}


def step_fields(opt, reg, solver, step, lambda_, hp, max_iters=100, pg_eps=1e-3, amsgrad=False):
    """The StepArgs values of one call: the scalars come from the optimizer's one
    definition (as the C++ ops get them), nothing is recomputed here."""
    v = [0.0] * 21
    v[0], v[1], v[2], v[3], v[4] = OPTIM[opt], REG[reg], SOLVER[solver], max_iters, float(amsgrad)
    group = dict(hp, lambda_=lambda_, pg_eps=pg_eps)
    scalars = DEFINITIONS[opt].scalars(step, hp.get("alpha", 0.0), group)
    slots = _ADAM_SLOTS if opt == "proxadamw" else {}
    for name, value in scalars.items():
        v[slots.get(name, _SLOTS.get(name))] = float(value)
    return v


def tensor_fields(p, g, states, opt, reg, solver, thr_base, dims, view, reweight=True, sigma=None):
    """The descriptor of one tensor: addresses, size, dtype and (group lasso)
    the grouped view; the driver decides the path and the whole-tensor l1
    group as the bindings do (csrc/cuda/fused_path.h). Weights: c_g and the PG
    tolerance scale sqrt(|g| / n) (1 and 1 for the whole-tensor l1 group)."""
    ptrs = [p.data_ptr(), g.data_ptr()] + [s.data_ptr() if s is not None else 0 for s in states]
    ptrs.append(sigma.data_ptr() if sigma is not None else 0)
    desc = ptrs + [p.numel(), DTYPE[p.dtype], 0, 0] + [0] * (3 * MAX_DIMS)
    cg, tol_scale = 1.0, 1.0
    if reg == "group_lasso" and p.numel() > 0:
        vw = p.view(view) if view is not None else p
        shape, strides = list(vw.shape), list(vw.stride())
        nd = len(shape)
        red = [True] * nd if dims is None else [d in [x % nd for x in dims] for d in range(nd)]
        gsize = math.prod(s for s, r in zip(shape, red) if r)
        desc[9] = len(shape)
        for i, (s, st, r) in enumerate(zip(shape, strides, red)):
            desc[10 + i], desc[10 + MAX_DIMS + i], desc[10 + 2 * MAX_DIMS + i] = s, st, int(r)
        cg = math.sqrt(gsize) if reweight else 1.0
        tol_scale = math.sqrt(gsize / p.numel())
    return desc, [cg, tol_scale]


def host_step(lib, fields, tensors, seed=0, drop_sync=0):
    """tensors: list of (param, grad, [s0, s1, s2], descriptor, weights)."""
    step = (ctypes.c_double * 21)(*fields)
    desc = (ctypes.c_int64 * max(1, len(tensors) * TENSOR_FIELDS))(
        *[x for t in tensors for x in t[3]])
    w = (ctypes.c_double * max(1, 2 * len(tensors)))(*[x for t in tensors for x in t[4]])
    err = ctypes.create_string_buffer(512)
    rc = lib.ramda_cuda_host_step(step, len(tensors), desc, w, seed, drop_sync, err, 512)
    assert rc == 0, err.value.decode()


# --- cases

# Extra shapes (dims=(0,) groups): 37 and 700 element columns, a transposed
# (strided) weight, and a permuted 3-d tensor.
EXTRA = {
    "sizes-37-700": ([(37, 5), (700, 2)], (0,), None, None),
    "strided": ([(9, 13, "t"), (6, 4, 5, "p")], (0,), None, None),
}


def make_tensor(shape, fmt, gen, dtype, scale=1.0):
    tag = shape[-1] if isinstance(shape[-1], str) else None
    shape = tuple(s for s in shape if not isinstance(s, str))
    if tag == "t":  # a transposed view: dense, column-major
        x = torch.randn(shape[::-1], generator=gen, dtype=torch.float64).t()
    elif tag == "p":  # a permuted view: dense, dims out of memory order
        x = torch.randn((shape[2], shape[0], shape[1]), generator=gen, dtype=torch.float64).permute(1, 2, 0)
    else:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        if fmt is not None and fmt != torch.contiguous_format and x.dim() == 4:
            x = x.contiguous(memory_format=fmt)
    return (x * scale).to(dtype)


def like(p, fill):
    s = torch.empty_like(p, dtype=torch.float32)
    s.copy_(fill)
    return s


def build_case(opt, grouping, dtype, gen, shapes=None, spread=False):
    """The grouping's tensors (or `shapes` with its dims, view and format);
    spread: dim 1 scaled too (the groups of the input-wise and channel-wise
    layouts), so that their norms differ and a threshold zeroes some."""
    default, dims, view, fmt = {**GROUPINGS, **EXTRA}[grouping]
    shapes = shapes or default
    params, grads, states = [], [], []
    for shape in shapes:
        # groups of different scales, so that some are zeroed and some not
        p = make_tensor(shape, fmt, gen, dtype, 0.5)
        rows = torch.rand(p.shape[:1] + (1,) * (p.dim() - 1), generator=gen, dtype=torch.float64)
        p.copy_((p.double() * (0.3 + rows)).to(dtype))
        if spread and p.dim() >= 2:
            cols = torch.rand((1, p.shape[1]) + (1,) * (p.dim() - 2), generator=gen, dtype=torch.float64)
            p.copy_((p.double() * 2 * cols).to(dtype))
        g = like(p, torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(dtype)
        rnd = lambda: torch.randn(p.shape, generator=gen, dtype=torch.float64)  # noqa: E731
        # W0 in the parameter's dtype (ramda_ref.definitions: Definition.state_dtype)
        if opt == "ramda":
            st = [like(p, p.double() + 0.1 * rnd()).to(p.dtype), like(p, 0.2 * rnd()),
                  like(p, 0.5 * rnd().abs())]
        elif opt == "rmda":
            st = [like(p, p.double() + 0.1 * rnd()).to(p.dtype), like(p, 0.2 * rnd()), None]
        elif opt == "proxadamw":
            st = [like(p, 0.1 * rnd()), like(p, 0.01 * rnd().abs()), None]
        else:
            st = [like(p, 0.3 * rnd()), None, None]
        params.append(p)
        grads.append(g)
        states.append(st)
    return params, grads, states, dims, view


def run_ref(opt, reg, solver, step, lambda_, hp, params, grads, states, dims, view, max_iters=100):
    common = dict(step=step, lambda_=lambda_, regularizer=reg, dims=list(dims) if dims else None,
                  view=list(view) if view else None, reweight=True)
    pg = dict(solver=solver, max_iters=max_iters, rtol=1e-8, pg_stop="inexact", pg_eps=1e-3)
    s = [[x[i] for x in states] for i in range(3)]
    if opt == "ramda":
        ref.ramda(params, grads, s[0], s[1], s[2], alpha=hp["alpha"], lr=hp["lr"],
                  momentum=hp["momentum"], epsilon=hp["epsilon"], **common, **pg)
    elif opt == "rmda":
        ref.rmda(params, grads, s[0], s[1], alpha=hp["alpha"], lr=hp["lr"], momentum=hp["momentum"],
                 **common)
    elif opt == "proxadamw":
        ref.proxadamw(params, grads, s[0], s[1], [], lr=hp["lr"], beta1=hp["beta1"],
                      beta2=hp["beta2"], epsilon=hp["epsilon"], weight_decay=hp["weight_decay"],
                      amsgrad=False, **common, **pg)
    else:
        ref.proxsgd(params, grads, s[0], lr=hp["lr"], momentum=hp["momentum"], **common)


def clone_all(params, grads, states):
    return ([p.clone() for p in params], [g.clone() for g in grads],
            [[s.clone() if s is not None else None for s in st] for st in states])


def run_both(lib, opt, reg, solver, grouping, dtype, step=3, seed=0, order_seed=0, hp=None,
             lambda_=None, sigmas=None, meter=None, shapes=None, spread=False, max_iters=100):
    """One step of the reference and of the CUDA kernels on CPU threads. sigmas:
    one warm-start tensor per parameter (or None), updated in place; meter: a
    dict that receives the step's counts per tensor role (`metered`); spread:
    build_case's; max_iters: PG's cap."""
    gen = torch.Generator().manual_seed(seed)
    hp = hp or HP[opt]
    if lambda_ is None:
        lambda_ = 0.0 if reg == "none" else LAMBDA[opt]
    params, grads, states, dims, view = build_case(opt, grouping, dtype, gen, shapes, spread)
    rp, rg, rs = clone_all(params, grads, states)
    run_ref(opt, reg, solver, step, lambda_, hp, rp, rg, rs, dims, view, max_iters)
    fields = step_fields(opt, reg, solver, step, lambda_, hp, max_iters=max_iters)
    tensors = []
    for i, (p, g, st) in enumerate(zip(params, grads, states)):
        sg = sigmas[i] if sigmas is not None else None
        desc, w = tensor_fields(p, g, st, opt, reg, solver, fields[19], dims, view, sigma=sg)
        tensors.append((p, g, st, desc, w))
    if meter is None:
        host_step(lib, fields, tensors, seed=order_seed)
    else:
        roles = []
        for i, (p, g, st) in enumerate(zip(params, grads, states)):
            roles += [("param", p), ("grad", g)] + [(f"s{k}", x) for k, x in enumerate(st) if x is not None]
            if sigmas is not None:
                roles.append(("sigma", sigmas[i]))
        meter.update(metered(lib, roles, lambda: host_step(lib, fields, tensors, seed=order_seed)))
    return (params, states), (rp, rs), (dims, view, fields)


def metered(lib, roles, run):
    """Runs `run` under the stand-in's meter (NOTE: [Counted global memory] in
    csrc/tests/cuda_host/cuda_runtime.h). roles: (name, tensor) pairs. Returns
    per name (plus "scratch" and "other"): bytes read, bytes written, sectors
    read, sectors written (summed over warp-level instructions), bytes of the
    tensors."""
    regions = [(t.data_ptr(), t.numel() * t.element_size()) for _, t in roles]
    arr = (ctypes.c_int64 * max(1, 2 * len(regions)))(*[x for r in regions for x in r])
    out = (ctypes.c_int64 * (4 * (len(regions) + 2)))()
    lib.ramda_cuda_host_meter_start(len(regions), arr)
    try:
        run()
    finally:
        lib.ramda_cuda_host_meter_read(out)
    counts = {}
    for i, name in enumerate([n for n, _ in roles] + ["scratch", "other"]):
        c = counts.setdefault(name, [0, 0, 0, 0, 0])
        for k in range(4):
            c[k] += out[4 * i + k]
        c[4] += regions[i][1] if i < len(regions) else 0
    return counts


def assert_close_to_ref(fast, slow, dtype, solver):
    (fp, fs), (rp, rs) = fast, slow
    # fp32: a few ulps of the tensor's scale; PG stops on a tolerance, so the
    # fused and reference iterates may differ by one iteration near it.
    rel = 5e-3 if solver == "pg" else 2e-6
    eps16 = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    for i, (a, b) in enumerate(zip(fp, rp)):
        if a.numel() == 0:
            continue
        a64, b64 = a.double(), b.double()
        scale = float(b64.abs().max())
        # 16-bit parameters: the one rounding of the result may land on the other side
        bound = rel * max(scale, 1e-30) + 2 * eps16 * b64.abs()
        err = (a64 - b64).abs()
        assert bool((err <= bound).all()), (
            f"params[{i}] {tuple(a.shape)}: max err {float(err.max()):.3g} (scale {scale:.3g})")
        for k, (x, y) in enumerate(zip(fs[i], rs[i])):
            if x is None:
                continue
            e = float((x.double() - y.double()).abs().max())
            assert e <= 2e-6 * max(float(y.abs().max()), 1e-30), f"state {k} of params[{i}]: err {e:.3g}"


def order_seed(*names):
    """A block order per test, so that the suite runs many orders."""
    return sum(ord(c) * 31 ** k for k, c in enumerate("-".join(names))) % (2 ** 63)


# Rows, columns (with groups of 1, 13 and 1031 > one block), NCHW and
# channels_last channel-wise, a view (heads), 37/700-element groups and
# strided tensors. The other groupings of ramda_kernels.testing are the same
# tilings again and cost seconds each here (one OS thread per CUDA thread).
LAYOUTS = ["linear-input", "linear-output", "conv2d-channel", "conv2d-channels-last", "heads",
           "sizes-37-700", "strided"]
GROUP_SOLVERS = [("ramda", "exact"), ("ramda", "pg"), ("rmda", "exact"), ("proxadamw", "exact"),
                 ("proxadamw", "pg"), ("proxsgd", "exact")]


@pytest.mark.parametrize("grouping", LAYOUTS)
def test_exact_group_lasso_every_layout(lib, grouping):
    fast, slow, _ = run_both(lib, "ramda", "group_lasso", "exact", grouping, torch.float32,
                             order_seed=order_seed(grouping))
    assert_close_to_ref(fast, slow, torch.float32, "exact")


# NOTE: [Register rows] in csrc/cuda/kernels.cuh: rows of up to 16 x 256 elements
# keep z, d in registers; longer rows re-read the state per Newton pass.
CACHED_ROW = 16 * 256


@pytest.mark.parametrize("opt", ["ramda", "proxadamw"])
@pytest.mark.parametrize("cols", [CACHED_ROW, CACHED_ROW + 3])
def test_exact_rows_at_the_register_limit(lib, opt, cols):
    """Rows of 4096 elements (the longest kept in registers) and of 4099
    (the two-pass plan), cold and warm, against the reference. In registers
    every input is read once and every output written once, whatever the
    number of Newton steps (RAMDA fp32: 32 B per element); past the limit a
    cold solve re-reads the state for its Newton passes."""
    shapes = [(3, cols)]
    dims, view = GROUPINGS["linear-output"][1:3]
    sig = sigma_like(build_case(opt, "linear-output", torch.float32, torch.Generator().manual_seed(0),
                                shapes)[0], dims, view)
    for step in (3, 4):  # cold (sigma 0), then warm from the first step's sigma
        counts = {}
        fast, slow, _ = run_both(lib, opt, "group_lasso", "exact", "linear-output", torch.float32, step=step,
                                 seed=step, shapes=shapes, sigmas=sig, meter=counts, order_seed=cols)
        assert_close_to_ref(fast, slow, torch.float32, "exact")
        grad = counts["grad"]
        assert grad[:2] == [grad[4], 0]
        reads = counts["s1"][0] / counts["s1"][4]  # V (RAMDA) / v (ProxAdamW): every pass reads it
        if cols <= CACHED_ROW:
            assert reads == 1 and counts["s1"][1] == counts["s1"][4], (step, reads)
            assert counts["param"][:2] == [counts["param"][4]] * 2
        elif step == 3:
            assert reads > 2, reads
    assert any(bool((s > 0).any()) for s in sig), "no nonzero group: the warm start is not checked"


@pytest.mark.parametrize("opt,solver", GROUP_SOLVERS)
def test_group_lasso_every_optimizer(lib, opt, solver):
    # channels_last: a "columns" tiling with strided groups
    fast, slow, _ = run_both(lib, opt, "group_lasso", solver, "conv2d-channels-last", torch.float32,
                             order_seed=order_seed(opt, solver))
    assert_close_to_ref(fast, slow, torch.float32, solver)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("opt,solver", [("ramda", "exact"), ("proxadamw", "pg"), ("rmda", "exact")])
def test_group_lasso_16bit(lib, opt, solver, dtype):
    fast, slow, _ = run_both(lib, opt, "group_lasso", solver, "heads", DTYPES[dtype],
                             order_seed=order_seed(opt, solver, dtype))
    assert_close_to_ref(fast, slow, DTYPES[dtype], solver)


# RMDA/ProxSGD have one (closed-form) solver; l1 + PG is the whole-tensor PG
# group (RAMDA, ProxAdamW), a few thousand elements in one block.
ELEMENTWISE = [(o, r, "exact", dt) for o in OPTIM for r in ("none", "l1") for dt in DTYPES]
ELEMENTWISE += [("ramda", "l1", "pg", "fp32"), ("proxadamw", "l1", "pg", "bf16")]


@pytest.mark.parametrize("opt,reg,solver,dtype", ELEMENTWISE)
def test_elementwise_and_l1_match_reference(lib, opt, reg, solver, dtype):
    fast, slow, _ = run_both(lib, opt, reg, solver, "linear-input", DTYPES[dtype],
                             order_seed=order_seed(opt, reg, solver, dtype))
    assert_close_to_ref(fast, slow, DTYPES[dtype], solver)


# The RMDA / ProxSGD shrink and PG on column tiles (NOTE: [Shrink tiles],
# NOTE: [PG column tiles] in csrc/cuda/kernels.cuh): input-wise Linear
# (groups of 13, 1, 1031 > 8 warps' rows and 9 elements, an empty tensor), 37
# and 700, channels_last 3x3, 1x1 and 5x5 Conv, in every parameter dtype.
TILE_LAYOUTS = ["linear-input", "sizes-37-700", "conv2d-channels-last"]
TILE_SOLVERS = [("rmda", "exact"), ("proxsgd", "exact"), ("ramda", "pg"), ("proxadamw", "pg")]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("grouping", TILE_LAYOUTS)
@pytest.mark.parametrize("opt,solver", TILE_SOLVERS)
def test_tiles_match_reference(lib, opt, solver, grouping, dtype):
    """Groups of spread norms, some of them zero (momentum 1 for RAMDA, RMDA:
    the parameter is w), against the reference; the zero groups exactly zero."""
    hp = dict(HP[opt], momentum=1.0) if "momentum" in HP[opt] else HP[opt]
    (fp, fs), (rp, rs), _ = run_both(lib, opt, "group_lasso", solver, grouping, DTYPES[dtype], spread=True, hp=hp,
                                     lambda_=ZERO_LAMBDA[opt], order_seed=order_seed("tiles", opt, grouping, dtype))
    assert_close_to_ref((fp, fs), (rp, rs), DTYPES[dtype], solver)
    zeros = 0
    for a, b in zip(fp, rp):
        assert torch.equal(a == 0, b == 0)
        zeros += int((b == 0).sum())
    assert 0 < zeros < sum(b.numel() for b in rp), "no zero group, or all: the case checks less"


@pytest.mark.parametrize("max_iters", [1, 3])
@pytest.mark.parametrize("opt", ["ramda", "proxadamw"])
def test_pg_tiles_stop_at_the_cap(lib, opt, max_iters):
    """PG capped at 1 and 3 iterations on column tiles (NOTE: [PG column
    tiles]): every group stops where the reference's does, at its tolerance
    or at the cap, whatever the other groups of its tile do."""
    hp = dict(HP[opt], momentum=1.0) if "momentum" in HP[opt] else HP[opt]
    fast, slow, _ = run_both(lib, opt, "group_lasso", "pg", "sizes-37-700", torch.float32, spread=True, hp=hp,
                             lambda_=ZERO_LAMBDA[opt], max_iters=max_iters,
                             order_seed=order_seed("cap", opt, str(max_iters)))
    assert_close_to_ref(fast, slow, torch.float32, "exact")


@pytest.mark.parametrize("opt,grouping", [("ramda", "linear-input"), ("ramda", "conv2d-channels-last"),
                                          ("rmda", "linear-input"), ("rmda", "conv2d-channels-last"),
                                          ("rmda", "conv2d-channel"), ("proxsgd", "linear-input"),
                                          ("proxsgd", "conv2d-channels-last"), ("proxsgd", "conv2d-channel")])
def test_zero_groups_exact(lib, opt, grouping):
    """Momentum 1: the parameter is the subproblem's solution (RMDA, ProxSGD:
    the shrink's), so the groups the reference zeroes must be exactly zero
    here, and no others."""
    hp = dict(HP[opt], momentum=1.0)
    (fp, _), (rp, _), _ = run_both(lib, opt, "group_lasso", "exact", grouping, torch.float32,
                                   hp=hp, lambda_=ZERO_LAMBDA[opt], order_seed=order_seed("zero", opt, grouping),
                                   spread=opt != "ramda")
    zeros = total = 0
    for a, b in zip(fp, rp):
        assert torch.equal(a == 0, b == 0)
        zeros += int((b == 0).sum())
        total += b.numel()
    assert 0 < zeros < total, f"{zeros} of {total} elements zero: the case checks nothing"


def test_block_order_does_not_matter(lib):
    runs = [run_both(lib, "ramda", "group_lasso", "exact", "conv2d-channels-last", torch.float32,
                     order_seed=k)[0][0] for k in (1, 2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_16bit_conversions_match_torch(lib):
    """The stand-in's c10::Half / c10::BFloat16 (csrc/tests/cuda_host/c10)
    round like torch: every fp32 near each 16-bit boundary, subnormals, overflow,
    inf and NaN."""
    bits = torch.arange(0, 2 ** 16, dtype=torch.int32)
    h = bits.to(torch.int16).view(torch.float16).float()
    b = bits.to(torch.int16).view(torch.bfloat16).float()
    x = torch.cat([h, b, torch.randn(1 << 16) * 1e3, torch.tensor([65519.0, 65520.0, 65536.0, 1e-8,
                                                                  3e-8, 6e-8, float("inf")])])
    # neighbours of every representable value and the midpoints between them
    x = torch.cat([x, x.nextafter(torch.tensor(float("inf"))), x.nextafter(torch.tensor(float("-inf"))),
                   -x]).contiguous()
    x = x[~x.isnan()]
    n = x.numel()
    half = torch.empty(n, dtype=torch.int16)
    bf = torch.empty(n, dtype=torch.int16)
    lib.ramda_cuda_host_to_16bit(ctypes.c_void_p(x.data_ptr()), ctypes.c_int64(n),
                                 ctypes.c_void_p(half.data_ptr()), ctypes.c_void_p(bf.data_ptr()))
    assert torch.equal(half, x.half().view(torch.int16))
    assert torch.equal(bf, x.bfloat16().view(torch.int16))
    back_h, back_b = torch.empty(n), torch.empty(n)
    lib.ramda_cuda_host_from_16bit(ctypes.c_void_p(half.data_ptr()), ctypes.c_void_p(bf.data_ptr()),
                                   ctypes.c_int64(n), ctypes.c_void_p(back_h.data_ptr()),
                                   ctypes.c_void_p(back_b.data_ptr()))
    assert torch.equal(back_h, half.view(torch.float16).float())
    assert torch.equal(back_b, bf.view(torch.bfloat16).float())
    nan = torch.tensor([float("nan")])
    lib.ramda_cuda_host_to_16bit(ctypes.c_void_p(nan.data_ptr()), ctypes.c_int64(1),
                                 ctypes.c_void_p(half.data_ptr()), ctypes.c_void_p(bf.data_ptr()))
    assert half[:1].view(torch.float16).isnan().all() and bf[:1].view(torch.bfloat16).isnan().all()


# --- the meter: traffic of the kernels (NOTE: [Counted global memory])

def warp_sectors(n, elsize):
    """Distinct 32-byte sectors of one pass over n contiguous, 32-byte aligned
    elements by whole warps of consecutive lanes (a warp covers 32 elements)."""
    full, rest = divmod(n, 32)
    return full * (32 * elsize // 32) + -(-rest * elsize // 32)


def test_meter_counts_an_elementwise_step_exactly(lib):
    """RAMDA without a regularizer reads g, W0, V, U and the parameter once and
    writes V, U and the parameter once: 32 bytes per fp32 element, every
    sector used whole (each warp instruction covers 32 consecutive elements)."""
    counts = {}
    (params, _), _, _ = run_both(lib, "ramda", "none", "exact", "linear-input", torch.float32, meter=counts)
    n = sum(p.numel() for p in params)
    expect = {"param": (1, 1), "grad": (1, 0), "s0": (1, 0), "s1": (1, 1), "s2": (1, 1)}
    for role, (r, w) in expect.items():
        read, written, sec_r, sec_w, size = counts[role]
        assert (read, written) == (r * size, w * size), role
        sectors = sum(warp_sectors(p.numel(), 4) for p in params if p.numel())
        assert (sec_r, sec_w) == (r * sectors, w * sectors), role
    assert counts["scratch"][:4] == [0] * 4 and counts["other"][:4] == [0] * 4
    total = sum(c[0] + c[1] for c in counts.values())
    assert total == 32 * n


def grad_sectors(shape, dims):
    """Sectors of the one fp32 pass over the gradient of a contiguous 2-D
    tensor in the exact solve: rows (dims (1,)) are one group per block, a
    warp's lanes on 32 consecutive elements of a row; columns (dims (0,)) are
    column tiles (NOTE: [Column tiles]), a warp's lanes on one row of 32
    adjacent columns."""
    rows, cols = shape
    total = 0
    if dims == (1,):
        for g in range(rows):
            for w0 in range(0, cols, 32):
                total += len({4 * (g * cols + e) // 32 for e in range(w0, min(cols, w0 + 32))})
    else:
        for g0 in range(0, cols, 32):
            for e in range(rows):
                total += len({4 * (e * cols + g) // 32 for g in range(g0, min(cols, g0 + 32))})
    return total


@pytest.mark.parametrize("grouping", ["linear-output", "linear-input"])
def test_meter_counts_strided_sectors(lib, grouping):
    """The sectors of each warp-level access: the gradient is read once, and
    its sectors are the ones the lanes' addresses touch (torch's allocations
    are 64-byte aligned)."""
    counts = {}
    (params, _), _, (dims, _, _) = run_both(lib, "ramda", "group_lasso", "exact", grouping, torch.float32,
                                            meter=counts)
    read, written, sec_r, _, size = counts["grad"]
    assert (read, written) == (size, 0)
    expect = sum(grad_sectors(tuple(p.shape), dims) for p in params if p.numel())
    assert sec_r == expect


#: The state each optimizer writes (run_both's roles: s0, s1, s2 in the kernels' order).
WRITTEN_STATE = {"ramda": ("s1", "s2"), "rmda": ("s1",), "proxadamw": ("s0", "s1"), "proxsgd": ("s0",)}


def assert_whole_sectors(counts, state=WRITTEN_STATE["ramda"], scratch=False):
    """The gradient read once and the parameter and `state` written once, in
    whole sectors; no scratch traffic (scratch: some)."""
    read, _, sec_r, _, size = counts["grad"]
    assert (read, 32 * sec_r) == (size, size)
    for role in ("param", *state):
        _, written, _, sec_w, size = counts[role]
        assert (written, 32 * sec_w) == (size, size), role
    assert (counts["scratch"][:4] != [0] * 4) == scratch


@pytest.mark.parametrize("opt,solver", [("ramda", "exact"), ("rmda", "exact"), ("proxsgd", "exact"),
                                        ("ramda", "pg"), ("proxadamw", "pg")])
def test_meter_column_tiles_coalesce(lib, opt, solver):
    """Columns of 64- and 96-wide weights: pass 1's and the last pass's
    accesses cover 32 adjacent columns, 4 whole sectors: the gradient's reads
    and every write (state, parameter), each element written once, where one
    group per block (the RMDA / ProxSGD shrink and PG before NOTE: [Shrink
    tiles], NOTE: [PG column tiles] in csrc/cuda/kernels.cuh) used one 4-byte
    lane per sector of every strided column. A Newton pass re-reads the state
    only for the lanes whose group is not done, so those reads may use part
    of a sector. Nothing goes to scratch (NOTE: [two-pass plan]) but PG's z,
    d and iterate, laid out [element][lane]: pass 1 writes them in whole
    sectors, and the iterations' accesses miss only the lanes of done groups
    (here 71-86% of each sector used; one group per block: ~100%, its
    scratch is contiguous per group)."""
    counts = {}
    run_both(lib, opt, "group_lasso", solver, "sizes-37-700", torch.float32, meter=counts,
             shapes=[(37, 64), (300, 96)])
    assert_whole_sectors(counts, WRITTEN_STATE[opt], scratch=solver == "pg")
    if solver == "pg":
        read, written, sec_r, sec_w, _ = counts["scratch"]
        print(f"scratch sector efficiency: read {read / (32 * sec_r):.1%}, written {written / (32 * sec_w):.1%}")
        assert read >= 0.6 * 32 * sec_r and written >= 0.6 * 32 * sec_w


# NOTE: [Run tiles] in csrc/cuda/kernels.cuh: NCHW channel-wise Conv weights
# (groups W[:, i]) of runs K = 9, 6 and 49, with partial tiles (70 = 32 + 32 + 6
# groups, 40 = 32 + 8, 13 = 5 + 5 + 3) and two rows per warp.
RUN_SHAPES = [(16, 70, 3, 3), (6, 40, 2, 3), (5, 13, 7, 7)]


# The RMDA / ProxSGD shrink runs on the same tiles (NOTE: [Shrink tiles]),
# also with groups longer than a row buffer (40 x 9 = 360 > 288 positions).
RUN_TILE_CASES = [("ramda", "fp32"), ("proxadamw", "fp32"), ("rmda", "fp32"), ("rmda", "bf16"),
                  ("proxsgd", "fp32"), ("proxsgd", "fp16")]


@pytest.mark.parametrize("opt,dtype", RUN_TILE_CASES)
def test_run_tiles_match_reference(lib, opt, dtype):
    shapes = RUN_SHAPES if opt in ("ramda", "proxadamw") else RUN_SHAPES + [(40, 20, 3, 3)]
    fast, slow, _ = run_both(lib, opt, "group_lasso", "exact", "conv2d-channel", DTYPES[dtype],
                             order_seed=order_seed("runs", opt, dtype), shapes=shapes)
    assert_close_to_ref(fast, slow, DTYPES[dtype], "exact")


@pytest.mark.parametrize("opt", ["ramda", "rmda", "proxsgd"])
def test_meter_run_tiles_coalesce(lib, opt):
    """NCHW channel-wise 3x3 Conv, 64 input channels: a run tile of 32 groups
    reads, per output channel, 288 consecutive floats in 9 warp accesses of 4
    whole sectors (the tiles and rows start at multiples of 128 bytes): the
    gradient's reads and every write (state, parameter) use whole sectors,
    each element written once, against 2-3 sectors per 36-byte run with one
    group per block. Nothing goes to scratch."""
    counts = {}
    run_both(lib, opt, "group_lasso", "exact", "conv2d-channel", torch.float32, meter=counts,
             shapes=[(16, 64, 3, 3)])
    assert_whole_sectors(counts, WRITTEN_STATE[opt])


# --- warm start (docs/math.md section 4, item 5)

def reference_sigma(p, dims, view, T):
    """T / ||w_g|| of the solution p, one per group in the reference's group
    order (0 where the group is zero)."""
    from ramda_ref.groups import group_norm, grouped_view, normalize_dims

    vw = grouped_view(p.double(), list(view) if view else None)
    n = group_norm(vw, normalize_dims(dims, vw.dim())).flatten()
    return torch.where(n > 0, T / n, torch.zeros_like(n))


def thresholds_of(params, dims, view, fields):
    """The fp32 T = tau c_g of each tensor, as the kernels round it."""
    out = []
    for p in params:
        _, w = tensor_fields(p, p, [None] * 3, "ramda", "group_lasso", "exact", fields[19], dims, view)
        out.append(float(torch.tensor(fields[19] * w[0], dtype=torch.float32)))
    return out


def sigma_like(params, dims, view, fill=0.0):
    from ramda_ref.groups import grouped_view, normalize_dims

    out = []
    for p in params:
        vw = grouped_view(p, list(view) if view else None)
        red = normalize_dims(dims, vw.dim())
        n = math.prod(s for k, s in enumerate(vw.shape) if k not in red)
        out.append(torch.full((n,), fill, dtype=torch.float32))
    return out


WARM_LAYOUTS = ["linear-input", "linear-output", "conv2d-channels-last", "heads"]
WARM_LAMBDA = {"heads": 2.5}  # so that each case has zero and nonzero groups


@pytest.mark.parametrize("grouping", WARM_LAYOUTS)
def test_warm_start_writes_the_root_and_keeps_zero_groups(lib, grouping):
    """Momentum 1 (the parameter is the solution w): a cold start (sigma 0)
    writes T/||w_g|| for every nonzero group and leaves zero groups at 0; a
    second step warm-started from those values (zero groups pre-set to a
    sentinel) solves the same problem as the reference's cold solve and keeps
    the sentinel in the groups that are zero again."""
    hp = dict(HP["ramda"], momentum=1.0)
    shapes, dims, view, _ = GROUPINGS[grouping]
    params0 = build_case("ramda", grouping, torch.float32, torch.Generator().manual_seed(0))[0]
    sig = sigma_like(params0, dims, view)
    for step, seed in ((3, 0), (4, 1)):
        before = [s.clone() for s in sig]
        (fp, _), (rp, _), (_, _, fields) = run_both(lib, "ramda", "group_lasso", "exact", grouping,
                                                    torch.float32, step=step, seed=seed, hp=hp,
                                                    lambda_=WARM_LAMBDA.get(grouping, 1.2), sigmas=sig)
        assert_close_to_ref((fp, [[None] * 3] * len(fp)), (rp, [[None] * 3] * len(rp)), torch.float32, "exact")
        zeros = 0
        for p, r, s, b, T in zip(fp, rp, sig, before, thresholds_of(fp, dims, view, fields)):
            if p.numel() == 0:
                continue
            want = reference_sigma(r, dims, view, T)
            nz = want > 0
            zeros += int((~nz).sum())
            assert torch.allclose(s[nz].double(), want[nz], rtol=2e-5, atol=0), f"step {step}: sigma"
            assert torch.equal(s[~nz], b[~nz]), f"step {step}: a zero group's sigma changed"
        assert zeros > 0, "the case has no zero group: the keep rule is not checked"
        for s, r in zip(sig, rp):
            s[s == 0] = 7.0  # the sentinel the zero groups must keep next step


@pytest.mark.parametrize("start", ["left", "right", "far-right", "nan", "inf", "negative"])
def test_warm_start_from_bad_values_still_solves(lib, start):
    """The root from any start: far left of it (phi > 0: one Newton step or
    sigma_hi), right of it and beyond sigma_hi (clamped), NaN, inf and
    negative values (no warm start)."""
    grouping = "conv2d-channels-last"
    shapes, dims, view, _ = GROUPINGS[grouping]
    hp = dict(HP["ramda"], momentum=1.0)
    cold = sigma_like(build_case("ramda", grouping, torch.float32, torch.Generator().manual_seed(0))[0], dims, view)
    run_both(lib, "ramda", "group_lasso", "exact", grouping, torch.float32, hp=hp, lambda_=1.2, sigmas=cold)
    factor = {"left": 1e-3, "right": 1.5, "far-right": 1e6, "nan": float("nan"), "inf": float("inf"),
              "negative": -1.0}[start]
    sig = [torch.where(s > 0, s * factor, s) if start not in ("nan", "inf")
           else torch.full_like(s, factor) for s in cold]
    (fp, _), (rp, _), _ = run_both(lib, "ramda", "group_lasso", "exact", grouping, torch.float32, hp=hp,
                                   lambda_=1.2, sigmas=sig)
    assert_close_to_ref((fp, [[None] * 3] * len(fp)), (rp, [[None] * 3] * len(rp)), torch.float32, "exact")
    for s, c in zip(sig, cold):
        nz = c > 0
        assert torch.allclose(s[nz], c[nz], rtol=2e-5, atol=0)


def test_warm_start_at_the_root_skips_the_newton_sweeps(lib):
    """The same step twice, the second warm-started from the first's sigma:
    the step from the previous sigma is at the rounding floor of phi, so the
    solve ends there and reads the state twice in all (pass 1, and the last
    pass for the nonzero groups: NOTE: [two-pass plan] in
    csrc/cuda/kernels.cuh), at least one pass fewer than from sigma_hi. W0 is
    read once per pass, and nothing goes to scratch."""
    grouping = "linear-input"
    shapes, dims, view, _ = GROUPINGS[grouping]
    hp = dict(HP["ramda"], momentum=1.0)
    sig = sigma_like(build_case("ramda", grouping, torch.float32, torch.Generator().manual_seed(0))[0], dims, view)
    cold, warm = {}, {}
    run_both(lib, "ramda", "group_lasso", "exact", grouping, torch.float32, hp=hp, lambda_=0.2, sigmas=sig,
             meter=cold)
    run_both(lib, "ramda", "group_lasso", "exact", grouping, torch.float32, hp=hp, lambda_=0.2, sigmas=sig,
             meter=warm)
    passes = lambda c: c["s0"][0] / c["s0"][4]  # noqa: E731
    print(f"passes over W0: cold {passes(cold):.2f}, warm {passes(warm):.2f}")
    assert 1 < passes(warm) <= 2 and passes(warm) <= passes(cold) - 1, (passes(cold), passes(warm))
    assert cold["scratch"][:4] == warm["scratch"][:4] == [0] * 4


@pytest.mark.parametrize("grouping,shapes", [("linear-input", None), ("linear-output", [(3, 5000), (2, 4100)])])
@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_warm_start_near_the_root_ends_in_two_passes(lib, grouping, shapes, factor):
    """A previous sigma 10% off the root (sigma moving as in training): the
    plain warm step leaves a predicted error far above the tolerance, but the
    moment model of pass 1 (NOTE: [Moment model] in csrc/cuda/kernels.cuh)
    finds the root without reading memory, so the nonzero groups are read
    twice (pass 1 and the last pass) on column tiles and on rows past the
    register rows, and the result and the new sigma are the reference's."""
    _, dims, view, _ = GROUPINGS[grouping]
    hp = dict(HP["ramda"], momentum=1.0)
    lam = WARM_LAMBDA.get(grouping, 1.2)
    gen = torch.Generator().manual_seed(0)
    cold = sigma_like(build_case("ramda", grouping, torch.float32, gen, shapes)[0], dims, view)
    run_both(lib, "ramda", "group_lasso", "exact", grouping, torch.float32, hp=hp, lambda_=lam, sigmas=cold,
             shapes=shapes)
    sig = [s * factor for s in cold]
    meter = {}
    (fp, _), (rp, _), _ = run_both(lib, "ramda", "group_lasso", "exact", grouping, torch.float32, hp=hp,
                                   lambda_=lam, sigmas=sig, meter=meter, shapes=shapes)
    assert_close_to_ref((fp, [[None] * 3] * len(fp)), (rp, [[None] * 3] * len(rp)), torch.float32, "exact")
    nonzero = 0  # elements of the nonzero groups
    for p, s, c in zip(fp, sig, cold):
        nz = c > 0
        nonzero += int(nz.sum()) * (p.numel() // max(1, c.numel()))
        assert torch.allclose(s[nz], c[nz], rtol=2e-5, atol=0)
    assert nonzero > 0
    # W0 (s0, fp32) is read by pass 1 (every element) and by the last pass of
    # the nonzero groups; Newton passes (one would re-read the nonzero groups
    # again) only for the few tiny groups whose model bound is too loose
    total = meter["s0"][4] // 4
    extra = meter["s0"][0] // 4 - (total + nonzero)
    assert -0.001 * total <= extra <= 0.01 * total, (extra, total, nonzero)


def test_warm_start_needs_groups_in_memory_order(lib):
    """A permuted tensor whose kept dims are not in memory order numbers its
    groups differently in the kernels than in the reference: a clear error,
    and nothing is written."""
    gen = torch.Generator().manual_seed(0)
    params, grads, states, _, _ = build_case("ramda", "strided", torch.float32, gen)
    p, g, st = params[1], grads[1], states[1]  # (6, 4, 5) permuted, dims (0,): kept dims 1, 2 of strides 1, 24
    before = p.clone()
    sig = torch.zeros(20)
    fields = step_fields("ramda", "group_lasso", "exact", 3, 0.4, HP["ramda"])
    desc, w = tensor_fields(p, g, st, "ramda", "group_lasso", "exact", fields[19], (0,), None, sigma=sig)
    with pytest.raises(AssertionError, match="kept dims in memory order"):
        host_step(lib, fields, [(p, g, st, desc, w)])
    assert torch.equal(p, before)
