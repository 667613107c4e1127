"""Unit groups in one Triton launch per param group and step (docs/math.md
section 3, "Coupled groups", and section 4).

``units_step_kernel`` runs a whole param group with ``units`` on its segment
table (NOTE: [Unit segment table] in ``ramda_kernels/backends/_units.py``):
the first programs one tile of units each, the others a tile of pieces of the
free runs (elements in no unit: ``w = z/d``, or ``y`` with a scalar ``d``).
The per-element math is step.py's (`_load_update`, `_load_new`,
`_store_state`, `_store_param`) and so is the solve (`_newton_start`,
`_warm_start`, `_newton_step`, `_newton_terms5`): a unit is a group whose
elements happen to lie in several tensors.

NOTE: [unit tile]
A program owns ``BU`` consecutive units (a row of the tile each) and walks
their unions in chunks of ``BE`` elements: element ``e`` of a unit is found
in its segment rows (a row's elements start at its ``RCOL_START`` in the
union, ``(outer, inner)`` order), so each lane carries its own addresses and
dtype code (`_lanes`) and one chunk may span several rows and tensors. A pass
walks its chunks in order, so each unit keeps a cursor on its current row
(the row's fields and its tensor's addresses, loaded when the cursor reaches
it): the tables are read once per row and pass, not once per row and chunk.
Consecutive units are mostly neighbours in memory in their consumer slices
(columns ``k, k+1, ..`` of a weight), so a tile of at least ``MIN_UNITS``
reads those in whole sectors. When every unit of the group fits in
``REGISTER_E`` elements (``ONE_CHUNK``, step.py's register tiles, NOTE:
[registers tile live set] there) the tile is one chunk: it is read and
updated once, the Newton solve iterates on registers with the reference's
stopping rule, and the write reads only the parameter (RAMDA / RMDA's
average): one read and one write per element. Larger units run in chunks, as
step.py's two-pass plan (NOTE: [two-pass plan] there):

* pass 1 reads gradient, parameter where ``z`` needs it and the old state,
  writes the new state, and sums per unit ``sum z^2``, ``max d``, ``min d``
  and the `_newton_terms5` sums at the unit's warm-start sigma
  (``unit_sigma``, 0: none), each unit's in one program, so they are
  deterministic;
* `_newton_start` / `_warm_start` turn them into the start; each further
  Newton step (with the two-pass plan's predicted stop) re-reads the new
  state of the units still iterating only;
* the last pass reads the new state and the parameter and writes it; a
  nonzero unit's sigma is written back, a zero unit keeps its previous one.
A unit's tensors may differ in dtype: each chunk runs the typed loads of
every dtype that some lane has (`_elems`), so one launch covers every dtype.
Nothing is read back to the host.

Tables (on the tensors' device):

* ``ttab``  int64 ``[n_tensors, TTAB_WIDTH]``: addresses of parameter,
  gradient and state 0..2 (0: none), the dtype code;
* ``rows`` int64 ``[S, ROW_WIDTH]``: the segment rows, their start in the
  union and their element count, ``ustart`` ``[U + 1]`` and ``usize`` ``[U]``
  per unit; the free pieces the same way (``frows``, ``fstart``, ``fsize``);
* ``thr`` fp32 ``[U]``: ``tau * c_g`` per unit, rounded once from float64 (the
  reference's ``(tau * sqrt(size)).to(float32)``).

All math is fp32 with IEEE division and square root (docs/math.md section 9).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import numpy as np

import torch
import triton
import triton.language as tl

from ramda_ref.prox import newton_tolerance

from .step import (NEWTON_MAX_ITERS, OPT_PROXSGD, OPT_RAMDA, OPT_RMDA, REG_NONE, _closed_form,
                   _div, _group_stats, _gsum, _load_for_write, _load_new, _load_update,
                   _newton_start, _newton_step, _newton_terms, _newton_terms5, _nonzero,
                   _shrink_scale, _store, _store_param, _store_state, _warm_start)

# ttab columns.
TCOL_P = tl.constexpr(0)
TCOL_G = tl.constexpr(1)
TCOL_S0 = tl.constexpr(2)
TCOL_S1 = tl.constexpr(3)
TCOL_S2 = tl.constexpr(4)
TCOL_DTYPE = tl.constexpr(5)
TTAB_WIDTH = tl.constexpr(6)
# row-table columns: a segment row (NOTE: [Unit segment table]) and where its
# elements start in the union of its unit.
RCOL_TENSOR = tl.constexpr(0)
RCOL_OFFSET = tl.constexpr(1)
RCOL_COUNT = tl.constexpr(2)
RCOL_STRIDE = tl.constexpr(3)
RCOL_OUTER = tl.constexpr(4)
RCOL_OUTER_STRIDE = tl.constexpr(5)
RCOL_START = tl.constexpr(6)
RCOL_SIZE = tl.constexpr(7)  # RCOL_COUNT * RCOL_OUTER: the row's elements
ROW_WIDTH = tl.constexpr(8)
# dtype codes.
DT_FP32 = tl.constexpr(0)
DT_BF16 = tl.constexpr(1)
DT_FP16 = tl.constexpr(2)
# what `_elems` does with a chunk.
MODE_FIRST = tl.constexpr(0)  # update the state, return d, z
MODE_NEW = tl.constexpr(1)    # d, z from the new state
MODE_WRITE = tl.constexpr(2)  # the new parameter from the unit's solution
MODE_FREE = tl.constexpr(3)   # update and write unregularized (no unit)
MODE_WRITE_HELD = tl.constexpr(4)  # MODE_WRITE from the d, z given (a tile in registers)


# ---------------------------------------------------------------------------
# One chunk of a tile
# ---------------------------------------------------------------------------

@triton.jit
def _row(rows, ttab, r0, j, load, old, OPT: tl.constexpr, AMSGRAD: tl.constexpr):
    """Row ``j`` of each unit where ``load`` (``old``'s fields elsewhere): the
    cursor of `_lanes`, ``(j, first, size, count, offset, outer_stride, stride,
    dtype code, p, g, s0, s1, s2)``; the state addresses an optimizer never
    touches stay 0."""
    row = rows + (r0 + j) * ROW_WIDTH
    ti = tl.load(row + RCOL_TENSOR, mask=load, other=0)
    meta = ttab + ti * TTAB_WIDTH
    _, first, size, cnt, off, ostr, istr, dt, bp, bg, b0, b1, b2 = old
    first = tl.where(load, tl.load(row + RCOL_START, mask=load, other=0), first)
    size = tl.where(load, tl.load(row + RCOL_SIZE, mask=load, other=0), size)
    cnt = tl.where(load, tl.load(row + RCOL_COUNT, mask=load, other=1), cnt)
    off = tl.where(load, tl.load(row + RCOL_OFFSET, mask=load, other=0), off)
    ostr = tl.where(load, tl.load(row + RCOL_OUTER_STRIDE, mask=load, other=0), ostr)
    istr = tl.where(load, tl.load(row + RCOL_STRIDE, mask=load, other=0), istr)
    dt = tl.where(load, tl.load(meta + TCOL_DTYPE, mask=load, other=0), dt)
    bp = tl.where(load, tl.load(meta + TCOL_P, mask=load, other=0), bp)
    bg = tl.where(load, tl.load(meta + TCOL_G, mask=load, other=0), bg)
    b0 = tl.where(load, tl.load(meta + TCOL_S0, mask=load, other=0), b0)
    if OPT != OPT_PROXSGD:  # V (RAMDA, RMDA), v (ProxAdamW)
        b1 = tl.where(load, tl.load(meta + TCOL_S1, mask=load, other=0), b1)
    if OPT == OPT_RAMDA or AMSGRAD:  # U, vmax
        b2 = tl.where(load, tl.load(meta + TCOL_S2, mask=load, other=0), b2)
    return (j, first, size, cnt, off, ostr, istr, dt, bp, bg, b0, b1, b2)


@triton.jit
def _first_rows(rows, ttab, r0, nrow, OPT: tl.constexpr, AMSGRAD: tl.constexpr):
    """`_lanes`' cursor before a pass's first chunk: each unit's row 0 (units of
    ``nrow`` 0 take part in none of the pass)."""
    z = r0 * 0
    return _row(rows, ttab, r0, z, nrow > 0, (z, z, z, z + 1, z, z, z, z, z, z, z, z, z),
                OPT, AMSGRAD)


@triton.jit
def _lanes(rows, ttab, r0, nrow, c0, cursor, OPT: tl.constexpr, AMSGRAD: tl.constexpr,
           BU: tl.constexpr, BE: tl.constexpr):
    """Where elements ``c0 .. c0 + BE`` of each unit of a tile are (NOTE: [unit
    tile]): per lane the addresses of its parameter, gradient and state 0..2
    elements, its dtype code, and whether the unit has that element; and the
    cursor for the next chunk. A pass visits its chunks in order from 0, so
    each unit's cursor is the first of its rows that ends past ``c0``: every
    row is read from the tables once per pass, when the cursor reaches it."""
    e = c0 + tl.arange(0, BE).to(tl.int64)
    pa = tl.zeros([BU, BE], dtype=tl.int64)
    ga = pa
    s0a = pa
    s1a = pa
    s2a = pa
    code = pa
    inside = pa != 0
    end = c0 + BE
    going = cursor[0] < nrow
    while tl.max(going.to(tl.int32), axis=0) > 0:
        j, first, size, cnt, off, ostr, istr, dt, bp, bg, b0, b1, b2 = cursor
        k = e[None, :] - first[:, None]
        sel = going[:, None] & (k >= 0) & (k < size[:, None])
        k = tl.where(sel, k, 0)
        eo = off[:, None] + (k // cnt[:, None]) * ostr[:, None] + (k % cnt[:, None]) * istr[:, None]
        pb = eo * tl.where(dt == DT_FP32, 4, 2)[:, None]  # bytes into a param-dtype tensor
        fb = eo * 4  # into an fp32 state tensor
        pa = tl.where(sel, bp[:, None] + pb, pa)
        ga = tl.where(sel, bg[:, None] + pb, ga)
        if OPT == OPT_RAMDA or OPT == OPT_RMDA:  # W0 in the parameter's dtype
            s0a = tl.where(sel, b0[:, None] + pb, s0a)
        else:
            s0a = tl.where(sel, b0[:, None] + fb, s0a)
        if OPT != OPT_PROXSGD:
            s1a = tl.where(sel, b1[:, None] + fb, s1a)
        if OPT == OPT_RAMDA or AMSGRAD:
            s2a = tl.where(sel, b2[:, None] + fb, s2a)
        code = tl.where(sel, dt[:, None], code)
        inside = inside | sel
        # units whose row ends in this chunk move on to their next row
        step = going & (first + size <= end)
        j = tl.where(step, j + 1, j)
        going = step & (j < nrow)
        cursor = _row(rows, ttab, r0, j, going, (j, first, size, cnt, off, ostr, istr, dt, bp, bg,
                                                  b0, b1, b2), OPT, AMSGRAD)
    return pa, ga, s0a, s1a, s2a, code, inside, cursor


@triton.jit
def _typed(d, z, pa, ga, s0a, s1a, s2a, code, mask, sigma, scale, active,
           h0, h1, h2, h3, h4, h5, h6, h7, OPT: tl.constexpr, AMSGRAD: tl.constexpr,
           SCALAR_D: tl.constexpr, SOLVE: tl.constexpr, MODE: tl.constexpr,
           CODE: tl.constexpr, PD: tl.constexpr):
    """`_elems` on the lanes of ``mask`` whose dtype code is ``CODE`` (parameter
    dtype ``PD``): ``d, z`` with those lanes replaced (none: one reduction);
    ``MODE_WRITE_HELD`` writes from the ``d, z`` given."""
    m = mask & (code == CODE)
    if tl.max(tl.max(m.to(tl.int32), axis=1), axis=0) > 0:
        p = pa.to(tl.pointer_type(PD))
        g = ga.to(tl.pointer_type(PD))
        if OPT == OPT_RAMDA or OPT == OPT_RMDA:  # W0 in the parameter's dtype
            s0 = s0a.to(tl.pointer_type(PD))
        else:
            s0 = s0a.to(tl.pointer_type(tl.float32))
        s1 = s1a.to(tl.pointer_type(tl.float32))
        s2 = s2a.to(tl.pointer_type(tl.float32))
        offs = tl.zeros_like(m.to(tl.int32))  # the addresses are per lane already
        if MODE == MODE_FIRST or MODE == MODE_FREE:
            cd, cz, x, n0, n1, n2 = _load_update(p, g, s0, s1, s2, offs, m, h0, h1, h2, h3, h4,
                                                 h5, h6, h7, 1.0, OPT, AMSGRAD, False,
                                                 MODE == MODE_FREE)
            if MODE == MODE_FREE:
                _store(p, s0, s1, s2, offs, m, x, _closed_form(cd, cz, 0.0, REG_NONE, SCALAR_D),
                       n0, n1, n2, h2, h3, OPT, AMSGRAD, PD)
            else:
                _store_state(s0, s1, s2, offs, m, n0, n1, n2, OPT, AMSGRAD)
        else:
            if MODE == MODE_WRITE_HELD:  # RAMDA / RMDA read the parameter for the average only
                cd = d
                cz = z
                x = d * 0.0
                if OPT == OPT_RAMDA or OPT == OPT_RMDA:
                    x = tl.load(p + offs, mask=m, other=0.0).to(tl.float32)
            elif MODE == MODE_WRITE:
                live = m
                if SOLVE:
                    live = _nonzero(active, scale, SCALAR_D)[:, None]
                cd, cz, x = _load_for_write(p, s0, s1, s2, offs, m, live, h0, h1, h2, h3, h4, h5,
                                            h6, h7, OPT, AMSGRAD)
            else:
                cd, cz, x = _load_new(p, s0, s1, s2, offs, m, h0, h1, h2, h3, h4, h5, h6, h7, OPT,
                                      AMSGRAD, False)
            if MODE == MODE_WRITE or MODE == MODE_WRITE_HELD:
                if not SOLVE:
                    w = _closed_form(cd, cz, 0.0, REG_NONE, SCALAR_D)
                elif SCALAR_D:
                    w = cz * scale[:, None]
                else:
                    w = tl.where(active[:, None], _div(cz, cd + sigma[:, None]), 0.0)
                _store_param(p, offs, m, x, w, h2, h3, OPT, PD)
        d = tl.where(m, cd, d)
        z = tl.where(m, cz, z)
    return d, z


@triton.jit
def _elems(d, z, pa, ga, s0a, s1a, s2a, code, mask, sigma, scale, active, h0, h1, h2, h3, h4,
           h5, h6, h7, OPT: tl.constexpr, AMSGRAD: tl.constexpr, SCALAR_D: tl.constexpr,
           SOLVE: tl.constexpr, MODE: tl.constexpr):
    """One chunk of a tile in ``MODE``, each lane typed by its dtype code:
    ``d, z`` (``z`` is the prox input ``y`` with a scalar ``d``; the given
    ones off ``mask``, and the ones ``MODE_WRITE_HELD`` writes from)."""
    d, z = _typed(d, z, pa, ga, s0a, s1a, s2a, code, mask, sigma, scale, active, h0, h1, h2, h3,
                  h4, h5, h6, h7, OPT, AMSGRAD, SCALAR_D, SOLVE, MODE, DT_FP32, tl.float32)
    d, z = _typed(d, z, pa, ga, s0a, s1a, s2a, code, mask, sigma, scale, active, h0, h1, h2, h3,
                  h4, h5, h6, h7, OPT, AMSGRAD, SCALAR_D, SOLVE, MODE, DT_BF16, tl.bfloat16)
    d, z = _typed(d, z, pa, ga, s0a, s1a, s2a, code, mask, sigma, scale, active, h0, h1, h2, h3,
                  h4, h5, h6, h7, OPT, AMSGRAD, SCALAR_D, SOLVE, MODE, DT_FP16, tl.float16)
    return d, z


# ---------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------

@triton.jit
def _tile(t, rows, ustart, usize, n, ttab, thr, sigma_ptr, newton_tol,
          h0, h1, h2, h3, h4, h5, h6, h7, OPT: tl.constexpr, AMSGRAD: tl.constexpr,
          SCALAR_D: tl.constexpr, SOLVE: tl.constexpr, FREE: tl.constexpr,
          ONE_CHUNK: tl.constexpr, BU: tl.constexpr, BE: tl.constexpr):
    """Units ``t * BU ..`` of ``n`` (NOTE: [unit tile]); ``FREE``: pieces of the
    free runs instead, one pass, unregularized. ``ONE_CHUNK``: every unit fits
    in ``BE``; the tile stays in registers from pass 1 to the write."""
    gu = t * BU + tl.arange(0, BU).to(tl.int64)
    gmask = gu < n
    r0 = tl.load(ustart + gu, mask=gmask, other=0)
    nrow = tl.load(ustart + gu + 1, mask=gmask, other=0) - r0
    size = tl.load(usize + gu, mask=gmask, other=0)
    longest = tl.max(size, axis=0)
    EXACT: tl.constexpr = SOLVE and not SCALAR_D and not FREE
    T = tl.zeros([BU], dtype=tl.float32)
    if not FREE:
        T = tl.load(thr + gu, mask=gmask, other=1.0)
    s_prev = T * 0.0
    if EXACT:
        s_prev = tl.load(sigma_ptr + gu, mask=gmask, other=0.0)
    sigma = s_prev
    scale = s_prev + 1.0
    active = gmask
    zt = tl.zeros([BU, BE], dtype=tl.float32)
    if FREE:
        cursor = _first_rows(rows, ttab, r0, nrow, OPT, AMSGRAD)
        for c0 in range(0, longest, BE):
            pa, ga, s0a, s1a, s2a, code, inside, cursor = _lanes(rows, ttab, r0, nrow, c0, cursor,
                                                                 OPT, AMSGRAD, BU, BE)
            _elems(zt, zt, pa, ga, s0a, s1a, s2a, code, inside, sigma, scale, active, h0, h1, h2,
                   h3, h4, h5, h6, h7, OPT, AMSGRAD, SCALAR_D, SOLVE, MODE_FREE)
    else:
        zz = tl.zeros([BU], dtype=tl.float32)
        dmax = zz
        dmin = zz + float("inf")
        wa = zz
        wb = zz
        wc = zz
        we = zz
        wg = zz
        d = zt
        z = zt
        inside = zt != 0.0
        cursor = _first_rows(rows, ttab, r0, nrow, OPT, AMSGRAD)
        for c0 in range(0, longest, BE):  # ONE_CHUNK: once, and d, z, inside are the tile
            pa, ga, s0a, s1a, s2a, code, inside, cursor = _lanes(rows, ttab, r0, nrow, c0, cursor,
                                                                 OPT, AMSGRAD, BU, BE)
            d, z = _elems(zt, zt, pa, ga, s0a, s1a, s2a, code, inside, sigma, scale, active, h0, h1,
                          h2, h3, h4, h5, h6, h7, OPT, AMSGRAD, SCALAR_D, SOLVE, MODE_FIRST)
            czz, cmax, cmin = _group_stats(z, d, inside, SCALAR_D)
            zz += czz
            if EXACT:
                dmax = tl.maximum(dmax, cmax)
                dmin = tl.minimum(dmin, cmin)
                ta, tb, tc, te, tg = _newton_terms5(z, d, s_prev[:, None])
                wa += _gsum(ta, inside)
                wb += _gsum(tb, inside)
                wc += _gsum(tc, inside)
                we += _gsum(te, inside)
                wg += _gsum(tg, inside)
        tl.debug_barrier()  # the later passes read the state this one wrote
        if SOLVE:
            znorm = tl.sqrt_rn(zz)
            if SCALAR_D:
                scale = _shrink_scale(znorm, T)
            else:
                active, sigma, todo, rel_excess, inv_norm = _newton_start(
                    znorm, tl.where(gmask, dmax, 1.0), dmin, T, gmask)
                # pass 1 summed the terms over z itself: scale to the unit-norm union
                inv_zz = inv_norm * inv_norm
                sigma, todo, steps = _warm_start(wa * inv_zz, wb * inv_zz, wc * inv_zz,
                                                 we * inv_zz, wg * inv_zz, s_prev, sigma,
                                                 rel_excess, todo, newton_tol, not ONE_CHUNK)
                it = 0
                if ONE_CHUNK:  # in registers: Newton steps cost no memory (the reference's rule)
                    while (it < NEWTON_MAX_ITERS) & (tl.sum(todo, axis=0) > 0):
                        ta, tb, tc = _newton_terms(z * inv_norm[:, None], d, sigma[:, None])
                        sa = _gsum(ta, inside)
                        sigma, todo = _newton_step(sa, _gsum(tb, inside), _gsum(tc, inside), sa,
                                                   rel_excess, sigma, todo, newton_tol, False)
                        it += 1
                else:
                    while (it < NEWTON_MAX_ITERS) & (tl.sum(todo, axis=0) > 0):
                        sa = tl.zeros([BU], dtype=tl.float32)
                        sb = sa
                        sc = sa
                        se = sa
                        # only units still iterating re-read
                        nrow_going = tl.where(gmask & (todo != 0), nrow, 0)
                        cursor = _first_rows(rows, ttab, r0, nrow_going, OPT, AMSGRAD)
                        for c0 in range(0, tl.max(tl.where(nrow_going > 0, size, 0), axis=0), BE):
                            pa, ga, s0a, s1a, s2a, code, inside, cursor = _lanes(
                                rows, ttab, r0, nrow_going, c0, cursor, OPT, AMSGRAD, BU, BE)
                            d, z = _elems(zt, zt, pa, ga, s0a, s1a, s2a, code, inside, sigma, scale,
                                          active, h0, h1, h2, h3, h4, h5, h6, h7, OPT, AMSGRAD,
                                          SCALAR_D, SOLVE, MODE_NEW)
                            ta, tb, tc, te, tg = _newton_terms5(z * inv_norm[:, None], d,
                                                                sigma[:, None])
                            sa += _gsum(ta, inside)
                            sb += _gsum(tb, inside)
                            sc += _gsum(tc, inside)
                            se += _gsum(te, inside)
                        sigma, todo = _newton_step(sa, sb, sc, se, rel_excess, sigma, todo,
                                                   newton_tol, True)
                        it += 1
                # a nonzero unit's sigma is its warm start next step; a zero unit keeps its own
                tl.store(sigma_ptr + gu, sigma, mask=gmask & active)
        if ONE_CHUNK:
            cursor = _first_rows(rows, ttab, r0, nrow, OPT, AMSGRAD)
            pa, ga, s0a, s1a, s2a, code, inside, cursor = _lanes(rows, ttab, r0, nrow, 0, cursor,
                                                                 OPT, AMSGRAD, BU, BE)
            _elems(d, z, pa, ga, s0a, s1a, s2a, code, inside, sigma, scale, active, h0, h1, h2,
                   h3, h4, h5, h6, h7, OPT, AMSGRAD, SCALAR_D, SOLVE, MODE_WRITE_HELD)
        else:
            cursor = _first_rows(rows, ttab, r0, nrow, OPT, AMSGRAD)
            for c0 in range(0, longest, BE):
                pa, ga, s0a, s1a, s2a, code, inside, cursor = _lanes(rows, ttab, r0, nrow, c0,
                                                                     cursor, OPT, AMSGRAD, BU, BE)
                _elems(zt, zt, pa, ga, s0a, s1a, s2a, code, inside, sigma, scale, active, h0, h1,
                       h2, h3, h4, h5, h6, h7, OPT, AMSGRAD, SCALAR_D, SOLVE, MODE_WRITE)


@triton.jit
def units_step_kernel(ttab, rows, ustart, usize, n_units, frows, fstart, fsize, n_pieces, thr,
                      sigma_ptr, newton_tol, h0, h1, h2, h3, h4, h5, h6, h7,
                      OPT: tl.constexpr, AMSGRAD: tl.constexpr, SCALAR_D: tl.constexpr,
                      SOLVE: tl.constexpr, ONE_CHUNK: tl.constexpr, BU: tl.constexpr,
                      BE: tl.constexpr):
    """One step of optimizer ``OPT`` on a unit group: the first programs one
    tile of ``BU`` units each (NOTE: [unit tile]), the rest ``BU`` pieces of the
    free runs each. ``h0..h7``: the step scalars of step.py's
    ``fused_step_kernel`` table; ``SOLVE``: the threshold is nonzero (else every
    element is ``z/d``, or ``y``); ``sigma_ptr`` is read and written by the
    exact solve only (``SOLVE`` and not ``SCALAR_D``)."""
    pid = tl.program_id(0).to(tl.int64)
    unit_tiles = (n_units + BU - 1) // BU
    if pid < unit_tiles:
        _tile(pid, rows, ustart, usize, n_units, ttab, thr, sigma_ptr, newton_tol,
              h0, h1, h2, h3, h4, h5, h6, h7, OPT, AMSGRAD, SCALAR_D, SOLVE, False, ONE_CHUNK, BU,
              BE)
    else:
        _tile(pid - unit_tiles, frows, fstart, fsize, n_pieces, ttab, thr, sigma_ptr, newton_tol,
              h0, h1, h2, h3, h4, h5, h6, h7, OPT, AMSGRAD, SCALAR_D, SOLVE, True, False, BU, BE)


# ---------------------------------------------------------------------------
# Host side: the op `_units.fused_step` wraps
# ---------------------------------------------------------------------------

#: Elements per chunked program (``BU * BE``) and most elements of a chunk
#: (``BE``). Each lane of a tile holds the 64-bit addresses of its element in
#: five tensors and its dtype code (`_lanes`), about 14 registers per element
#: before any math, and a chunked tile also carries each unit's row cursor
#: (13 values per unit) from chunk to chunk: ptxas (sm_90) fits one element
#: per thread of a chunked tile in 128 registers without spill (two spilled
#: 64-124 B with the cursor), so a chunked tile is 512 elements at 16 warps.
#: The tables are read once per row and pass whatever the chunk width, so
#: narrower chunks cost no table bytes, only loop trips.
TILE = 512
BLOCK_E = 1024
#: Largest unit (rounded up to a power of two) held in registers, and the
#: most elements of such a tile: two elements per thread (at 16 and 32 the
#: tiles spilled 5.6 KB and 46-97 KB per thread).
REGISTER_E = 1024
REGISTER_TILE = 1024
#: Fewest units per chunked tile: 8 fp32 are one 32-byte sector, so the columns of
#: consecutive units (a consumer's inputs) are read in whole sectors.
MIN_UNITS = 8
#: Most free runs in one piece.
PIECE_ROWS = 8
#: Warps of every launch: one element of a TILE, two of a REGISTER_TILE per thread.
NUM_WARPS = 16
_OPT = {"ramda": 0, "rmda": 1, "proxadamw": 2, "proxsgd": 3}
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: per segment table: {device: _Tables}
_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
#: tensor-table cache, keyed by the addresses and dtypes it holds
_TTABS: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_TTAB_CACHE = 16


def _np2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _row_table(rows: np.ndarray, start: np.ndarray) -> np.ndarray:
    """``[R, ROW_WIDTH]``: segment rows, each one's first element in its union
    and its element count."""
    out = np.zeros((rows.shape[0], 8), dtype=np.int64)
    out[:, :6] = rows
    sizes = rows[:, 2] * rows[:, 4]
    first = np.concatenate(([0], np.cumsum(sizes)[:-1])) if len(sizes) else sizes
    unit_of = np.repeat(np.arange(len(start) - 1), np.diff(start))
    out[:, 6] = first - first[start[:-1]][unit_of] if len(sizes) else first
    out[:, 7] = sizes
    return out


def _pieces(free: np.ndarray, be: int) -> Tuple[np.ndarray, np.ndarray]:
    """The free runs cut into pieces of at most ``be`` elements and `PIECE_ROWS`
    runs, as segment rows ``(tensor, offset, count, 1, 1, 0)`` and piece starts."""
    rows: List[Tuple[int, ...]] = []
    start, room, used = [0], be, 0
    for t, o, n in free.tolist():
        while n > 0:
            k = min(n, room)
            rows.append((t, o, k, 1, 1, 0))
            o, n, room, used = o + k, n - k, room - k, used + 1
            if room == 0 or used == PIECE_ROWS:
                start.append(len(rows))
                room, used = be, 0
    if start[-1] != len(rows):
        start.append(len(rows))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 6), np.asarray(start, dtype=np.int64)


def tile_shape(longest: int, median: int, units: int) -> Tuple[bool, int, int]:
    """``(ONE_CHUNK, BU, BE)`` of the launch for ``units`` units whose largest
    has ``longest`` elements and the median ``median`` (NOTE: [unit tile])."""
    be = max(16, _np2(longest))
    # every unit in registers, as many as fill REGISTER_TILE, if that is at
    # least MIN_UNITS of them (or all there are): the consumer columns in sectors
    if be <= REGISTER_E and be * min(MIN_UNITS, _np2(units)) <= REGISTER_TILE:
        return True, max(1, min(REGISTER_TILE // be, _np2(units))), be
    # chunks as wide as the typical unit, at least MIN_UNITS per tile
    be = min(BLOCK_E, TILE // MIN_UNITS, max(16, _np2(median)))
    return False, max(1, min(TILE // be, _np2(units))), be


class _Tables:
    """A segment table's launch tables on one device, and its tile shape."""

    def __init__(self, table, device: torch.device):
        seg = table.segments.numpy()
        start = table.unit_start.numpy()
        sizes = table.sizes.numpy().astype(np.int64)
        self.one_chunk, self.bu, self.be = tile_shape(int(sizes.max()), int(np.median(sizes)),
                                                      table.units)
        frows, fstart = _pieces(table.free.numpy(), self.be)
        fsizes = np.array([frows[a:b, 2].sum() for a, b in zip(fstart[:-1], fstart[1:])],
                          dtype=np.int64)
        put = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device)  # noqa: E731
        self.rows, self.ustart, self.usize = put(_row_table(seg, start)), put(start), put(sizes)
        self.frows = put(_row_table(frows, fstart))
        self.fstart, self.fsize = put(fstart), put(fsizes)
        self.n_units, self.n_pieces = table.units, len(fsizes)
        self.root = table.sizes.sqrt().to(device)
        self.grid = (-(-self.n_units // self.bu) + -(-self.n_pieces // self.bu),)


def _tables(table, device: torch.device) -> _Tables:
    per_device = _TABLES.setdefault(table, {})
    if device not in per_device:
        per_device[device] = _Tables(table, device)
    return per_device[device]


def _tensor_table(params, grads, lists, device) -> torch.Tensor:
    rows = tuple((p.data_ptr(), g.data_ptr(),
                  *(lst[i].data_ptr() if lst else 0 for lst in lists), _DTYPE_CODE[p.dtype])
                 for i, (p, g) in enumerate(zip(params, grads)))
    key = (device, rows)
    hit = _TTABS.get(key)
    if hit is None:
        hit = _TTABS[key] = torch.tensor(rows, dtype=torch.int64).to(device)
        while len(_TTABS) > _TTAB_CACHE:
            _TTABS.popitem(last=False)
    _TTABS.move_to_end(key)
    return hit


def run_units(name: str, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
              lists: Sequence[List[torch.Tensor]], sigma: Optional[torch.Tensor], table,
              scalars: Sequence[float], amsgrad: bool, reweight: bool) -> None:
    """One step of a unit group in one launch: the ``run_op`` of
    ``_units.fused_step`` (arguments as it passes them; ``scalars`` in the order
    of ``_units.OP_SCALARS[name]``, the threshold last). The tensors are the
    ones ``_rules.unit_group_problem`` accepted."""
    device = params[0].device
    tabs = _tables(table, device)
    tau = float(scalars[-1])
    solve = tau != 0.0
    scalar_d = name in ("rmda", "proxsgd")
    if solve and not scalar_d and sigma is None:
        raise ValueError(f"{name}: the exact unit solve needs unit_sigma (one fp32 per unit)")
    thr = ((tau * tabs.root) if reweight else torch.full_like(tabs.root, tau)).to(torch.float32)
    h = [float(x) for x in scalars[:-1]] + [0.0] * (9 - len(scalars))
    units_step_kernel[tabs.grid](
        _tensor_table(params, grads, lists, device), tabs.rows, tabs.ustart, tabs.usize,
        tabs.n_units, tabs.frows, tabs.fstart, tabs.fsize, tabs.n_pieces, thr,
        sigma if sigma is not None else thr, newton_tolerance(torch.float32), *h,
        OPT=_OPT[name], AMSGRAD=bool(amsgrad) and name == "proxadamw", SCALAR_D=scalar_d,
        SOLVE=solve, ONE_CHUNK=tabs.one_chunk, BU=tabs.bu, BE=tabs.be,
        num_warps=NUM_WARPS)


__all__ = ["units_step_kernel", "run_units", "tile_shape", "NUM_WARPS", "TILE", "BLOCK_E"]
