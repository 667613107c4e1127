// CPU implementation of the fused step: the same matrix as the CUDA kernels,
// threads across work items (tiles of groups, or chunks of elements),
// inner loops over contiguous runs that the compiler vectorizes.
//
// NOTE: [Tiling per layout]
// Per tensor the canonical layout (NOTE: [Group layout]) decides the tile
// (dispatch.cpp: split):
// * "lanes" (neighbouring groups are neighbouring runs of R elements): the
//   innermost block is kept with stride 1 ("columns": input-wise Linear,
//   channel-wise 1x1 / channels_last Conv; R = 1), or the innermost reduced
//   run of R <= kMaxLaneRun elements sits right inside a kept block of
//   stride R (channel-wise k x k Conv, R = k*k). A tile is J adjacent groups
//   (J*R a multiple of 16 floats where possible, about kTileElems elements
//   in all); for each outer index the J runs form ONE contiguous run of J*R
//   elements. The buffer is laid out [outer][J*R] and the solver sweeps it
//   vectorized across the J*R lanes with per-lane partial sums, added per
//   group (each group keeps its own sigma). Runs of consecutive outer
//   indices are far apart in memory. A strided run streams nearly as fast
//   as contiguous memory only from about two cache lines on, so tiles aim
//   for J*R >= kMinLanes (cpu_step.h); even then, once the loop carries
//   RAMDA's cube root, strided runs cost a few times what whole rows cost,
//   and software prefetch does not recover it (so the kernels issue none).
//   Hence "lanes" panels for the exact solve (RAMDA, ProxAdamW): a work item
//   is a panel of up to kPanelElems elements, whole rows of up to a whole
//   innermost kept block, several tiles wide. Pass 1 streams the panel row
//   by row into panel-sized buffers z and d laid out like the tensor (and
//   adds each row into per-lane statistics), the Newton solve runs tile by
//   tile on them (row stride = panel width; the tile's d is copied compact
//   for the sweeps), pass 2 streams the rows again and computes the solution
//   on the way (NOTE: [Panel stats and solution] in run_item). The buffers
//   leave L2, so each tile pays a strided read of z and d when its iterating
//   groups are gathered; streaming whole rows in both passes saves more.
//   PG and the scalar-d shrink keep single tiles.
// * "rows" (anything else; in practice the innermost block is reduced:
//   output-wise Linear, filter-wise Conv): a tile is a range of whole
//   consecutive groups; each group is copied run by run (as z, d, and x for
//   PG) into the buffer group after group, and the solver sweeps one
//   contiguous slice per group (in L1 for groups up to a few thousand
//   elements; the exact solve and pass 2 run on each group as soon as pass
//   1 has written it, NOTE: [Rows solved group by group] in run_item).
// A tile's buffers plus the lines of parameter, gradient and state it
// touches fit in L2, so the second pass (writing the parameter) and every
// solver sweep hit cache and memory sees each tensor about once per step.
// A group larger than a tile gets a tile of its own (the buffer grows:
// correct, just out of cache). Elementwise paths (no group solve) stream
// each tensor in chunks of kElemItem in one fused loop.
// The CUDA side's choice is NOTE: [CUDA tiling] in csrc/cuda/kernels.cuh.

// This file is the body of csrc/cpu/kernels_{default,avx2,avx512}.cpp: each
// includes the headers below, switches the instruction set with
// `#pragma GCC target`, defines RAMDA_CPU_ISA and includes this file, so the
// same source is compiled once per instruction set (like ATen's CPU
// kernels); csrc/cpu/dispatch.cpp picks one at run time.

namespace ramda {
namespace cpu {
namespace RAMDA_CPU_ISA {
namespace {

// Scratch arrays (thread-local, from scratch()): B0 = z (then w) or y,
// B1 = d, B2 = x (the fp32 parameter; PG only), B3 = PG iterate Z (Newton on
// "lanes": zeta), B4 = PG gradient point (Newton on "lanes": d gathered).
struct Buffers {
  float* b[kScratchArrays];
  explicit Buffers(int64_t n, int64_t rest = -1) {
    float* const* s = scratch(n, rest);
    for (int i = 0; i < kScratchArrays; ++i) b[i] = s[i];
  }
};

RAMDA_HD float fmax_(float a, float b) { return a > b ? a : b; }
RAMDA_HD float fmin_(float a, float b) { return a < b ? a : b; }
RAMDA_HD int64_t imin_(int64_t a, int64_t b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------
// Per-optimizer element updates (docs/math.md section 1), apart from the
// memory movement of the loops below. Each optimizer is one functor, built
// from the call's StepArgs:
//   step(r, i)   reads element i's gradient, state and (where the update needs
//                it) parameter from the run r, writes the new state and
//                returns the subproblem data of docs/math.md section 2;
//   finish(x, w) the new parameter from the old one x and the solution w.
// kScalarD: d is one scalar (RMDA, ProxSGD), so `z` holds the prox argument y
// and every prox is closed form; otherwise d varies per element and a group
// needs the exact or PG solve. Adding an optimizer or a hyperparameter means
// one functor here (and its math in ramda_math.h); every regularizer path and
// instruction set runs it through the same loops.
// ---------------------------------------------------------------------------

// One element's subproblem data: d, z (y for kScalarD), and x, the fp32 point
// PG starts from (only read when stored for PG).
struct Elem {
  float d, z, x;
};

// Pointers of the contiguous run at storage offset o of one tensor; state
// roles as in TensorArgs. The members the loops call are always inlined: a
// call left in a loop body keeps it from vectorizing.
template <typename P>
struct Run {
  P* p;
  const P* g;
  const P* w0;
  float* s0;
  float* s1;
  float* s2;
  Run(const TensorArgs& t, int64_t o)
      : p(static_cast<P*>(t.param) + o), g(static_cast<const P*>(t.grad) + o),
        w0(t.w0 ? static_cast<const P*>(t.w0) + o : nullptr), s0(t.s0 ? t.s0 + o : nullptr),
        s1(t.s1 ? t.s1 + o : nullptr), s2(t.s2 ? t.s2 + o : nullptr) {}
  [[gnu::always_inline]] float grad(int64_t i) const { return static_cast<float>(g[i]); }
  [[gnu::always_inline]] float param(int64_t i) const { return static_cast<float>(p[i]); }
  [[gnu::always_inline]] float initial(int64_t i) const { return static_cast<float>(w0[i]); }
};

// The two properties that pick an optimizer's paths: whether its d is one
// scalar (kScalarD), and how the solution w becomes the parameter (finish).
// RAMDA, RMDA: momentum by averaging with the old parameter x.
template <bool kScalar>
struct Averaging {
  static constexpr bool kScalarD = kScalar;
  float keep, c;
  explicit Averaging(const StepArgs& a) : keep(a.keep), c(a.c) {}
  [[gnu::always_inline]] float finish(float x, float w) const { return average(x, w, keep, c); }
};
// ProxAdamW, ProxSGD: the solution is the new parameter.
template <bool kScalar>
struct Replacing {
  static constexpr bool kScalarD = kScalar;
  [[gnu::always_inline]] float finish(float, float w) const { return w; }
};

// RAMDA: w0 = W0, s1 = V, s2 = U.
struct RamdaUpdate : Averaging<false> {
  float s, eps;
  explicit RamdaUpdate(const StepArgs& a) : Averaging(a), s(a.s), eps(a.eps) {}
  template <typename P>
  [[gnu::always_inline]] Elem step(const Run<P>& r, int64_t i) const {
    float v = r.s1[i], u = r.s2[i];
    Elem e{};
    ramda_dz(r.grad(i), r.initial(i), v, u, s, eps, e.d, e.z);
    r.s1[i] = v;
    r.s2[i] = u;
    e.x = r.param(i);
    return e;
  }
};

// RMDA: w0 = W0, s1 = V; d = beta is a scalar, so y = W0 - V/beta.
struct RmdaUpdate : Averaging<true> {
  float s, beta;
  explicit RmdaUpdate(const StepArgs& a) : Averaging(a), s(a.s), beta(a.beta) {}
  template <typename P>
  [[gnu::always_inline]] Elem step(const Run<P>& r, int64_t i) const {
    float v = r.s1[i];
    Elem e{};
    e.z = rmda_y(r.grad(i), r.initial(i), v, s, beta);
    r.s1[i] = v;
    return e;
  }
};

// ProxAdamW: s0 = m, s1 = v, s2 = vmax (kAmsgrad only); the subproblem is
// centred at the decayed parameter, whose solution is the new parameter.
template <bool kAmsgrad>
struct ProxAdamWUpdate : Replacing<false> {
  AdamCoeffs c;
  float decay;
  explicit ProxAdamWUpdate(const StepArgs& a) : c(a.adam), decay(a.decay) {}
  template <typename P>
  [[gnu::always_inline]] Elem step(const Run<P>& r, int64_t i) const {
    float m = r.s0[i], v = r.s1[i], vmax = kAmsgrad ? r.s2[i] : 0.0f;
    Elem e{};
    e.x = r.param(i) * decay;
    proxadamw_dz(r.grad(i), e.x, m, v, vmax, kAmsgrad, c, e.d, e.z);
    r.s0[i] = m;
    r.s1[i] = v;
    if constexpr (kAmsgrad) r.s2[i] = vmax;
    return e;
  }
};

// ProxSGD: s0 = momentum buffer; y = x - lr * buf.
struct ProxSgdUpdate : Replacing<true> {
  float keep, c, lr;
  explicit ProxSgdUpdate(const StepArgs& a) : keep(a.keep), c(a.c), lr(a.lr) {}
  template <typename P>
  [[gnu::always_inline]] Elem step(const Run<P>& r, int64_t i) const {
    float buf = r.s0[i];
    Elem e{};
    e.x = r.param(i);
    e.z = proxsgd_y(r.grad(i), e.x, buf, keep, c, lr);
    r.s0[i] = buf;
    return e;
  }
};

// ---------------------------------------------------------------------------
// Pass 1: update the state of a contiguous run of n elements at storage
// offset `o` and write the subproblem data to the buffers; x (B2) only for
// PG, whose warm start it is.
// Pass 2: write the parameter from the solution w; RAMDA and RMDA read the
// old parameter again there for the averaging. That read costs no extra
// memory traffic (the store needs the line anyway), where a buffered copy
// costs a write and a read of the buffer per element.
// ---------------------------------------------------------------------------

template <typename P, bool kStoreX, typename U>
inline void pass1(const U& u, const TensorArgs& t, int64_t o, int64_t n, float* __restrict__ B0,
                  float* __restrict__ B1, float* __restrict__ B2) {
  const Run<P> r(t, o);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const Elem e = u.step(r, i);
    B0[i] = e.z;
    if constexpr (!U::kScalarD) B1[i] = e.d;
    if constexpr (kStoreX) B2[i] = e.x;
  }
}

// `w_at(i)`: the solution of element i of the run.
template <typename P, typename U, typename Sol>
inline void pass2_with(const U& u, const TensorArgs& t, int64_t o, int64_t n, Sol w_at) {
  P* __restrict__ p = static_cast<P*>(t.param) + o;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<P>(u.finish(static_cast<float>(p[i]), w_at(i)));
}

// The elementwise paths (no regularizer, l1 exact, tau == 0) in one loop:
// state update, closed-form prox and parameter write per element.
template <typename P, bool kL1, typename U>
inline void elementwise_run(const U& u, const TensorArgs& t, int64_t o, int64_t n) {
  const Run<P> r(t, o);
  const float thr = t.thr;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const Elem e = u.step(r, i);
    const float y = kL1 ? soft_threshold(e.z, thr) : e.z;
    const float w = U::kScalarD ? y : y / e.d;
    r.p[i] = static_cast<P>(u.finish(r.param(i), w));
  }
}

// ---------------------------------------------------------------------------
// Group solves on the buffers. `contig`: one group, elements contiguous.
// ---------------------------------------------------------------------------

struct GroupStats { float znorm, dmax, dmin; };

// NOTE: [Newton sums]
// The three sums of a Newton step are added in fp32 over blocks of
// kSumBlock terms and the block sums in fp64. Each term is in [0, 1] (the
// group is scaled to unit norm), so a block's rounding error is at most
// kSumBlock * eps(fp32) relative to its sum (about sqrt(kSumBlock) * eps in
// practice), comparable to the pairwise fp32 sum of the reference; summing
// every term in fp64 would put a conversion and two double adds per term
// into the hot loop of the solve.
constexpr int64_t kSumBlock = 32;

#if RAMDA_CPU_AVX512
// NOTE: [Newton sums with a reciprocal estimate]
// A Newton sweep is one division per element (1/(d + sigma)), and vdivps on
// 16 lanes costs several times the rest of the terms. The AVX-512 build
// uses the 14-bit estimate vrcp14ps refined by one Newton-Raphson step
// instead: the refined reciprocal is within about 1 ulp (the estimate's error
// squared, 2^-28, plus the FMA's rounding), as accurate as the rest of the
// term's roundings. Denominators above 2^125, whose reciprocal the estimate
// flushes to zero, take the division. The solution w = z/(d + sigma) keeps
// the division (one sweep).
inline __m512 recip16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 r = _mm512_rcp14_ps(x);
  r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(x, r, one), r);
  const __mmask16 big = _mm512_cmp_ps_mask(x, _mm512_set1_ps(0x1p125f), _CMP_GT_OQ);
  if (__builtin_expect(big != 0, 0)) r = _mm512_mask_div_ps(r, big, one, x);
  return r;
}

// newton_terms4 on 16 lanes, added to (fa, fb, fc, fe).
inline void newton_terms16(__m512 zeta, __m512 d, __m512 sigma, __m512& fa, __m512& fb, __m512& fc, __m512& fe) {
  const __m512 inv = recip16(_mm512_add_ps(d, sigma));
  const __m512 sd = _mm512_mul_ps(sigma, inv), dd = _mm512_mul_ps(d, inv);
  const __m512 v = _mm512_mul_ps(zeta, sd), u = _mm512_mul_ps(zeta, dd);
  const __m512 v2 = _mm512_mul_ps(v, v);
  const __m512 tb = _mm512_mul_ps(v2, sd);
  fa = _mm512_add_ps(fa, _mm512_mul_ps(v2, dd));
  fb = _mm512_add_ps(fb, tb);
  fc = _mm512_add_ps(fc, _mm512_mul_ps(u, _mm512_add_ps(zeta, v)));
  fe = _mm512_add_ps(fe, _mm512_mul_ps(tb, sd));
}

// Adds 16 fp32 lanes into two fp64 vectors (lanes 0-7, 8-15).
inline void add_wide(__m512d& lo, __m512d& hi, __m512 x) {
  lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(x)));
  hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1))));
}

// Sums of newton_terms4 over rows e in [0, E) of 16 lanes at zeta + e*stride,
// d + e*stride, per lane: fp32 over kSumBlock rows, fp64 across blocks.
inline void newton_sums16(const float* zeta, const float* d, int64_t stride, int64_t E,
                          __m512 sigma, double* a, double* b, double* c, double* ee) {
  __m512d alo = _mm512_setzero_pd(), ahi = alo, blo = alo, bhi = alo, clo = alo, chi = alo, elo = alo, ehi = alo;
  for (int64_t e0 = 0; e0 < E; e0 += kSumBlock) {
    const int64_t e1 = imin_(E, e0 + kSumBlock);
    __m512 fa = _mm512_setzero_ps(), fb = fa, fc = fa, fe = fa;
    for (int64_t e = e0; e < e1; ++e)
      newton_terms16(_mm512_loadu_ps(zeta + e * stride), _mm512_loadu_ps(d + e * stride), sigma, fa, fb, fc, fe);
    add_wide(alo, ahi, fa);
    add_wide(blo, bhi, fb);
    add_wide(clo, chi, fc);
    add_wide(elo, ehi, fe);
  }
  _mm512_storeu_pd(a, alo), _mm512_storeu_pd(a + 8, ahi);
  _mm512_storeu_pd(b, blo), _mm512_storeu_pd(b + 8, bhi);
  _mm512_storeu_pd(c, clo), _mm512_storeu_pd(c + 8, chi);
  _mm512_storeu_pd(ee, elo), _mm512_storeu_pd(ee + 8, ehi);
}
#endif

// Group norms accumulate in fp64: the screen ||z|| <= T and the shrink
// factor (||y|| - T)/||y|| cancel, and the reference sums pairwise.
inline GroupStats stats_contig(const float* __restrict__ z, const float* __restrict__ d, int64_t n) {
  double z2 = 0.0;
  float dmax = -INFINITY, dmin = INFINITY;
#pragma omp simd reduction(+ : z2) reduction(max : dmax) reduction(min : dmin)
  for (int64_t i = 0; i < n; ++i) {
    z2 += static_cast<double>(z[i]) * z[i];
    dmax = fmax_(dmax, d[i]);
    dmin = fmin_(dmin, d[i]);
  }
  return {static_cast<float>(std::sqrt(z2)), dmax, dmin};
}

inline float norm_contig(const float* __restrict__ y, int64_t n) {
  double y2 = 0.0;
#pragma omp simd reduction(+ : y2)
  for (int64_t i = 0; i < n; ++i) y2 += static_cast<double>(y[i]) * y[i];
  return static_cast<float>(std::sqrt(y2));
}

// The solution of the exact solve from a group's (or lane's) sigma, NaN for
// a zero group.
RAMDA_HD float lane_solution(float z, float d, float sigma) {
  return sigma == sigma ? newton_solution(z, d, sigma) : 0.0f;
}

// Sums of newton_terms4 at sigma over one contiguous group (x: zeta, or the
// raw z, NOTE: [Warm sums on the raw z]): fp32 over blocks of kSumBlock
// elements, added in fp64 (NOTE: [Newton sums]).
inline void newton_sums_contig(const float* __restrict__ x, const float* __restrict__ d, int64_t n, float sigma,
                               double (&r)[4]) {
  double sa = 0.0, sb = 0.0, sc = 0.0, se = 0.0;
#if RAMDA_CPU_AVX512
  // Whole rows of 16 elements as lanes (NOTE: [Newton sums with a
  // reciprocal estimate]); the last n % 16 below.
  const int64_t n16 = n / 16 * 16;
  if (n16 > 0) {
    double la[16], lb[16], lc[16], le[16];
    newton_sums16(x, d, 16, n16 / 16, _mm512_set1_ps(sigma), la, lb, lc, le);
    for (int l = 0; l < 16; ++l) sa += la[l], sb += lb[l], sc += lc[l], se += le[l];
  }
  for (int64_t i0 = n16; i0 < n; i0 += kSumBlock) {
#else
  for (int64_t i0 = 0; i0 < n; i0 += kSumBlock) {
#endif
    const int64_t i1 = imin_(n, i0 + kSumBlock);
    float fa = 0.0f, fb = 0.0f, fc = 0.0f, fe = 0.0f;
#pragma omp simd reduction(+ : fa, fb, fc, fe)
    for (int64_t i = i0; i < i1; ++i) {
      float ta, tb, tc, te;
      newton_terms4(x[i], d[i], sigma, ta, tb, tc, te);
      fa += ta;
      fb += tb;
      fc += tc;
      fe += te;
    }
    sa += fa;
    sb += fb;
    sc += fc;
    se += fe;
  }
  r[0] = sa, r[1] = sb, r[2] = sc, r[3] = se;
}

// NOTE: [Warm sums on the raw z]
// A group with a previous sigma takes its first Newton step at that sigma
// (docs/math.md section 4, item 5), where no bound is needed: the sums of
// that step can be added over the raw z before ||z|| is known, since every
// term is quadratic in zeta = z/||z||: the unit-norm sums are the raw ones
// over ||z||^2. The contiguous solve ("rows", unit groups) takes its first
// step from them, and with the predicted-error stop
// (newton_advance_predicted) a group whose z and d changed little since the
// last step needs no sweep over zeta at all. Raw terms are fp32 (up to z^2),
// so only groups of norm in [kRawNormLo, kRawNormHi] take this path; the
// others take the same first step on zeta. "Lanes" tiles do not: adding the
// sums per lane as pass 1 writes each row costs loads and stores of four
// fp64 lane arrays per element, more than the gathered sweep (which holds
// its sums in registers) that it would save (bench/RESULTS.md, s7-cpu).
constexpr float kRawNormLo = 0x1p-40f, kRawNormHi = 0x1p40f;

RAMDA_HD bool raw_sums_usable(float norm) { return norm >= kRawNormLo && norm <= kRawNormHi; }

// The warm first step of group st from raw sums r (NOTE: [Warm sums on the raw z]).
RAMDA_HD float warm_step_raw(NewtonStart& st, const double (&r)[4], bool& done) {
  const double q = 1.0 / (static_cast<double>(st.norm) * st.norm);
  return newton_advance_predicted(st, static_cast<float>(r[0] * q), static_cast<float>(r[1] * q),
                                  static_cast<float>(r[2] * q), static_cast<float>(r[3] * q), done);
}

// Exact group lasso (docs/math.md section 4) for one contiguous group: returns its
// sigma, NaN for a zero group (w = lane_solution(z, d, sigma)). `zeta` is
// scratch for the unit-norm group. `kept` (nullptr: none): the group's sigma
// from the previous step, the warm start, overwritten with the new one by a
// nonzero group (docs/math.md section 4, item 5). Every step may end the
// solve on its predicted error (newton_advance_predicted).
inline float newton_contig_sigma(const float* __restrict__ z, const float* __restrict__ d,
                                 float* __restrict__ zeta, int64_t n, float thr, float* kept) {
  const GroupStats st = stats_contig(z, d, n);
  NewtonStart s0 = newton_start(st.znorm, st.dmax, st.dmin, thr, kept ? *kept : 0.0f);
  if (!s0.active) return NAN;
  float sigma = s0.sigma;
  bool done = s0.done;
  int it = 0;
  if (!done && s0.warm && raw_sums_usable(s0.norm)) {
    double r[4];
    newton_sums_contig(z, d, n, sigma, r);
    sigma = warm_step_raw(s0, r, done);
    s0.sigma = sigma;
    ++it;
  }
  if (!done) {
    const float inv_norm = s0.inv_norm;  // a product per element, not a division (1 ulp)
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) zeta[i] = z[i] * inv_norm;
  }
  for (; it < kNewtonMaxIters && !done; ++it) {
    double r[4];
    newton_sums_contig(zeta, d, n, sigma, r);
    s0.sigma = sigma;
    sigma = newton_advance_predicted(s0, static_cast<float>(r[0]), static_cast<float>(r[1]),
                                     static_cast<float>(r[2]), static_cast<float>(r[3]), done);
  }
  if (kept) *kept = sigma;
  return sigma;
}

// Proximal gradient (docs/math.md section 5) for one contiguous group, warm started
// at x; `l1` picks the elementwise prox (whole-tensor l1) over the group
// prox. The solution is written to z.
inline void pg_contig(float* __restrict__ z, const float* __restrict__ d,
                      const float* __restrict__ x, float* __restrict__ Z, float* __restrict__ y,
                      int64_t n, bool l1, float thr, float tol, int max_iters) {
  const GroupStats st = stats_contig(z, d, n);
  if (!l1 && st.znorm <= thr) {  // screened: exactly zero, no iteration
    for (int64_t i = 0; i < n; ++i) z[i] = 0.0f;
    return;
  }
  const float theta = 1.0f / st.dmax;
  const float inv_theta = 1.0f / theta;
  const float pthr = theta * thr;
  for (int64_t i = 0; i < n; ++i) Z[i] = x[i];
  for (int it = 0; it < max_iters; ++it) {
    float s2 = 0.0f;
    if (l1) {
#pragma omp simd reduction(+ : s2)
      for (int64_t i = 0; i < n; ++i) {
        const float zn = soft_threshold(pg_gradient_point(Z[i], z[i], d[i], theta), pthr);
        const float s = pg_residual(Z[i], zn, d[i], inv_theta);
        s2 += s * s;
        Z[i] = zn;
      }
    } else {
      double y2 = 0.0;
#pragma omp simd reduction(+ : y2)
      for (int64_t i = 0; i < n; ++i) {
        y[i] = pg_gradient_point(Z[i], z[i], d[i], theta);
        y2 += static_cast<double>(y[i]) * y[i];
      }
      const float scale = group_shrink(static_cast<float>(std::sqrt(y2)), pthr);
#pragma omp simd reduction(+ : s2)
      for (int64_t i = 0; i < n; ++i) {
        const float zn = y[i] * scale;
        const float s = pg_residual(Z[i], zn, d[i], inv_theta);
        s2 += s * s;
        Z[i] = zn;
      }
    }
    if (!(std::sqrt(s2) > tol)) break;
  }
  for (int64_t i = 0; i < n; ++i) z[i] = Z[i];
}

// RMDA / ProxSGD group soft-threshold of y (scalar d: closed form).
inline void shrink_contig(float* __restrict__ y, int64_t n, float thr) {
  const float scale = group_shrink(norm_contig(y, n), thr);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] *= scale;
}

// The same three solves for J groups interleaved in "lanes": the buffer is
// [E][J*R], lane l = j*R + r belongs to group j (R = 1 for "columns"
// layouts, R = the inner run for channel-wise convolutions, NOTE: [Tiling
// per layout]). Loops run over lanes with per-lane partial sums, which are
// then added per group.
struct Lanes {
  int64_t E, J, R, L;
};

// Whether a group of lanes [l0, l0 + n) (R lanes per group) is still iterating.
inline bool block_pending(const NewtonStart* st, int64_t l0, int64_t n, int64_t R) {
  for (int64_t j = l0 / R; j <= (l0 + n - 1) / R; ++j)
    if (!st[j].done) return true;
  return false;
}

template <typename T>
inline void group_sums(const T* lane, const Lanes& s, T* group) {
  for (int64_t j = 0; j < s.J; ++j) {
    T acc = 0;
    for (int64_t r = 0; r < s.R; ++r) acc += lane[j * s.R + r];
    group[j] = acc;
  }
}

// Per-lane statistics of the subproblem data: sum of z^2 (fp64, in row
// order), max and min of d. A "lanes" tile sweeps its buffer for them; a
// panel adds each row as pass 1 writes it (NOTE: [Panel stats and solution]).
struct LaneStats {
  double* z2;
  float* dmax;
  float* dmin;
  void reset(int64_t n) const {
    for (int64_t l = 0; l < n; ++l) z2[l] = 0.0, dmax[l] = -INFINITY, dmin[l] = INFINITY;
  }
  // Adds one row of n lanes (z and d of that row).
  void add(const float* __restrict__ z, const float* __restrict__ d, int64_t n) const {
    double* __restrict__ q = z2;
    float* __restrict__ hi = dmax;
    float* __restrict__ lo = dmin;
#pragma omp simd
    for (int64_t l = 0; l < n; ++l) {
      q[l] += static_cast<double>(z[l]) * z[l];
      hi[l] = fmax_(hi[l], d[l]);
      lo[l] = fmin_(lo[l], d[l]);
    }
  }
  LaneStats offset(int64_t l0) const { return {z2 + l0, dmax + l0, dmin + l0}; }
};

// The exact solve of a "lanes" tile from its per-lane statistics `ls`: z
// and d have rows of stride ld (>= L: a "lanes" tile's buffer has ld = L, a
// panel's (NOTE: [Tiling per layout]) the panel's width); zeta and dc are
// compact scratch of E rows of up to L rounded up to 16 lanes. Writes each
// lane's sigma to sigma_out, NaN for a lane of a zero group; w =
// newton_solution(z, d, sigma) on the others. `kept` (nullptr: none): the J
// groups' sigmas from the previous step, the warm starts, overwritten with the
// new ones by the nonzero groups (docs/math.md section 4, item 5).
//
// NOTE: [Pending lanes only]
// Groups that need no iteration (zero groups, constant d) are dropped before
// the sweeps: the lanes of the groups that iterate are gathered into zeta and
// dc ([E][Lc], Lc = their lane count rounded up to whole 16-lane vectors;
// pad lanes hold zeta = 0, d = 1 and add nothing). In structured training
// most groups of a regularized tensor end up zero (the point of it), and the
// zero groups of a "columns" tile are scattered across the lanes, so
// skipping only 16-lane blocks whose groups have all converged would skip
// little. Each
// group's sums are the same additions in the same order either way.
inline void newton_lanes_sigma(const float* __restrict__ z, const float* __restrict__ d, int64_t ld,
                               float* __restrict__ zeta, float* __restrict__ dc, const Lanes& s,
                               float thr, const LaneStats& ls, float* __restrict__ sigma_out,
                               float* kept) {
  constexpr int64_t kCap = kMaxLanes + 16;
  double z2[kMaxLanes], al[kCap], bl[kCap], cl[kCap], el[kCap], ga[kCap], gb[kCap], gc[kCap], ge[kCap];
  float sigmal[kCap], normc[kCap + 16];
  int32_t src[kCap], pj[kMaxLanes];
  const float* dmaxl = ls.dmax;
  const float* dminl = ls.dmin;
  NewtonStart st[kMaxLanes], cs[kCap];
  const int64_t R = s.R;
  group_sums(ls.z2, s, z2);
  int64_t Jp = 0;
  for (int64_t j = 0; j < s.J; ++j) {
    float dmax = -INFINITY, dmin = INFINITY;
    for (int64_t r = 0; r < R; ++r) {
      dmax = fmax_(dmax, dmaxl[j * R + r]);
      dmin = fmin_(dmin, dminl[j * R + r]);
    }
    st[j] = newton_start(static_cast<float>(std::sqrt(z2[j])), dmax, dmin, thr, kept ? kept[j] : 0.0f);
    if (!st[j].done) pj[Jp++] = static_cast<int32_t>(j);
  }
  if (Jp > 0) {
    // No gather when every group iterates and the rows are compact already.
    const bool gather = Jp < s.J || ld != s.L;
    const int64_t Lp = Jp * R, L = gather ? (Lp + 15) / 16 * 16 : Lp;
    const Lanes c{s.E, Jp, R, L};
    for (int64_t k = 0; k < Jp; ++k) cs[k] = st[pj[k]];
    for (int64_t k = Jp; k < kCap; ++k) cs[k].done = true, cs[k].sigma = 1.0f;  // pad lanes
    for (int64_t k = 0; k < Lp; ++k) {
      src[k] = static_cast<int32_t>(pj[k / R] * R + k % R);
      normc[k] = cs[k / R].inv_norm;  // products, not divisions
    }
    for (int64_t k = Lp; k < L + 16; ++k) normc[k] = 0.0f;
#if RAMDA_CPU_AVX512
    // Pending-lane masks of the source's 16-lane vectors.
    const int64_t nblk = (s.L + 15) / 16;
    __mmask16 keep[kCap / 16];
    for (int64_t b = 0; b < nblk; ++b) keep[b] = 0;
    for (int64_t k = 0; k < Lp; ++k) keep[src[k] / 16] |= __mmask16(1u << (src[k] % 16));
#endif
    for (int64_t e = 0; e < s.E; ++e) {
      const float* __restrict__ ze = z + e * ld;
      const float* __restrict__ de = d + e * ld;
      float* __restrict__ zo = zeta + e * L;
      if (!gather) {
#pragma omp simd
        for (int64_t k = 0; k < L; ++k) zo[k] = ze[k] * normc[k];
        continue;
      }
      float* __restrict__ dout = dc + e * L;
#if RAMDA_CPU_AVX512
      // Source vectors compressed by their lanes' pending masks: each store
      // writes 16 lanes, the next one overwrites those past the pending ones
      // (the rows are written in order, the buffers have 16 floats of slack).
      int64_t k = 0;
      for (int64_t b = 0; b < nblk; ++b) {
        const __mmask16 m = keep[b];
        if (!m) continue;
        const int64_t l = b * 16;
        const __mmask16 in = l + 16 <= s.L ? __mmask16(0xFFFF) : __mmask16((1u << (s.L - l)) - 1);
        const __m512 zv = _mm512_maskz_compress_ps(m, _mm512_maskz_loadu_ps(in, ze + l));
        const __m512 dv = _mm512_maskz_compress_ps(m, _mm512_maskz_loadu_ps(in, de + l));
        _mm512_storeu_ps(zo + k, _mm512_mul_ps(zv, _mm512_loadu_ps(normc + k)));
        _mm512_storeu_ps(dout + k, dv);
        k += __builtin_popcount(m);
      }
#else
#pragma omp simd
      for (int64_t k = 0; k < Lp; ++k) {
        zo[k] = ze[src[k]] * normc[k];
        dout[k] = de[src[k]];
      }
#endif
      for (int64_t k = Lp; k < L; ++k) zo[k] = 0.0f, dout[k] = 1.0f;
    }
    const float* __restrict__ dn = gather ? dc : d;
    int64_t pending = Jp;
    for (int it = 0; it < kNewtonMaxIters && pending > 0; ++it) {
      for (int64_t l = 0; l < L; ++l) sigmal[l] = cs[l / R].sigma, al[l] = bl[l] = cl[l] = el[l] = 0.0;
      // Blocks of kBlk lanes, each swept over all e with its partial sums held
      // in registers (not reloaded and stored per e): fp32 over kSumBlock
      // consecutive e, added into fp64 (NOTE: [Newton sums]).
      constexpr int64_t kBlk = 16;
      int64_t l0 = 0;
#if RAMDA_CPU_AVX512
      // Blocks whose groups have all converged are skipped (their sums are not read).
      for (; l0 + kBlk <= L; l0 += kBlk)
        if (block_pending(cs, l0, kBlk, R))
          newton_sums16(zeta + l0, dn + l0, L, s.E, _mm512_loadu_ps(sigmal + l0), al + l0, bl + l0, cl + l0,
                        el + l0);
#endif
      for (; l0 + kBlk <= L; l0 += kBlk) {
        if (!block_pending(cs, l0, kBlk, R)) continue;  // converged: its sums are not read
        double ra[kBlk], rb[kBlk], rc[kBlk], re[kBlk];
        float sg[kBlk];
        for (int64_t l = 0; l < kBlk; ++l) ra[l] = rb[l] = rc[l] = re[l] = 0.0, sg[l] = sigmal[l0 + l];
        for (int64_t e0 = 0; e0 < s.E; e0 += kSumBlock) {
          const int64_t e1 = imin_(s.E, e0 + kSumBlock);
          float fa[kBlk], fb[kBlk], fc[kBlk], fe[kBlk];
          for (int64_t l = 0; l < kBlk; ++l) fa[l] = fb[l] = fc[l] = fe[l] = 0.0f;
          for (int64_t e = e0; e < e1; ++e) {
            const float* ze = zeta + e * L + l0;
            const float* de = dn + e * L + l0;
#pragma omp simd
            for (int64_t l = 0; l < kBlk; ++l) {
              float ta, tb, tc, te;
              newton_terms4(ze[l], de[l], sg[l], ta, tb, tc, te);
              fa[l] += ta;
              fb[l] += tb;
              fc[l] += tc;
              fe[l] += te;
            }
          }
          for (int64_t l = 0; l < kBlk; ++l) ra[l] += fa[l], rb[l] += fb[l], rc[l] += fc[l], re[l] += fe[l];
        }
        for (int64_t l = 0; l < kBlk; ++l)
          al[l0 + l] = ra[l], bl[l0 + l] = rb[l], cl[l0 + l] = rc[l], el[l0 + l] = re[l];
      }
      // Lanes past the last whole vector: only without gathering (L = Lp).
      for (int64_t e = 0; l0 < L && e < s.E; ++e) {
        const float* ze = zeta + e * L;
        const float* de = dn + e * L;
#pragma omp simd
        for (int64_t l = l0; l < L; ++l) {
          float ta, tb, tc, te;
          newton_terms4(ze[l], de[l], sigmal[l], ta, tb, tc, te);
          al[l] += ta;
          bl[l] += tb;
          cl[l] += tc;
          el[l] += te;
        }
      }
      group_sums(al, c, ga);
      group_sums(bl, c, gb);
      group_sums(cl, c, gc);
      group_sums(el, c, ge);
      pending = 0;
      for (int64_t k = 0; k < Jp; ++k) {
        if (cs[k].done) continue;
        bool dk;
        cs[k].sigma = newton_advance_predicted(cs[k], static_cast<float>(ga[k]), static_cast<float>(gb[k]),
                                               static_cast<float>(gc[k]), static_cast<float>(ge[k]), dk);
        cs[k].done = dk;
        pending += !dk;
      }
    }
    for (int64_t k = 0; k < Jp; ++k) st[pj[k]].sigma = cs[k].sigma;
  }
  for (int64_t l = 0; l < s.L; ++l) sigma_out[l] = st[l / R].active ? st[l / R].sigma : NAN;
  if (kept)
    for (int64_t j = 0; j < s.J; ++j)
      if (st[j].active) kept[j] = st[j].sigma;
}

// Per-lane statistics and sigma of a panel's width (thread-local); the "rows"
// path keeps one sigma per group of its tile there.
// Per-lane statistics and sigma of a panel's width (thread-local); the "rows"
// path keeps one sigma per group of its tile there.
struct PanelLanes {
  LaneStats stats;
  float* sigma;
  explicit PanelLanes(int64_t width) {
    thread_local std::vector<double> wide;
    thread_local std::vector<float> narrow;
    if (static_cast<int64_t>(wide.size()) < width) wide.resize(width);
    if (static_cast<int64_t>(narrow.size()) < 3 * width) narrow.resize(3 * width);
    stats = {wide.data(), narrow.data(), narrow.data() + width};
    sigma = narrow.data() + 2 * width;
  }
};

// Exact group lasso of a "lanes" tile ([E][L] buffer, ld = L): w -> z.
inline void newton_lanes(float* __restrict__ z, const float* __restrict__ d,
                         float* __restrict__ zeta, float* __restrict__ dc, const Lanes& s, float thr,
                         float* kept) {
  const int64_t L = s.L;
  double z2l[kMaxLanes];
  float dmaxl[kMaxLanes], dminl[kMaxLanes], sigmal[kMaxLanes];
  const LaneStats ls{z2l, dmaxl, dminl};
  ls.reset(L);
  for (int64_t e = 0; e < s.E; ++e) ls.add(z + e * L, d + e * L, L);
  newton_lanes_sigma(z, d, L, zeta, dc, s, thr, ls, sigmal, kept);
  for (int64_t e = 0; e < s.E; ++e) {
    float* ze = z + e * L;
    const float* de = d + e * L;
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) ze[l] = lane_solution(ze[l], de[l], sigmal[l]);
  }
}

inline void pg_lanes(float* __restrict__ z, const float* __restrict__ d, const float* __restrict__ x,
                     float* __restrict__ Z, float* __restrict__ y, const Lanes& s, float thr,
                     float tol, int max_iters) {
  const int64_t L = s.L;
  double z2l[kMaxLanes], z2[kMaxLanes], y2l[kMaxLanes], y2[kMaxLanes];
  float dmaxl[kMaxLanes], thetal[kMaxLanes], inv_thetal[kMaxLanes], scalel[kMaxLanes],
      s2l[kMaxLanes], s2[kMaxLanes], theta[kMaxLanes], pthr[kMaxLanes];
  bool live[kMaxLanes], livel[kMaxLanes];
  for (int64_t l = 0; l < L; ++l) z2l[l] = 0.0, dmaxl[l] = -INFINITY;
  for (int64_t e = 0; e < s.E; ++e) {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      z2l[l] += static_cast<double>(z[e * L + l]) * z[e * L + l];
      dmaxl[l] = fmax_(dmaxl[l], d[e * L + l]);
    }
  }
  group_sums(z2l, s, z2);
  int64_t pending = 0;
  for (int64_t j = 0; j < s.J; ++j) {
    float dmax = -INFINITY;
    for (int64_t r = 0; r < s.R; ++r) dmax = fmax_(dmax, dmaxl[j * s.R + r]);
    live[j] = static_cast<float>(std::sqrt(z2[j])) > thr;  // screened groups are exactly zero
    theta[j] = 1.0f / dmax;
    pthr[j] = theta[j] * thr;
    pending += live[j];
  }
  for (int64_t l = 0; l < L; ++l) {
    thetal[l] = theta[l / s.R];
    inv_thetal[l] = 1.0f / thetal[l];
    livel[l] = live[l / s.R];
  }
  for (int64_t e = 0; e < s.E; ++e)
    for (int64_t l = 0; l < L; ++l) Z[e * L + l] = livel[l] ? x[e * L + l] : 0.0f;
  for (int it = 0; it < max_iters && pending > 0; ++it) {
    for (int64_t l = 0; l < L; ++l) y2l[l] = 0.0, s2l[l] = 0.0f;
    for (int64_t e = 0; e < s.E; ++e) {
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) {
        const int64_t i = e * L + l;
        y[i] = pg_gradient_point(Z[i], z[i], d[i], thetal[l]);
        y2l[l] += static_cast<double>(y[i]) * y[i];
      }
    }
    group_sums(y2l, s, y2);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t j = l / s.R;
      scalel[l] = livel[l] ? group_shrink(static_cast<float>(std::sqrt(y2[j])), pthr[j]) : 1.0f;
    }
    for (int64_t e = 0; e < s.E; ++e) {
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) {
        const int64_t i = e * L + l;
        const float zn = livel[l] ? y[i] * scalel[l] : Z[i];
        const float r = pg_residual(Z[i], zn, d[i], inv_thetal[l]);
        s2l[l] += r * r;
        Z[i] = zn;
      }
    }
    group_sums(s2l, s, s2);
    pending = 0;
    for (int64_t j = 0; j < s.J; ++j) {
      live[j] = live[j] && std::sqrt(s2[j]) > tol;
      pending += live[j];
    }
    for (int64_t l = 0; l < L; ++l) livel[l] = live[l / s.R];
  }
  for (int64_t i = 0; i < s.E * L; ++i) z[i] = Z[i];
}

inline void shrink_lanes(float* __restrict__ y, const Lanes& s, float thr) {
  const int64_t L = s.L;
  double y2l[kMaxLanes], y2[kMaxLanes];
  float scalel[kMaxLanes];
  for (int64_t l = 0; l < L; ++l) y2l[l] = 0.0;
  for (int64_t e = 0; e < s.E; ++e) {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) y2l[l] += static_cast<double>(y[e * L + l]) * y[e * L + l];
  }
  group_sums(y2l, s, y2);
  for (int64_t l = 0; l < L; ++l)
    scalel[l] = group_shrink(static_cast<float>(std::sqrt(y2[l / s.R])), thr);
  for (int64_t e = 0; e < s.E; ++e) {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) y[e * L + l] *= scalel[l];
  }
}

// Offsets of a sequence of items decoded over blocks (last fastest), by
// increment instead of division.
struct Odometer {
  int32_t n;
  const int64_t* size;
  const int64_t* stride;
  int64_t idx[kMaxDims] = {};
  int64_t off = 0;
  Odometer(int32_t n_, const int64_t* size_, const int64_t* stride_)
      : n(n_), size(size_), stride(stride_) {}
  void next() {
    for (int32_t b = n - 1; b >= 0; --b) {
      off += stride[b];
      if (++idx[b] < size[b]) return;
      off -= idx[b] * stride[b];
      idx[b] = 0;
    }
  }
};

// ---------------------------------------------------------------------------
// Work items (split in dispatch.cpp)
// ---------------------------------------------------------------------------

// The solves that run after pass 1 of a whole tile: the scalar-d group
// soft-threshold, and PG (the exact solve of "rows" runs group by group in
// run_item).
template <bool kScalarD>
inline void solve_rows(const TensorArgs& t, const StepArgs& a, const Buffers& B, int64_t groups,
                       int64_t gsize) {
  const bool l1 = a.reg == Reg::kL1;  // only reaches here as whole-tensor PG
  for (int64_t j = 0; j < groups; ++j) {
    const int64_t o = j * gsize;
    if (kScalarD) shrink_contig(B.b[0] + o, gsize, t.thr);
    else pg_contig(B.b[0] + o, B.b[1] + o, B.b[2] + o, B.b[3] + o, B.b[4] + o, gsize, l1, t.thr, t.pg_tol, a.max_iters);
  }
}

template <bool kScalarD>
inline void solve_lanes(const TensorArgs& t, const StepArgs& a, const Buffers& B, const Lanes& s,
                        float* kept) {
  if (kScalarD) shrink_lanes(B.b[0], s, t.thr);
  else if (a.solver == Solver::kPg) pg_lanes(B.b[0], B.b[1], B.b[2], B.b[3], B.b[4], s, t.thr, t.pg_tol, a.max_iters);
  else newton_lanes(B.b[0], B.b[1], B.b[3], B.b[4], s, t.thr, kept);
}

// One work item of optimizer update U (RamdaUpdate, ...) on parameters of type P.
template <typename P, typename U>
void run_item(const TensorArgs& t, const StepArgs& a, const WorkItem& w) {
  const U u(a);
  if (t.path == Path::kElementwise) {
    if (a.reg == Reg::kL1 && t.thr != 0.0f)
      elementwise_run<P, true>(u, t, w.begin, w.end - w.begin);
    else
      elementwise_run<P, false>(u, t, w.begin, w.end - w.begin);
    return;
  }
  const GroupLayout& L = t.layout;
  const int64_t gsize = L.group_size;
  const int64_t groups = w.end - w.begin;
  // A panel's z and d (B0, B1) span the panel; its solver scratch (B3, B4), one
  // tile, of whole 16-lane vectors for "lanes" (NOTE: [Pending lanes only]).
  const int64_t tile_groups = w.tile > 0 ? imin_(w.tile, groups) : groups;
  const Buffers B(groups * gsize, w.run > 0 ? (tile_groups * w.run + 15) / 16 * 16 * (gsize / w.run)
                                            : tile_groups * gsize);
  // Only PG reads x (B2): its warm start.
  const bool pg = !U::kScalarD && a.solver == Solver::kPg;
  const int64_t base = block_offset(w.begin, L.n_kept, L.kept_size, L.kept_stride);
  // The item's groups' warm starts (exact group lasso; bindings.cpp numbers
  // them like the layout's groups).
  float* const kept = t.sigma ? t.sigma + w.begin : nullptr;
  // One pass over the run of n elements at storage offset o, buffers from index bi.
  const auto run_pass = [&](int pass, int64_t o, int64_t n, int64_t bi) {
    const float* __restrict__ W = B.b[0] + bi;
    if (pass == 1) pass2_with<P>(u, t, o, n, [W](int64_t i) { return W[i]; });
    else if (pg) pass1<P, true>(u, t, o, n, B.b[0] + bi, B.b[1] + bi, B.b[2] + bi);
    else pass1<P, false>(u, t, o, n, B.b[0] + bi, B.b[1] + bi, nullptr);
  };
  if (w.tile > 0) {
    // A panel of "lanes" tiles: pass 1 and pass 2 over whole rows of the
    // panel (one contiguous run per outer index), the exact solve tile by tile
    // on the panel's buffers (row stride `width`). NOTE: [Panel stats and
    // solution]: pass 1 adds each row it writes into per-lane statistics
    // while the row is in L1, and pass 2 computes w = z/(d + sigma) from the
    // buffers as it writes the parameter, instead of a sweep each over the
    // panel buffers, which have left L2 by then.
    const int64_t E = gsize / w.run, width = groups * w.run;
    const int32_t n_outer = w.run > 1 ? L.n_red - 1 : L.n_red;
    const PanelLanes pl(width);
    const float* z = B.b[0];
    const float* d = B.b[1];
    pl.stats.reset(width);
    Odometer odo(n_outer, L.red_size, L.red_stride);
    for (int64_t e = 0; e < E; ++e, odo.next()) {
      run_pass(0, base + odo.off, width, e * width);
      pl.stats.add(z + e * width, d + e * width, width);
    }
    for (int64_t j0 = 0; j0 < groups; j0 += w.tile) {
      const int64_t J = imin_(w.tile, groups - j0), l0 = j0 * w.run;
      const Lanes s{E, J, w.run, J * w.run};
      newton_lanes_sigma(z + l0, d + l0, width, B.b[3], B.b[4], s, t.thr, pl.stats.offset(l0), pl.sigma + l0,
                         kept ? kept + j0 : nullptr);
    }
    const float* __restrict__ sigma = pl.sigma;
    Odometer odo2(n_outer, L.red_size, L.red_stride);
    for (int64_t e = 0; e < E; ++e, odo2.next()) {
      const float* __restrict__ ze = z + e * width;
      const float* __restrict__ de = d + e * width;
      pass2_with<P>(u, t, base + odo2.off, width,
                       [=](int64_t i) { return lane_solution(ze[i], de[i], sigma[i]); });
    }
    return;
  }
  if (w.run > 0) {
    // Lanes: the tile's J groups are adjacent runs of w.run elements, so one
    // outer element index of all of them is a single contiguous run.
    const Lanes s{gsize / w.run, groups, w.run, groups * w.run};
    const int32_t n_outer = w.run > 1 ? L.n_red - 1 : L.n_red;
    for (int pass = 0; pass < 2; ++pass) {
      Odometer odo(n_outer, L.red_size, L.red_stride);
      for (int64_t e = 0; e < s.E; ++e, odo.next()) run_pass(pass, base + odo.off, s.L, e * s.L);
      if (pass == 0) solve_lanes<U::kScalarD>(t, a, B, s, kept);
    }
    return;
  }
  // Rows: each group is runs of its innermost (stride-1) reduced block;
  // group_runs(j, fn) calls fn(storage offset, buffer index) for each.
  const int64_t run = L.red_size[L.n_red - 1];
  const int64_t outer = gsize / run;
  const auto group_runs = [&](int64_t j, const auto& fn) {
    const int64_t gbase = block_offset(w.begin + j, L.n_kept, L.kept_size, L.kept_stride);
    Odometer odo(L.n_red - 1, L.red_size, L.red_stride);
    for (int64_t r = 0; r < outer; ++r, odo.next()) fn(gbase + odo.off, j * gsize + r * run);
  };
  if (!pg && !U::kScalarD) {
    // NOTE: [Rows solved group by group]: each group goes through pass 1,
    // the exact solve and pass 2 before the next one starts, so its z and d
    // are written and read again in L1 (groups up to a few thousand
    // elements; the buffer holds one group at index 0), and pass 2 computes
    // w = z/(d + sigma) as it writes the parameter: one pass over memory per
    // tensor, no sweep over a tile's buffers.
    for (int64_t j = 0; j < groups; ++j) {
      const int64_t b0 = j * gsize;  // group_runs' buffer index of the group's first run
      group_runs(j, [&](int64_t o, int64_t bi) { run_pass(0, o, run, bi - b0); });
      const float sj = newton_contig_sigma(B.b[0], B.b[1], B.b[3], gsize, t.thr, kept ? kept + j : nullptr);
      group_runs(j, [&](int64_t o, int64_t bi) {
        const float* __restrict__ zr = B.b[0] + (bi - b0);
        const float* __restrict__ dr = B.b[1] + (bi - b0);
        pass2_with<P>(u, t, o, run, [=](int64_t i) { return lane_solution(zr[i], dr[i], sj); });
      });
    }
    return;
  }
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t j = 0; j < groups; ++j)
      group_runs(j, [&](int64_t o, int64_t bi) { run_pass(pass, o, run, bi); });
    if (pass == 0) solve_rows<U::kScalarD>(t, a, B, groups, gsize);
  }
}

template <typename U>
void run_dtype(const TensorArgs& t, const StepArgs& a, const WorkItem& w) {
  switch (t.dtype) {
    case DType::kFp32: return run_item<float, U>(t, a, w);
    case DType::kBf16: return run_item<c10::BFloat16, U>(t, a, w);
    case DType::kFp16: return run_item<c10::Half, U>(t, a, w);
  }
}

// x * 0 is +-0 for a finite x and NaN for NaN and +-Inf, so the sum of
// those products is NaN exactly when some element is not finite (a plain sum
// can also overflow on finite values, and needs no second look here).
template <typename T, typename Acc>
inline bool all_finite_run(const T* __restrict__ x, int64_t n) {
  Acc acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += static_cast<Acc>(x[i]) * Acc(0);
  return acc == acc;
}

}  // namespace

bool all_finite(const ScreenArgs& t, int64_t begin, int64_t end) {
  const int64_t n = end - begin;
  switch (t.type) {
    case ScreenType::kFp32: return all_finite_run<float, float>(static_cast<const float*>(t.data) + begin, n);
    case ScreenType::kBf16:
      return all_finite_run<c10::BFloat16, float>(static_cast<const c10::BFloat16*>(t.data) + begin, n);
    case ScreenType::kFp16: return all_finite_run<c10::Half, float>(static_cast<const c10::Half*>(t.data) + begin, n);
    case ScreenType::kFp64: return all_finite_run<double, double>(static_cast<const double*>(t.data) + begin, n);
  }
  return false;
}

void run(const TensorArgs& t, const StepArgs& a, const WorkItem& w) {
  switch (a.optim) {
    case Optim::kRamda: return run_dtype<RamdaUpdate>(t, a, w);
    case Optim::kRmda: return run_dtype<RmdaUpdate>(t, a, w);
    case Optim::kProxAdamW:
      return a.amsgrad ? run_dtype<ProxAdamWUpdate<true>>(t, a, w) : run_dtype<ProxAdamWUpdate<false>>(t, a, w);
    case Optim::kProxSgd: return run_dtype<ProxSgdUpdate>(t, a, w);
  }
}

}  // namespace RAMDA_CPU_ISA
}  // namespace cpu
}  // namespace ramda
