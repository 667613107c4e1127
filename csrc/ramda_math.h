// The update and prox math of docs/math.md sections 1-5, as small inline
// functions shared by the CPU (C++) and CUDA kernels. Everything here is fp32
// math on scalars; loads, stores, tiling and reductions live in the kernel
// bodies (csrc/cpu/kernels_impl.h, csrc/cuda/kernels.cuh).
//
// The expressions follow python/ramda_ref operation by operation (same
// operand order, hyperparameters rounded to fp32 the way torch rounds a
// Python scalar), so the fused paths agree with the reference to a few ulps.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Host copies have internal linkage and are always inlined: the CPU kernels
// are compiled once per instruction set (csrc/cpu/kernels_*.cpp), and an
// out-of-line copy must never be shared between those translation units.
#if defined(__CUDACC__)
#define RAMDA_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define RAMDA_HD static inline __attribute__((always_inline))
#else
#define RAMDA_HD static inline
#endif

namespace ramda {

// Relative change of sigma under which Newton stops: 4 * eps(fp32)
// (ramda_ref.prox.newton_tolerance). Cap: ramda_ref.prox.NEWTON_MAX_ITERS.
constexpr float kNewtonTol = 4.0f * 1.1920928955078125e-07f;
constexpr int kNewtonMaxIters = 50;

// Real cube root of x >= 0, branch and division free so that a loop over it
// vectorizes cheaply (libm's cbrtf does not vectorize). Two Newton steps for
// the reciprocal cube root r = x^(-1/3) from a bit-trick seed (3% -> 1e-6),
// then cbrt = x r^2 and one Newton correction whose residual c^3 - x is
// computed (nearly) exactly: with FMA (RAMDA_CPU_FMA, set by the AVX2/AVX-512
// kernel builds) from the products' rounding errors, else in fp64. Within
// 1 ulp of the true cube root.
RAMDA_HD float cbrt_nonneg(float x) {
#if defined(__CUDA_ARCH__)
  return cbrtf(x);
#else
  const bool tiny = x < 1.0e-30f;  // keep the seed's exponent trick in the normal range
  const float xs = tiny ? x * 0x1p90f : x;
  int32_t i;
  std::memcpy(&i, &xs, sizeof(i));
  i = 0x54a21d2a - static_cast<int32_t>(static_cast<float>(i) * (1.0f / 3.0f));
  float r;
  std::memcpy(&r, &i, sizeof(r));
  const float third = xs * (1.0f / 3.0f);
  r = r * (4.0f / 3.0f - third * (r * r * r));
  r = r * (4.0f / 3.0f - third * (r * r * r));
#if defined(RAMDA_CPU_FMA) && RAMDA_CPU_FMA
  const float c = xs * r * r;
  const float c2 = c * c;
  const float e2 = __builtin_fmaf(c, c, -c2);
  const float c3 = c2 * c;
  const float e3 = __builtin_fmaf(c2, c, -c3);
  const float res = (c3 - xs) + __builtin_fmaf(e2, c, e3);
  float y = c - res * (r * r) * (1.0f / 3.0f);
#else
  const double c = static_cast<double>(xs) * r * r;
  const double rd = r;
  float y = static_cast<float>(c - (c * c * c - xs) * (rd * rd) * (1.0 / 3.0));
#endif
  y = tiny ? y * 0x1p-30f : y;
  return x > 0.0f ? y : 0.0f;
#endif
}

RAMDA_HD float sign_of(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }

// prox of thr*|.|: sign(y) * max(|y| - thr, 0)  (ramda_ref.prox.soft_threshold)
RAMDA_HD float soft_threshold(float y, float thr) {
  const float m = fabsf(y) - thr;
  return sign_of(y) * (m > 0.0f ? m : 0.0f);
}

// Factor that group soft-thresholding applies to a group of norm `norm`:
// max(norm - thr, 0) / norm (1 for a zero group; ramda_ref.prox.group_soft_threshold).
RAMDA_HD float group_shrink(float norm, float thr) {
  const float m = norm - thr;
  return (m > 0.0f ? m : 0.0f) / (norm > 0.0f ? norm : 1.0f);
}

// ---------------------------------------------------------------------------
// Per-element optimizer updates (docs/math.md section 1). Each reads the gradient and
// the state, writes the new state and yields the subproblem's (d, z) or the
// closed-form prox argument y.
// ---------------------------------------------------------------------------

// RAMDA: V += s g; U += s g g; d = cbrt(U) + eps; z = d W0 - V.
// d and z from the updated V, U (what a later pass recomputes from the state
// this step wrote: the same arithmetic, so the same bits).
RAMDA_HD void ramda_dz_of_state(float w0, float v, float u, float eps, float& d, float& z) {
  d = cbrt_nonneg(u) + eps;
  z = d * w0 - v;
}

RAMDA_HD void ramda_dz(float g, float w0, float& v, float& u, float s, float eps,
                       float& d, float& z) {
  v = v + s * g;
  u = u + s * g * g;
  ramda_dz_of_state(w0, v, u, eps, d, z);
}

// RMDA: V += s g; y = W0 - V / beta.
RAMDA_HD float rmda_y(float g, float w0, float& v, float s, float beta) {
  v = v + s * g;
  return w0 - v / beta;
}

// ProxAdamW: m, v moments (amsgrad keeps vmax), d = sqrt(v)/sqrt(1-b2^t) + eps,
// z = d x - (lr/(1-b1^t)) m, with x the decayed parameter.
struct AdamCoeffs {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, bias2_sqrt, eps, step_size;
};

// d and z from the updated m and the second moment in use (vmax with amsgrad, else v).
RAMDA_HD void proxadamw_dz_of_state(float x, float m, float vv, const AdamCoeffs& c, float& d, float& z) {
  d = sqrtf(vv) / c.bias2_sqrt + c.eps;
  z = d * x - c.step_size * m;
}

RAMDA_HD void proxadamw_dz(float g, float x, float& m, float& v, float& vmax, bool amsgrad,
                           const AdamCoeffs& c, float& d, float& z) {
  m = m * c.beta1 + c.one_minus_beta1 * g;
  v = v * c.beta2 + c.one_minus_beta2 * g * g;
  float vv = v;
  if (amsgrad) {
    vmax = vmax > v ? vmax : v;
    vv = vmax;
  }
  proxadamw_dz_of_state(x, m, vv, c, d, z);
}

// ProxSGD: buf = (1-c) buf + c g; y = x - lr buf.
RAMDA_HD float proxsgd_y(float g, float x, float& buf, float keep, float c, float lr) {
  buf = buf * keep + c * g;
  return x - lr * buf;
}

// Momentum by averaging (RAMDA, RMDA): p = (1-c) x + c w.
RAMDA_HD float average(float x, float w, float keep, float c) { return keep * x + c * w; }

// ---------------------------------------------------------------------------
// Exact group lasso (docs/math.md section 4): Newton on
//   phi(sigma) = 1/||z/(d+sigma)|| - sigma/T
// from sigma_hi = T max(d)/(||z|| - T), with the step written without
// cancellation as ramda_ref.prox._newton_step does (NOTE: [secular equation
// without cancellation] there): on the unit-norm group zeta = z/||z|| and
// the relative excess e = (||z|| - T)/||z||, with v = sigma zeta/(d+sigma),
// u = d zeta/(d+sigma),
//   a = sum v^2 d/(d+sigma),  b = sum v^2 sigma/(d+sigma),  c = sum u (zeta + v),
//   f = e - c/(1 + ||v||),    phi/phi' = sigma f ||v|| / (a + f b/||v||).
// A kernel sums newton_terms over the group, then calls newton_update.
// ---------------------------------------------------------------------------

struct NewtonStart {
  bool active;       // ||z|| > T: the group is nonzero
  bool done;         // nothing to iterate (zero group, or constant d: closed form)
  bool warm;         // the next step is the first one from a previous sigma
  float sigma;
  float hi;          // sigma_hi = T max(d)/(||z|| - T), the cold start and every iterate's cap
  float inv_norm;    // 1/||z|| (zeta = z * inv_norm is not used: zeta = z / ||z||)
  float norm;        // ||z|| (1 for an inactive group)
  float rel_excess;  // (||z|| - T)/||z||
};

// `prev`: the group's sigma from the previous step (0: none; docs/math.md
// section 4, item 5): a group that iterates takes its first step from there.
RAMDA_HD NewtonStart newton_start(float znorm, float dmax, float dmin, float thr, float prev = 0.0f) {
  NewtonStart st;
  st.active = znorm > thr;
  const float excess = st.active ? znorm - thr : 1.0f;
  st.hi = thr * dmax / excess;
  st.done = !st.active || dmax == dmin;
  st.warm = !st.done && prev > 0.0f;
  st.sigma = st.warm ? prev : st.hi;
  st.norm = st.active ? znorm : 1.0f;
  st.inv_norm = 1.0f / st.norm;
  st.rel_excess = excess / st.norm;
  return st;
}

// One element's shares of a, b, c at sigma (zeta = z/||z||).
// With e = v^2 (sigma/(d+sigma))^2, the curvature term of a predicted Newton
// error (kernels that stop on it: NOTE: [two-pass plan] in csrc/cuda/kernels.cuh).
RAMDA_HD void newton_terms4(float zeta, float d, float sigma, float& a, float& b, float& c, float& e) {
  // One division and two products instead of the reference's two divisions:
  // each ratio is off by at most one more rounding (no cancellation, both are
  // products of positive numbers), and this sum is the hot loop of the solve.
  // dd is not 1 - sd, which cancels when sigma >> d.
  const float inv = 1.0f / (d + sigma);
  const float sd = sigma * inv, dd = d * inv;
  const float v = zeta * sd, u = zeta * dd;
  const float v2 = v * v;
  a = v2 * dd;
  b = v2 * sd;
  c = u * (zeta + v);
  e = b * sd;
}

RAMDA_HD void newton_terms(float zeta, float d, float sigma, float& a, float& b, float& c) {
  float e;
  newton_terms4(zeta, d, sigma, a, b, c, e);
}

// One Newton step from the group sums; returns the new sigma and sets `done`
// once the step is below kNewtonTol relative or not positive (phi at its
// rounding floor: sigma is the root), as ramda_ref.prox.exact_group_lasso.
RAMDA_HD float newton_update(float sigma, float a, float b, float c, float rel_excess, bool& done) {
  const float vn = sqrtf(a + b);
  const float f = rel_excess - c / (1.0f + vn);
  const float delta = sigma * f * vn / (a + f * b / vn);
  const float next = delta > 0.0f ? sigma - delta : sigma;
  done = !(delta > kNewtonTol * next);
  return next;
}

// The first step from a warm start s0 > 0 (ramda_ref.prox._warm_step), every
// iterate capped at hi (a capped step goes on as the cold solve):
// phi(s0) <= 0 (f >= 0, or NaN): the plain step above; phi(s0) > 0 and
// phi'(s0) < 0 (a + f b/||v|| > 0): the Newton step, which by concavity
// lands right of the root, done when it moved sigma by less than kNewtonTol
// relative; otherwise hi, not done.
RAMDA_HD float newton_warm_update(float s0, float a, float b, float c, float rel_excess, float hi,
                                  bool& done) {
  const float vn = sqrtf(a + b);
  const float f = rel_excess - c / (1.0f + vn);
  const float denom = a + f * b / vn;
  const float delta = s0 * f * vn / denom;
  if (!(f < 0.0f)) {
    const float next = delta > 0.0f ? s0 - delta : s0;
    if (!(next <= hi)) {
      done = false;
      return hi;
    }
    done = !(delta > kNewtonTol * next);
    return next;
  }
  if (denom > 0.0f) {
    const float up = s0 - delta;
    const float next = up < hi ? up : hi;
    done = !(next - s0 > kNewtonTol * next);
    return next;
  }
  done = false;
  return hi;
}

// One Newton step of a group from its sums at st.sigma: the warm step first
// when the group has a previous sigma, the monotone step after that.
RAMDA_HD float newton_advance(NewtonStart& st, float a, float b, float c, bool& done) {
  if (!st.warm) return newton_update(st.sigma, a, b, c, st.rel_excess, done);
  st.warm = false;
  return newton_warm_update(st.sigma, a, b, c, st.rel_excess, st.hi, done);
}

// Predicted-error stop (docs/math.md section 4, item 4): a Newton step of
// relative size at most kPredictMaxStep from s leaves an error of about
// kappa delta^2 / s, kappa = s |phi''| / (2 |phi'|) =
// 1.5 (T/||z||) (||v||^2 e - b^2) / (||v||^3 (a + f b/||v||)), with e the sum
// of newton_terms4's fourth term; under kNewtonTol sigma by kPredictSafety
// the group needs no confirming sweep. The values of the CUDA and Triton
// kernels' rule (NOTE: [two-pass plan] in csrc/cuda/kernels.cuh).
constexpr float kPredictSafety = 4.0f;
constexpr float kPredictMaxStep = 0.125f;

// newton_advance from the sums a, b, c, e at st.sigma, also done when the
// step it took (a Newton step, not a cap at sigma_hi) leaves a predicted
// error under the tolerance above.
RAMDA_HD float newton_advance_predicted(NewtonStart& st, float a, float b, float c, float e, bool& done) {
  const float from = st.sigma;
  const float next = newton_advance(st, a, b, c, done);
  if (done || next == st.hi) return next;
  const float vn = sqrtf(a + b);
  const float f = st.rel_excess - c / (1.0f + vn);
  const float den = a + f * b / vn;
  const float delta = from - next;
  const float curv = fmaxf(vn * vn * e - b * b, 0.0f);
  const float kappa = 1.5f * fmaxf(1.0f - st.rel_excess, 0.0f) * (curv / (vn * vn * vn * den));
  const float err = kappa * delta * delta / from;
  done = den > 0.0f && fabsf(delta) <= from * kPredictMaxStep && err * kPredictSafety <= kNewtonTol * next;
  return next;
}

// The solution of an active group: w = z / (d + sigma).
RAMDA_HD float newton_solution(float z, float d, float sigma) { return z / (d + sigma); }

// ---------------------------------------------------------------------------
// Proximal gradient (docs/math.md section 5), one iteration per element:
//   y = Z - theta (d Z - z)  ->  Z' = prox(y)  ->  s = (1/theta - d)(Z - Z').
// Group lasso needs ||y|| before the prox, so kernels run pg_gradient_point,
// reduce, then apply group_shrink; l1 applies soft_threshold directly.
// ---------------------------------------------------------------------------

RAMDA_HD float pg_gradient_point(float Z, float z, float d, float theta) {
  return Z - theta * (d * Z - z);
}

RAMDA_HD float pg_residual(float Zold, float Znew, float d, float inv_theta) {
  return (inv_theta - d) * (Zold - Znew);
}

}  // namespace ramda
