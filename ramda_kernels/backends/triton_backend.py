"""Triton backend: one fused kernel launch per (call, parameter dtype, gradient dtype).

Same functions and signatures as ``ramda_ref.functional``; the kernel is
``ramda_kernels.triton_kernels.step.fused_step_kernel`` (see NOTE: [Triton
tiling] there). Per call, the host side only builds a cache key from the
tensors' addresses, shapes, strides and dtypes (gradients: all but their
addresses, which are patched into the table when they move, `_refresh_grads`)
and launches; everything else (metadata tables on the device, tile shapes,
which tensors take the kernel) is built once per key by `_build_plan` and
kept in a small LRU cache. Nothing in a step reads a device value back to
the host.

Memory: PG on groups larger than ``MAX_BLOCK_E`` keeps its iterate in an
fp32 scratch buffer owned by the cached plan (4 bytes per element of every
tensor in that launch); nothing else is allocated per step.

NOTE: [Triton fallbacks]
These tensors go to ``ramda_ref.functional`` instead of the kernel, in the
same call (their entries in the returned list are the reference's):

* regularizer ``nuclear`` (an SVD per PG iteration, not a kernel's job) and
  ``pg_stop="rtol"`` (a whole-tensor objective per iteration, the authors'
  parity rule): the whole call;
* fp64 parameters or gradients (state is fp64 there), state that is not fp32;
* a state tensor whose strides differ from its parameter's
  (``layout.same_layout``), or a gradient or state on another device;
* for the elementwise paths, a parameter that is not dense
  (``layout.is_dense``); for grouped paths, a layout with more than
  ``MAX_BLOCKS`` kept or reduced blocks after merging.

A gradient whose strides differ from its parameter's (say a contiguous
gradient of a channels_last weight) is not a fallback: the plan keeps a
staging buffer in the parameter's layout and copies the gradient into it
before the launch (one extra copy per such tensor and step).

The returned list holds ``None`` for every tensor the kernel handled: the
fused path does not report per-group iteration counts.

Capturable calls (``capturable=True``, conventions in ``ramda_ref.functional``)
take the same cached plans; the step-derived scalars, the skip flag and the
gradient scale go to the kernel as one small fp32 device table per call,
``[n_tensors, STAB_WIDTH]``, built from the step counters with a dozen tensor
ops (`_scalar_table`, NOTE: [capturable kernel] in the kernel module), so
nothing is read back and a CUDA graph replays them. Build the plan (the
first call with a tensor list) outside a graph capture: it copies its tables
from the host. Fallback tensors go to the reference's capturable path;
``nuclear`` and ``pg_stop="rtol"`` are refused.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ramda_ref import functional as _ref
from ramda_ref.groups import grouped_view, normalize_dims
from ramda_ref.prox import inexact_tolerance, newton_tolerance, refuse_capturable

from ..layout import group_layout, is_dense, same_layout
from . import _triton_ops

try:
    import triton  # noqa: F401  (the import error is what why_unavailable reports)

    from ..triton_kernels import step as _K
    _IMPORT_ERROR: Optional[BaseException] = None
    #: triton picks the interpreter when the kernel is decorated, so ask the kernel.
    INTERPRETED = type(_K.fused_step_kernel).__name__ == "InterpretedFunction"
except Exception as e:  # ImportError, or a triton build that cannot initialize
    _K = None
    _IMPORT_ERROR = e
    INTERPRETED = False

Tensors = List[torch.Tensor]

#: Elements per program (``BG * BE``); tests shrink these to exercise the
#: multi-chunk paths on small tensors. Part of the cache key.
TILE = int(os.environ.get("RAMDA_TRITON_TILE", "2048"))
#: Largest chunk of one group (``BE``).
MAX_BLOCK_E = int(os.environ.get("RAMDA_TRITON_BLOCK_E", "2048"))
#: Groups per tile when some tensor of the launch has adjacent groups ("columns").
COLUMN_GROUPS = 32
#: How many launch plans to keep (distinct tensor lists / layouts).
CACHE_SIZE = 64

_OPT = {"ramda": 0, "rmda": 1, "proxadamw": 2, "proxsgd": 3}
_REG_NONE, _REG_L1, _REG_GROUP = 0, 1, 2
_SOLVER = {"exact": 0, "pg": 1}
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ITAB_WIDTH = 9 + 4 * 4
#: Columns of the capturable scalar table: tau, eps_t, h0..h7, skip flag, gradient scale.
_STAB_WIDTH = 12
_MAX_BLOCKS = 4
_COL_BLOCKS = 9


def why_unavailable(device: torch.device) -> Optional[str]:
    """``None`` when the kernel can run on ``device`` here, else the reason."""
    device = torch.device(device)
    if _K is None:
        return f"triton is not importable: {type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}"
    if device.type == "cpu":
        if INTERPRETED:
            return None
        return ("triton runs CPU tensors only under TRITON_INTERPRET=1 "
                "(set before triton kernels are imported)")
    if device.type == "cuda":
        if INTERPRETED:
            return "triton was imported with TRITON_INTERPRET=1, which runs CPU tensors only"
        if not torch.cuda.is_available():
            return "no CUDA device visible to torch"
        return None
    return f"triton backend does not run on device type {device.type!r}"


# ---------------------------------------------------------------------------
# Plans: everything a launch needs, built once per cache key
# ---------------------------------------------------------------------------

class _Launch:
    """One kernel launch: device tables plus constexprs.

    ``grad_rows`` maps the table's rows to the call's tensor indices for the
    gradients read in place (not staged), ``grad_ptrs`` their addresses as
    written in ``itab``: a new gradient tensor (``zero_grad(set_to_none=True)``
    hands out fresh ones) only rewrites that column, see `_refresh_grads`.
    ``call_rows``: the call's tensor index of every table row, on the device
    (picks this launch's rows of a capturable scalar table), or ``None`` when
    the rows are the call's tensors in order.
    """

    __slots__ = ("items", "itab", "ftab", "scratch", "grid", "constexprs", "num_warps",
                 "grad_rows", "grad_ptrs", "call_rows")

    def __init__(self, items, itab, ftab, scratch, grid, constexprs, num_warps, grad_rows,
                 grad_ptrs, call_rows):
        self.items, self.itab, self.ftab, self.scratch = items, itab, ftab, scratch
        self.grid, self.constexprs, self.num_warps = grid, constexprs, num_warps
        self.grad_rows, self.grad_ptrs = grad_rows, grad_ptrs
        self.call_rows = call_rows


class _Plan:
    """Launches of one call signature, the tensors left to the reference, and
    the gradient staging buffers (index, buffer) refreshed before the launches."""

    __slots__ = ("launches", "fallback", "staged")

    def __init__(self, launches: List[_Launch], fallback: List[int],
                 staged: List[Tuple[int, torch.Tensor]]):
        self.launches = launches
        self.fallback = fallback
        self.staged = staged


_cache: "OrderedDict[tuple, _Plan]" = OrderedDict()


def clear_cache() -> None:
    """Drop every cached plan (their device tables and scratch buffers)."""
    _cache.clear()


def _np2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _pad(blocks: Sequence[int], fill: int) -> List[int]:
    return list(blocks) + [fill] * (_MAX_BLOCKS - len(blocks))


def _blocks_fit(lay) -> bool:
    return len(lay.kept_sizes) <= _MAX_BLOCKS and len(lay.red_sizes) <= _MAX_BLOCKS


def _extent(x: torch.Tensor) -> int:
    """Elements spanned in memory from ``x.data_ptr()`` (largest offset + 1)."""
    return 1 + sum((s - 1) * st for s, st in zip(x.shape, x.stride()))


def _kernel_ok(p, g, states, flat: bool, device_ok: Callable[[torch.device], bool]) -> bool:
    """Can the kernel take this tensor? See NOTE: [Triton fallbacks]."""
    if p.dtype not in _KERNEL_DTYPES or g.dtype not in _KERNEL_DTYPES:
        return False
    if not device_ok(p.device) or g.device != p.device:
        return False
    for t in states:
        if t.device != p.device or not same_layout(p, t):
            return False
    if any(s.dtype != torch.float32 for s in states):
        return False
    if flat and not is_dense(p):
        return False
    return True


def _layout(p: torch.Tensor, reg: int, dims, view):
    pv = grouped_view(p, view)
    gdims = (normalize_dims(dims, pv.dim()) if reg == _REG_GROUP
             else tuple(range(pv.dim())))  # PG on l1: the whole tensor is one group
    return group_layout(pv.shape, pv.stride(), gdims)


class _TileStats:
    """What the tile shape of a launch is chosen from, per tensor: its element
    count and group layout (``None`` on the flat paths)."""

    __slots__ = ("numel", "lay")

    def __init__(self, numel: int, lay):
        self.numel, self.lay = numel, lay


def _build_plan(opt: int, params, grads, states, *, reg: int, solver: int, flat: bool,
                scalar_d: bool, amsgrad: bool, dims, view, reweight: bool,
                like: Optional[Sequence[torch.Size]] = None) -> _Plan:
    """``like``: per call tensor, the grouped shape (after ``view``) whose tiling
    the launch takes instead of the tensor's own (contiguous layout, same
    ``dims``). The traffic meter
    (bench/traffic.py) runs a copy of a model with fewer groups per tensor under
    the tiling the full model gets; ``None`` everywhere else."""
    device_cache: Dict[torch.device, bool] = {}

    def device_ok(dev):
        if dev not in device_cache:
            device_cache[dev] = why_unavailable(dev) is None
        return device_cache[dev]

    fallback: List[int] = []
    staged: List[Tuple[int, torch.Tensor]] = []
    buckets: Dict[tuple, List[tuple]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        st = [s[i] for s in states]
        if p.numel() == 0:
            continue
        if not _kernel_ok(p, g, st, flat, device_ok):
            fallback.append(i)
            continue
        in_place = same_layout(p, g)
        if not in_place:
            g = torch.empty_strided(p.shape, p.stride(), dtype=g.dtype, device=p.device)
            staged.append((i, g))
        lay = tiled = None
        if not flat:
            lay = _layout(p, reg, dims, view)
            if not _blocks_fit(lay):
                fallback.append(i)
                continue
            tiled = lay if like is None else _layout(torch.empty(like[i], device="meta"), reg,
                                                     dims, None)
        numel = p.numel() if like is None else math.prod(like[i])
        buckets.setdefault((p.device, p.dtype, g.dtype), []).append(
            (i, p, g, st, lay, in_place, _TileStats(numel, tiled)))

    launches = []
    for (device, pdt, gdt), entries in buckets.items():
        launches.append(_build_launch(opt, entries, device, pdt, gdt, len(params), reg=reg,
                                      solver=solver, flat=flat, scalar_d=scalar_d,
                                      amsgrad=amsgrad, reweight=reweight))
    return _Plan(launches, fallback, staged)


def _build_launch(opt, entries, device, pdt, gdt, n_call: int, *, reg, solver, flat, scalar_d,
                  amsgrad, reweight) -> _Launch:
    n_state = len(entries[0][3])
    aligned = all(t.data_ptr() % 16 == 0 for _, p, g, st, *_ in entries for t in [p, g, *st])
    constexprs, num_warps = _specialization(opt, reg, solver, flat, scalar_d, amsgrad, pdt, gdt,
                                            [e[6] for e in entries], aligned)
    bg, one_chunk = constexprs["BG"], constexprs["ONE_CHUNK"]
    need_scratch = not flat and not one_chunk and solver == 1 and not scalar_d
    itab, ftab, items = [], [], []
    scratch_len = 0
    grad_rows, grad_ptrs = [], []
    for row, (i, p, g, st, lay, in_place, _) in enumerate(entries):
        if in_place:
            grad_rows.append((row, i))
            grad_ptrs.append(g.data_ptr())
        ptrs = [s.data_ptr() for s in st] + [0] * (3 - n_state)
        n = p.numel()
        if flat:
            n_groups, gsize = n, 1
            blocks = [1] * (4 * _MAX_BLOCKS)
            cg, tol_share = 1.0, 1.0
        else:
            n_groups, gsize = lay.n_groups, lay.group_size
            blocks = (_pad(lay.kept_sizes, 1) + _pad(lay.kept_strides, 0)
                      + _pad(lay.red_sizes, 1) + _pad(lay.red_strides, 0))
            cg = math.sqrt(gsize) if (reweight and reg == _REG_GROUP) else 1.0
            tol_share = math.sqrt(gsize / n)
        itab.append([p.data_ptr(), g.data_ptr(), *ptrs, n, n_groups, gsize, scratch_len, *blocks])
        ftab.append([cg, tol_share])
        if need_scratch:
            scratch_len += _extent(p)
        items.extend((row, start) for start in range(0, n_groups, bg))

    itab_t = torch.tensor(itab, dtype=torch.int64, device=device)
    ftab_t = torch.tensor(ftab, dtype=torch.float32, device=device)
    items_t = torch.tensor(items, dtype=torch.int64, device=device).reshape(-1)
    scratch = torch.empty(max(scratch_len, 1), dtype=torch.float32, device=device)
    rows = [i for i, *_ in entries]
    call_rows = (None if rows == list(range(n_call))
                 else torch.tensor(rows, dtype=torch.int64, device=device))
    return _Launch(items_t, itab_t, ftab_t, scratch, (len(items),), constexprs, num_warps,
                   grad_rows, grad_ptrs, call_rows)


def _tile_shape(stats: Sequence[_TileStats], flat: bool):
    """``(BG, BE, ONE_CHUNK, NKB, NRB, UNIT_KEPT, UNIT_RED)`` of a launch over
    tensors with these statistics (NOTE: [Triton tiling])."""
    if flat:
        bg = min(_np2(max(s.numel for s in stats)), _np2(TILE))
        return bg, 1, True, 1, 1, False, False
    lays = [s.lay for s in stats]
    max_gs = max(lay.group_size for lay in lays)
    max_ng = max(lay.n_groups for lay in lays)
    if all(lay.inner_reduced for lay in lays):
        be = min(_np2(max_gs), _np2(MAX_BLOCK_E))
        bg = max(1, min(_np2(TILE) // be, _np2(max_ng)))
    else:
        bg = min(_np2(max_ng), COLUMN_GROUPS, _np2(TILE))
        be = min(_np2(max_gs), _np2(MAX_BLOCK_E), max(1, _np2(TILE) // bg))
    one_chunk = max_gs <= be
    nkb = max(1, max(len(lay.kept_sizes) for lay in lays))
    nrb = max(1, max(len(lay.red_sizes) for lay in lays))
    unit_kept = all(lay.kept_strides in ((), (1,)) for lay in lays)
    unit_red = all(lay.red_strides == (1,) for lay in lays)
    return bg, be, one_chunk, nkb, nrb, unit_kept, unit_red


def _specialization(opt: int, reg: int, solver: int, flat: bool, scalar_d: bool, amsgrad: bool,
                    pdt: torch.dtype, gdt: torch.dtype, stats: Sequence[_TileStats],
                    aligned: bool) -> Tuple[Dict[str, object], int]:
    """The constexprs (all but ``CAPTURABLE``, a per-call switch) and ``num_warps``
    of a launch over tensors with these statistics; compile_check.py compiles
    exactly these."""
    bg, be, one_chunk, nkb, nrb, unit_kept, unit_red = _tile_shape(stats, flat)
    constexprs = dict(OPT=opt, REG=reg, SOLVER=solver, FLAT=flat, ONE_CHUNK=one_chunk,
                      AMSGRAD=amsgrad, P_DTYPE=_tl_dtype(pdt), G_DTYPE=_tl_dtype(gdt), BG=bg, BE=be,
                      NKB=nkb, NRB=nrb, SCALAR_D=scalar_d, ALIGNED=aligned, UNIT_KEPT=unit_kept,
                      UNIT_RED=unit_red)
    return constexprs, (8 if bg * be >= 1024 else 4)


def _refresh_grads(launch: _Launch, grads) -> None:
    """Point the table at this call's gradients if they moved (one small copy, no sync)."""
    ptrs = [grads[i].data_ptr() for _, i in launch.grad_rows]
    if ptrs == launch.grad_ptrs:
        return
    device = launch.itab.device
    rows = torch.tensor([r for r, _ in launch.grad_rows], dtype=torch.int64).to(device, non_blocking=True)
    values = torch.tensor(ptrs, dtype=torch.int64).to(device, non_blocking=True)
    launch.itab[:, 1].index_copy_(0, rows, values)
    if any(a % 16 for a in ptrs):
        launch.constexprs["ALIGNED"] = False
    launch.grad_ptrs = ptrs


def _tl_dtype(dt: torch.dtype):
    import triton.language as tl
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dt]


def _launch(launch: _Launch, scalars: Tuple, stab: Optional[torch.Tensor] = None) -> None:
    """The only place a kernel is launched (tests count calls to it). ``stab``:
    the capturable scalar table of the call (``scalars`` are then ignored)."""
    device = launch.itab.device
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):  # triton launches on the current device
            _kernel(launch, scalars, stab)
    else:
        _kernel(launch, scalars, stab)


def _kernel(launch: _Launch, scalars: Tuple, stab: Optional[torch.Tensor]) -> None:
    if stab is not None and launch.call_rows is not None:
        stab = stab.index_select(0, launch.call_rows)
    # a non-capturable launch never reads stab: any fp32 pointer does
    _K.fused_step_kernel[launch.grid](launch.items, launch.itab, launch.ftab, launch.scratch,
                                      launch.ftab if stab is None else stab, *scalars,
                                      num_warps=launch.num_warps, CAPTURABLE=stab is not None,
                                      **launch.constexprs)


def _signature(params, grads, states) -> tuple:
    sig = []
    for i, (p, g) in enumerate(zip(params, grads)):
        st = [s[i] for s in states]
        sig.append((p.data_ptr(), p.shape, p.stride(), g.stride(), p.dtype, g.dtype,
                    p.device, g.device, tuple((s.data_ptr(), s.stride(), s.dtype, s.device) for s in st)))
    return tuple(sig)


def _run(name: str, params, grads, states, *, reg: int, solver: int, flat: bool, amsgrad: bool,
         dims, view, reweight: bool, scalars: Tuple, reference: Callable,
         stab: Optional[torch.Tensor] = None) -> List[Optional[torch.Tensor]]:
    """Run one call: cached plan, one launch per dtype bucket, reference for the rest.

    ``reference(indices, *tensor_lists)`` runs the fallback tensors; ``stab``
    is the capturable scalar table (`_scalar_table`), ``None`` otherwise.
    """
    n = len(params)
    opt = _OPT[name]
    scalar_d = name in ("rmda", "proxsgd")
    if not flat and reg == _REG_GROUP:
        dims_key = dims if not isinstance(dims, list) else tuple(dims)
    else:
        dims_key = None
    key = (opt, reg, solver, flat, amsgrad, dims_key, None if view is None else tuple(view),
           reweight, TILE, MAX_BLOCK_E, COLUMN_GROUPS, len(states), _signature(params, grads, states))
    plan = _cache.get(key)
    if plan is None:
        plan = _build_plan(opt, params, grads, states, reg=reg, solver=solver, flat=flat,
                           scalar_d=scalar_d, amsgrad=amsgrad, dims=dims, view=view,
                           reweight=reweight)
        _cache[key] = plan
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
    for i, buf in plan.staged:
        buf.copy_(grads[i])
    for launch in plan.launches:
        _refresh_grads(launch, grads)
        _launch(launch, scalars, stab)
    out: List[Optional[torch.Tensor]] = [None] * n
    if plan.fallback:
        idx = plan.fallback
        res = reference(idx, [params[i] for i in idx], [grads[i] for i in idx],
                        *[[s[i] for i in idx] for s in states])
        for i, r in zip(idx, res):
            out[i] = r
    return out


def _subset_reference(fn: Callable, **kwargs) -> Callable:
    return lambda idx, *lists: fn(*lists, **_subset_kwargs(kwargs, idx))


def _subset_kwargs(kwargs, idx: List[int]):
    """The call's keywords for the tensors ``idx``: a capturable call's per-tensor
    ``step`` / ``alpha`` are cut down to them (0-d views, nothing read)."""
    if not kwargs.get("capturable"):
        return kwargs
    out = dict(kwargs)
    for key in ("step", "alpha"):
        if out.get(key) is not None:
            out[key] = [out[key][i] for i in idx]
    return out


def _as_vector(x) -> torch.Tensor:
    """Per-tensor counters as one 1-D tensor (a list of 0-d tensors is stacked)."""
    return x.reshape(-1) if isinstance(x, torch.Tensor) else torch.stack(list(x))


def _scalar_table(n: int, device, columns, found_inf, grad_scale) -> torch.Tensor:
    """The capturable launches' fp32 ``[n, STAB_WIDTH]`` table (NOTE: [capturable
    kernel]): ``columns`` are ``tau, eps_t, h0..h7``, each a number or a float64
    vector over the call's tensors (rounded to fp32 here, as a Python float
    argument is rounded by the launch), then the skip flag and the scale."""
    tab = torch.empty(n, _STAB_WIDTH, dtype=torch.float32, device=device)
    extra = [0.0 if found_inf is None else found_inf, 1.0 if grad_scale is None else grad_scale]
    for j, value in enumerate(list(columns) + extra):
        if isinstance(value, torch.Tensor):
            tab[:, j].copy_(value)
        else:
            tab[:, j].fill_(value)
    return tab


def _check_capture(capturable: bool, n: int, step, alpha, found_inf, grad_scale,
                   regularizer: str, solver: str = "exact", pg_stop: str = "inexact") -> None:
    """The argument rules of a capturable call (as ``ramda_ref.functional``)."""
    if not capturable:
        if found_inf is not None or grad_scale is not None:
            raise ValueError("found_inf and grad_scale are taken with capturable=True only "
                             "(a non-capturable call divides and skips before it is made)")
        return
    refuse_capturable(regularizer, solver, pg_stop)
    for name, value in (("step", step), ("alpha", alpha)):
        if value is not None and (isinstance(value, (int, float)) or len(value) != n):
            raise ValueError(f"capturable=True takes {name} as one 0-d tensor per parameter "
                             f"({n}), got {type(value).__name__}")


def _mode(regularizer: str, solver: str, tau: float, scalar_d: bool) -> Tuple[int, int, bool]:
    """(regularizer code, solver code, flat) for a call whose threshold is ``tau``."""
    if regularizer == "none" or tau == 0:
        return _REG_NONE, 0, True
    if regularizer == "l1":
        if scalar_d or solver == "exact":
            return _REG_L1, 0, True
        return _REG_L1, 1, False
    return _REG_GROUP, (0 if scalar_d else _SOLVER[solver]), False


def _needs_reference(regularizer: str, solver: str, pg_stop: str, tau: float) -> bool:
    """Whole call to the reference: see NOTE: [Triton fallbacks]."""
    if regularizer == "nuclear" and tau != 0:
        return True
    return (regularizer in ("l1", "group_lasso") and solver == "pg" and pg_stop == "rtol"
            and tau != 0)


# ---------------------------------------------------------------------------
# The four functionals (signatures of ramda_ref.functional)
# ---------------------------------------------------------------------------

def ramda(params: Tensors, grads: Tensors, initial_points: Tensors, grad_sums: Tensors,
          grad_sum_sqs: Tensors, *, step: int, alpha: float, lr: float, momentum: float,
          epsilon: float, lambda_: float, regularizer: str, dims, view, reweight: bool,
          solver: str, max_iters: int, rtol: float, pg_stop: str, pg_eps: float,
          capturable: bool = False, found_inf: Optional[torch.Tensor] = None,
          grad_scale: Optional[torch.Tensor] = None) -> List[Optional[torch.Tensor]]:
    """RAMDA step, fused; math as ``ramda_ref.functional.ramda``."""
    kwargs = dict(step=step, alpha=alpha, lr=lr, momentum=momentum, epsilon=epsilon,
                  lambda_=lambda_, regularizer=regularizer, dims=dims, view=view,
                  reweight=reweight, solver=solver, max_iters=max_iters, rtol=rtol,
                  pg_stop=pg_stop, pg_eps=pg_eps)
    _check_capture(capturable, len(params), step, alpha, found_inf, grad_scale, regularizer,
                   solver, pg_stop)
    if capturable and params and torch.compiler.is_compiling():  # NOTE: [Triton steps under torch.compile]
        return _triton_ops.call("ramda", [params, grads, initial_points, grad_sums, grad_sum_sqs],
                                kwargs, found_inf, grad_scale)
    stab = None
    if capturable:
        kwargs.update(capturable=True, found_inf=found_inf, grad_scale=grad_scale)
        tau = 0.0 if lambda_ == 0 else 1.0  # only the mode depends on it: tau > 0 when lambda_ > 0
        if params:
            t = _as_vector(step).double()
            s = lr * t.sqrt()
            stab = _scalar_table(len(params), t.device, (
                _as_vector(alpha) * lambda_, inexact_tolerance(pg_eps, t), s, epsilon,
                1.0 - momentum, momentum, 0.0, 0.0, 0.0, 0.0), found_inf, grad_scale)
        scalars = (0.0, 0.0, newton_tolerance(torch.float32), max_iters) + (0.0,) * 8
    else:
        tau = alpha * lambda_
        if _needs_reference(regularizer, solver, pg_stop, tau):
            return _ref.ramda(params, grads, initial_points, grad_sums, grad_sum_sqs, **kwargs)
        s = lr * math.sqrt(step)
        scalars = (tau, inexact_tolerance(pg_eps, step), newton_tolerance(torch.float32), max_iters,
                   s, epsilon, 1.0 - momentum, momentum, 0.0, 0.0, 0.0, 0.0)
    reg, solv, flat = _mode(regularizer, solver, tau, False)
    return _run("ramda", params, grads, [initial_points, grad_sums, grad_sum_sqs], reg=reg,
                solver=solv, flat=flat, amsgrad=False, dims=dims, view=view, reweight=reweight,
                scalars=scalars, reference=_subset_reference(_ref.ramda, **kwargs), stab=stab)


def rmda(params: Tensors, grads: Tensors, initial_points: Tensors, grad_sums: Tensors, *,
         step: int, alpha: float, lr: float, momentum: float, lambda_: float, regularizer: str,
         dims, view, reweight: bool, capturable: bool = False,
         found_inf: Optional[torch.Tensor] = None, grad_scale: Optional[torch.Tensor] = None
         ) -> List[Optional[torch.Tensor]]:
    """RMDA step, fused; math as ``ramda_ref.functional.rmda``."""
    kwargs = dict(step=step, alpha=alpha, lr=lr, momentum=momentum, lambda_=lambda_,
                  regularizer=regularizer, dims=dims, view=view, reweight=reweight)
    _check_capture(capturable, len(params), step, alpha, found_inf, grad_scale, regularizer)
    if capturable and params and torch.compiler.is_compiling():  # NOTE: [Triton steps under torch.compile]
        return _triton_ops.call("rmda", [params, grads, initial_points, grad_sums], kwargs,
                                found_inf, grad_scale)
    stab = None
    if capturable:
        kwargs.update(capturable=True, found_inf=found_inf, grad_scale=grad_scale)
        thr = 0.0 if lambda_ == 0 else 1.0  # the mode only: thr > 0 when lambda_ > 0
        if params:
            beta = _as_vector(step).double().sqrt()
            stab = _scalar_table(len(params), beta.device, (
                _as_vector(alpha) * lambda_ / beta, 0.0, lr * beta, beta, 1.0 - momentum,
                momentum, 0.0, 0.0, 0.0, 0.0), found_inf, grad_scale)
        scalars = (0.0, 0.0, 0.0, 1) + (0.0,) * 8
    else:
        beta = math.sqrt(step)
        thr = alpha * lambda_ / beta
        if _needs_reference(regularizer, "exact", "inexact", thr):
            return _ref.rmda(params, grads, initial_points, grad_sums, **kwargs)
        scalars = (thr, 0.0, 0.0, 1, lr * math.sqrt(step), beta, 1.0 - momentum, momentum,
                   0.0, 0.0, 0.0, 0.0)
    reg, solv, flat = _mode(regularizer, "exact", thr, True)
    return _run("rmda", params, grads, [initial_points, grad_sums], reg=reg, solver=solv,
                flat=flat, amsgrad=False, dims=dims, view=view, reweight=reweight,
                scalars=scalars, reference=_subset_reference(_ref.rmda, **kwargs), stab=stab)


def proxadamw(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
              max_exp_avg_sqs: Tensors, *, step: int, lr: float, beta1: float, beta2: float,
              epsilon: float, weight_decay: float, amsgrad: bool, lambda_: float,
              regularizer: str, dims, view, reweight: bool, solver: str, max_iters: int,
              rtol: float, pg_stop: str, pg_eps: float, capturable: bool = False,
              found_inf: Optional[torch.Tensor] = None, grad_scale: Optional[torch.Tensor] = None
              ) -> List[Optional[torch.Tensor]]:
    """ProxAdamW step, fused; math as ``ramda_ref.functional.proxadamw``."""
    kwargs = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, epsilon=epsilon,
                  weight_decay=weight_decay, amsgrad=amsgrad, lambda_=lambda_,
                  regularizer=regularizer, dims=dims, view=view, reweight=reweight,
                  solver=solver, max_iters=max_iters, rtol=rtol, pg_stop=pg_stop, pg_eps=pg_eps)
    _check_capture(capturable, len(params), step, None, found_inf, grad_scale, regularizer,
                   solver, pg_stop)
    if capturable and params and torch.compiler.is_compiling():  # NOTE: [Triton steps under torch.compile]
        return _triton_ops.call("proxadamw", [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs],
                                kwargs, found_inf, grad_scale)
    tau = lr * lambda_
    stab = None
    if capturable:
        kwargs.update(capturable=True, found_inf=found_inf, grad_scale=grad_scale)
        if params:
            t = _as_vector(step).double()
            stab = _scalar_table(len(params), t.device, (
                tau, inexact_tolerance(pg_eps, t), 1.0 - lr * weight_decay, beta1, 1.0 - beta1,
                beta2, 1.0 - beta2, (1.0 - torch.pow(beta2, t)).sqrt(), epsilon,
                lr / (1.0 - torch.pow(beta1, t))), found_inf, grad_scale)
        scalars = (0.0, 0.0, newton_tolerance(torch.float32), max_iters) + (0.0,) * 8
    else:
        if _needs_reference(regularizer, solver, pg_stop, tau):
            return _ref.proxadamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, **kwargs)
        bias1 = 1.0 - beta1 ** step
        bias2_sqrt = math.sqrt(1.0 - beta2 ** step)
        scalars = (tau, inexact_tolerance(pg_eps, step), newton_tolerance(torch.float32), max_iters,
                   1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2, bias2_sqrt,
                   epsilon, lr / bias1)
    reg, solv, flat = _mode(regularizer, solver, tau, False)
    states = [exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    return _run("proxadamw", params, grads, states, reg=reg, solver=solv, flat=flat,
                amsgrad=bool(amsgrad), dims=dims, view=view, reweight=reweight, scalars=scalars,
                reference=_ref_adamw_subset(kwargs, amsgrad), stab=stab)


def _ref_adamw_subset(kwargs, amsgrad: bool) -> Callable:
    def run(idx, params, grads, m, v, *vmax):
        return _ref.proxadamw(params, grads, m, v, list(vmax[0]) if amsgrad else [],
                              **_subset_kwargs(kwargs, idx))
    return run


def proxsgd(params: Tensors, grads: Tensors, momentum_buffers: Tensors, *, step: int,
            lr: float, momentum: float, lambda_: float, regularizer: str, dims, view,
            reweight: bool, capturable: bool = False, found_inf: Optional[torch.Tensor] = None,
            grad_scale: Optional[torch.Tensor] = None) -> List[Optional[torch.Tensor]]:
    """ProxSGD step, fused; math as ``ramda_ref.functional.proxsgd``."""
    kwargs = dict(step=step, lr=lr, momentum=momentum, lambda_=lambda_, regularizer=regularizer,
                  dims=dims, view=view, reweight=reweight)
    _check_capture(capturable, len(params), step, None, found_inf, grad_scale, regularizer)
    if capturable and params and torch.compiler.is_compiling():  # NOTE: [Triton steps under torch.compile]
        return _triton_ops.call("proxsgd", [params, grads, momentum_buffers], kwargs, found_inf,
                                grad_scale)
    thr = lr * lambda_
    scalars = (thr, 0.0, 0.0, 1, 1.0 - momentum, momentum, lr, 0.0, 0.0, 0.0, 0.0, 0.0)
    stab = None
    if capturable:  # no step-derived scalar: the table carries the flag and the scale
        kwargs.update(capturable=True, found_inf=found_inf, grad_scale=grad_scale)
        if params:
            stab = _scalar_table(len(params), params[0].device, (thr, 0.0) + scalars[4:],
                                 found_inf, grad_scale)
    elif _needs_reference(regularizer, "exact", "inexact", thr):
        return _ref.proxsgd(params, grads, momentum_buffers, **kwargs)
    reg, solv, flat = _mode(regularizer, "exact", thr, True)
    return _run("proxsgd", params, grads, [momentum_buffers], reg=reg, solver=solv, flat=flat,
                amsgrad=False, dims=dims, view=view, reweight=reweight, scalars=scalars,
                reference=_subset_reference(_ref.proxsgd, **kwargs), stab=stab)


__all__ = ["ramda", "rmda", "proxadamw", "proxsgd", "why_unavailable", "clear_cache", "TILE",
           "MAX_BLOCK_E", "INTERPRETED"]
