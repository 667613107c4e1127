"""Triton backend: one fused kernel launch per (call, parameter dtype, gradient dtype, size class).

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
The tensors and calls of NOTE: [Fused-backend fallbacks] (``_rules.py``) go
to ``ramda_ref.functional`` instead of the kernel, in the same call, with the
kernel's `CAPABILITIES`: a gradient of another fused dtype than its
parameter's is read as it is; a non-dense parameter runs the grouped paths
(not the elementwise ones); and a grouped layout with more than
``MAX_BLOCKS`` kept or reduced blocks after merging falls back too.

A gradient whose strides differ from its parameter's (say a contiguous
gradient of a channels_last weight) is not a fallback: the plan keeps a
staging buffer in the parameter's layout and copies the gradient into it
before the launch (one extra copy per such tensor and step).

The returned list holds ``None`` for every tensor the kernel handled: the
fused path does not report per-group iteration counts (`newton_counts` sums
them for benchmarks). The warm start of the exact group-lasso solve
(docs/math.md section 4) is an optional list of per-group ``sigma`` tensors
after the state lists, checked once per plan (`_sigma_problem`).

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

import functools
import math
import os
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ramda_ref import definitions as _D
from ramda_ref import functional as _ref
from ramda_ref.groups import grouped_view, normalize_dims
from ramda_ref.prox import newton_tolerance

from ..layout import group_layout, same_layout
from . import _ops
from ._rules import Capabilities, own_dtype_flags, tensor_problem, whole_call_to_reference

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

#: Elements per program (``BG * BE``) of the flat path, of tiles of small row
#: groups and of the chunks of groups read in several chunks; tests shrink
#: these to exercise the multi-chunk paths on small tensors. Part of the cache key.
TILE = int(os.environ.get("RAMDA_TRITON_TILE", "2048"))
#: Largest group held in registers (``BE`` of a one-chunk tile); a columns tile
#: holds at most ``max(TILE, MAX_BLOCK_E)`` elements.
MAX_BLOCK_E = int(os.environ.get("RAMDA_TRITON_BLOCK_E", "8192"))
#: Most groups per tile when neighbouring groups are neighbours in memory ("columns").
COLUMN_GROUPS = 32
#: Fewest groups per columns tile that keeps it one chunk: 8 fp32 are one
#: 32-byte sector, so each row of the tile still reads whole sectors.
COLUMN_MIN_GROUPS = 8
#: Rows whose innermost run is shorter than this (elements) are tiled as
#: columns (`_short_runs`).
SHORT_RUN = 64
#: How many launch plans to keep (distinct tensor lists / layouts).
CACHE_SIZE = 64

_OPT = {"ramda": 0, "rmda": 1, "proxadamw": 2, "proxsgd": 3}
#: per optimizer, which state lists the kernel reads in the parameter's dtype
#: (W0); sigma aside, the optional lists come last, so a shorter call is a prefix
_OWN_DTYPE = {_OPT[n]: own_dtype_flags(d, [k for k in d.state if k != "sigma"])
              for n, d in _D.DEFINITIONS.items()}
_REG_NONE, _REG_L1, _REG_GROUP = 0, 1, 2
_SOLVER = {"exact": 0, "pg": 1}
_ITAB_WIDTH = 10 + 4 * 4
#: Columns of the capturable scalar table: tau, eps_t, h0..h7, skip flag, gradient scale.
_STAB_WIDTH = 12
_MAX_BLOCKS = 4
_COL_BLOCKS = 10
#: The optional Newton counter (`newton_counts`), ``None`` when off.
_COUNTER: Optional[torch.Tensor] = None


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
                 "grad_rows", "grad_ptrs", "call_rows", "no_counter")

    def __init__(self, items, itab, ftab, scratch, grid, constexprs, num_warps, grad_rows,
                 grad_ptrs, call_rows):
        self.items, self.itab, self.ftab, self.scratch = items, itab, ftab, scratch
        #: the counter argument of launches outside `newton_counts` (never touched)
        self.no_counter = torch.zeros(4, dtype=torch.int32, device=items.device)
        self.grid, self.constexprs, self.num_warps = grid, constexprs, num_warps
        self.grad_rows, self.grad_ptrs = grad_rows, grad_ptrs
        self.call_rows = call_rows


class _Plan:
    """Launches of one call signature, the tensors left to the reference, and
    the gradient staging buffers (index, buffer) refreshed before the launches."""

    __slots__ = ("launches", "fallback", "staged", "sigma_staged")

    def __init__(self, launches: List[_Launch], fallback: List[int],
                 staged: List[Tuple[int, torch.Tensor]], sigma_staged: List[tuple] = ()):
        self.launches = launches
        self.fallback = fallback
        self.staged = staged
        #: (index, kept sizes, perm, buffer): warm-start sigmas of tensors whose
        #: groups lie out of row-major order, in memory order (`_group_order`)
        self.sigma_staged = list(sigma_staged)


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


#: What the kernel reads beyond the common case (NOTE: [Triton fallbacks]).
CAPABILITIES = Capabilities(mixed_grad_dtype=True, grad_layout_staged=True, strided_groups=True)


def _kernel_ok(p, g, states, flat: bool, device_ok: Callable[[torch.device], bool],
               own_dtype=()) -> bool:
    """Can the kernel take this tensor? See NOTE: [Triton fallbacks]."""
    return device_ok(p.device) and tensor_problem(p, g, states, CAPABILITIES, flat=flat,
                                                  own_dtype=own_dtype) is None


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


def _sigma_problem(i: int, p: torch.Tensor, sig: torch.Tensor, dims, view) -> Optional[str]:
    """Why ``sig`` cannot be the warm-start state of parameter ``p`` (docs/math.md
    section 4: one value per group, in the reference's group order), else ``None``."""
    pv = grouped_view(p, view)
    gdims = normalize_dims(dims, pv.dim())
    n = math.prod(s for k, s in enumerate(pv.shape) if k not in gdims)
    want = _ref.state_dtype(p)
    if (sig.dim() != 1 or sig.numel() != n or sig.dtype != want or sig.device != p.device
            or (n > 1 and sig.stride(0) != 1)):
        return (f"sigmas[{i}]: expected a contiguous 1-D {want} tensor of {n} values (one per "
                f"group of the parameter of shape {tuple(p.shape)}, dims={dims}) on {p.device}, "
                f"got shape {tuple(sig.shape)}, stride {sig.stride()}, {sig.dtype} on {sig.device}")
    return None


def _group_order(p: torch.Tensor, dims, view) -> Optional[Tuple[List[int], List[int]]]:
    """The kernel numbers groups in memory order (NOTE: [Group layout]): the
    kept dims sorted by decreasing stride. ``None`` when that is the
    reference's row-major order of the kept dims (the order of the sigma
    state), else ``(kept sizes, perm)``: the sigma state viewed as the kept
    sizes and permuted by ``perm`` is the kernel's order, the rule of the C++
    op's ``attach_sigma`` (csrc/bindings.cpp); `_run` stages it there."""
    pv = grouped_view(p, view)
    gdims = normalize_dims(dims, pv.dim())
    kept = [k for k in range(pv.dim()) if k not in gdims]
    strides = [pv.stride(k) if pv.shape[k] > 1 else 0 for k in kept]
    perm = sorted(range(len(kept)), key=lambda j: -strides[j])
    if [j for j in perm if pv.shape[kept[j]] > 1] == [j for j in range(len(kept))
                                                      if pv.shape[kept[j]] > 1]:
        return None
    return [pv.shape[k] for k in kept], perm


def _build_plan(opt: int, params, grads, states, *, reg: int, solver: int, flat: bool,
                scalar_d: bool, amsgrad: bool, dims, view, reweight: bool,
                like: Optional[Sequence[torch.Size]] = None, sigmas: Sequence = ()) -> _Plan:
    """``like``: per call tensor, the grouped shape (after ``view``) whose tiling
    the launch takes instead of the tensor's own (contiguous layout, same
    ``dims``). The traffic meter
    (bench/traffic.py) runs a copy of a model with fewer groups per tensor under
    the tiling the full model gets; ``None`` everywhere else. ``sigmas``: the
    warm-start state per tensor (empty: none), checked here before anything runs."""
    for i, sig in enumerate(sigmas):
        problem = _sigma_problem(i, params[i], sig, dims, view)
        if problem is not None:
            raise ValueError(problem)
    device_cache: Dict[torch.device, bool] = {}

    def device_ok(dev):
        if dev not in device_cache:
            device_cache[dev] = why_unavailable(dev) is None
        return device_cache[dev]

    fallback: List[int] = []
    staged: List[Tuple[int, torch.Tensor]] = []
    sigma_staged: List[tuple] = []
    buckets: Dict[tuple, List[tuple]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        st = [s[i] for s in states]
        if p.numel() == 0:
            continue
        if not _kernel_ok(p, g, st, flat, device_ok, _OWN_DTYPE[opt]):
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
        stats = _TileStats(numel, tiled)
        sig = None
        if sigmas and not flat and reg == _REG_GROUP and solver == 0 and not scalar_d:
            order = _group_order(p, dims, view)
            sig = sigmas[i]
            if order is not None:
                sig = torch.empty_like(sigmas[i])
                sigma_staged.append((i, *order, sig))
        buckets.setdefault((p.device, p.dtype, g.dtype, _size_class(stats, flat)), []).append(
            (i, p, g, st, lay, in_place, stats, sig))

    launches = []
    for (device, pdt, gdt, _), entries in buckets.items():
        launches.append(_build_launch(opt, entries, device, pdt, gdt, len(params), reg=reg,
                                      solver=solver, flat=flat, scalar_d=scalar_d,
                                      amsgrad=amsgrad, reweight=reweight))
    return _Plan(launches, fallback, staged, sigma_staged)


def _build_launch(opt, entries, device, pdt, gdt, n_call: int, *, reg, solver, flat, scalar_d,
                  amsgrad, reweight) -> _Launch:
    n_state = len(entries[0][3])
    aligned = all(t.data_ptr() % 16 == 0 for _, p, g, st, *_ in entries for t in [p, g, *st])
    constexprs, num_warps = _specialization(opt, reg, solver, flat, scalar_d, amsgrad, pdt, gdt,
                                            [e[6] for e in entries], aligned)
    bg, one_chunk = constexprs["BG"], constexprs["ONE_CHUNK"]
    if not flat and constexprs["ALIGNED"]:  # the tensors' own layouts, not only the tiled ones
        constexprs["ALIGNED"] = _vector_ok([e[4] for e in entries], bg, constexprs["UNIT_KEPT"],
                                           constexprs["UNIT_RED"])
    need_scratch = not flat and not one_chunk and solver == 1 and not scalar_d
    itab, ftab, items = [], [], []
    scratch_len = 0
    grad_rows, grad_ptrs = [], []
    for row, (i, p, g, st, lay, in_place, _, sig) in enumerate(entries):
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
        itab.append([p.data_ptr(), g.data_ptr(), *ptrs, n, n_groups, gsize, scratch_len,
                     0 if sig is None else sig.data_ptr(), *blocks])
        ftab.append([cg, tol_share])
        if need_scratch:  # each tensor's scratch 16-byte aligned, like its own memory
            scratch_len += -(-_extent(p) // 4) * 4
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


def _size_class(st: _TileStats, flat: bool) -> tuple:
    """The launch a tensor joins (NOTE: [Triton tiling]): flat; rows or columns
    by layout, and by the power of two of the group size when the group fits
    in registers (``None``: read in chunks). At most a few dozen classes
    whatever the tensor count, so the launches per step stay bounded. Tensors
    in aligned 4-element runs (`_runs_of_four`) get launches of their own, so
    that one odd tensor does not take the vector layout from the others."""
    if flat:
        return ("flat",)
    lay = st.lay
    be = _np2(lay.group_size)
    vec = _runs_of_four(lay, lay.inner_reduced)
    short = _short_runs(lay)
    if lay.inner_reduced and not short:
        return ("rows", be if lay.group_size <= MAX_BLOCK_E else None, vec)
    reg_tile = max(TILE, MAX_BLOCK_E)
    fits = be <= MAX_BLOCK_E and be * min(COLUMN_MIN_GROUPS, _np2(lay.n_groups)) <= reg_tile
    return ("cols", be if fits else None, vec, short)


def _short_runs(lay) -> bool:
    """Rows of short runs (NOTE: [Triton tiling]): a group of several reduced
    blocks whose innermost one is of stride 1 and fewer than `SHORT_RUN`
    elements, and the
    innermost kept block's stride is that run's length, so neighbouring groups'
    runs are neighbours in memory (channel-wise k x k convolutions: runs of
    k*k). Tiled as rows, a group alone reads each run as a partial sector at
    either end (runs of 9 fp32 use about 55% of the sectors they touch);
    tiled as columns, the tile's adjacent groups read whole sectors."""
    return (lay.inner_reduced and len(lay.red_sizes) > 1 and lay.red_strides[-1] == 1
            and lay.red_sizes[-1] < SHORT_RUN
            and bool(lay.kept_strides) and lay.kept_strides[-1] == lay.red_sizes[-1]
            and lay.n_groups > 1)


def size_classes(stats: Sequence[_TileStats], flat: bool) -> List[List[int]]:
    """Indices of ``stats`` per launch (`_size_class`), in first-seen order."""
    out: Dict[tuple, List[int]] = {}
    for i, st in enumerate(stats):
        out.setdefault(_size_class(st, flat), []).append(i)
    return list(out.values())


def _tile_shape(stats: Sequence[_TileStats], flat: bool):
    """``(BG, BE, ONE_CHUNK, NKB, NRB, UNIT_KEPT, UNIT_RED)`` of a launch over
    tensors of one size class (`_size_class`, NOTE: [Triton tiling])."""
    if flat:
        bg = min(_np2(max(s.numel for s in stats)), _np2(TILE))
        return bg, 1, True, 1, 1, False, False
    lays = [s.lay for s in stats]
    cls = _size_class(stats[0], flat)
    kind, be = cls[0], cls[1]
    short = kind == "cols" and cls[3]
    max_ng = _np2(max(lay.n_groups for lay in lays))
    one_chunk = be is not None
    if kind == "rows":
        if not one_chunk:  # chunks of TILE elements (at most MAX_BLOCK_E)
            be = min(_np2(MAX_BLOCK_E), _np2(TILE))
        bg = max(1, min(_np2(TILE) // be, max_ng))
    elif one_chunk:
        bg = max(1, min(max_ng, COLUMN_GROUPS, max(TILE, MAX_BLOCK_E) // be))
    else:
        # short runs: 8 adjacent groups of runs of R fp32 are R whole sectors,
        # and a longer chunk leaves fewer partial runs at its ends
        bg = min(max_ng, COLUMN_MIN_GROUPS if short else COLUMN_GROUPS, _np2(TILE))
        be = max(1, _np2(TILE) // bg)
    nkb = max(1, max(len(lay.kept_sizes) for lay in lays))
    nrb = max(1, max(len(lay.red_sizes) for lay in lays))
    unit_kept = all(lay.kept_strides in ((), (1,)) for lay in lays)
    unit_red = all(lay.red_strides == (1,) for lay in lays)
    return bg, be, one_chunk, nkb, nrb, unit_kept, unit_red


def _runs_of_four(lay, rows: bool) -> bool:
    """Does this layout lie in aligned 4-element runs along its unit-stride axis
    (NOTE: [grouped vector loads])? Rows: one reduced block of stride 1, the
    group size and every kept stride multiples of 4; columns: one kept block
    of stride 1 (or none), the group count and every reduced stride."""
    if rows:
        return (lay.red_strides == (1,) and lay.group_size % 4 == 0
                and all(st % 4 == 0 for st in lay.kept_strides))
    return (lay.kept_strides in ((), (1,)) and lay.n_groups % 4 == 0
            and all(st % 4 == 0 for st in lay.red_strides))


def _vector_ok(lays, bg: int, unit_kept: bool, unit_red: bool) -> bool:
    """NOTE: [grouped vector loads]: may a grouped launch over these layouts
    (16-byte aligned addresses given) promise the kernel 4-element runs? Rows
    (``unit_red``): `_runs_of_four` for every tensor; columns (``unit_kept``):
    that and tiles of a multiple of 4 groups."""
    if unit_red:
        return all(_runs_of_four(lay, True) for lay in lays)
    if unit_kept:
        return bg % 4 == 0 and all(_runs_of_four(lay, False) for lay in lays)
    return False


def _specialization(opt: int, reg: int, solver: int, flat: bool, scalar_d: bool, amsgrad: bool,
                    pdt: torch.dtype, gdt: torch.dtype, stats: Sequence[_TileStats],
                    aligned: bool) -> Tuple[Dict[str, object], int]:
    """The constexprs (all but ``CAPTURABLE`` and ``COUNT``, per-call switches)
    and ``num_warps`` of a launch over tensors of one size class;
    compile_check.py compiles exactly these. 4 warps below 1024 elements, then
    one warp per 256 (8 elements per thread) up to 16 warps: at 32 warps
    ptxas caps a thread at 64 registers and the grouped tiles spill."""
    bg, be, one_chunk, nkb, nrb, unit_kept, unit_red = _tile_shape(stats, flat)
    if not flat:
        aligned = aligned and _vector_ok([s.lay for s in stats], bg, unit_kept, unit_red)
    constexprs = dict(OPT=opt, REG=reg, SOLVER=solver, FLAT=flat, ONE_CHUNK=one_chunk,
                      AMSGRAD=amsgrad, P_DTYPE=_tl_dtype(pdt), G_DTYPE=_tl_dtype(gdt), BG=bg, BE=be,
                      NKB=nkb, NRB=nrb, SCALAR_D=scalar_d, ALIGNED=aligned, UNIT_KEPT=unit_kept,
                      UNIT_RED=unit_red)
    tile = bg * be
    return constexprs, (4 if tile < 1024 else min(16, max(8, tile // 256)))


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
    counter = _COUNTER
    if counter is not None and counter.device != launch.itab.device:
        counter = None
    # a non-capturable launch never reads stab: any fp32 pointer does
    _K.fused_step_kernel[launch.grid](launch.items, launch.itab, launch.ftab, launch.scratch,
                                      launch.ftab if stab is None else stab,
                                      launch.no_counter if counter is None else counter, *scalars,
                                      num_warps=launch.num_warps, CAPTURABLE=stab is not None,
                                      COUNT=counter is not None, **launch.constexprs)


@contextmanager
def newton_counts(device) -> Iterator[torch.Tensor]:
    """Count, in the launches on ``device`` run inside the block, the Newton work
    of the exact group-lasso solve (for benchmarks and tests; off otherwise, and
    then compiled out): an int32 tensor ``[steps, groups, passes, tiles]`` with
    the Newton steps summed over the groups that iterate (nonzero, non-constant
    ``d``), those groups, the passes over memory summed over the grouped tiles,
    and those tiles. Read it after the block (that synchronizes)."""
    global _COUNTER
    buf = torch.zeros(4, dtype=torch.int32, device=device)
    previous, _COUNTER = _COUNTER, buf
    try:
        yield buf
    finally:
        _COUNTER = previous


def _signature(params, grads, states, sigmas=()) -> tuple:
    sig = []
    for i, (p, g) in enumerate(zip(params, grads)):
        st = [s[i] for s in states] + ([sigmas[i]] if sigmas else [])
        sig.append((p.data_ptr(), p.shape, p.stride(), g.stride(), p.dtype, g.dtype,
                    p.device, g.device,
                    tuple((s.data_ptr(), s.shape, s.stride(), s.dtype, s.device) for s in st)))
    return tuple(sig)


def _run(name: str, params, grads, states, *, reg: int, solver: int, flat: bool, amsgrad: bool,
         dims, view, reweight: bool, scalars: Tuple, reference: Callable,
         stab: Optional[torch.Tensor] = None, sigmas: Sequence = ()) -> List[Optional[torch.Tensor]]:
    """Run one call: cached plan, one launch per dtype and size class, reference for the rest.

    ``reference(indices, *tensor_lists)`` runs the fallback tensors; ``stab``
    is the capturable scalar table (`_scalar_table`), ``None`` otherwise;
    ``sigmas`` the warm-start state (docs/math.md section 4), or empty.
    """
    n = len(params)
    opt = _OPT[name]
    scalar_d = name in ("rmda", "proxsgd")
    if not flat and reg == _REG_GROUP:
        dims_key = dims if not isinstance(dims, list) else tuple(dims)
    else:
        dims_key = None
    key = (opt, reg, solver, flat, amsgrad, dims_key, None if view is None else tuple(view),
           reweight, TILE, MAX_BLOCK_E, COLUMN_GROUPS, len(states), bool(sigmas),
           _signature(params, grads, states, sigmas))
    plan = _cache.get(key)
    if plan is None:
        plan = _build_plan(opt, params, grads, states, reg=reg, solver=solver, flat=flat,
                           scalar_d=scalar_d, amsgrad=amsgrad, dims=dims, view=view,
                           reweight=reweight, sigmas=sigmas)
        _cache[key] = plan
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
    for i, buf in plan.staged:
        buf.copy_(grads[i])
    for i, sizes, perm, buf in plan.sigma_staged:
        buf.view([sizes[j] for j in perm]).copy_(sigmas[i].view(sizes).permute(perm))
    for launch in plan.launches:
        _refresh_grads(launch, grads)
        _launch(launch, scalars, stab)
    for i, sizes, perm, buf in plan.sigma_staged:
        sigmas[i].view(sizes).permute(perm).copy_(buf.view([sizes[j] for j in perm]))
    out: List[Optional[torch.Tensor]] = [None] * n
    if plan.fallback:
        idx = plan.fallback
        res = reference(idx, [params[i] for i in idx], [grads[i] for i in idx],
                        *[[s[i] for i in idx] for s in states])
        for i, r in zip(idx, res):
            out[i] = r
    return out


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


def _mode(regularizer: str, solver: str, tau: float, scalar_d: bool) -> Tuple[int, int, bool]:
    """(regularizer code, solver code, flat) for a call whose threshold is ``tau``."""
    if regularizer == "none" or tau == 0:
        return _REG_NONE, 0, True
    if regularizer == "l1":
        if scalar_d or solver == "exact":
            return _REG_L1, 0, True
        return _REG_L1, 1, False
    return _REG_GROUP, (0 if scalar_d else _SOLVER[solver]), False


#: The kernel's scalar arguments ``tau, eps_t, h0..h7`` (and the same columns
#: of the capturable table) as named step scalars of ``ramda_ref.definitions``,
#: per optimizer; ``None`` and missing slots are 0.
_KERNEL_SLOTS: Dict[str, Tuple[Optional[str], ...]] = {
    "ramda": ("tau", "eps_t", "s", "epsilon", "keep", "c"),
    "rmda": ("thr", None, "s", "beta", "keep", "c"),
    "proxadamw": ("tau", "eps_t", "decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2",
                  "bias2_sqrt", "epsilon", "step_size"),
    "proxsgd": ("thr", None, "keep", "c", "lr"),
}


def _kernel_scalars(name: str, scalars: Dict) -> Tuple:
    """The named step scalars of optimizer ``name`` in the kernel's slots
    ``tau, eps_t, h0..h7`` (numbers, or float64 vectors in a capturable call)."""
    slots = _KERNEL_SLOTS[name]
    values = tuple(0.0 if key is None else scalars[key] for key in slots)
    return values + (0.0,) * (10 - len(values))


def _subset_reference(d: "_D.Definition", present: Sequence[bool], kwargs,
                      sigmas: Sequence = ()) -> Callable:
    """The reference for the fallback tensors ``idx`` of a call: the state lists
    the kernel does not take (``present`` False) go back in as empty lists, the
    warm-start list (`_split_sigmas`) cut down to ``idx`` where the reference takes it."""
    fn = getattr(_ref, d.name)

    def run(idx, params, grads, *lists):
        given = iter(lists)
        full = [list(next(given)) if on else [] for on in present]
        if _SIGMA in d.state:
            full.append([sigmas[i] for i in idx] if sigmas else [])
        return fn(params, grads, *full, **_subset_kwargs(kwargs, idx))
    return run


#: State key of the warm start (docs/math.md section 4): one value per group,
#: the last state list of RAMDA and ProxAdamW.
_SIGMA = "sigma"


def _split_sigmas(d: "_D.Definition", lists: Sequence, hp) -> Tuple[List, List]:
    """``(per-element state lists, sigmas)`` of a call: the warm-start list is the
    one after the per-element state (empty when not given). A non-empty one is
    refused where there is no exact group-lasso solve to warm-start."""
    n_state = len([k for k in d.state if k != _SIGMA])
    if len(lists) > n_state + 1:
        raise TypeError(f"{d.name}: {len(lists)} state lists given, at most {n_state + 1} "
                        f"({', '.join(d.state_args)}, sigmas)")
    sigmas = list(lists[n_state]) if len(lists) > n_state else []
    if sigmas and not (d.solves and hp["regularizer"] == "group_lasso"
                       and hp.get("solver", "exact") == "exact"):
        raise ValueError(f"{d.name}: sigmas (the warm start of the exact group-lasso solve) "
                         f"given with regularizer={hp['regularizer']!r}, "
                         f"solver={hp.get('solver', 'exact')!r}: pass an empty list")
    return list(lists[:n_state]), sigmas


# ---------------------------------------------------------------------------
# The four functionals (signatures of ramda_ref.functional)
# ---------------------------------------------------------------------------

def _functional(d: "_D.Definition") -> Callable:
    """Functional ``d.name``, fused; math as ``ramda_ref.functional``."""
    reference = getattr(_ref, d.name)
    uses_alpha = "alpha" in d.counters

    @functools.wraps(reference)
    def step_fn(params: Tensors, grads: Tensors, *lists: Tensors, step, alpha=None,
                capturable: bool = False, found_inf: Optional[torch.Tensor] = None,
                grad_scale: Optional[torch.Tensor] = None, **hp) -> List[Optional[torch.Tensor]]:
        kwargs = dict(hp, step=step)
        if uses_alpha:
            kwargs["alpha"] = alpha
        regularizer = hp["regularizer"]
        solver, pg_stop = hp.get("solver", "exact"), hp.get("pg_stop", "inexact")
        _ref._capture(capturable, len(params), step, alpha if uses_alpha else None, found_inf,
                      grad_scale, regularizer, solver, pg_stop)
        if capturable and params and torch.compiler.is_compiling():  # NOTE: [one op per optimizer] in _ops.py
            return _ops.call(d.name, "triton", [params, grads, *lists],
                             dict(kwargs, found_inf=found_inf, grad_scale=grad_scale))
        all_lists = lists
        lists, sigmas = _split_sigmas(d, lists, hp)
        if sigmas and len(sigmas) != len(params):
            raise ValueError(f"{d.name}: {len(sigmas)} sigmas for {len(params)} parameters")
        present = [key in d.state_keys(hp) for key in d.state if key != _SIGMA]
        solve_args = (newton_tolerance(torch.float32), hp["max_iters"]) if d.solves else (0.0, 1)
        stab = None
        if capturable:
            kwargs.update(capturable=True, found_inf=found_inf, grad_scale=grad_scale)
            if not params:
                return []
            t = _as_vector(step).double()
            sc = d.scalars(t, _as_vector(alpha) if uses_alpha else None, hp)
            stab = _scalar_table(len(params), t.device, _kernel_scalars(d.name, sc), found_inf,
                                 grad_scale)
            threshold = sc[d.threshold]
            if isinstance(threshold, torch.Tensor):  # only the mode depends on it: > 0 iff lambda_ > 0
                threshold = 0.0 if hp["lambda_"] == 0 else 1.0
            scalars = (0.0, 0.0) + solve_args + (0.0,) * 8
        else:
            sc = d.scalars(step, alpha, hp)
            threshold = sc[d.threshold]
            if whole_call_to_reference(regularizer, solver, pg_stop, threshold):
                return reference(params, grads, *(all_lists if _SIGMA in d.state else lists),
                                 **kwargs)
            cols = _kernel_scalars(d.name, sc)
            scalars = cols[:2] + solve_args + cols[2:]
        reg, solv, flat = _mode(regularizer, solver, threshold, not d.solves)
        states = [lst for lst, on in zip(lists, present) if on]
        return _run(d.name, params, grads, states, reg=reg, solver=solv, flat=flat,
                    amsgrad=bool(hp.get("amsgrad", False)), dims=hp["dims"], view=hp["view"],
                    reweight=hp["reweight"], scalars=scalars,
                    reference=_subset_reference(d, present, kwargs, sigmas), stab=stab,
                    sigmas=sigmas if not flat else ())

    return step_fn


ramda = _functional(_D.RAMDA)
rmda = _functional(_D.RMDA)
proxadamw = _functional(_D.PROXADAMW)
proxsgd = _functional(_D.PROXSGD)
_ops.register("triton", ramda=ramda, rmda=rmda, proxadamw=proxadamw, proxsgd=proxsgd)


#: What the unit step (`_register_units`) takes: dense tensors whose gradients
#: have the parameter's dtype and strides.
UNIT_CAPABILITIES = Capabilities()


def _register_units() -> None:
    """Param groups with ``units`` run as one launch per group and step
    (``ramda_kernels.triton_kernels.units``, on the segment table of
    ``_units.py``); what `_rules.unit_group_problem` refuses with
    `UNIT_CAPABILITIES` runs on the reference."""
    if _K is None:
        return
    from ..triton_kernels import units as unit_kernels
    from . import _units

    _ops.register_units("triton", _units.fused_step(unit_kernels.run_units, UNIT_CAPABILITIES))


_register_units()


__all__ = ["ramda", "rmda", "proxadamw", "proxsgd", "why_unavailable", "clear_cache", "TILE",
           "MAX_BLOCK_E", "INTERPRETED", "newton_counts"]
