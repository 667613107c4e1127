// CUDA kernels of the fused step, templated on the parameter type; each
// kernels_<dtype>.cu instantiates one (one instantiation group per
// file). The math is ramda_math.h, shared with the CPU kernels.
//
// NOTE: [CUDA tiling]
// One launch covers every tensor of one dtype in a call; block b runs work
// item b of the cached table (cuda_step.h: BlockItem):
// * elementwise paths (none, l1 exact, tau == 0): a chunk of kElemChunk
//   consecutive storage elements, coalesced;
// * grouped paths on "rows" layouts (inner block reduced: output-wise
//   Linear, heads; group lasso exact / PG, whole-tensor l1 PG, RMDA/ProxSGD
//   group shrink): one block per group, neighbouring threads on
//   neighbouring addresses. The exact solve keeps nothing in scratch: rows
//   of up to kCached * kThreads elements hold z, d in registers (NOTE:
//   [Register rows]), longer ones follow NOTE: [two-pass plan]. PG and the
//   shrink have pass 1 write z and d (or y) for the group to an fp32
//   scratch laid out group by group (allocated once per plan, only the slots
//   the path uses: plan.h), which PG's iterations re-read. The solver
//   reduces over the block (warp shuffles, then shared memory); the last
//   pass writes the parameter. Element offsets are decoded from the
//   canonical layout (NOTE: [Group layout], NOTE: [32-bit offsets]), so any
//   dims and strides are read in place;
// * group lasso on "columns" layouts (inner block kept: input-wise Linear,
//   channels-last channel-wise Conv): a column tile of 32 adjacent groups
//   per block, lane = group (NOTE: [Column tiles]), so a warp's accesses are
//   neighbouring addresses there too: the exact solve, the RMDA/ProxSGD
//   shrink (NOTE: [Shrink tiles], no scratch) and PG (NOTE: [PG column
//   tiles], its scratch laid out [element][lane] per tile). On rows layouts
//   of short runs (NCHW channel-wise Conv: runs of kh kw elements) the exact
//   solve and the shrink take a run tile of adjacent groups, read row by row
//   at consecutive addresses (NOTE: [Run tiles]); PG there still takes one
//   group per block (2-3 sectors per run).
// The exact solve is warm-started from the previous sigma (NOTE: [Warm start]).
//
// NOTE: [two-pass plan]
// The exact solve, rows and column tiles alike, in the passes of the Triton
// kernel's plan (NOTE: [two-pass plan] in ramda_kernels/triton_kernels/step.py):
// * pass 1 reads the gradient, the old state (and the parameter where z
//   needs it), writes the new state, and gathers per group max d, min d and
//   the moments of NOTE: [Moment model] at the warm-start sigma, whose
//   series model may end the solve here;
// * each Newton pass, run only while a group of the block is not done,
//   recomputes z and d from the state pass 1 wrote (element_dz: the same
//   arithmetic, so the same bits) instead of storing them: RAMDA reads
//   W0, V, U (12 B), ProxAdamW the parameter, m and its second moment;
// * the last pass recomputes z, d again and writes the parameter.
// RAMDA fp32: 24 + 20 + 12 k B per element for k Newton passes (ProxAdamW
// 24 + 16 + 12 k). A step read from memory (the warm step too) ends the solve
// when its predicted error kappa delta^2 / s is under kNewtonTol sigma by
// kPredictSafety (predicted_done, as the Triton kernel; docs/math.md
// section 4, item 4), so a warm start on slowly changing z, d is k = 0.
// Nothing is read back to the host: every loop bound is a block-uniform
// value computed on the device. The block reads its TensorArgs (384 bytes)
// in place through a const reference into the table, never as a per-thread
// copy (which would live in local memory).
// The same bodies run on CPU threads in the tests (NOTE: [CUDA on CPU] in
// csrc/tests/cuda_host/cuda_runtime.h); only the launch differs.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include "../ramda_args.h"
#include "../ramda_math.h"
#include "cuda_step.h"

namespace ramda {
namespace cuda {

constexpr int kThreads = 256;

// Predicted-error stop (NOTE: [two-pass plan]): safety factor on the
// predicted error, and the largest relative step whose prediction is trusted.
constexpr float kPredictSafety = 4.0f;
constexpr float kPredictMaxStep = 0.125f;

// NOTE: [Global accesses]
// Every global load and store of a kernel goes through gload / gstore: plain
// accesses under nvcc, counted by the CUDA-on-CPU stand-in (NOTE: [Counted
// global memory] in csrc/tests/cuda_host/cuda_runtime.h), which is how the
// tests and bench/cuda_traffic.py measure the traffic of these kernels.
#ifdef __CUDACC__
template <typename T>
__device__ __forceinline__ T gload(const T* p) {
  return *p;
}
template <typename T>
__device__ __forceinline__ void gstore(T* p, T v) {
  *p = v;
}
// The end of one round of a loop whose lanes may skip rounds (counted by the stand-in).
__device__ __forceinline__ void meter_round() {}
#endif

// The per-step thresholds of one tensor: fill_thresholds' values (ramda_args.h),
// computed per block so that the cached table does not change between steps.
struct Thresholds {
  float thr;
  float pg_tol;
};

__device__ __forceinline__ Thresholds thresholds(const TensorArgs& t, const StepArgs& a) {
  const double T = a.reg == Reg::kGroupLasso ? a.thr_base * t.cg : a.thr_base;
  return {static_cast<float>(T), static_cast<float>(a.eps_t * t.tol_scale)};
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_min(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reduction of up to three values (op per value: 0 sum, 1 max,
// 2 min); every thread gets the results.
template <int N>
__device__ __forceinline__ void block_reduce(float (&v)[N], const int (&op)[N]) {
  __shared__ float part[N][kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    v[k] = op[k] == 0 ? warp_sum(v[k]) : (op[k] == 1 ? warp_max(v[k]) : warp_min(v[k]));
    if (lane == 0) part[k][warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    float x = lane < kThreads / 32 ? part[k][lane] : (op[k] == 0 ? 0.0f : (op[k] == 1 ? -INFINITY : INFINITY));
    v[k] = op[k] == 0 ? warp_sum(x) : (op[k] == 1 ? warp_max(x) : warp_min(x));
  }
  __syncthreads();  // part[] is reused by the next reduction
}

template <typename P>
__device__ __forceinline__ float load(const void* base, int64_t i) {
  return static_cast<float>(gload(static_cast<const P*>(base) + i));
}

// The initial point W0 of element o (RAMDA, RMDA: TensorArgs::w0, kept in the
// parameter's type P): every read of it goes through here.
template <typename P>
__device__ __forceinline__ float load_w0(const TensorArgs& t, int64_t o) { return load<P>(t.w0, o); }

// Pass 1 for one element at storage offset o: update the state, return the
// subproblem data (z, d) for RAMDA/ProxAdamW or y (in z) for RMDA/ProxSGD.
template <typename P>
__device__ __forceinline__ void element_pass1(const TensorArgs& t, const StepArgs& a, int64_t o,
                                              float& z, float& d) {
  const float g = load<P>(t.grad, o);
  switch (a.optim) {
    case Optim::kRamda: {
      float v = gload(t.s1 + o), u = gload(t.s2 + o);
      ramda_dz(g, load_w0<P>(t, o), v, u, a.s, a.eps, d, z);
      gstore(t.s1 + o, v);
      gstore(t.s2 + o, u);
      break;
    }
    case Optim::kRmda: {
      float v = gload(t.s1 + o);
      z = rmda_y(g, load_w0<P>(t, o), v, a.s, a.beta);
      gstore(t.s1 + o, v);
      d = 1.0f;
      break;
    }
    case Optim::kProxAdamW: {
      float m = gload(t.s0 + o), v = gload(t.s1 + o), vmax = a.amsgrad ? gload(t.s2 + o) : 0.0f;
      const float x = load<P>(t.param, o) * a.decay;
      proxadamw_dz(g, x, m, v, vmax, a.amsgrad, a.adam, d, z);
      gstore(t.s0 + o, m);
      gstore(t.s1 + o, v);
      if (a.amsgrad) gstore(t.s2 + o, vmax);
      break;
    }
    case Optim::kProxSgd: {
      float buf = gload(t.s0 + o);
      z = proxsgd_y(g, load<P>(t.param, o), buf, a.keep, a.c, a.lr);
      gstore(t.s0 + o, buf);
      d = 1.0f;
      break;
    }
  }
}

// z, d of element o for RAMDA / ProxAdamW, recomputed from the state pass 1
// wrote this step (NOTE: [two-pass plan]); the parameter is not written
// before the last pass.
template <typename P>
__device__ __forceinline__ void element_dz(const TensorArgs& t, const StepArgs& a, int64_t o, float& z, float& d) {
  if (a.optim == Optim::kRamda) {
    ramda_dz_of_state(load_w0<P>(t, o), gload(t.s1 + o), gload(t.s2 + o), a.eps, d, z);
  } else {
    const float x = load<P>(t.param, o) * a.decay;
    proxadamw_dz_of_state(x, gload(t.s0 + o), gload((a.amsgrad ? t.s2 : t.s1) + o), a.adam, d, z);
  }
}

// y of element o for RMDA / ProxSGD, recomputed from the state pass 1 wrote
// this step (NOTE: [Shrink tiles]): rmda_y's and proxsgd_y's last line on
// the new V / buf, the same arithmetic, so the same bits; the parameter is
// not written before the last pass.
template <typename P>
__device__ __forceinline__ float element_y(const TensorArgs& t, const StepArgs& a, int64_t o) {
  if (a.optim == Optim::kRmda) return load_w0<P>(t, o) - gload(t.s1 + o) / a.beta;
  return load<P>(t.param, o) - a.lr * gload(t.s0 + o);
}

// The point the parameter moves from: x (RAMDA/RMDA averaging, PG warm start).
template <typename P>
__device__ __forceinline__ float current_x(const TensorArgs& t, const StepArgs& a, int64_t o) {
  const float p = load<P>(t.param, o);
  return a.optim == Optim::kProxAdamW ? p * a.decay : p;
}

template <typename P>
__device__ __forceinline__ void write_param(const TensorArgs& t, const StepArgs& a, int64_t o, float w) {
  float out = w;
  if (a.optim == Optim::kRamda || a.optim == Optim::kRmda)
    out = average(load<P>(t.param, o), w, a.keep, a.c);
  gstore(static_cast<P*>(t.param) + o, static_cast<P>(out));
}

template <typename P>
__device__ void elementwise_block(const TensorArgs& t, const StepArgs& a, float thr, int64_t begin,
                                  int64_t end) {
  const bool dual = a.optim == Optim::kRamda || a.optim == Optim::kProxAdamW;
  const bool l1 = a.reg == Reg::kL1 && thr != 0.0f;
  for (int64_t o = begin + threadIdx.x; o < end; o += blockDim.x) {
    float z, d;
    element_pass1<P>(t, a, o, z, d);
    const float y = l1 ? soft_threshold(z, thr) : z;
    write_param<P>(t, a, o, dual ? y / d : y);
  }
}

// NOTE: [32-bit offsets]
// A tensor of fewer than 2^31 elements decodes its offsets in 32-bit math
// (64-bit division and remainder are emulated on the device, dozens of
// instructions each): its storage is dense (numel is its extent), so every
// offset and every term of one is below numel. Larger tensors take the
// 64-bit block_offset, out of line so that its registers do not weigh on
// the common path. The branch is uniform over the block.
#ifdef __CUDACC__
#define RAMDA_NOINLINE __noinline__
#else
#define RAMDA_NOINLINE __attribute__((noinline))
#endif
static __device__ RAMDA_NOINLINE int64_t decode_offset64(int64_t idx, int32_t n, const int64_t* size, const int64_t* stride) {
  return block_offset(idx, n, size, stride);
}
__device__ __forceinline__ int64_t decode_offset(const TensorArgs& t, int64_t idx, int32_t n, const int64_t* size,
                                                 const int64_t* stride) {
  if (t.numel > INT32_MAX) return decode_offset64(idx, n, size, stride);
  uint32_t i = static_cast<uint32_t>(idx), off = 0;
  for (int32_t b = n - 1; b >= 0; --b) {
    const uint32_t s = static_cast<uint32_t>(size[b]);
    off += (i % s) * static_cast<uint32_t>(stride[b]);
    i /= s;
  }
  return off;
}

// Storage offset of element e of a group, from the group's base offset.
__device__ __forceinline__ int64_t element_offset(const TensorArgs& t, int64_t e) {
  return decode_offset(t, e, t.layout.n_red, t.layout.red_size, t.layout.red_stride);
}

// Storage offset of group g's first element.
__device__ __forceinline__ int64_t group_base(const TensorArgs& t, int64_t g) {
  return decode_offset(t, g, t.layout.n_kept, t.layout.kept_size, t.layout.kept_stride);
}

// The four Newton sums a, b, c, e (newton_terms4) of one element, added to r.
__device__ __forceinline__ void add_newton_terms(float* r, float zeta, float d, float sigma) {
  float ta, tb, tc, te;
  newton_terms4(zeta, d, sigma, ta, tb, tc, te);
  r[0] += ta;
  r[1] += tb;
  r[2] += tc;
  r[3] += te;
}

// Pass 1's group sums: sum z^2, max d, min d, then the Newton sums at the
// previous sigma s0 when there is one (NOTE: [Warm start]).
constexpr int kPass1Sums = 7;
__device__ __forceinline__ void add_pass1(float (&acc)[kPass1Sums], float z, float d, float s0) {
  acc[0] += z * z;
  acc[1] = fmaxf(acc[1], d);
  acc[2] = fminf(acc[2], d);
  if (s0 > 0.0f) add_newton_terms(acc + 3, z, d, s0);
}

// The Newton step's parts at s from the unit-norm sums a, b, c:
// phi has the sign of -f, phi' the sign of -den, delta = phi / phi'.
struct NewtonEval {
  float vn, f, den, delta;
};
__device__ __forceinline__ NewtonEval newton_eval(float s, float a, float b, float c, float rel_excess) {
  NewtonEval n;
  n.vn = sqrtf(a + b);
  n.f = rel_excess - c / (1.0f + n.vn);
  n.den = a + n.f * b / n.vn;
  n.delta = s * n.f * n.vn / n.den;
  return n;
}

// Whether the Newton step n.delta from s_from to sigma leaves a predicted
// error kappa delta^2 / s_from, kappa = s |phi''| / (2 |phi'|) =
// 1.5 (T/||z||) (||v||^2 e - b^2) / (||v||^3 den) at s_from, under
// kNewtonTol sigma by kPredictSafety, for a step of at most kPredictMaxStep
// s_from (NOTE: [two-pass plan]; docs/math.md section 4, item 4).
__device__ __forceinline__ bool predicted_done(const NewtonEval& n, float b, float e, float rel_excess,
                                               float s_from, float sigma) {
  const float curv = fmaxf(n.vn * n.vn * e - b * b, 0.0f);
  const float kappa = 1.5f * fmaxf(1.0f - rel_excess, 0.0f) * (curv / (n.vn * n.vn * n.vn * n.den));
  const float err = kappa * n.delta * n.delta / s_from;
  return fabsf(n.delta) <= s_from * kPredictMaxStep && n.den > 0.0f &&
         err * kPredictSafety <= kNewtonTol * sigma;
}

// One Newton step of a pass over memory from the unit-norm sums r = a, b, c, e at
// sigma: the usual step and stopping rule (newton_update), or done on the predicted error.
__device__ __forceinline__ float newton_pass_step(float sigma, const float (&r)[4], float rel_excess, bool& done) {
  const float next = newton_update(sigma, r[0], r[1], r[2], rel_excess, done);
  if (!done) done = predicted_done(newton_eval(sigma, r[0], r[1], r[2], rel_excess), r[1], r[3], rel_excess,
                                   sigma, next);
  return next;
}

// A Newton pass's share of element o (NOTE: [two-pass plan]): z, d
// recomputed from the new state, the four sums at sigma added to r.
template <typename P>
__device__ __forceinline__ void add_newton_terms_at(float (&r)[4], const TensorArgs& t, const StepArgs& a, int64_t o,
                                                    float norm, float sigma) {
  float z, d;
  element_dz<P>(t, a, o, z, d);
  add_newton_terms(r, z / norm, d, sigma);
}

// The last pass of the exact solve for element o: w = z / (d + sigma) from
// the recomputed z, d, or 0 in a zero group.
template <typename P>
__device__ __forceinline__ void write_exact(const TensorArgs& t, const StepArgs& a, int64_t o, bool active,
                                            float sigma) {
  float w = 0.0f;
  if (active) {
    float z, d;
    element_dz<P>(t, a, o, z, d);
    w = newton_solution(z, d, sigma);
  }
  meter_round();  // the lanes of zero groups skipped the state reads
  write_param<P>(t, a, o, w);
}

// NOTE: [Warm start] (docs/math.md section 4, item 5). Pass 1 also sums
// newton_terms at the previous sigma s0 (register rows; the moments of NOTE:
// [Moment model] give the same sums elsewhere) (on the raw z: every term is
// quadratic in zeta, so the sums over z divided by ||z||^2 are the sums over
// zeta). With f and the denominator of newton_update, phi(s0) = -K f and
// phi'(s0) = -K' den for positive K, K': f >= 0 is right of the root (Newton
// from s0, monotone as from sigma_hi); f < 0 with den > 0 is left of it with
// phi' < 0, and by concavity one Newton step lands at or right of the root;
// anything else (s0 >= sigma_hi, den <= 0, NaN, no s0) starts at sigma_hi.
// Every start is clamped to <= sigma_hi (right of the root too), and `done`
// follows the usual rule (the step from s0 was below kNewtonTol relative) or
// the predicted error (NOTE: [two-pass plan]).
__device__ __forceinline__ float warm_start_at(float s0, float a, float b, float c, float e, const NewtonStart& st,
                                               bool& done) {
  done = false;
  // Beyond sigma_hi the step from s0 would cancel (s0 - delta with delta ~ s0):
  // start at sigma_hi, as the rule's clamp allows.
  if (!(s0 > 0.0f) || !(s0 < st.sigma)) return st.sigma;
  const NewtonEval n = newton_eval(s0, a, b, c, st.rel_excess);
  if (!(n.f >= 0.0f || n.den > 0.0f)) return st.sigma;  // (f >= 0 implies den > 0)
  const float next = s0 - n.delta;  // delta >= 0 right of the root, < 0 left of it
  if (!(next <= st.sigma)) return st.sigma;
  done = !(fabsf(n.delta) > kNewtonTol * next) || predicted_done(n, b, e, st.rel_excess, s0, next);
  return next;
}
__device__ __forceinline__ float warm_start(float s0, const float (&acc)[kPass1Sums], const NewtonStart& st,
                                            bool& done) {
  return warm_start_at(s0, acc[3] / acc[0], acc[4] / acc[0], acc[5] / acc[0], acc[6] / acc[0], st, done);
}

// NOTE: [Moment model]
// Pass 1 of a solve read from memory (column tiles, rows past the register
// rows) gathers, with max d, min d, the moments at the previous sigma s0
//   A_k = sum z^2 sd^k (k <= K + 4),  B_k = sum z^2 dd sd^k (k <= K + 3),
// sd = s0 / (d + s0), dd = d / (d + s0), both in [0, 1], K = kModelTerms
// (A_0 = sum z^2). With tau = sigma / s0 - 1, 1 / (d + sigma) = x0 / (1 +
// tau sd) (x0 = 1 / (d + s0)), so every Newton sum at any sigma is a power
// series in tau over the moments (model_sums; S(M, j) = sum_{k <= K}
// C(j + k - 1, k) (-tau)^k M_k):
//   a = (1 + tau)^2 S(B_2.., 3),  b = (1 + tau)^3 S(A_3.., 3),
//   c = S(B_0.., 1) + (1 + tau) S(B_1.., 2),  e = (1 + tau)^4 S(A_4.., 4),
// divided by A_0; at tau = 0 these are newton_terms4's sums. Newton runs on
// the model, reading no memory, from the exact warm step at s0 (warm_start_at)
// to the usual stop. The series' terms shrink at least by rho (J + k) /
// (k + 1), rho = |tau| s0 / (min d + s0) (M_(k+1) <= M_k s0 / (min d + s0)),
// so each sum's truncation error is bounded by its first omitted term
// (series_tail, from the moments one past the series); model_error turns
// those into a bound on the root's relative error, and the model's root is
// taken when that is under kNewtonTol by kPredictSafety (docs/math.md
// section 4, item 4). Otherwise the solve goes on from memory from the warm
// step (NOTE: [two-pass plan]). So a group whose sigma moves by about a
// tenth per step (tests/test_cuda_on_cpu.py) ends in two passes; at 40-70%
// (the fifth step of bench/cuda_traffic.py) it does not.
constexpr int kModelTerms = 12;
constexpr int kMomA = kModelTerms + 5, kMomB = kModelTerms + 4;
constexpr int kMomIdxA = 2, kMomIdxB = 2 + kMomA;
constexpr int kMomSums = 2 + kMomA + kMomB;  // max d, min d, A_k, B_k

__device__ __forceinline__ void init_moments(float (&m)[kMomSums], int (&op)[kMomSums]) {
#pragma unroll
  for (int k = 0; k < kMomSums; ++k) {
    m[k] = k == 0 ? -INFINITY : (k == 1 ? INFINITY : 0.0f);
    op[k] = k == 0 ? 1 : (k == 1 ? 2 : 0);
  }
}

__device__ __forceinline__ void add_moments(float (&m)[kMomSums], float z, float d, float s0) {
  m[0] = fmaxf(m[0], d);
  m[1] = fminf(m[1], d);
  float p = z * z;
  if (!(s0 > 0.0f)) {  // no warm start: sum z^2 only
    m[kMomIdxA] += p;
    return;
  }
  const float inv = 1.0f / (d + s0);
  const float sd = s0 * inv, dd = d * inv;
#pragma unroll
  for (int k = 0; k < kMomA; ++k) {
    m[kMomIdxA + k] += p;
    if (k < kMomB) m[kMomIdxB + k] += p * dd;
    p *= sd;
  }
}

// S(M_first.., j) at mt = -tau: the first kModelTerms + 1 terms.
template <int First, int J>
__device__ __forceinline__ float moment_series(const float (&m)[kMomSums], float mt) {
  float sum = 0.0f, pw = 1.0f, coef = 1.0f;  // coef = C(J + k - 1, k)
#pragma unroll
  for (int k = 0; k <= kModelTerms; ++k) {
    sum += coef * pw * m[First + k];
    pw *= mt;
    coef = coef * static_cast<float>(J + k) / static_cast<float>(k + 1);
  }
  return sum;
}

// The unit-norm Newton sums a, b, c, e at sigma = s0 (1 + tau) from the moments.
__device__ __forceinline__ void model_sums(const float (&m)[kMomSums], float tau, float (&r)[4]) {
  const float inv0 = 1.0f / m[kMomIdxA], t1 = 1.0f + tau, mt = -tau;
  r[0] = t1 * t1 * moment_series<kMomIdxB + 2, 3>(m, mt) * inv0;
  r[1] = t1 * t1 * t1 * moment_series<kMomIdxA + 3, 3>(m, mt) * inv0;
  r[2] = (moment_series<kMomIdxB, 1>(m, mt) + t1 * moment_series<kMomIdxB + 1, 2>(m, mt)) * inv0;
  r[3] = t1 * t1 * t1 * t1 * moment_series<kMomIdxA + 4, 4>(m, mt) * inv0;
}

// The truncation error of S(M_first.., J) at tau: the first omitted term
// C(J + K, K + 1) |tau|^(K + 1) M_(first + K + 1) over 1 - rho (J + K + 1) /
// (K + 2), a bound on the ratio of the later terms (M_(k+1) <= M_k s0 /
// (min d + s0)); infinite where that ratio is not below 1.
template <int First, int J>
__device__ __forceinline__ float series_tail(const float (&m)[kMomSums], float tau, float rho_max) {
  const float at = fabsf(tau);
  const float ratio = at * rho_max * static_cast<float>(J + kModelTerms + 1) / static_cast<float>(kModelTerms + 2);
  if (!(ratio < 1.0f)) return INFINITY;
  float coef = 1.0f, pw = 1.0f;  // C(J + k - 1, k) up to k = K + 1, |tau|^(K + 1)
#pragma unroll
  for (int k = 0; k <= kModelTerms; ++k) {
    coef = coef * static_cast<float>(J + k) / static_cast<float>(k + 1);
    pw *= at;
  }
  return coef * pw * m[First + kModelTerms + 1] / (1.0f - ratio);
}

// The root's relative error from truncating model_sums at tau (r: the sums
// there, n: the step from them): with the sums' errors da, db, dc (over
// A_0), f is off by at most dc + c (da + db) / (2 ||v||) and the root by
// that times ||v|| / den (NOTE: [Moment model]).
__device__ __forceinline__ float model_error(const float (&m)[kMomSums], float tau, float rho_max,
                                             const float (&r)[4], const NewtonEval& n) {
  const float inv0 = 1.0f / m[kMomIdxA], t1 = 1.0f + fabsf(tau);
  const float da = t1 * t1 * series_tail<kMomIdxB + 2, 3>(m, tau, rho_max) * inv0;
  const float db = t1 * t1 * t1 * series_tail<kMomIdxA + 3, 3>(m, tau, rho_max) * inv0;
  const float dc = (series_tail<kMomIdxB, 1>(m, tau, rho_max) + t1 * series_tail<kMomIdxB + 1, 2>(m, tau, rho_max)) * inv0;
  return (dc + r[2] * (da + db) / (2.0f * n.vn)) * n.vn / n.den;
}

// The exact solve's start from pass 1's moments (NOTE: [Moment model]):
// the model's root with done = true when its error bound allows, else the
// warm step at s0 (warm_start_at), done as its own rule says.
__device__ __forceinline__ float model_solve(const float (&m)[kMomSums], float s0, const NewtonStart& st,
                                             bool& done) {
  float r[4];
  model_sums(m, 0.0f, r);
  const float warm = warm_start_at(s0, r[0], r[1], r[2], r[3], st, done);
  if (done || !(s0 > 0.0f)) return warm;
  const float rho_max = s0 / (m[1] + s0);
  float sigma = warm;
  bool mdone = false;
  for (int it = 1; it < kNewtonMaxIters && !mdone; ++it) {
    model_sums(m, sigma / s0 - 1.0f, r);
    sigma = newton_update(sigma, r[0], r[1], r[2], st.rel_excess, mdone);
  }
  const float tau = sigma / s0 - 1.0f;
  model_sums(m, tau, r);
  const NewtonEval n = newton_eval(sigma, r[0], r[1], r[2], st.rel_excess);
  const float err = model_error(m, tau, rho_max, r, n);
  if (mdone && n.den > 0.0f && err * kPredictSafety <= kNewtonTol && sigma <= st.hi) {
    done = true;
    return sigma;
  }
  return warm;
}

// NOTE: [Register rows]
// A rows group of at most kCached * blockDim.x elements (exact solve) keeps
// its z and d in registers: thread i holds elements i + j * blockDim.x,
// j < kCached (unrolled, so the arrays are registers). Pass 1 is the only read
// and the last pass writes the parameter from them, whatever the number of
// Newton steps: RAMDA fp32 32 B per element, the floor. The steps keep the
// reference's stopping rule (they cost no memory).
constexpr int kCached = 16;

// The exact solve of a block whose z, d sit in registers (kCached per thread,
// n of them valid): from the warm start at s0 to the reference's stop, every
// Newton step reduced over the block (it costs no memory).
__device__ __forceinline__ float register_newton(const float (&zr)[kCached], const float (&dr)[kCached], int64_t n,
                                                 const NewtonStart& st, float s0,
                                                 const float (&acc)[kPass1Sums]) {
  float sigma = st.sigma;
  bool done = st.done;
  if (!done) sigma = warm_start(s0, acc, st, done);
  const int sum3[3] = {0, 0, 0};
  for (int it = 0; it < kNewtonMaxIters && !done; ++it) {
    float r[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < kCached; ++j)
      if (threadIdx.x + static_cast<int64_t>(j) * blockDim.x < n) add_newton_terms(r, zr[j] / st.norm, dr[j], sigma);
    float s3[3] = {r[0], r[1], r[2]};
    block_reduce<3>(s3, sum3);
    sigma = newton_update(sigma, s3[0], s3[1], s3[2], st.rel_excess, done);
  }
  return sigma;
}

template <typename P>
__device__ void cached_rows_block(const TensorArgs& t, const StepArgs& a, float thr, int64_t g, int64_t base,
                                  float s0) {
  const int64_t n = t.layout.group_size;
  float zr[kCached], dr[kCached];
  float acc[kPass1Sums] = {0.0f, -INFINITY, INFINITY, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int j = 0; j < kCached; ++j) {
    const int64_t e = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
    zr[j] = 0.0f;
    dr[j] = 1.0f;
    if (e < n) {
      element_pass1<P>(t, a, base + element_offset(t, e), zr[j], dr[j]);
      add_pass1(acc, zr[j], dr[j], s0);
    }
  }
  const int ops[kPass1Sums] = {0, 1, 2, 0, 0, 0, 0};
  block_reduce<kPass1Sums>(acc, ops);
  const NewtonStart st = newton_start(sqrtf(acc[0]), acc[1], acc[2], thr);
  const float sigma = register_newton(zr, dr, n, st, s0, acc);
#pragma unroll
  for (int j = 0; j < kCached; ++j) {
    const int64_t e = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
    if (e < n)
      write_param<P>(t, a, base + element_offset(t, e), st.active ? newton_solution(zr[j], dr[j], sigma) : 0.0f);
  }
  // A zero group keeps its previous sigma.
  if (t.sigma != nullptr && st.active && threadIdx.x == 0) gstore(t.sigma + g, sigma);
}

// Pass 1 of the exact solve over elements first, first + step, ... of the
// group at base: the state update and this thread's share of the moments.
template <typename P>
__device__ __forceinline__ void pass1_moments(const TensorArgs& t, const StepArgs& a, int64_t base, int64_t first,
                                              int64_t step, float s0, float (&m)[kMomSums], int (&ops)[kMomSums]) {
  init_moments(m, ops);
  for (int64_t e = first; e < t.layout.group_size; e += step) {
    float z, d;
    element_pass1<P>(t, a, base + element_offset(t, e), z, d);
    add_moments(m, z, d, s0);
  }
}

// The exact solve of one rows group past the register rows (NOTE: [two-pass
// plan], NOTE: [Moment model]), docs/math.md section 4.
template <typename P>
__device__ void exact_rows_block(const TensorArgs& t, const StepArgs& a, float thr, int64_t g, int64_t base,
                                 float s0) {
  const int64_t n = t.layout.group_size;
  float m[kMomSums];
  int ops[kMomSums];
  pass1_moments<P>(t, a, base, threadIdx.x, blockDim.x, s0, m, ops);
  block_reduce<kMomSums>(m, ops);
  const NewtonStart st = newton_start(sqrtf(m[kMomIdxA]), m[0], m[1], thr);
  float sigma = st.sigma;
  bool done = st.done;
  if (!done) sigma = model_solve(m, s0, st, done);
  const int sum4[4] = {0, 0, 0, 0};
  for (int it = 0; it < kNewtonMaxIters && !done; ++it) {
    float r[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t e = threadIdx.x; e < n; e += blockDim.x)
      add_newton_terms_at<P>(r, t, a, base + element_offset(t, e), st.norm, sigma);
    block_reduce<4>(r, sum4);
    sigma = newton_pass_step(sigma, r, st.rel_excess, done);
  }
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) write_exact<P>(t, a, base + element_offset(t, e), st.active, sigma);
  // A zero group keeps its previous sigma.
  if (t.sigma != nullptr && st.active && threadIdx.x == 0) gstore(t.sigma + g, sigma);
}

template <typename P>
__device__ RAMDA_NOINLINE void scratch_rows_block(const TensorArgs& t, const StepArgs& a, Thresholds th, int64_t g,
                                                  int64_t base, float* scratch);

template <typename P>
__device__ void group_block(const TensorArgs& t, const StepArgs& a, Thresholds th, int64_t g,
                            float* scratch) {
  const GroupLayout& L = t.layout;
  const int64_t n = L.group_size;
  const int64_t base = group_base(t, g);
  const bool dual = a.optim == Optim::kRamda || a.optim == Optim::kProxAdamW;
  const bool pg = dual && a.solver == Solver::kPg;
  const bool exact = dual && !pg;  // no scratch (NOTE: [two-pass plan]): exact_rows_block
  // The previous sigma (NOTE: [Warm start]): one lane per warp reads it.
  float s0 = 0.0f;
  if (exact && t.sigma != nullptr) s0 = warp_sum((threadIdx.x & 31) == 0 ? gload(t.sigma + g) : 0.0f);
  if (exact && n <= kCached * static_cast<int64_t>(blockDim.x)) return cached_rows_block<P>(t, a, th.thr, g, base, s0);
  if (exact) return exact_rows_block<P>(t, a, th.thr, g, base, s0);
  scratch_rows_block<P>(t, a, th, g, base, scratch);
}

// PG and the RMDA / ProxSGD shrink of one rows group, through the scratch;
// out of line (as decode_offset64), so that its registers do not weigh on
// the other paths of the kernel.
template <typename P>
__device__ RAMDA_NOINLINE void scratch_rows_block(const TensorArgs& t, const StepArgs& a, Thresholds th, int64_t g,
                                                  int64_t base, float* scratch) {
  const int64_t n = t.layout.group_size;
  const bool dual = a.optim == Optim::kRamda || a.optim == Optim::kProxAdamW;
  const bool pg = dual && a.solver == Solver::kPg;
  const bool l1 = a.reg == Reg::kL1;  // whole-tensor PG
  // Slots as plan.h allots them: y only (RMDA/ProxSGD), z, d and Z (PG).
  float* zs = scratch + t.scratch + g * n;  // z (PG) or y (RMDA/ProxSGD)
  float* ds = zs + (pg ? t.numel : 0);      // d
  float* Zs = zs + (pg ? 2 * t.numel : 0);  // PG iterate

  // PG and the RMDA/ProxSGD shrink: sum z^2, max d
  float acc[2] = {0.0f, -INFINITY};
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
    float z, d;
    element_pass1<P>(t, a, base + element_offset(t, e), z, d);
    gstore(zs + e, z);
    if (pg) gstore(ds + e, d);
    acc[0] += z * z;
    acc[1] = fmaxf(acc[1], d);
  }
  const int ops[2] = {0, 1};
  block_reduce<2>(acc, ops);
  const float znorm = sqrtf(acc[0]), dmax = acc[1];
  const float thr = th.thr;

  if (!dual) {  // RMDA / ProxSGD: group soft-threshold of y
    const float scale = group_shrink(znorm, thr);
    for (int64_t e = threadIdx.x; e < n; e += blockDim.x)
      write_param<P>(t, a, base + element_offset(t, e), gload(zs + e) * scale);
    return;
  }
  // Proximal gradient (docs/math.md section 5), warm started at x; screened groups are zero.
  if (!l1 && znorm <= thr) {
    for (int64_t e = threadIdx.x; e < n; e += blockDim.x)
      write_param<P>(t, a, base + element_offset(t, e), 0.0f);
    return;
  }
  // NOTE: [One sweep per PG iteration]
  // Group lasso's shrink of Z_(j+1) needs ||y|| over the group at Z_j; the
  // sweep that writes Z_(j+1) also sums y at it (the same arithmetic as a
  // sweep over the stored Z_(j+1), so the same bits), and the sweep that
  // writes Z_0 = x sums it at Z_0: every iteration reads Z, z, d once and
  // writes Z (16 B per element), not twice (28 B).
  const float theta = 1.0f / dmax, inv_theta = 1.0f / theta, pthr = theta * thr;
  float y2[1] = {0.0f};
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
    const float x = current_x<P>(t, a, base + element_offset(t, e));
    gstore(Zs + e, x);
    if (l1) continue;
    const float y = pg_gradient_point(x, gload(zs + e), gload(ds + e), theta);
    y2[0] += y * y;
  }
  const int sum1[1] = {0}, sum2[2] = {0, 0};
  if (!l1) block_reduce<1>(y2, sum1);
  for (int it = 0; it < a.max_iters; ++it) {
    const float scale = l1 ? 1.0f : group_shrink(sqrtf(y2[0]), pthr);
    float r[2] = {0.0f, 0.0f};  // ||s||^2, ||y||^2 at the new iterate
    for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
      const float Z = gload(Zs + e), z = gload(zs + e), dd = gload(ds + e);
      const float y = pg_gradient_point(Z, z, dd, theta);
      const float zn = l1 ? soft_threshold(y, pthr) : y * scale;
      const float s = pg_residual(Z, zn, dd, inv_theta);
      r[0] += s * s;
      gstore(Zs + e, zn);
      if (l1) continue;
      const float yn = pg_gradient_point(zn, z, dd, theta);
      r[1] += yn * yn;
    }
    block_reduce<2>(r, sum2);
    if (!(sqrtf(r[0]) > th.pg_tol)) break;
    y2[0] = r[1];
  }
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x)
    write_param<P>(t, a, base + element_offset(t, e), gload(Zs + e));
}

// The shared memory of the tiles: tile_reduce's partial sums, and between
// reductions the run tiles' row buffers (NOTE: [Run tiles]); one buffer, so
// that the kernel stays under the 48 KB of static shared memory.
constexpr int kRunSlots = kRunRow / 32;
constexpr int kTilePool = kMomSums * kThreads;
static_assert(2 * kRunRow * (kThreads / 32) <= kTilePool, "run rows must fit in the tile pool");
__device__ __forceinline__ float* tile_pool() {
  __shared__ float pool[kTilePool];
  return pool;
}

// Per-lane reduction over the warps of a block (tiles: lane l of every warp
// holds a share of group l); every warp gets the same results, summed in
// warp order. It opens with a barrier: the pool may still hold other warps'
// row buffers.
template <int N>
__device__ __forceinline__ void tile_reduce(float (&v)[N], const int (&op)[N]) {
  static_assert(N * kThreads <= kTilePool, "tile_reduce: too many sums for the pool");
  float* part = tile_pool();  // [N][warps][32]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) part[(k * warps + warp) * 32 + lane] = v[k];
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    float x = part[k * warps * 32 + lane];
    for (int w = 1; w < warps; ++w) {
      const float y = part[(k * warps + w) * 32 + lane];
      x = op[k] == 0 ? x + y : (op[k] == 1 ? fmaxf(x, y) : fminf(x, y));
    }
    v[k] = x;
  }
  __syncthreads();  // the pool is reused next
}

// NOTE: [Column tiles]
// The exact solve on a columns layout (innermost memory block kept): a block
// takes kTileGroups adjacent groups, lane l of every warp the group
// begin + l, so the 32 lanes of an access read neighbouring addresses (the
// innermost kept block has stride 1 in every dense layout of this kind);
// the warps split the elements (warp w: w, w + 8, ...). Group sums meet in
// shared memory (tile_reduce); every warp then holds the same per-group
// values, so a loop over the tile runs while any lane of a warp is not done,
// a condition uniform over the block. The passes are those of NOTE:
// [two-pass plan]; in a Newton pass done groups and lanes past the last
// group issue no access. tile_block runs the passes; the walk (ColumnWalk,
// RunWalk) says which lanes touch which elements.
struct ColumnWalk {
  const TensorArgs& t;
  int64_t base;  // this lane's group
  bool live;     // this lane has a group
  int warp, warps;

  // f(e) for each element index e of this lane's group (none when skip).
  template <typename F>
  __device__ __forceinline__ void each(bool skip, F f) const {
    if (!live || skip) return;
    for (int64_t e = warp; e < t.layout.group_size; e += warps) f(e);
  }
  // Storage offset of element e of this lane's group.
  __device__ __forceinline__ int64_t offset(int64_t e) const { return base + element_offset(t, e); }
  // load(offset, z, d) for each element of this lane's group (none when skip),
  // then use(z, d) on the same lane.
  template <typename Load, typename Use>
  __device__ __forceinline__ void gather(bool skip, Load load, Use use) const {
    each(skip, [&](int64_t e) {
      float z, d;
      load(offset(e), z, d);
      use(z, d);
    });
  }
  // put(offset, active, sigma) for each element of this lane's group.
  template <typename Put>
  __device__ __forceinline__ void scatter(bool active, float sigma, Put put) const {
    each(false, [&](int64_t e) { put(offset(e), active, sigma); });
  }
};

// NOTE: [Run tiles]
// A rows layout whose groups are runs of K < kRunRow / 2 consecutive
// elements repeated at a larger stride (NCHW channel-wise Conv: group i is
// W[:, i] and element (o, i, k) sits at o I K + i K + k), with adjacent
// groups adjacent runs (the innermost kept block has stride K): one group
// per block would read 2-3 sectors per run of 36 bytes (K = 9). A block
// takes G = min(32, kRunRow / K) adjacent groups of one innermost kept run;
// for each outer index r (the reduced blocks outside the run) their G K
// elements are contiguous. Warp w takes rows r = w, w + 8, ...; lane l
// reads positions p = l, l + 32, ... of the row (consecutive addresses),
// computes z, d there and leaves them in its warp's row buffer; after a
// __syncwarp lane gi takes positions gi K .. gi K + K - 1, the elements of
// group gi, as in a column tile (lane = group). The last pass writes at
// position p with the sigma and zero flag of group p / K, shuffled from its
// lane. A position of a done group issues no access; meter_round keeps the
// meter's instructions aligned when lanes skip a round in the middle.
struct RunWalk {
  const TensorArgs& t;
  int64_t base;  // the tile's first element
  int run, len;  // K, and G K positions per row
  int lane, warp, warps;

  __device__ __forceinline__ int64_t rows() const { return t.layout.group_size / run; }
  // Group (lane) of the position p = lane + 32 j, or 32 past the row.
  __device__ __forceinline__ int slot_group(int j) const {
    const int p = lane + 32 * j;
    return p < len ? p / run : 32;
  }

  template <typename Load, typename Use>
  __device__ __forceinline__ void gather(bool skip, Load load, Use use) const {
    float* zb = tile_pool() + warp * 2 * kRunRow;
    float* db = zb + kRunRow;
    unsigned take = 0;  // bit j: position lane + 32 j is loaded
#pragma unroll
    for (int j = 0; j < kRunSlots; ++j) {
      const int gi = slot_group(j);
      const bool sk = __shfl_sync(0xffffffffu, static_cast<int>(skip), gi & 31) != 0;
      if (gi < 32 && !sk) take |= 1u << j;
    }
    const bool mine = lane * run < len && !skip;
    for (int64_t r = warp; r < rows(); r += warps) {
      const int64_t row = base + element_offset(t, r * run);
#pragma unroll
      for (int j = 0; j < kRunSlots; ++j) {
        if (take >> j & 1u) {
          const int p = lane + 32 * j;
          load(row + p, zb[p], db[p]);
        }
        meter_round();
      }
      __syncwarp();
      if (mine)
        for (int k = lane * run; k < lane * run + run; ++k) use(zb[k], db[k]);
      __syncwarp();
    }
  }
  template <typename Put>
  __device__ __forceinline__ void scatter(bool active, float sigma, Put put) const {
    float sg[kRunSlots];
    unsigned act = 0, in = 0;
#pragma unroll
    for (int j = 0; j < kRunSlots; ++j) {
      const int gi = slot_group(j);
      sg[j] = __shfl_sync(0xffffffffu, sigma, gi & 31);
      if (__shfl_sync(0xffffffffu, static_cast<int>(active), gi & 31) != 0) act |= 1u << j;
      if (gi < 32) in |= 1u << j;
    }
    for (int64_t r = warp; r < rows(); r += warps) {
      const int64_t row = base + element_offset(t, r * run);
#pragma unroll
      for (int j = 0; j < kRunSlots; ++j) {
        if (in >> j & 1u) put(row + lane + 32 * j, (act >> j & 1u) != 0, sg[j]);
        meter_round();
      }
    }
  }
};

// NOTE: [Shrink tiles]
// The RMDA / ProxSGD group shrink (w = y max(0, 1 - T / ||y||), closed form)
// runs on the column and run tiles of the exact solve, in two passes over
// the walk: pass 1 updates the state and sums y^2 per lane (= group),
// tile_reduce gives every group its factor, and the last pass recomputes y
// from the state pass 1 wrote (element_y) and writes the parameter. The
// recompute reads W0, V (RMDA) or x, buf (ProxSGD): 8 B per fp32 element, 6
// B with 16-bit parameters, where a y in scratch would cost 4 B written and
// 4 B read; and a zero group (||y|| <= T: w = 0) reads nothing there. So no
// scratch: RMDA fp32 32 B per element (24 B in a zero group), ProxSGD 28 B
// (20 B). Groups of any size: each lane walks all its group's elements.
template <typename P, typename Walk>
__device__ void shrink_tile(const TensorArgs& t, const StepArgs& a, float thr, bool live, const Walk& walk) {
  float y2[1] = {0.0f};
  walk.gather(false, [&](int64_t o, float& y, float& d) { element_pass1<P>(t, a, o, y, d); },
              [&](float y, float) { y2[0] += y * y; });
  const int sum1[1] = {0};
  tile_reduce<1>(y2, sum1);
  const float norm = sqrtf(y2[0]);
  // NaN and inf norms stay active, so that they reach the parameter
  const bool active = live && !(norm <= thr);
  walk.scatter(active, group_shrink(norm, thr), [&](int64_t o, bool act, float scale) {
    const float w = act ? element_y<P>(t, a, o) * scale : 0.0f;
    meter_round();  // the lanes of zero groups skipped the state reads
    write_param<P>(t, a, o, w);
  });
}

// The groups g0 .. g1 - 1 of a tile, lane l holding group g0 + l; walk
// reads and writes the elements: the exact solve (NOTE: [Column tiles]) or
// the RMDA / ProxSGD shrink (NOTE: [Shrink tiles]).
template <typename P, typename Walk>
__device__ void tile_block(const TensorArgs& t, const StepArgs& a, float thr, int64_t g0, int64_t g1,
                           const Walk& walk) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t g = g0 + lane;
  const bool live = g < g1;
  if (a.optim == Optim::kRmda || a.optim == Optim::kProxSgd) return shrink_tile<P>(t, a, thr, live, walk);
  // The previous sigma (NOTE: [Warm start]), read once per group by warp 0.
  float s0 = 0.0f;
  if (t.sigma != nullptr) {
    __shared__ float prev[kTileGroups];
    if (warp == 0) prev[lane] = live ? gload(t.sigma + g) : 0.0f;
    __syncthreads();
    s0 = prev[lane];
  }
  float m[kMomSums];
  int ops[kMomSums];
  init_moments(m, ops);
  walk.gather(false, [&](int64_t o, float& z, float& d) { element_pass1<P>(t, a, o, z, d); },
              [&](float z, float d) { add_moments(m, z, d, s0); });
  tile_reduce<kMomSums>(m, ops);
  const NewtonStart st = newton_start(sqrtf(m[kMomIdxA]), m[0], m[1], thr);
  float sigma = st.sigma;
  bool done = !live || st.done;
  if (!done) sigma = model_solve(m, s0, st, done);
  const int sum4[4] = {0, 0, 0, 0};
  for (int it = 0; it < kNewtonMaxIters && warp_max(done ? 0.0f : 1.0f) > 0.0f; ++it) {
    float r[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    walk.gather(done, [&](int64_t o, float& z, float& d) { element_dz<P>(t, a, o, z, d); },
                [&](float z, float d) { add_newton_terms(r, z / st.norm, d, sigma); });
    tile_reduce<4>(r, sum4);
    if (!done) sigma = newton_pass_step(sigma, r, st.rel_excess, done);
  }
  walk.scatter(st.active, sigma, [&](int64_t o, bool active, float s) { write_exact<P>(t, a, o, active, s); });
  // A zero group keeps its previous sigma.
  if (live && t.sigma != nullptr && st.active && warp == 0) gstore(t.sigma + g, sigma);
}

// NOTE: [PG column tiles]
// PG (docs/math.md section 5) on a column tile, lane l holding group g0 + l
// as in NOTE: [Column tiles]. Pass 1 writes z, d to the scratch and the
// iterations keep Z there (plan.h's three slots); the tile's slots are laid
// out [element][lane] (element e of lane l at e W + l, W = g1 - g0 groups,
// from g0's first element on), so that a warp's scratch accesses are
// consecutive addresses like its parameter and state accesses. Every group
// keeps the reference's own stopping rule (||s_g|| <= its tolerance, at most
// max_iters iterations, screened groups zero without one): a done lane
// issues no access, and the tile iterates while any group is not done, a
// condition uniform over the block (every warp holds the same sums). Out
// of line, as scratch_rows_block.
template <typename P>
__device__ RAMDA_NOINLINE void pg_column_tile(const TensorArgs& t, const StepArgs& a, Thresholds th, int64_t g0,
                                              int64_t g1, const ColumnWalk& walk, float* scratch) {
  const int64_t width = g1 - g0, lane = threadIdx.x & 31;
  float* zs = scratch + t.scratch + g0 * t.layout.group_size;  // z, then [element][lane]
  float* ds = zs + t.numel;                                    // d
  float* Zs = zs + 2 * t.numel;                                // the iterate
  auto slot = [&](int64_t e) { return e * width + lane; };
  float acc[2] = {0.0f, -INFINITY};
  walk.each(false, [&](int64_t e) {
    float z, d;
    element_pass1<P>(t, a, walk.offset(e), z, d);
    gstore(zs + slot(e), z);
    gstore(ds + slot(e), d);
    acc[0] += z * z;
    acc[1] = fmaxf(acc[1], d);
  });
  const int ops[2] = {0, 1}, sum1[1] = {0};
  tile_reduce<2>(acc, ops);
  const float znorm = sqrtf(acc[0]), thr = th.thr;
  const bool active = walk.live && !(znorm <= thr);  // screened groups are zero
  const float theta = 1.0f / acc[1], inv_theta = 1.0f / theta, pthr = theta * thr;
  // One sweep per iteration (NOTE: [One sweep per PG iteration]).
  float y2[1] = {0.0f};
  walk.each(!active, [&](int64_t e) {
    const float x = current_x<P>(t, a, walk.offset(e));
    gstore(Zs + slot(e), x);
    const float y = pg_gradient_point(x, gload(zs + slot(e)), gload(ds + slot(e)), theta);
    y2[0] += y * y;
  });
  tile_reduce<1>(y2, sum1);
  const int sum2[2] = {0, 0};
  bool done = !active;
  for (int it = 0; it < a.max_iters && warp_max(done ? 0.0f : 1.0f) > 0.0f; ++it) {
    const float scale = group_shrink(sqrtf(y2[0]), pthr);
    float r[2] = {0.0f, 0.0f};  // ||s||^2, ||y||^2 at the new iterate
    walk.each(done, [&](int64_t e) {
      const float Z = gload(Zs + slot(e)), z = gload(zs + slot(e)), dd = gload(ds + slot(e));
      const float zn = pg_gradient_point(Z, z, dd, theta) * scale;
      const float s = pg_residual(Z, zn, dd, inv_theta);
      r[0] += s * s;
      gstore(Zs + slot(e), zn);
      const float yn = pg_gradient_point(zn, z, dd, theta);
      r[1] += yn * yn;
    });
    tile_reduce<2>(r, sum2);
    if (!(sqrtf(r[0]) > th.pg_tol)) done = true;
    y2[0] = r[1];
  }
  walk.each(false, [&](int64_t e) { write_param<P>(t, a, walk.offset(e), active ? gload(Zs + slot(e)) : 0.0f); });
}

template <typename P>
__device__ void column_tile_block(const TensorArgs& t, const StepArgs& a, Thresholds th, int64_t g0, int64_t g1,
                                  float* scratch) {
  const int lane = threadIdx.x & 31;
  const bool live = g0 + lane < g1;
  const ColumnWalk walk{t, live ? group_base(t, g0 + lane) : 0, live, static_cast<int>(threadIdx.x >> 5),
                        static_cast<int>(blockDim.x >> 5)};
  const bool dual = a.optim == Optim::kRamda || a.optim == Optim::kProxAdamW;
  if (dual && a.solver == Solver::kPg) return pg_column_tile<P>(t, a, th, g0, g1, walk, scratch);
  tile_block<P>(t, a, th.thr, g0, g1, walk);
}

template <typename P>
__device__ void run_tile_block(const TensorArgs& t, const StepArgs& a, float thr, int64_t g0, int64_t g1) {
  const int k = run_length(t.layout);
  const RunWalk walk{t, group_base(t, g0), k, static_cast<int>(g1 - g0) * k, static_cast<int>(threadIdx.x & 31),
                     static_cast<int>(threadIdx.x >> 5), static_cast<int>(blockDim.x >> 5)};
  tile_block<P>(t, a, thr, g0, g1, walk);
}

template <typename P>
__global__ void __launch_bounds__(kThreads) fused_step_kernel(Launch l, StepArgs a) {
  const auto* tensors = reinterpret_cast<const TensorArgs*>(l.table);
  const auto* items = reinterpret_cast<const BlockItem*>(l.table + l.n_tensors * sizeof(TensorArgs));
  const BlockItem item = items[blockIdx.x];
  const TensorArgs& t = tensors[item.tensor];
  const Thresholds th = thresholds(t, a);
  if (item.group == 3) run_tile_block<P>(t, a, th.thr, item.begin, item.end);
  else if (item.group == 2) column_tile_block<P>(t, a, th, item.begin, item.end, l.scratch);
  else if (item.group == 1) group_block<P>(t, a, th, item.begin, l.scratch);
  else elementwise_block<P>(t, a, th.thr, item.begin, item.end);
}

template <typename P>
void launch(const Launch& l, const StepArgs& a, cudaStream_t stream) {
  if (l.n_items == 0) return;
#ifdef __CUDACC__
  fused_step_kernel<P><<<static_cast<unsigned>(l.n_items), kThreads, 0, stream>>>(l, a);
#else
  (void)stream;
  cuda_host::launch(dim3(static_cast<unsigned>(l.n_items)), dim3(kThreads), &fused_step_kernel<P>, l, a);
#endif
}

}  // namespace cuda
}  // namespace ramda
