"""One fused Triton kernel for a whole optimizer step over many tensors.

``fused_step_kernel`` reads gradient, parameter and state once, updates the
state, forms the subproblem's ``d`` and ``z`` (SPEC section 2), solves it
(SPEC sections 3-5) and writes the new parameter, for every tensor of a call
in one launch. The host side (``ramda_kernels.backends.triton_backend``)
builds the metadata tables described below once and caches them.

Tables (all on the tensors' device):

* ``items``  int64 ``[n_items, 2]``: (tensor row, first group of the tile).
* ``itab``   int64 ``[n_tensors, ITAB_WIDTH]``: addresses of parameter,
  gradient and up to three state tensors, ``numel``, number of groups, group
  size, offset into ``scratch``, then the canonical group layout of
  ``ramda_kernels.layout`` (see NOTE: [Group layout]): kept block sizes, kept
  block strides, reduced block sizes, reduced block strides, ``MAX_BLOCKS``
  slots each, in memory order, unused slots ``(1, 0)``.
* ``ftab``   fp32 ``[n_tensors, FTAB_WIDTH]``: ``c_g`` (the group weight) and
  ``sqrt(|g| / n)`` (the share of the inexactness tolerance of one group).
* ``stab``   fp32 ``[n_tensors, STAB_WIDTH]``, capturable launches only (NOTE:
  [capturable kernel]): per tensor ``tau, eps_t, h0..h7``, the skip flag and
  GradScaler's scale, computed on the device from the step counters.

NOTE: [capturable kernel]
With ``CAPTURABLE`` the step-derived scalars are not kernel arguments (a
CUDA graph would freeze them) but loaded from ``stab``, one row per tensor,
so the tensors of one launch may be at different steps. A nonzero skip flag
(GradScaler's ``found_inf`` or a NaN/Inf gradient) makes the tile empty: the
element / group count is taken as 0, every load and store is masked off and
the solver loops do not run, so nothing is written. The gradient is divided
by the scale as it is loaded. Without ``CAPTURABLE`` none of this is traced:
the non-capturable kernel is the same code as before.

NOTE: [Triton tiling]
A program owns a tile of ``BG`` consecutive groups of one tensor and walks
their elements in chunks of ``BE`` (both ``tl.constexpr``, chosen per launch
from the largest group size and group count of the launch):

* ``FLAT`` (no group reduction: ``none``, closed-form ``l1``): the dense
  tensor is read in memory order, ``BG`` elements per program, ``BE == 1``.
* ``ONE_CHUNK`` (every group of the launch fits in ``BE``): the tile is loaded
  once and kept in registers; Newton / PG iterate on registers and the tile
  is written once.
* otherwise (groups larger than ``BE``): every pass over a group re-reads its
  inputs (gradient and *old* state) and recomputes ``d`` and ``z``; state and
  parameter are written only by the last pass, so no pass reads what another
  wrote and no scratch copy of ``d`` / ``z`` is needed (for Newton that is
  one pass for the norms, one per Newton step, one to write). The PG solver
  must carry its iterate ``Z`` between iterations, so it keeps ``Z`` in an
  fp32 ``scratch`` buffer (same offsets as the tensor), two passes per PG
  step for group lasso (the prox needs the group norm of ``Y`` first), one
  for l1.
Rows vs columns (NOTE: [Group layout]): the host makes ``BG`` small and
``BE`` large when every group is a contiguous run, and ``BG`` large when
neighbouring groups are neighbours in memory; when every tensor of the launch
has a single unit-stride reduced (rows) or kept (columns) block, the
``UNIT_RED`` / ``UNIT_KEPT`` constexprs make that stride visible to the
compiler, which then orders threads along the contiguous axis. ``FLAT`` full
tiles are masked by a bound the compiler can prove is a multiple of ``BG``
and, with ``ALIGNED``, use 16-byte vector loads; a tensor's last tile is the
only ragged one.

All math is fp32; parameters are read in ``P_DTYPE`` and rounded once on the
final store. No value goes back to the host: iterative solves are in-kernel
``while`` loops over per-group flags.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Optimizer, regularizer and solver codes (the host passes them as constexprs).
OPT_RAMDA = tl.constexpr(0)
OPT_RMDA = tl.constexpr(1)
OPT_PROXADAMW = tl.constexpr(2)
OPT_PROXSGD = tl.constexpr(3)
REG_NONE = tl.constexpr(0)
REG_L1 = tl.constexpr(1)
REG_GROUP = tl.constexpr(2)
SOLVER_EXACT = tl.constexpr(0)
SOLVER_PG = tl.constexpr(1)

# itab columns.
COL_P = tl.constexpr(0)
COL_G = tl.constexpr(1)
COL_S0 = tl.constexpr(2)
COL_S1 = tl.constexpr(3)
COL_S2 = tl.constexpr(4)
COL_NUMEL = tl.constexpr(5)
COL_NGROUPS = tl.constexpr(6)
COL_GSIZE = tl.constexpr(7)
COL_SCRATCH = tl.constexpr(8)
COL_BLOCKS = tl.constexpr(9)
MAX_BLOCKS = tl.constexpr(4)
ITAB_WIDTH = tl.constexpr(9 + 4 * 4)
# ftab columns.
FCOL_CG = tl.constexpr(0)
FCOL_TOL = tl.constexpr(1)
FTAB_WIDTH = tl.constexpr(2)
# stab columns (capturable launches): tau, eps_t, h0..h7, skip flag, gradient scale.
SCOL_TAU = tl.constexpr(0)
SCOL_EPS = tl.constexpr(1)
SCOL_H = tl.constexpr(2)
SCOL_SKIP = tl.constexpr(10)
SCOL_GSCALE = tl.constexpr(11)
STAB_WIDTH = tl.constexpr(12)

#: Same cap as ramda_ref.prox.NEWTON_MAX_ITERS.
NEWTON_MAX_ITERS = tl.constexpr(50)


# ---------------------------------------------------------------------------
# Math (no memory movement)
# ---------------------------------------------------------------------------

@triton.jit
def _cbrt(u):
    """Real cube root of ``u >= 0``: exp2/log2 estimate plus one Newton step,
    so the result is within an ulp or two whatever the hardware's approximate
    log2/exp2 do."""
    pos = u > 0.0
    safe = tl.where(pos, u, 1.0)
    y = tl.exp2(tl.log2(safe) * (1.0 / 3.0))
    y = (2.0 * y + safe / (y * y)) * (1.0 / 3.0)
    return tl.where(pos, y, 0.0)


@triton.jit
def _soft(y, thr):
    """``sign(y) * max(|y| - thr, 0)`` (prox of ``thr * |.|``)."""
    a = tl.maximum(tl.abs(y) - thr, 0.0)
    return tl.where(y > 0.0, a, tl.where(y < 0.0, -a, 0.0))


@triton.jit
def _shrink_scale(norm, thr):
    """Group soft-threshold factor ``max(norm - thr, 0) / norm`` (0 for a zero norm)."""
    return tl.maximum(norm - thr, 0.0) / tl.where(norm > 0.0, norm, 1.0)


@triton.jit
def _gsum(x, mask):
    """Per-group (row) sum over the valid elements of a tile."""
    return tl.sum(tl.where(mask, x, 0.0), axis=1)


@triton.jit
def _newton_terms(zeta, d, sigma):
    """Per-element terms of `_newton_step`'s three group sums, from the unit-norm
    group ``zeta = z * (1/||z_g||)``: ``a = v^2 d/(d+sigma)``, ``b = v^2 sigma/(d+sigma)``
    and ``c = u (zeta + v)`` with ``v = sigma zeta/(d+sigma)``, ``u = d zeta/(d+sigma)``."""
    inv = 1.0 / (d + sigma)
    ps = sigma * inv
    pd = d * inv
    v = zeta * ps
    vv = v * v
    return vv * pd, vv * ps, (zeta * pd) * (zeta + v)


@triton.jit
def _pg_trial(p_ptr, g_ptr, s0, s1, s2, zs, offs, mask, theta,
              h0, h1, h2, h3, h4, h5, h6, h7, gs, OPT: tl.constexpr, AMSGRAD: tl.constexpr,
              CAPTURABLE: tl.constexpr):
    """One chunk of a PG iteration on a group larger than a block: ``d``, the
    iterate ``Z`` (from the scratch buffer) and the gradient point
    ``Y = Z - theta (d Z - z)`` whose prox is the next iterate."""
    d, z, x, n0, n1, n2 = _load_update(p_ptr, g_ptr, s0, s1, s2, offs, mask,
                                       h0, h1, h2, h3, h4, h5, h6, h7, gs, OPT, AMSGRAD, CAPTURABLE)
    Z = tl.load(zs + offs, mask=mask, other=0.0)
    return d, Z, Z - theta[:, None] * (d * Z - z)


@triton.jit
def _newton_start(znorm, dmax, dmin, T, gmask):
    """Screening and the start of the Newton solve, per group (SPEC section 4):
    ``(active, sigma_hi, todo, relative excess, 1/||z_g||)``. The iteration runs
    on unit-norm groups (NOTE: [secular equation without cancellation] in
    ramda_ref.prox); groups with constant ``d`` start at the root and take no step."""
    active = (znorm > T) & gmask
    excess = tl.where(active, znorm - T, 1.0)
    sigma = T * dmax / excess
    todo = (active & (dmax != dmin)).to(tl.int32)
    safe_norm = tl.where(active, znorm, 1.0)
    return active, sigma, todo, excess / safe_norm, 1.0 / safe_norm


@triton.jit
def _newton_step(a, b, c, rel_excess, sigma, todo, tol):
    """One Newton step on the secular equation of SPEC section 4, from the group
    sums of `_newton_terms` and ``rel_excess = (||z_g|| - T)/||z_g||``, written
    without cancellation as in ``ramda_ref.prox._newton_step`` (see NOTE:
    [secular equation without cancellation] there).
    Groups with ``todo == 0`` keep their sigma; sigma moves only by a positive
    step, and a group is done once not ``delta > tol * sigma`` (same rules as
    ``ramda_ref.prox.exact_group_lasso``)."""
    vn = tl.sqrt(a + b)
    f = rel_excess - c / (1.0 + vn)
    delta = sigma * f * vn / (a + f * b / vn)
    step = todo != 0
    sigma = tl.where(step & (delta > 0.0), sigma - delta, sigma)
    todo = tl.where(step & (delta > tol * sigma), todo, 0)
    return sigma, todo


@triton.jit
def _round_to_bf16(x):
    """``x`` rounded to the nearest bfloat16 (ties to even), still in fp32, so the
    final cast is exact. The GPU cast rounds this way already; the Triton
    interpreter's cast truncates, which would make CPU tests disagree with
    torch by an ulp of bf16 on half of all writes."""
    b = x.to(tl.int32, bitcast=True)
    b = (b + (0x7FFF + ((b >> 16) & 1))) & -65536
    return tl.where(x == x, b.to(tl.float32, bitcast=True), x)


@triton.jit
def _closed_form(d, z, tau, REG: tl.constexpr, SCALAR_D: tl.constexpr):
    """Elementwise subproblem solutions (SPEC section 3); with a scalar ``d``
    (RMDA, ProxSGD) ``z`` already is the prox input ``y`` and ``tau`` its threshold."""
    if REG == REG_L1:
        if SCALAR_D:
            w = _soft(z, tau)
        else:
            w = _soft(z, tau) / d
    else:
        if SCALAR_D:
            w = z
        else:
            w = z / d
    return w


# ---------------------------------------------------------------------------
# Per-optimizer state update: loads, returns (d, z, x, new states)
# ---------------------------------------------------------------------------

@triton.jit
def _load_update(p_ptr, g_ptr, s0, s1, s2, offs, mask, h0, h1, h2, h3, h4, h5, h6, h7, gs,
                 OPT: tl.constexpr, AMSGRAD: tl.constexpr, CAPTURABLE: tl.constexpr):
    """Load one tile and apply the optimizer's state update (SPEC section 1).

    Returns ``d, z, x, n0, n1, n2``: the subproblem's diagonal and linear term
    (for RMDA / ProxSGD ``d`` is unused and ``z`` is the prox input ``y``),
    the current point ``x`` (for ProxAdamW after weight decay) and the new
    values of state 0..2. The ``h*`` scalars are documented at
    ``fused_step_kernel``; ``gs`` is GradScaler's scale (capturable only),
    divided out as the gradient is read.
    """
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CAPTURABLE:
        g = g / gs
    x = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if OPT == OPT_RAMDA:
        n0 = tl.load(s0 + offs, mask=mask, other=0.0)
        n1 = tl.load(s1 + offs, mask=mask, other=0.0) + h0 * g
        n2 = tl.load(s2 + offs, mask=mask, other=0.0) + h0 * g * g
        d = _cbrt(n2) + h1
        z = d * n0 - n1
    elif OPT == OPT_RMDA:
        n0 = tl.load(s0 + offs, mask=mask, other=0.0)
        n1 = tl.load(s1 + offs, mask=mask, other=0.0) + h0 * g
        n2 = n1
        z = n0 - n1 / h1
        d = z
    elif OPT == OPT_PROXADAMW:
        x = x * h0
        n0 = tl.load(s0 + offs, mask=mask, other=0.0) * h1 + h2 * g
        n1 = tl.load(s1 + offs, mask=mask, other=0.0) * h3 + h4 * g * g
        if AMSGRAD:
            n2 = tl.maximum(tl.load(s2 + offs, mask=mask, other=0.0), n1)
            d = tl.sqrt_rn(n2) / h5 + h6
        else:
            n2 = n1
            d = tl.sqrt_rn(n1) / h5 + h6
        z = d * x - h7 * n0
    else:
        n0 = tl.load(s0 + offs, mask=mask, other=0.0) * h0 + h1 * g
        n1 = n0
        n2 = n0
        z = x - h2 * n0
        d = z
    return d, z, x, n0, n1, n2


@triton.jit
def _store(p_ptr, s0, s1, s2, offs, mask, x, w, n0, n1, n2, h2, h3,
           OPT: tl.constexpr, AMSGRAD: tl.constexpr, P_DTYPE: tl.constexpr):
    """Write the new state and the new parameter (rounded once to its dtype)."""
    if OPT == OPT_RAMDA:
        tl.store(s1 + offs, n1, mask=mask)
        tl.store(s2 + offs, n2, mask=mask)
        out = h2 * x + h3 * w
    elif OPT == OPT_RMDA:
        tl.store(s1 + offs, n1, mask=mask)
        out = h2 * x + h3 * w
    elif OPT == OPT_PROXADAMW:
        tl.store(s0 + offs, n0, mask=mask)
        tl.store(s1 + offs, n1, mask=mask)
        if AMSGRAD:
            tl.store(s2 + offs, n2, mask=mask)
        out = w
    else:
        tl.store(s0 + offs, n0, mask=mask)
        out = w
    if P_DTYPE == tl.bfloat16:
        out = _round_to_bf16(out)
    tl.store(p_ptr + offs, out.to(P_DTYPE), mask=mask)


# ---------------------------------------------------------------------------
# Addressing
# ---------------------------------------------------------------------------

@triton.jit
def _decode(idx, sizes, strides, NB: tl.constexpr, UNIT: tl.constexpr):
    """Memory offset of index ``idx`` over ``NB`` blocks (last block fastest).

    ``UNIT``: the host saw one block of stride 1 in every tensor of the launch;
    the offset is ``idx`` itself, which tells the compiler the addresses are
    contiguous along that axis (coalesced order for the "columns" layout,
    NOTE: [Group layout]).
    """
    if UNIT:
        return idx
    off = tl.zeros_like(idx)
    rem = idx
    for jj in tl.static_range(NB):
        # block NB-1-jj, innermost first; the outermost needs no modulo
        stride = tl.load(strides + (NB - 1 - jj))
        if jj == NB - 1:
            off += rem * stride
        else:
            size = tl.load(sizes + (NB - 1 - jj))
            off += (rem % size) * stride
            rem = rem // size
    return off


@triton.jit
def _chunk(c0, goff, gmask, red_sizes, red_strides, gsize, BE: tl.constexpr, NRB: tl.constexpr,
           UNIT_RED: tl.constexpr):
    e = c0 + tl.arange(0, BE).to(tl.int64)
    eoff = _decode(e, red_sizes, red_strides, NRB, UNIT_RED)
    offs = goff[:, None] + eoff[None, :]
    mask = gmask[:, None] & (e < gsize)[None, :]
    return offs, mask


@triton.jit
def _flat_tile(p_ptr, g_ptr, s0, s1, s2, offs, limit, tau, h0, h1, h2, h3, h4, h5, h6, h7, gs,
               OPT: tl.constexpr, REG: tl.constexpr, AMSGRAD: tl.constexpr,
               P_DTYPE: tl.constexpr, SCALAR_D: tl.constexpr, CAPTURABLE: tl.constexpr):
    """Elements ``offs < limit`` of a tensor without group reductions."""
    mask = offs < limit
    d, z, x, n0, n1, n2 = _load_update(p_ptr, g_ptr, s0, s1, s2, offs, mask,
                                       h0, h1, h2, h3, h4, h5, h6, h7, gs, OPT, AMSGRAD, CAPTURABLE)
    w = _closed_form(d, z, tau, REG, SCALAR_D)
    _store(p_ptr, s0, s1, s2, offs, mask, x, w, n0, n1, n2, h2, h3, OPT, AMSGRAD, P_DTYPE)


# ---------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------

@triton.jit
def fused_step_kernel(items, itab, ftab, scratch, stab, tau, eps_t, newton_tol, max_iters,
                      h0, h1, h2, h3, h4, h5, h6, h7,
                      OPT: tl.constexpr, REG: tl.constexpr, SOLVER: tl.constexpr,
                      FLAT: tl.constexpr, ONE_CHUNK: tl.constexpr, AMSGRAD: tl.constexpr,
                      P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, BG: tl.constexpr,
                      BE: tl.constexpr, NKB: tl.constexpr, NRB: tl.constexpr,
                      SCALAR_D: tl.constexpr, ALIGNED: tl.constexpr, UNIT_KEPT: tl.constexpr,
                      UNIT_RED: tl.constexpr, CAPTURABLE: tl.constexpr):
    """One step of optimizer ``OPT`` on the tile ``items[program_id]``.

    ``tau`` is the subproblem's threshold before the group weight (RAMDA
    ``alpha_t*lambda``, ProxAdamW ``lr*lambda``, RMDA ``alpha_t*lambda/beta_t``,
    ProxSGD ``lr*lambda``), ``eps_t`` the PG inexactness tolerance,
    ``newton_tol`` Newton's relative stopping tolerance, ``max_iters`` PG's cap.
    ``h0..h7`` (unused ones are 0):

    * RAMDA:     ``s_t, eps, 1-c, c``
    * RMDA:      ``s_t, beta_t, 1-c, c``
    * ProxAdamW: ``1-lr*wd, b1, 1-b1, b2, 1-b2, sqrt(1-b2^t), eps, lr/(1-b1^t)``
    * ProxSGD:   ``1-c, c, lr``

    ``SCALAR_D`` is true for RMDA and ProxSGD (closed-form prox); ``ALIGNED``
    promises that every tensor address of the launch is 16-byte aligned;
    ``UNIT_KEPT`` / ``UNIT_RED`` that every tensor has a single kept / reduced
    block of stride 1 (see `_decode`). ``CAPTURABLE``: ``tau, eps_t, h*``
    come from row ``row`` of ``stab`` instead (their arguments are ignored),
    with a skip flag and a gradient scale (NOTE: [capturable kernel]).
    Tiling: see NOTE: [Triton tiling].
    """
    pid = tl.program_id(0)
    row = tl.load(items + 2 * pid)
    first = tl.load(items + 2 * pid + 1)
    meta = itab + row * ITAB_WIDTH
    p_ptr = tl.load(meta + COL_P).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(meta + COL_G).to(tl.pointer_type(G_DTYPE))
    s0 = tl.load(meta + COL_S0).to(tl.pointer_type(tl.float32))
    s1 = tl.load(meta + COL_S1).to(tl.pointer_type(tl.float32))
    s2 = tl.load(meta + COL_S2).to(tl.pointer_type(tl.float32))
    gi = first + tl.arange(0, BG).to(tl.int64)
    gs = 1.0
    skip = False
    if CAPTURABLE:  # NOTE: [capturable kernel]
        srow = stab + row * STAB_WIDTH
        tau = tl.load(srow + SCOL_TAU)
        eps_t = tl.load(srow + SCOL_EPS)
        h0 = tl.load(srow + SCOL_H)
        h1 = tl.load(srow + SCOL_H + 1)
        h2 = tl.load(srow + SCOL_H + 2)
        h3 = tl.load(srow + SCOL_H + 3)
        h4 = tl.load(srow + SCOL_H + 4)
        h5 = tl.load(srow + SCOL_H + 5)
        h6 = tl.load(srow + SCOL_H + 6)
        h7 = tl.load(srow + SCOL_H + 7)
        skip = tl.load(srow + SCOL_SKIP) != 0.0
        gs = tl.load(srow + SCOL_GSCALE)

    if FLAT:
        numel = tl.load(meta + COL_NUMEL)
        if CAPTURABLE:
            numel = tl.where(skip, 0, numel)
        if ALIGNED:  # every address of the launch is a multiple of 16 bytes (host-checked)
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            s0 = tl.multiple_of(s0, 16)
            s1 = tl.multiple_of(s1, 16)
            s2 = tl.multiple_of(s2, 16)
        first = tl.multiple_of(first, BG)
        offs = (first + tl.arange(0, BG).to(tl.int64))[:, None] + tl.zeros([BG, BE], dtype=tl.int64)
        # A full tile gets a mask the compiler can prove uniform per vector, so
        # its loads and stores vectorize; only a tensor's last tile is ragged.
        if first + BG <= numel:
            _flat_tile(p_ptr, g_ptr, s0, s1, s2, offs, tl.multiple_of(first + BG, BG), tau,
                       h0, h1, h2, h3, h4, h5, h6, h7, gs, OPT, REG, AMSGRAD, P_DTYPE, SCALAR_D,
                       CAPTURABLE)
        else:
            _flat_tile(p_ptr, g_ptr, s0, s1, s2, offs, numel, tau,
                       h0, h1, h2, h3, h4, h5, h6, h7, gs, OPT, REG, AMSGRAD, P_DTYPE, SCALAR_D,
                       CAPTURABLE)
    else:
        n_groups = tl.load(meta + COL_NGROUPS)
        if CAPTURABLE:
            n_groups = tl.where(skip, 0, n_groups)
        gsize = tl.load(meta + COL_GSIZE)
        kept_sizes = meta + COL_BLOCKS
        kept_strides = kept_sizes + MAX_BLOCKS
        red_sizes = kept_strides + MAX_BLOCKS
        red_strides = red_sizes + MAX_BLOCKS
        gmask = gi < n_groups
        goff = _decode(gi, kept_sizes, kept_strides, NKB, UNIT_KEPT)
        T = tau * tl.load(ftab + row * FTAB_WIDTH + FCOL_CG)
        tol_g = eps_t * tl.load(ftab + row * FTAB_WIDTH + FCOL_TOL)
        zero_g = tl.zeros([BG], dtype=tl.float32)
        if ONE_CHUNK:
            offs, mask = _chunk(0, goff, gmask, red_sizes, red_strides, gsize, BE, NRB, UNIT_RED)
            d, z, x, n0, n1, n2 = _load_update(p_ptr, g_ptr, s0, s1, s2, offs, mask,
                                               h0, h1, h2, h3, h4, h5, h6, h7, gs, OPT, AMSGRAD, CAPTURABLE)
            if SCALAR_D:
                w = z * _shrink_scale(tl.sqrt(_gsum(z * z, mask)), T)[:, None]
            else:
                znorm = tl.sqrt(_gsum(z * z, mask))
                dmax = tl.where(gmask, tl.max(tl.where(mask, d, 0.0), axis=1), 1.0)
                if SOLVER == SOLVER_EXACT:
                    dmin = tl.min(tl.where(mask, d, float("inf")), axis=1)
                    active, sigma, todo, rel_excess, inv_norm = _newton_start(znorm, dmax, dmin, T, gmask)
                    zeta = z * inv_norm[:, None]
                    it = 0
                    while (it < NEWTON_MAX_ITERS) & (tl.sum(todo, axis=0) > 0):
                        ta, tb, tc = _newton_terms(zeta, d, sigma[:, None])
                        sigma, todo = _newton_step(_gsum(ta, mask), _gsum(tb, mask), _gsum(tc, mask),
                                                   rel_excess, sigma, todo, newton_tol)
                        it += 1
                    w = tl.where(active[:, None], z / (d + sigma[:, None]), 0.0)
                else:
                    if REG == REG_GROUP:
                        active = (znorm > T) & gmask
                    else:
                        active = gmask
                    theta = 1.0 / dmax
                    Z = tl.where(active[:, None] & mask, x, 0.0)
                    run = active.to(tl.int32)
                    it = 0
                    while (it < max_iters) & (tl.sum(run, axis=0) > 0):
                        Y = Z - theta[:, None] * (d * Z - z)
                        if REG == REG_GROUP:
                            Znew = Y * _shrink_scale(tl.sqrt(_gsum(Y * Y, mask)), theta * T)[:, None]
                        else:
                            Znew = _soft(Y, (theta * T)[:, None])
                        Znew = tl.where((run != 0)[:, None], Znew, Z)
                        s = (1.0 / theta[:, None] - d) * (Z - Znew)
                        run = tl.where(tl.sqrt(_gsum(s * s, mask)) > tol_g, run, 0)
                        Z = Znew
                        it += 1
                    w = Z
            _store(p_ptr, s0, s1, s2, offs, mask, x, w, n0, n1, n2, h2, h3, OPT, AMSGRAD, P_DTYPE)
        else:
            # Pass 1: group statistics of z and d.
            zz = zero_g
            dmax = zero_g
            dmin = zero_g + float("inf")
            for c0 in range(0, gsize, BE):
                offs, mask = _chunk(c0, goff, gmask, red_sizes, red_strides, gsize, BE, NRB, UNIT_RED)
                d, z, x, n0, n1, n2 = _load_update(p_ptr, g_ptr, s0, s1, s2, offs, mask,
                                                   h0, h1, h2, h3, h4, h5, h6, h7, gs, OPT, AMSGRAD, CAPTURABLE)
                zz += _gsum(z * z, mask)
                if not SCALAR_D:
                    dmax = tl.maximum(dmax, tl.max(tl.where(mask, d, 0.0), axis=1))
                    dmin = tl.minimum(dmin, tl.min(tl.where(mask, d, float("inf")), axis=1))
            znorm = tl.sqrt(zz)
            dmax = tl.where(gmask, dmax, 1.0)
            scale = _shrink_scale(znorm, T)
            sigma = zero_g
            active = gmask
            if not SCALAR_D:
                if SOLVER == SOLVER_EXACT:
                    active, sigma, todo, rel_excess, inv_norm = _newton_start(znorm, dmax, dmin, T, gmask)
                    it = 0
                    while (it < NEWTON_MAX_ITERS) & (tl.sum(todo, axis=0) > 0):
                        sa = zero_g
                        sb = zero_g
                        sc = zero_g
                        for c0 in range(0, gsize, BE):
                            offs, mask = _chunk(c0, goff, gmask, red_sizes, red_strides, gsize, BE, NRB, UNIT_RED)
                            d, z, x, n0, n1, n2 = _load_update(
                                p_ptr, g_ptr, s0, s1, s2, offs, mask,
                                h0, h1, h2, h3, h4, h5, h6, h7, gs, OPT, AMSGRAD, CAPTURABLE)
                            ta, tb, tc = _newton_terms(z * inv_norm[:, None], d, sigma[:, None])
                            sa += _gsum(ta, mask)
                            sb += _gsum(tb, mask)
                            sc += _gsum(tc, mask)
                        sigma, todo = _newton_step(sa, sb, sc, rel_excess, sigma, todo, newton_tol)
                        it += 1
                else:
                    if REG == REG_GROUP:
                        active = (znorm > T) & gmask
                    theta = 1.0 / dmax
                    zs = scratch + tl.load(meta + COL_SCRATCH)
                    for c0 in range(0, gsize, BE):
                        offs, mask = _chunk(c0, goff, gmask, red_sizes, red_strides, gsize, BE, NRB, UNIT_RED)
                        x = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                        if OPT == OPT_PROXADAMW:
                            x = x * h0
                        tl.store(zs + offs, tl.where(active[:, None], x, 0.0), mask=mask)
                    tl.debug_barrier()
                    run = active.to(tl.int32)
                    it = 0
                    while (it < max_iters) & (tl.sum(run, axis=0) > 0):
                        pscale = zero_g
                        if REG == REG_GROUP:
                            yy = zero_g
                            for c0 in range(0, gsize, BE):
                                offs, mask = _chunk(c0, goff, gmask, red_sizes, red_strides, gsize, BE, NRB, UNIT_RED)
                                d, Z, Y = _pg_trial(p_ptr, g_ptr, s0, s1, s2, zs, offs, mask, theta,
                                                    h0, h1, h2, h3, h4, h5, h6, h7, gs, OPT, AMSGRAD, CAPTURABLE)
                                yy += _gsum(Y * Y, mask)
                            pscale = _shrink_scale(tl.sqrt(yy), theta * T)
                        ss = zero_g
                        for c0 in range(0, gsize, BE):
                            offs, mask = _chunk(c0, goff, gmask, red_sizes, red_strides, gsize, BE, NRB, UNIT_RED)
                            d, Z, Y = _pg_trial(p_ptr, g_ptr, s0, s1, s2, zs, offs, mask, theta,
                                                h0, h1, h2, h3, h4, h5, h6, h7, gs, OPT, AMSGRAD, CAPTURABLE)
                            if REG == REG_GROUP:
                                Znew = Y * pscale[:, None]
                            else:
                                Znew = _soft(Y, (theta * T)[:, None])
                            Znew = tl.where((run != 0)[:, None], Znew, Z)
                            s = (1.0 / theta[:, None] - d) * (Z - Znew)
                            ss += _gsum(s * s, mask)
                            tl.store(zs + offs, Znew, mask=mask)
                        tl.debug_barrier()
                        run = tl.where(tl.sqrt(ss) > tol_g, run, 0)
                        it += 1
            # Last pass: write state and parameter.
            for c0 in range(0, gsize, BE):
                offs, mask = _chunk(c0, goff, gmask, red_sizes, red_strides, gsize, BE, NRB, UNIT_RED)
                d, z, x, n0, n1, n2 = _load_update(p_ptr, g_ptr, s0, s1, s2, offs, mask,
                                                   h0, h1, h2, h3, h4, h5, h6, h7, gs, OPT, AMSGRAD, CAPTURABLE)
                if SCALAR_D:
                    w = z * scale[:, None]
                elif SOLVER == SOLVER_EXACT:
                    w = tl.where(active[:, None], z / (d + sigma[:, None]), 0.0)
                else:
                    w = tl.load(scratch + tl.load(meta + COL_SCRATCH) + offs, mask=mask, other=0.0)
                _store(p_ptr, s0, s1, s2, offs, mask, x, w, n0, n1, n2, h2, h3, OPT, AMSGRAD, P_DTYPE)
