"""One fused Triton kernel for a whole optimizer step over many tensors.

``fused_step_kernel`` reads gradient, parameter and state once, updates the
state, forms the subproblem's ``d`` and ``z`` (docs/math.md section 2), solves it
(docs/math.md sections 3-5) and writes the new parameter, for every tensor of a call
in one launch. The host side (``ramda_kernels.backends.triton_backend``)
builds the metadata tables described below once and caches them.

Tables (all on the tensors' device):

* ``items``  int64 ``[n_items, 2]``: (tensor row, first group of the tile).
* ``itab``   int64 ``[n_tensors, ITAB_WIDTH]``: addresses of parameter,
  gradient and up to three state tensors, ``numel``, number of groups, group
  size, offset into ``scratch``, address of the warm-start ``sigma`` (one fp32
  per group, 0 = none; NOTE: [two-pass plan]), then the canonical group layout of
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
their elements in chunks of ``BE`` (both ``tl.constexpr``). The host puts the
tensors of a call into launches by size class (``triton_backend._size_class``:
flat; rows or columns; the power of two of the group size when the group fits
in registers, else "chunked"), so a tile is shaped for its own groups and the
launches per step are bounded by the classes, not by the tensor count:

* ``FLAT`` (no group reduction: ``none``, closed-form ``l1``): the dense
  tensor is read in memory order, ``BG`` elements per program, ``BE == 1``.
* ``ONE_CHUNK`` (the class's groups fit in ``BE``: rows up to ``MAX_BLOCK_E``
  = 8192 elements, columns tiles of up to ``max(TILE, MAX_BLOCK_E)`` elements
  with at least 8 adjacent groups, i.e. one 32-byte fp32 sector per row): the
  tile is loaded once and kept in registers; Newton / PG iterate on registers
  and the tile is written once (the floor, warm or cold).
* otherwise: NOTE: [two-pass plan].
Rows vs columns (NOTE: [Group layout]): rows get ``BE`` = the group's power of
two and ``BG = TILE / BE``; columns get up to ``COLUMN_GROUPS`` adjacent groups
per tile. Rows whose runs are short and neighbouring groups' runs adjacent
(``triton_backend._short_runs``: channel-wise k x k convolutions) are tiled as
columns of 8 groups, so that a tile's runs fill whole sectors. When every tensor of the launch has a single unit-stride reduced
(rows) or kept (columns) block, the ``UNIT_RED`` / ``UNIT_KEPT`` constexprs make
that stride visible to the compiler, which then orders threads along the
contiguous axis. ``FLAT`` full tiles are masked by a bound the compiler can
prove is a multiple of ``BG`` and, with ``ALIGNED``, use 16-byte vector
loads; a tensor's last tile is the only ragged one. ``num_warps``: up to 8
elements per thread (4 warps below 1024 elements, then one per 256, at most 16:
at 32 ptxas caps a thread at 64 registers).

NOTE: [two-pass plan]
The floor of a step is one read of every input and one write of every
output (RAMDA fp32: 32 B per element). Groups larger than a chunk run as:

* pass 1 (`_first_pass`) reads gradient, parameter where ``z`` needs it and
  the old state once, writes the new state, and gathers per group ``sum z^2``,
  ``max d``, ``min d`` and, for the exact solve, the sums of `_newton_terms5`
  at the warm-start ``sigma`` (docs/math.md section 4, item 5: one fp32 per
  group at the itab column ``COL_SIGMA``, 0 = none). `_warm_start` turns them
  into the first Newton step (or ``sigma_hi`` without a warm start);
* each further pass (a Newton step, `_newton_solve`, or a PG iteration) reads
  only the new state (`_load_new`: for RAMDA ``W0, V, U``, 12 B) of the groups
  still iterating and recomputes ``d``, ``z`` with the same arithmetic as
  pass 1; it runs only while some group of the tile is not done;
* the last pass reads the new state of the nonzero groups (a zero group's
  solution is 0) and, where the update needs it, the parameter, and writes
  the parameter (RAMDA: 16 B read, 4 written; a zero group 4 and 4).
So RAMDA fp32 costs ``44 + 12 k`` B per element of a group that took ``k``
Newton passes (was ``48 + 16 k``), ProxAdamW ``40 + 12 k``; a zero group is
at the floor (RAMDA 32 B, ProxAdamW 28 B). Columns of adjacent groups share
sectors, so there a pass costs a sector wherever one of its groups reads.
A Newton step read from memory also ends the solve when its predicted
error is under the tolerance (`_predicted`, from the Taylor series of
``phi`` at the step's start, whose second and third derivatives come from
two more sums of the same pass: the step itself leaves about ``kappa
delta^2 / s``; the warm step's second-order point, one more term of the
series (pass 1 gathers the third sum; a Newton pass has no registers
left for it), about ``|2 kappa^2 - beta| |delta / s|^3 s``, and is taken
when that is under the tolerance; a safety factor of 4 and steps of at
most 1/8 of sigma;
docs/math.md section 4, item 4 allows it as long as the KKT bounds hold),
instead of paying a confirming pass: from a warm start on slowly changing
``z``, ``d`` that is ``k = 0``, two passes. A group whose sigma moved by a
few percent since the last step needs the second-order point for that.
Registers tiles keep the reference's stopping rule (their steps are free).
A group is never split over programs (each program walks all chunks of its
groups), so no partial sums need combining; the price is less parallelism
for tensors with few huge groups. Groups whose kernel order (memory order)
differs from the reference's row-major order of the kept dims (kept dims
whose strides do not decrease) read and write a copy of their sigma in
memory order, which the host stages before the launch and copies back after
it (``triton_backend._group_order``, the C++ op's rule).

NOTE: [registers tile live set]
A ``ONE_CHUNK`` tile keeps only ``d`` and ``z`` (PG: and its iterate) live
through the solve: the new state is stored right after the update and RAMDA /
RMDA read the parameter for the final average only at the final store (the
exact solve does not need it earlier), so each tensor is still read once and
written once. Every extra tile-sized value costs one register per element a
thread holds (8 at a 2048-element tile on 8 warps).

NOTE: [grouped vector loads]
With ``ALIGNED`` on a grouped launch the host (``triton_backend._vector_ok``)
also promises 4-element runs along the tile's contiguous axis: rows
(``UNIT_RED``) have group sizes and kept strides that are multiples of 4,
columns (``UNIT_KEPT``) group counts, reduced strides and ``BG``. The kernel
states it to the compiler (`_chunk`; shifts that change no such offset), which
then issues 16-byte loads and, more important, lays the tile out 4 elements
per thread along that axis instead of one element of every row per thread
(which replicated every per-group value of the Newton solve in each thread).
A promise the layout does not keep would read wrong addresses on a GPU; the
interpreter ignores hints, so tests/test_triton_tiling.py checks the host rule.

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
COL_SIGMA = tl.constexpr(9)
COL_BLOCKS = tl.constexpr(10)
MAX_BLOCKS = tl.constexpr(4)
ITAB_WIDTH = tl.constexpr(10 + 4 * 4)
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
#: Slots of the optional Newton counter buffer (int32, ``COUNT``): Newton steps
#: summed over the groups that iterate, those groups, passes over memory
#: summed over tiles, tiles.
CNT_STEPS = tl.constexpr(0)
CNT_GROUPS = tl.constexpr(1)
CNT_PASSES = tl.constexpr(2)
CNT_TILES = tl.constexpr(3)
#: Factor between the predicted error of a Newton step and the tolerance it
#: must meet to skip the confirming pass (NOTE: [two-pass plan]).
PREDICT_SAFETY = tl.constexpr(4.0)
#: Largest relative Newton step whose predicted error is trusted.
PREDICT_MAX_STEP = tl.constexpr(0.125)


# ---------------------------------------------------------------------------
# Math (no memory movement)
# ---------------------------------------------------------------------------

@triton.jit
def _div(x, y):
    """IEEE-rounded ``x / y`` (docs/math.md section 9): ``/`` compiles to an
    approximate division on the GPU, which is not the math the CPU tests check."""
    return tl.math.fdiv(x, y, ieee_rounding=True)


@triton.jit
def _recip(y):
    """IEEE-rounded ``1 / y``."""
    return tl.math.fdiv(1.0, y, ieee_rounding=True)


@triton.jit
def _cbrt(u):
    """Real cube root of ``u >= 0``: exp2/log2 estimate plus one Newton step
    with an IEEE division, so the result is within an ulp or two whatever the
    hardware's approximate log2/exp2 do. Those flush subnormals to zero, so a
    ``u`` below ``2^-96`` is scaled by ``2^96`` for the estimate (and the
    estimate by ``2^-32``): no flush to zero (docs/math.md section 9)."""
    pos = u > 0.0
    safe = tl.where(pos, u, 1.0)
    tiny = safe < 1.2621774483536189e-29  # 2^-96
    scaled = tl.where(tiny, safe * 7.922816251426434e28, safe)
    y = tl.exp2(tl.log2(scaled) * (1.0 / 3.0))
    y = tl.where(tiny, y * 2.3283064365386963e-10, y)
    y = (2.0 * y + _div(safe, y * y)) * (1.0 / 3.0)
    return tl.where(pos, y, 0.0)


@triton.jit
def _soft(y, thr):
    """``sign(y) * max(|y| - thr, 0)`` (prox of ``thr * |.|``)."""
    a = tl.maximum(tl.abs(y) - thr, 0.0)
    return tl.where(y > 0.0, a, tl.where(y < 0.0, -a, 0.0))


@triton.jit
def _shrink_scale(norm, thr):
    """Group soft-threshold factor ``max(norm - thr, 0) / norm`` (0 for a zero norm)."""
    return _div(tl.maximum(norm - thr, 0.0), tl.where(norm > 0.0, norm, 1.0))


@triton.jit
def _gsum(x, mask):
    """Per-group (row) sum over the valid elements of a tile."""
    return tl.sum(tl.where(mask, x, 0.0), axis=1)


@triton.jit
def _newton_terms5(zeta, d, sigma):
    """Per-element terms of `_newton_step`'s three group sums, from the unit-norm
    group ``zeta = z * (1/||z_g||)``: ``a = v^2 d/(d+sigma)``, ``b = v^2 sigma/(d+sigma)``
    and ``c = u (zeta + v)`` with ``v = sigma zeta/(d+sigma)``, ``u = d zeta/(d+sigma)``;
    and ``e = v^2 (sigma/(d+sigma))^2``, ``g = v^2 (sigma/(d+sigma))^3``, the
    curvature terms of `_predicted`. All five are homogeneous of degree 2 in
    ``zeta``: from ``z`` itself they are ``||z_g||^2`` times those of ``zeta``."""
    inv = _recip(d + sigma)
    ps = sigma * inv
    pd = d * inv
    v = zeta * ps
    vv = v * v
    te = vv * ps * ps
    return vv * pd, vv * ps, (zeta * pd) * (zeta + v), te, te * ps


@triton.jit
def _newton_terms(zeta, d, sigma):
    """The terms ``a, b, c`` of `_newton_terms5`."""
    ta, tb, tc, te, tg = _newton_terms5(zeta, d, sigma)
    return ta, tb, tc


@triton.jit
def _newton_start(znorm, dmax, dmin, T, gmask):
    """Screening and the start of the Newton solve, per group (docs/math.md section 4):
    ``(active, sigma_hi, todo, relative excess, 1/||z_g||)``. The iteration runs
    on unit-norm groups (NOTE: [secular equation without cancellation] in
    ramda_ref.prox); groups with constant ``d`` start at the root and take no step."""
    active = (znorm > T) & gmask
    excess = tl.where(active, znorm - T, 1.0)
    sigma = _div(T * dmax, excess)
    todo = (active & (dmax != dmin)).to(tl.int32)
    safe_norm = tl.where(active, znorm, 1.0)
    return active, sigma, todo, _div(excess, safe_norm), _recip(safe_norm)


@triton.jit
def _newton_delta(a, b, c, rel_excess, sigma):
    """The Newton step ``phi/phi'`` of docs/math.md section 4 at ``sigma``, from the
    group sums of `_newton_terms` and ``rel_excess = (||z_g|| - T)/||z_g||``,
    written without cancellation as in ``ramda_ref.prox._newton_step`` (see
    NOTE: [secular equation without cancellation] there). Returns ``(delta,
    ||v||, f, den)`` with ``phi`` of the sign of ``-f`` and ``phi'`` of the sign
    of ``-den`` (``den = a + f b/||v||``)."""
    vn = tl.sqrt_rn(a + b)
    f = rel_excess - _div(c, 1.0 + vn)
    den = a + _div(f * b, vn)
    return _div(sigma * f * vn, den), vn, f, den


@triton.jit
def _predicted(b, e, g, vn, den, rel_excess, delta, s_from, sigma, tol,
               SECOND: tl.constexpr):
    """A Newton step ``delta`` from ``s_from`` to ``sigma`` read from memory, and
    the Taylor series of ``phi`` at ``s_from`` (docs/math.md section 4, item 4):
    the step leaves an error of about ``kappa delta^2 / s_from``, and the
    second-order point ``sigma - kappa delta^2 / s_from`` one of about ``|2
    kappa^2 - beta| |delta / s_from|^3 s_from``, with ``kappa = s phi^(2) / (2
    phi')`` and ``beta = s^2 phi^(3) / (6 phi')`` at ``s_from``:
    ``kappa = 1.5 (T/||z||) ||v|| (e' - b'^2) / den`` and ``beta = -(T/||z||)
    ||v|| (12 g' - 27 b' e' + 15 b'^3) / (6 den)``, where ``b', e', g'`` are
    ``b, e, g`` over ``||v||^2`` (from ``phi' = -den/(||v||^2 T)``, ``phi^(2) =
    3 (b^2 - ||v||^2 e)/(||z|| s ||v||^5)``, ``phi^(3) = (12 g ||v||^4 - 27 b e
    ||v||^2 + 15 b^3)/(||z|| s^2 ||v||^7)``). Returns ``(point, done)``: with
    ``SECOND`` the second-order point where its error is under ``tol * point``
    by ``PREDICT_SAFETY``, else ``sigma``; done where that holds for the point
    returned; both only for steps of at most ``PREDICT_MAX_STEP * s_from``.
    Without ``SECOND`` (``g`` unused) the Newton point only: the fifth sum
    costs a chunked Newton pass of RAMDA's 32 x 64 columns tile 24-72 B of
    spill at 128 registers (sm_90), where pass 1 has room for it."""
    inv_vv = _recip(vn * vn)
    bq = b * inv_vv
    eq = e * inv_vv
    gq = g * inv_vv
    lead = tl.maximum(1.0 - rel_excess, 0.0) * _div(vn, den)
    kappa = 1.5 * lead * tl.maximum(eq - bq * bq, 0.0)
    beta = -lead * (12.0 * gq - 27.0 * bq * eq + 15.0 * bq * bq * bq) * (1.0 / 6.0)
    r = _div(delta, s_from)
    trusted = (tl.abs(r) <= PREDICT_MAX_STEP) & (den > 0.0)
    newton_ok = trusted & (kappa * delta * r * PREDICT_SAFETY <= tol * sigma)
    if not SECOND:
        return sigma, newton_ok
    point = sigma - kappa * delta * r
    ar = tl.abs(r)
    second_ok = trusted & (point > 0.0) & (
        tl.abs(2.0 * kappa * kappa - beta) * ar * ar * ar * s_from * PREDICT_SAFETY <= tol * point)
    return tl.where(second_ok, point, sigma), second_ok | newton_ok


@triton.jit
def _newton_step(a, b, c, e, rel_excess, sigma, todo, tol, PREDICT: tl.constexpr):
    """One Newton step on the secular equation (`_newton_delta`).
    Groups with ``todo == 0`` keep their sigma; sigma moves only by a positive
    step, and a group is done once not ``delta > tol * sigma`` (same rules as
    ``ramda_ref.prox.exact_group_lasso``), or with ``PREDICT`` once
    `_predicted` for the Newton point (``e``: the curvature sum of
    `_newton_terms5`)."""
    delta, vn, f, den = _newton_delta(a, b, c, rel_excess, sigma)
    step = todo != 0
    s_from = sigma
    sigma = tl.where(step & (delta > 0.0), sigma - delta, sigma)
    going = step & (delta > tol * sigma)
    if PREDICT:
        point, done = _predicted(b, e, e, vn, den, rel_excess, delta, s_from, sigma, tol, False)
        going = going & (done == 0)
    todo = tl.where(going, todo, 0)
    return sigma, todo


@triton.jit
def _warm_start(a, b, c, e, g, s_prev, sigma_hi, rel_excess, todo, tol, PREDICT: tl.constexpr):
    """The warm start of docs/math.md section 4 (item 5), per group, from the sums
    ``a, b, c, e, g`` of `_newton_terms5` at ``s_prev`` (the previous step's sigma,
    0 for none): ``phi(s0) <= 0`` (``f >= 0``) is a Newton step from ``s0``, with
    the reference's stopping rule; ``phi(s0) > 0`` and ``phi'(s0) < 0``
    (``f < 0``, ``den > 0``) one Newton step, which lands at or right of the
    root by concavity; otherwise ``sigma_hi``. Every start is clamped to
    ``<= sigma_hi``; a group whose step was clamped keeps iterating. With
    ``PREDICT`` (groups re-read from memory per Newton step) a step also ends
    the solve when `_predicted`, at its second-order point if that is the one
    predicted converged. Returns ``(sigma, todo, steps)``."""
    delta, vn, f, den = _newton_delta(a, b, c, rel_excess, s_prev)
    warm = (todo != 0) & (s_prev > 0.0) & (delta == delta)
    right = warm & (f >= 0.0)
    left = warm & (f < 0.0) & (den > 0.0)
    moved = right | left
    s1 = tl.where(right & (delta <= 0.0), s_prev, s_prev - delta)
    inside = moved & (s1 <= sigma_hi)
    sigma = tl.where(inside, s1, sigma_hi)
    done = inside & right & (delta <= tol * sigma)
    if PREDICT:
        point, predicted = _predicted(b, e, g, vn, den, rel_excess, delta, s_prev, sigma, tol,
                                      True)
        predicted = inside & (done == 0) & predicted
        sigma = tl.where(predicted, point, sigma)
        done = done | predicted
    todo = tl.where(done, 0, todo)
    return sigma, todo, moved.to(tl.int32)


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
    """Elementwise subproblem solutions (docs/math.md section 3); with a scalar ``d``
    (RMDA, ProxSGD) ``z`` already is the prox input ``y`` and ``tau`` its threshold."""
    if REG == REG_L1:
        if SCALAR_D:
            w = _soft(z, tau)
        else:
            w = _div(_soft(z, tau), d)
    else:
        if SCALAR_D:
            w = z
        else:
            w = _div(z, d)
    return w


# ---------------------------------------------------------------------------
# Per-optimizer state updates (docs/math.md section 1): math only, named scalars
# ---------------------------------------------------------------------------

@triton.jit
def _ramda_update(g, w0, v, u, s_t, eps):
    """RAMDA: ``V += s_t g``, ``U += s_t g^2``, ``d = cbrt(U) + eps``, ``z = d W0 - V``.
    Returns ``d, z, V, U``."""
    v = v + s_t * g
    u = u + s_t * g * g
    d, z = _ramda_dz(w0, v, u, eps)
    return d, z, v, u


@triton.jit
def _ramda_dz(w0, v, u, eps):
    """RAMDA's ``d = cbrt(U) + eps`` and ``z = d W0 - V`` from the new state."""
    d = _cbrt(u) + eps
    return d, d * w0 - v


@triton.jit
def _rmda_update(g, w0, v, s_t, beta_t):
    """RMDA: ``V += s_t g``; the prox input is ``y = W0 - V / beta_t``. Returns ``y, V``."""
    v = v + s_t * g
    return _rmda_y(w0, v, beta_t), v


@triton.jit
def _rmda_y(w0, v, beta_t):
    """RMDA's prox input ``y = W0 - V / beta_t`` from the new state."""
    return w0 - _div(v, beta_t)


@triton.jit
def _proxadamw_update(g, x, m, v, vmax, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
                      bias2_sqrt, eps, step_size, AMSGRAD: tl.constexpr):
    """ProxAdamW: ``x *= decay`` (``1 - lr wd``), Adam moments, ``d = sqrt(v) /
    bias2_sqrt + eps`` (``vmax`` with amsgrad), ``z = d x - step_size m``.
    Returns ``d, z, x, m, v, vmax``."""
    x = x * decay
    m = m * beta1 + one_minus_beta1 * g
    v = v * beta2 + one_minus_beta2 * g * g
    if AMSGRAD:
        vmax = tl.maximum(vmax, v)
    else:
        vmax = v
    d, z = _proxadamw_dz(x, m, vmax, bias2_sqrt, eps, step_size)
    return d, z, x, m, v, vmax


@triton.jit
def _proxadamw_dz(x, m, vmax, bias2_sqrt, eps, step_size):
    """ProxAdamW's ``d = sqrt(vmax) / bias2_sqrt + eps`` and ``z = d x - step_size m``
    from the decayed point and the new moments."""
    d = _div(tl.sqrt_rn(vmax), bias2_sqrt) + eps
    return d, d * x - step_size * m


@triton.jit
def _proxsgd_update(g, x, buf, one_minus_c, c, lr):
    """ProxSGD: ``buf = (1 - c) buf + c g``; the prox input is ``y = x - lr buf``.
    Returns ``y, buf``."""
    buf = buf * one_minus_c + c * g
    return _proxsgd_y(x, buf, lr), buf


@triton.jit
def _proxsgd_y(x, buf, lr):
    """ProxSGD's prox input ``y = x - lr buf`` from the new buffer."""
    return x - lr * buf


@triton.jit
def _average(x, w, one_minus_c, c):
    """RAMDA / RMDA's new parameter ``(1 - c) p + c W~``."""
    return one_minus_c * x + c * w


# ---------------------------------------------------------------------------
# Memory: the one place the slots h0..h7 become named scalars
# ---------------------------------------------------------------------------

@triton.jit
def _load_update(p_ptr, g_ptr, s0, s1, s2, offs, mask, h0, h1, h2, h3, h4, h5, h6, h7, gs,
                 OPT: tl.constexpr, AMSGRAD: tl.constexpr, CAPTURABLE: tl.constexpr,
                 WITH_X: tl.constexpr):
    """Load one tile and apply the optimizer's state update.

    Returns ``d, z, x, n0, n1, n2``: the subproblem's diagonal and linear term
    (for RMDA / ProxSGD ``d`` is unused and ``z`` is the prox input ``y``),
    the current point ``x`` (for ProxAdamW after weight decay) and the new
    values of state tensors 0..2. The meaning of ``h0..h7`` per optimizer is
    the table at ``fused_step_kernel``; ``gs`` is GradScaler's scale
    (capturable only), divided out as the gradient is read. RAMDA and RMDA
    read the parameter only with ``WITH_X`` (their ``z`` does not need it; a
    pass 1 that does not write the parameter skips it, NOTE: [two-pass plan]).
    """
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CAPTURABLE:
        g = _div(g, gs)
    x = tl.zeros_like(g)
    if WITH_X or OPT == OPT_PROXADAMW or OPT == OPT_PROXSGD:
        x = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if OPT == OPT_RAMDA:
        n0 = tl.load(s0 + offs, mask=mask, other=0.0).to(tl.float32)  # W0: the param dtype
        d, z, n1, n2 = _ramda_update(g, w0=n0, v=tl.load(s1 + offs, mask=mask, other=0.0),
                                     u=tl.load(s2 + offs, mask=mask, other=0.0), s_t=h0, eps=h1)
    elif OPT == OPT_RMDA:
        n0 = tl.load(s0 + offs, mask=mask, other=0.0).to(tl.float32)  # W0: the param dtype
        z, n1 = _rmda_update(g, w0=n0, v=tl.load(s1 + offs, mask=mask, other=0.0), s_t=h0,
                             beta_t=h1)
        n2 = n1
        d = z
    elif OPT == OPT_PROXADAMW:
        vmax = x
        if AMSGRAD:
            vmax = tl.load(s2 + offs, mask=mask, other=0.0)
        d, z, x, n0, n1, n2 = _proxadamw_update(
            g, x, m=tl.load(s0 + offs, mask=mask, other=0.0),
            v=tl.load(s1 + offs, mask=mask, other=0.0), vmax=vmax, decay=h0, beta1=h1,
            one_minus_beta1=h2, beta2=h3, one_minus_beta2=h4, bias2_sqrt=h5, eps=h6,
            step_size=h7, AMSGRAD=AMSGRAD)
    else:
        z, n0 = _proxsgd_update(g, x, buf=tl.load(s0 + offs, mask=mask, other=0.0),
                                one_minus_c=h0, c=h1, lr=h2)
        n1 = n0
        n2 = n0
        d = z
    return d, z, x, n0, n1, n2


@triton.jit
def _load_new(p_ptr, s0, s1, s2, offs, mask, h0, h1, h2, h3, h4, h5, h6, h7,
              OPT: tl.constexpr, AMSGRAD: tl.constexpr, WITH_X: tl.constexpr):
    """``d, z, x`` of one tile from the state `_store_state` already wrote this
    step (no gradient read, no state update: the passes after the first,
    NOTE: [two-pass plan]); the same arithmetic as `_load_update`, so the same
    values. ``x`` (the parameter) is read only when ``z`` needs it or
    ``WITH_X`` asks (RAMDA and RMDA read it for the final average only)."""
    x = tl.zeros_like(offs).to(tl.float32)
    if WITH_X or OPT == OPT_PROXADAMW or OPT == OPT_PROXSGD:
        x = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if OPT == OPT_RAMDA:
        d, z = _ramda_dz(tl.load(s0 + offs, mask=mask, other=0.0).to(tl.float32),
                         tl.load(s1 + offs, mask=mask, other=0.0),
                         tl.load(s2 + offs, mask=mask, other=0.0), eps=h1)
    elif OPT == OPT_RMDA:
        z = _rmda_y(tl.load(s0 + offs, mask=mask, other=0.0).to(tl.float32),
                    tl.load(s1 + offs, mask=mask, other=0.0), beta_t=h1)
        d = z
    elif OPT == OPT_PROXADAMW:
        x = x * h0
        if AMSGRAD:
            vmax = tl.load(s2 + offs, mask=mask, other=0.0)
        else:
            vmax = tl.load(s1 + offs, mask=mask, other=0.0)
        d, z = _proxadamw_dz(x, tl.load(s0 + offs, mask=mask, other=0.0), vmax, bias2_sqrt=h5,
                             eps=h6, step_size=h7)
    else:
        z = _proxsgd_y(x, tl.load(s0 + offs, mask=mask, other=0.0), lr=h2)
        d = z
    return d, z, x


@triton.jit
def _nonzero(active, scale, SCALAR_D: tl.constexpr):
    """Per group, whether the solve left it nonzero: ``active`` for the exact and
    PG solves, a positive shrink ``scale`` with a scalar ``d``."""
    if SCALAR_D:
        return active & (scale > 0.0)
    return active


@triton.jit
def _load_for_write(p_ptr, s0, s1, s2, offs, mask, live, h0, h1, h2, h3, h4, h5, h6, h7,
                    OPT: tl.constexpr, AMSGRAD: tl.constexpr):
    """`_load_new` for the pass that writes the parameter: the state only on the
    lanes of ``live`` (a zero group's solution is 0, whatever its state), the
    parameter on every lane of ``mask`` where the update averages it (RAMDA,
    RMDA). Returns ``d, z, x``."""
    d, z, x = _load_new(p_ptr, s0, s1, s2, offs, mask & live, h0, h1, h2, h3, h4, h5, h6, h7,
                        OPT, AMSGRAD, False)
    if OPT == OPT_RAMDA or OPT == OPT_RMDA:
        x = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return d, z, x


@triton.jit
def _store_state(s0, s1, s2, offs, mask, n0, n1, n2, OPT: tl.constexpr, AMSGRAD: tl.constexpr):
    """Write the state tensors the optimizer updates."""
    if OPT == OPT_RAMDA:
        tl.store(s1 + offs, n1, mask=mask)
        tl.store(s2 + offs, n2, mask=mask)
    elif OPT == OPT_RMDA:
        tl.store(s1 + offs, n1, mask=mask)
    elif OPT == OPT_PROXADAMW:
        tl.store(s0 + offs, n0, mask=mask)
        tl.store(s1 + offs, n1, mask=mask)
        if AMSGRAD:
            tl.store(s2 + offs, n2, mask=mask)
    else:
        tl.store(s0 + offs, n0, mask=mask)


@triton.jit
def _store_param(p_ptr, offs, mask, x, w, h2, h3, OPT: tl.constexpr, P_DTYPE: tl.constexpr):
    """Write the new parameter (rounded once to its dtype)."""
    if OPT == OPT_RAMDA or OPT == OPT_RMDA:
        out = _average(x, w, one_minus_c=h2, c=h3)
    else:
        out = w
    if P_DTYPE == tl.bfloat16:
        out = _round_to_bf16(out)
    tl.store(p_ptr + offs, out.to(P_DTYPE), mask=mask)


@triton.jit
def _store(p_ptr, s0, s1, s2, offs, mask, x, w, n0, n1, n2, h2, h3,
           OPT: tl.constexpr, AMSGRAD: tl.constexpr, P_DTYPE: tl.constexpr):
    """Write the new state and the new parameter."""
    _store_state(s0, s1, s2, offs, mask, n0, n1, n2, OPT, AMSGRAD)
    _store_param(p_ptr, offs, mask, x, w, h2, h3, OPT, P_DTYPE)


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
           UNIT_RED: tl.constexpr, VEC: tl.constexpr = False):
    """Offsets and mask of chunk ``c0`` of a tile's groups. ``VEC``: the
    host promises NOTE: [grouped vector loads]; the shifts below are no-ops
    on such offsets that let the compiler see the multiple of 4."""
    if VEC and UNIT_RED:
        c0 = (c0 >> 2) << 2
    e = c0 + tl.arange(0, BE).to(tl.int64)
    eoff = _decode(e, red_sizes, red_strides, NRB, UNIT_RED)
    if VEC and not UNIT_RED:
        eoff = (eoff >> 2) << 2
    offs = goff[:, None] + eoff[None, :]
    mask = gmask[:, None] & (e < gsize)[None, :]
    return offs, mask


@triton.jit
def _load_chunk(c0, goff, gmask, red_sizes, red_strides, gsize, p_ptr, g_ptr, s0, s1, s2,
                h0, h1, h2, h3, h4, h5, h6, h7, gs, OPT: tl.constexpr, AMSGRAD: tl.constexpr,
                CAPTURABLE: tl.constexpr, BE: tl.constexpr, NRB: tl.constexpr,
                UNIT_RED: tl.constexpr, WITH_X: tl.constexpr, VEC: tl.constexpr = False):
    """Chunk ``c0`` of a tile's groups, loaded and updated (`_load_update`):
    ``offs, mask, d, z, x, n0, n1, n2``."""
    offs, mask = _chunk(c0, goff, gmask, red_sizes, red_strides, gsize, BE, NRB, UNIT_RED, VEC)
    d, z, x, n0, n1, n2 = _load_update(p_ptr, g_ptr, s0, s1, s2, offs, mask,
                                       h0, h1, h2, h3, h4, h5, h6, h7, gs, OPT, AMSGRAD, CAPTURABLE,
                                       WITH_X)
    return offs, mask, d, z, x, n0, n1, n2


@triton.jit
def _load_new_chunk(c0, goff, gmask, red_sizes, red_strides, gsize, p_ptr, s0, s1, s2,
                    h0, h1, h2, h3, h4, h5, h6, h7, OPT: tl.constexpr, AMSGRAD: tl.constexpr,
                    BE: tl.constexpr, NRB: tl.constexpr, UNIT_RED: tl.constexpr,
                    WITH_X: tl.constexpr, VEC: tl.constexpr = False):
    """Chunk ``c0`` of a tile's groups from the state this step already wrote
    (`_load_new`): ``offs, mask, d, z, x``."""
    offs, mask = _chunk(c0, goff, gmask, red_sizes, red_strides, gsize, BE, NRB, UNIT_RED, VEC)
    d, z, x = _load_new(p_ptr, s0, s1, s2, offs, mask, h0, h1, h2, h3, h4, h5, h6, h7,
                        OPT, AMSGRAD, WITH_X)
    return offs, mask, d, z, x


@triton.jit
def _flat_tile(p_ptr, g_ptr, s0, s1, s2, offs, limit, tau, h0, h1, h2, h3, h4, h5, h6, h7, gs,
               OPT: tl.constexpr, REG: tl.constexpr, AMSGRAD: tl.constexpr,
               P_DTYPE: tl.constexpr, SCALAR_D: tl.constexpr, CAPTURABLE: tl.constexpr):
    """Elements ``offs < limit`` of a tensor without group reductions."""
    mask = offs < limit
    d, z, x, n0, n1, n2 = _load_update(p_ptr, g_ptr, s0, s1, s2, offs, mask,
                                       h0, h1, h2, h3, h4, h5, h6, h7, gs, OPT, AMSGRAD, CAPTURABLE,
                                       True)
    w = _closed_form(d, z, tau, REG, SCALAR_D)
    _store(p_ptr, s0, s1, s2, offs, mask, x, w, n0, n1, n2, h2, h3, OPT, AMSGRAD, P_DTYPE)


# ---------------------------------------------------------------------------
# Grouped solves (docs/math.md sections 3-5). Each works on a tile of BG
# groups either held in registers (ONE_CHUNK: ``d, z, x`` are the tile) or
# re-read chunk by chunk from the state pass 1 wrote (`_load_new`; the
# register arguments are then unused placeholders). NOTE: [two-pass plan].
# ---------------------------------------------------------------------------

@triton.jit
def _group_stats(z, d, mask, SCALAR_D: tl.constexpr):
    """Per-group ``sum z^2``, ``max d`` and ``min d`` of one chunk."""
    zz = _gsum(z * z, mask)
    if SCALAR_D:
        return zz, zz, zz
    return (zz, tl.max(tl.where(mask, d, 0.0), axis=1),
            tl.min(tl.where(mask, d, float("inf")), axis=1))


@triton.jit
def _first_pass(p_ptr, g_ptr, s0, s1, s2, zs, goff, gmask, red_sizes, red_strides, gsize, s_prev,
                h0, h1, h2, h3, h4, h5, h6, h7, gs, OPT: tl.constexpr, SOLVER: tl.constexpr,
                AMSGRAD: tl.constexpr, CAPTURABLE: tl.constexpr, SCALAR_D: tl.constexpr,
                BG: tl.constexpr, BE: tl.constexpr, NRB: tl.constexpr, UNIT_RED: tl.constexpr,
                VEC: tl.constexpr = False):
    """Pass 1 over groups larger than a chunk (NOTE: [two-pass plan]): read the
    inputs once, write the new state, and gather per group ``sum z^2``, ``max d``,
    ``min d`` and, for the exact solve, the sums of `_newton_terms5` at the warm
    start ``s_prev`` (from ``z`` itself: ``||z_g||^2`` times the unit-norm sums).
    PG's iterate starts as the (decayed) point in ``zs``.
    Returns ``zz, dmax, dmin, wa, wb, wc, we, wg``."""
    zz = tl.zeros([BG], dtype=tl.float32)
    dmax = tl.zeros([BG], dtype=tl.float32)
    dmin = tl.zeros([BG], dtype=tl.float32) + float("inf")
    wa = tl.zeros([BG], dtype=tl.float32)
    wb = wa
    wc = wa
    we = wa
    wg = wa
    for c0 in range(0, gsize, BE):
        offs, mask, d, z, x, n0, n1, n2 = _load_chunk(
            c0, goff, gmask, red_sizes, red_strides, gsize, p_ptr, g_ptr, s0, s1, s2, h0, h1, h2,
            h3, h4, h5, h6, h7, gs, OPT, AMSGRAD, CAPTURABLE, BE, NRB, UNIT_RED,
            SOLVER == SOLVER_PG and not SCALAR_D, VEC)  # PG's iterate starts at x
        _store_state(s0, s1, s2, offs, mask, n0, n1, n2, OPT, AMSGRAD)
        czz, cmax, cmin = _group_stats(z, d, mask, SCALAR_D)
        zz += czz
        if not SCALAR_D:
            dmax = tl.maximum(dmax, cmax)
            dmin = tl.minimum(dmin, cmin)
            if SOLVER == SOLVER_EXACT:
                ta, tb, tc, te, tg = _newton_terms5(z, d, s_prev[:, None])
                wa += _gsum(ta, mask)
                wb += _gsum(tb, mask)
                wc += _gsum(tc, mask)
                we += _gsum(te, mask)
                wg += _gsum(tg, mask)
            else:
                tl.store(zs + offs, x, mask=mask)
    tl.debug_barrier()  # the later passes read what this one wrote
    return zz, dmax, dmin, wa, wb, wc, we, wg


@triton.jit
def _newton_solve(d, z, mask, sigma, todo, rel_excess, inv_norm, newton_tol, iters,
                  p_ptr, s0, s1, s2, goff, gmask, red_sizes, red_strides, gsize,
                  h0, h1, h2, h3, h4, h5, h6, h7, OPT: tl.constexpr, AMSGRAD: tl.constexpr,
                  ONE_CHUNK: tl.constexpr, BG: tl.constexpr, BE: tl.constexpr, NRB: tl.constexpr,
                  UNIT_RED: tl.constexpr, VEC: tl.constexpr = False):
    """Exact group lasso (docs/math.md section 4): Newton on the secular
    equation from ``sigma`` (``sigma_hi`` or the warm start, `_warm_start`)
    while ``todo``, same stopping rule as the reference; without ONE_CHUNK each
    step is one pass over the new state. ``iters`` counts the steps per group.
    Returns ``(sigma, iters, passes)``; the solution is ``z / (d + sigma)`` on
    active groups."""
    it = 0
    while (it < NEWTON_MAX_ITERS) & (tl.sum(todo, axis=0) > 0):
        if ONE_CHUNK:  # zeta formed per step: no third tile live (NOTE: [registers tile live set])
            ta, tb, tc = _newton_terms(z * inv_norm[:, None], d, sigma[:, None])
            sa = _gsum(ta, mask)
            sb = _gsum(tb, mask)
            sc = _gsum(tc, mask)
            se = sa
        else:
            sa = tl.zeros([BG], dtype=tl.float32)
            sb = tl.zeros([BG], dtype=tl.float32)
            sc = tl.zeros([BG], dtype=tl.float32)
            se = tl.zeros([BG], dtype=tl.float32)
            going = gmask & (todo != 0)  # only groups still iterating re-read
            for c0 in range(0, gsize, BE):
                offs, cmask, cd, cz, cx = _load_new_chunk(
                    c0, goff, going, red_sizes, red_strides, gsize, p_ptr, s0, s1, s2,
                    h0, h1, h2, h3, h4, h5, h6, h7, OPT, AMSGRAD, BE, NRB, UNIT_RED, False, VEC)
                ta, tb, tc, te, tg = _newton_terms5(cz * inv_norm[:, None], cd, sigma[:, None])
                sa += _gsum(ta, cmask)
                sb += _gsum(tb, cmask)
                sc += _gsum(tc, cmask)
                se += _gsum(te, cmask)
        iters += todo
        sigma, todo = _newton_step(sa, sb, sc, se, rel_excess, sigma, todo, newton_tol,
                                   not ONE_CHUNK)
        it += 1
    return sigma, iters, it


@triton.jit
def _pg_step(Z, d, z, theta, T, run, mask, pscale, REG: tl.constexpr):
    """One PG iteration on one chunk (docs/math.md section 5): gradient point
    ``Y = Z - theta (d Z - z)``, its prox (group shrink by ``pscale``, the
    group's factor, or soft threshold ``theta T``), groups with ``run == 0``
    kept, and the per-group squared step residual. Returns ``(Znew, ss)``."""
    Y = Z - theta[:, None] * (d * Z - z)
    if REG == REG_GROUP:
        Znew = Y * pscale[:, None]
    else:
        Znew = _soft(Y, (theta * T)[:, None])
    Znew = tl.where((run != 0)[:, None], Znew, Z)
    s = (_recip(theta)[:, None] - d) * (Z - Znew)
    return Znew, _gsum(s * s, mask)


@triton.jit
def _pg_solve(d, z, x, mask, znorm, dmax, T, gmask, tol_g, max_iters, zs,
              p_ptr, s0, s1, s2, goff, red_sizes, red_strides, gsize,
              h0, h1, h2, h3, h4, h5, h6, h7, REG: tl.constexpr, OPT: tl.constexpr,
              AMSGRAD: tl.constexpr, ONE_CHUNK: tl.constexpr,
              BG: tl.constexpr, BE: tl.constexpr, NRB: tl.constexpr, UNIT_RED: tl.constexpr,
              VEC: tl.constexpr = False):
    """The paper's Algorithm 2 (docs/math.md section 5) from ``Z = x``, step
    ``theta = 1 / max d``, until the step residual is at most ``tol_g``.
    ONE_CHUNK keeps ``Z`` in registers; otherwise it lives in ``zs`` (the
    scratch buffer at the tensor's offsets, filled by `_first_pass`), two
    passes over the new state per iteration for group lasso (the prox needs
    ``||Y_g||`` first), one for l1. Returns ``(active, Z, passes)`` (``Z``
    meaningful with ONE_CHUNK only; inactive groups' ``Z`` is not zeroed)."""
    if REG == REG_GROUP:
        active = (znorm > T) & gmask
    else:
        active = gmask
    theta = _recip(dmax)
    Z = tl.where(active[:, None] & mask, x, 0.0)
    run = active.to(tl.int32)
    it = 0
    passes = 0
    while (it < max_iters) & (tl.sum(run, axis=0) > 0):
        pscale = theta
        if ONE_CHUNK:
            if REG == REG_GROUP:
                Y = Z - theta[:, None] * (d * Z - z)
                pscale = _shrink_scale(tl.sqrt_rn(_gsum(Y * Y, mask)), theta * T)
            Z, ss = _pg_step(Z, d, z, theta, T, run, mask, pscale, REG)
        else:
            going = gmask & (run != 0)  # only groups still iterating re-read
            if REG == REG_GROUP:
                yy = tl.zeros([BG], dtype=tl.float32)
                for c0 in range(0, gsize, BE):
                    offs, cmask, cd, cz, cx = _load_new_chunk(
                        c0, goff, going, red_sizes, red_strides, gsize, p_ptr, s0, s1, s2,
                        h0, h1, h2, h3, h4, h5, h6, h7, OPT, AMSGRAD, BE, NRB, UNIT_RED, False, VEC)
                    cZ = tl.load(zs + offs, mask=cmask, other=0.0)
                    Y = cZ - theta[:, None] * (cd * cZ - cz)
                    yy += _gsum(Y * Y, cmask)
                pscale = _shrink_scale(tl.sqrt_rn(yy), theta * T)
                passes += 1
            ss = tl.zeros([BG], dtype=tl.float32)
            for c0 in range(0, gsize, BE):
                offs, cmask, cd, cz, cx = _load_new_chunk(
                    c0, goff, going, red_sizes, red_strides, gsize, p_ptr, s0, s1, s2,
                    h0, h1, h2, h3, h4, h5, h6, h7, OPT, AMSGRAD, BE, NRB, UNIT_RED, False, VEC)
                cZ, css = _pg_step(tl.load(zs + offs, mask=cmask, other=0.0), cd, cz, theta, T,
                                   run, cmask, pscale, REG)
                ss += css
                tl.store(zs + offs, cZ, mask=cmask)
            tl.debug_barrier()
            passes += 1
        run = tl.where(tl.sqrt_rn(ss) > tol_g, run, 0)
        it += 1
    return active, Z, passes


@triton.jit
def _solution(d, z, Z, active, sigma, scale, SCALAR_D: tl.constexpr, SOLVER: tl.constexpr):
    """The subproblem's solution on one chunk from the solve's per-group result."""
    if SCALAR_D:
        w = z * scale[:, None]
    elif SOLVER == SOLVER_EXACT:
        w = tl.where(active[:, None], _div(z, d + sigma[:, None]), 0.0)
    else:
        w = tl.where(active[:, None], Z, 0.0)
    return w


# ---------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------

@triton.jit
def fused_step_kernel(items, itab, ftab, scratch, stab, counters, tau, eps_t, newton_tol, max_iters,
                      h0, h1, h2, h3, h4, h5, h6, h7,
                      OPT: tl.constexpr, REG: tl.constexpr, SOLVER: tl.constexpr,
                      FLAT: tl.constexpr, ONE_CHUNK: tl.constexpr, AMSGRAD: tl.constexpr,
                      P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, BG: tl.constexpr,
                      BE: tl.constexpr, NKB: tl.constexpr, NRB: tl.constexpr,
                      SCALAR_D: tl.constexpr, ALIGNED: tl.constexpr, UNIT_KEPT: tl.constexpr,
                      UNIT_RED: tl.constexpr, CAPTURABLE: tl.constexpr, COUNT: tl.constexpr):
    """One step of optimizer ``OPT`` on the tile ``items[program_id]``.

    Scalar arguments (the launch boundary ``triton_backend._launch(launch,
    scalars, stab)`` passes ``scalars`` in this order; a capturable launch
    ignores them and reads the same quantities from ``stab``):

    * ``tau``: the subproblem's threshold before the group weight (RAMDA
      ``alpha_t*lambda``, ProxAdamW ``lr*lambda``, RMDA ``alpha_t*lambda/beta_t``,
      ProxSGD ``lr*lambda``);
    * ``eps_t``: the PG inexactness tolerance; ``newton_tol``: Newton's
      relative stopping tolerance; ``max_iters``: PG's iteration cap;
    * ``h0..h7``: the optimizer's per-step scalars, named where `_load_update`
      and `_store` pass them on (unused ones are 0):

      =========  ======  ======  =========  ======  =========  ==========  ===  =========
      optimizer  h0      h1      h2         h3      h4         h5          h6   h7
      =========  ======  ======  =========  ======  =========  ==========  ===  =========
      RAMDA      s_t     eps     1-c        c
      RMDA       s_t     beta_t  1-c        c
      ProxAdamW  1-lr*wd beta1   1-beta1    beta2   1-beta2    bias2_sqrt  eps  step_size
      ProxSGD    1-c     c       lr
      =========  ======  ======  =========  ======  =========  ==========  ===  =========

      with ``s_t = lr*sqrt(t)``, ``beta_t = sqrt(t)``, ``bias2_sqrt =
      sqrt(1-beta2^t)``, ``step_size = lr/(1-beta1^t)`` (docs/math.md section 1).

    ``SCALAR_D`` is true for RMDA and ProxSGD (closed-form prox); ``ALIGNED``
    promises that every tensor address of the launch is 16-byte aligned;
    ``UNIT_KEPT`` / ``UNIT_RED`` that every tensor has a single kept / reduced
    block of stride 1 (see `_decode`). ``CAPTURABLE``: ``tau, eps_t, h*``
    come from row ``row`` of ``stab`` instead (their arguments are ignored),
    with a skip flag and a gradient scale (NOTE: [capturable kernel]).
    ``COUNT``: add the Newton work to ``counters`` (int32, slots ``CNT_*``;
    ``triton_backend.newton_counts``); off, nothing is traced.
    Tiling: see NOTE: [Triton tiling].
    """
    pid = tl.program_id(0)
    row = tl.load(items + 2 * pid)
    first = tl.load(items + 2 * pid + 1)
    meta = itab + row * ITAB_WIDTH
    p_ptr = tl.load(meta + COL_P).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(meta + COL_G).to(tl.pointer_type(G_DTYPE))
    if OPT == OPT_RAMDA or OPT == OPT_RMDA:  # s0 is W0, kept in the parameter's dtype
        s0 = tl.load(meta + COL_S0).to(tl.pointer_type(P_DTYPE))
    else:
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

    if ALIGNED:  # every address of the launch is a multiple of 16 bytes (host-checked)
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        s0 = tl.multiple_of(s0, 16)
        s1 = tl.multiple_of(s1, 16)
        s2 = tl.multiple_of(s2, 16)
    if FLAT:
        numel = tl.load(meta + COL_NUMEL)
        if CAPTURABLE:
            numel = tl.where(skip, 0, numel)
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
        gsize = tl.load(meta + COL_GSIZE)
        VEC: tl.constexpr = ALIGNED and (UNIT_RED or UNIT_KEPT)
        if VEC:  # NOTE: [grouped vector loads]
            if UNIT_RED:
                gsize = tl.multiple_of(gsize, 4)
            else:
                n_groups = tl.multiple_of(n_groups, 4)
                gi = tl.multiple_of(first, 4) + tl.arange(0, BG).to(tl.int64)
        if CAPTURABLE:
            n_groups = tl.where(skip, 0, n_groups)
        kept_sizes = meta + COL_BLOCKS
        kept_strides = kept_sizes + MAX_BLOCKS
        red_sizes = kept_strides + MAX_BLOCKS
        red_strides = red_sizes + MAX_BLOCKS
        zs = scratch + tl.load(meta + COL_SCRATCH)
        gmask = gi < n_groups
        goff = _decode(gi, kept_sizes, kept_strides, NKB, UNIT_KEPT)
        if VEC and UNIT_RED:
            goff = (goff >> 2) << 2
        T = tau * tl.load(ftab + row * FTAB_WIDTH + FCOL_CG)
        tol_g = eps_t * tl.load(ftab + row * FTAB_WIDTH + FCOL_TOL)
        # the warm start (docs/math.md section 4): one fp32 per group, 0 = none
        sig_addr = tl.load(meta + COL_SIGMA)
        sig_ptr = sig_addr.to(tl.pointer_type(tl.float32))
        sig_mask = gmask & (sig_addr != 0)
        s_prev = tl.zeros([BG], dtype=tl.float32)
        if SOLVER == SOLVER_EXACT and not SCALAR_D:
            s_prev = tl.load(sig_ptr + gi, mask=sig_mask, other=0.0)
        # the tile in registers (ONE_CHUNK), else placeholders the solves ignore
        offs, mask = _chunk(0, goff, gmask, red_sizes, red_strides, gsize, BE, NRB, UNIT_RED,
                            VEC)
        if ONE_CHUNK:
            # NOTE: [registers tile live set]
            d, z, x, n0, n1, n2 = _load_update(p_ptr, g_ptr, s0, s1, s2, offs, mask,
                                               h0, h1, h2, h3, h4, h5, h6, h7, gs, OPT, AMSGRAD,
                                               CAPTURABLE, SOLVER == SOLVER_PG and not SCALAR_D)
            _store_state(s0, s1, s2, offs, mask, n0, n1, n2, OPT, AMSGRAD)
            zz, dmax, dmin = _group_stats(z, d, mask, SCALAR_D)
            wa = zz
            wb = zz
            wc = zz
            we = zz
            wg = zz
        else:
            d = tl.zeros([BG, BE], dtype=tl.float32)
            z = d
            x = d
            zz, dmax, dmin, wa, wb, wc, we, wg = _first_pass(
                p_ptr, g_ptr, s0, s1, s2, zs, goff, gmask, red_sizes, red_strides, gsize, s_prev,
                h0, h1, h2, h3, h4, h5, h6, h7, gs, OPT, SOLVER, AMSGRAD, CAPTURABLE, SCALAR_D,
                BG, BE, NRB, UNIT_RED, VEC)
        znorm = tl.sqrt_rn(zz)
        dmax = tl.where(gmask, dmax, 1.0)
        scale = _shrink_scale(znorm, T)
        sigma = scale
        active = gmask
        Z = z
        passes = 0
        if not SCALAR_D:
            if SOLVER == SOLVER_EXACT:
                active, sigma, todo, rel_excess, inv_norm = _newton_start(znorm, dmax, dmin, T,
                                                                          gmask)
                iterating = todo
                if ONE_CHUNK:
                    ta, tb, tc, te, tg = _newton_terms5(z * inv_norm[:, None], d, s_prev[:, None])
                    wa = _gsum(ta, mask)
                    wb = _gsum(tb, mask)
                    wc = _gsum(tc, mask)
                    we = wa  # the curvature sums serve the prediction of chunked solves only
                    wg = wa
                else:  # pass 1 summed over z itself: scale to the unit-norm group
                    inv_zz = inv_norm * inv_norm
                    wa = wa * inv_zz
                    wb = wb * inv_zz
                    wc = wc * inv_zz
                    we = we * inv_zz
                    wg = wg * inv_zz
                sigma, todo, iters = _warm_start(wa, wb, wc, we, wg, s_prev, sigma, rel_excess,
                                                 todo, newton_tol, not ONE_CHUNK)
                sigma, iters, passes = _newton_solve(
                    d, z, mask, sigma, todo, rel_excess, inv_norm, newton_tol, iters, p_ptr, s0,
                    s1, s2, goff, gmask, red_sizes, red_strides, gsize, h0, h1, h2, h3, h4, h5,
                    h6, h7, OPT, AMSGRAD, ONE_CHUNK, BG, BE, NRB, UNIT_RED, VEC)
                # write back the sigma each nonzero group ended with; zero groups keep theirs
                tl.store(sig_ptr + gi, sigma, mask=sig_mask & active)
                if COUNT:
                    tl.atomic_add(counters + CNT_STEPS, tl.sum(tl.where(iterating != 0, iters, 0),
                                                               axis=0))
                    tl.atomic_add(counters + CNT_GROUPS, tl.sum(iterating, axis=0))
            else:
                active, Z, passes = _pg_solve(d, z, x, mask, znorm, dmax, T, gmask, tol_g,
                                              max_iters, zs, p_ptr, s0, s1, s2, goff, red_sizes,
                                              red_strides, gsize, h0, h1, h2, h3, h4, h5, h6, h7,
                                              REG, OPT, AMSGRAD, ONE_CHUNK, BG, BE, NRB, UNIT_RED,
                                              VEC)
        if ONE_CHUNK:
            w = _solution(d, z, Z, active, sigma, scale, SCALAR_D, SOLVER)
            if (OPT == OPT_RAMDA or OPT == OPT_RMDA) and not (SOLVER == SOLVER_PG and not SCALAR_D):
                x = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            _store_param(p_ptr, offs, mask, x, w, h2, h3, OPT, P_DTYPE)
        else:
            # last pass: read the new state of the nonzero groups, write the parameter
            live = _nonzero(active, scale, SCALAR_D)[:, None]
            for c0 in range(0, gsize, BE):
                offs, mask = _chunk(c0, goff, gmask, red_sizes, red_strides, gsize, BE, NRB,
                                    UNIT_RED, VEC)
                d, z, x = _load_for_write(p_ptr, s0, s1, s2, offs, mask, live, h0, h1, h2, h3, h4,
                                          h5, h6, h7, OPT, AMSGRAD)
                if SOLVER == SOLVER_PG and not SCALAR_D:
                    Z = tl.load(zs + offs, mask=mask & live, other=0.0)
                w = _solution(d, z, Z, active, sigma, scale, SCALAR_D, SOLVER)
                _store_param(p_ptr, offs, mask, x, w, h2, h3, OPT, P_DTYPE)
        if COUNT:  # passes over memory: one in registers, else pass 1 + solver passes + last
            if ONE_CHUNK:
                tl.atomic_add(counters + CNT_PASSES, 1)
            else:
                tl.atomic_add(counters + CNT_PASSES, 2 + passes)
            tl.atomic_add(counters + CNT_TILES, 1)
