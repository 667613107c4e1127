// CPU implementation of the fused step: the same matrix as the CUDA kernels,
// threads across work items (tiles of groups, or chunks of elements),
// inner loops over contiguous runs that the compiler vectorizes.
//
// NOTE: [Tiling per layout]
// Per tensor the canonical layout (NOTE: [Group layout]) decides the tile:
// * "rows" (innermost block reduced, stride 1): a tile is a range of whole
//   consecutive groups; each group is walked as runs of its innermost block
//   and copied (as d, z, x) into a thread-local buffer laid out group after
//   group. Newton / PG iterations then sweep a contiguous slice per group,
//   which stays in L1 for groups up to a few thousand elements.
// * "columns" (innermost block kept, stride 1): a tile is J adjacent groups
//   of the innermost kept block (J >= 16 when possible, so every run is at
//   least a cache line). Element e of the J groups is one contiguous run; the
//   buffer is laid out [element][group] and the iterations run vectorized
//   across the J groups, each with its own sigma.
// A tile holds about kTileElems elements, so a tile's buffers plus the lines
// of parameter, gradient and state it touches stay in L2: the second pass
// (writing the parameter) and every solver iteration hit cache, and main
// memory sees each tensor once per step. Groups larger than a tile get a
// tile of their own (the buffer grows; correct, just out of cache).
// The same decision, in CUDA terms, is documented in csrc/cuda/kernels.cuh.

#include "cpu_step.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

namespace ramda {
namespace cpu {
namespace {

constexpr int64_t kTileElems = 16384;
constexpr int64_t kChunk = 1024;       // elementwise: elements per inner block
constexpr int64_t kElemItem = 65536;   // elementwise: elements per work item
constexpr int64_t kMinCols = 16;
constexpr int64_t kMaxCols = 64;

template <typename P> struct Scalar;
template <> struct Scalar<float> { using type = float; };
template <> struct Scalar<c10::BFloat16> { using type = c10::BFloat16; };
template <> struct Scalar<c10::Half> { using type = c10::Half; };

// Thread-local solver buffers: B0 = z (then w) or y, B1 = d, B2 = x (the
// fp32 parameter), B3 = PG iterate Z, B4 = PG gradient point.
struct Buffers {
  std::vector<float> mem;
  float* b[5];
  void reserve(int64_t n) {
    if (static_cast<int64_t>(mem.size()) < 5 * n) mem.resize(5 * n);
    for (int i = 0; i < 5; ++i) b[i] = mem.data() + i * n;
  }
};

// ---------------------------------------------------------------------------
// Pass 1: read gradient, parameter and state of a contiguous run at storage
// offset `o`, update the state, write the subproblem data to the buffers.
// Pass 2: write the parameter from the solution w (B0) and x (B2).
// ---------------------------------------------------------------------------

template <typename P, Optim O>
inline void pass1(const TensorArgs& t, const StepArgs& a, int64_t o, int64_t n,
                  float* __restrict__ B0, float* __restrict__ B1, float* __restrict__ B2) {
  const P* __restrict__ p = static_cast<const P*>(t.param) + o;
  const P* __restrict__ g = static_cast<const P*>(t.grad) + o;
  float* __restrict__ s0 = t.s0 + o;
  float* __restrict__ s1 = t.s1 ? t.s1 + o : nullptr;
  float* __restrict__ s2 = t.s2 ? t.s2 + o : nullptr;
  if constexpr (O == Optim::kRamda) {
    const float s = a.s, eps = a.eps;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      float v = s1[i], u = s2[i], d, z;
      ramda_dz(static_cast<float>(g[i]), s0[i], v, u, s, eps, d, z);
      s1[i] = v;
      s2[i] = u;
      B0[i] = z;
      B1[i] = d;
      B2[i] = static_cast<float>(p[i]);
    }
  } else if constexpr (O == Optim::kRmda) {
    const float s = a.s, beta = a.beta;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      float v = s1[i];
      B0[i] = rmda_y(static_cast<float>(g[i]), s0[i], v, s, beta);
      s1[i] = v;
      B2[i] = static_cast<float>(p[i]);
    }
  } else if constexpr (O == Optim::kProxAdamW) {
    const AdamCoeffs c = a.adam;
    const float decay = a.decay;
    if (a.amsgrad) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        float m = s0[i], v = s1[i], vmax = s2[i], d, z;
        const float x = static_cast<float>(p[i]) * decay;
        proxadamw_dz(static_cast<float>(g[i]), x, m, v, vmax, true, c, d, z);
        s0[i] = m;
        s1[i] = v;
        s2[i] = vmax;
        B0[i] = z;
        B1[i] = d;
        B2[i] = x;
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        float m = s0[i], v = s1[i], vmax = 0.0f, d, z;
        const float x = static_cast<float>(p[i]) * decay;
        proxadamw_dz(static_cast<float>(g[i]), x, m, v, vmax, false, c, d, z);
        s0[i] = m;
        s1[i] = v;
        B0[i] = z;
        B1[i] = d;
        B2[i] = x;
      }
    }
  } else {
    const float keep = a.keep, c = a.c, lr = a.lr;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      float buf = s0[i];
      const float x = static_cast<float>(p[i]);
      B0[i] = proxsgd_y(static_cast<float>(g[i]), x, buf, keep, c, lr);
      s0[i] = buf;
      B2[i] = x;
    }
  }
}

template <typename P, Optim O>
inline void pass2(const TensorArgs& t, const StepArgs& a, int64_t o, int64_t n,
                  const float* __restrict__ W, const float* __restrict__ X) {
  P* __restrict__ p = static_cast<P*>(t.param) + o;
  if constexpr (O == Optim::kRamda || O == Optim::kRmda) {
    const float keep = a.keep, c = a.c;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<P>(average(X[i], W[i], keep, c));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<P>(W[i]);
  }
}

// Closed forms: w from (z, d) for RAMDA/ProxAdamW, from y for RMDA/ProxSGD.
template <Optim O>
inline void closed_form(const TensorArgs& t, const StepArgs& a, int64_t n, float* __restrict__ B0,
                        const float* __restrict__ B1) {
  constexpr bool kDual = O == Optim::kRamda || O == Optim::kProxAdamW;
  const bool l1 = a.reg == Reg::kL1 && t.thr != 0.0f;
  if constexpr (kDual) {
    if (l1) {
      const float tau = t.thr;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) B0[i] = soft_threshold(B0[i], tau) / B1[i];
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) B0[i] = B0[i] / B1[i];
    }
  } else if (l1) {
    const float thr = t.thr;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) B0[i] = soft_threshold(B0[i], thr);
  }
}

// ---------------------------------------------------------------------------
// Group solves on the buffers. `contig`: one group, elements contiguous.
// ---------------------------------------------------------------------------

struct GroupStats { float znorm, dmax, dmin; };

inline GroupStats stats_contig(const float* __restrict__ z, const float* __restrict__ d, int64_t n) {
  float z2 = 0.0f, dmax = -INFINITY, dmin = INFINITY;
#pragma omp simd reduction(+ : z2) reduction(max : dmax) reduction(min : dmin)
  for (int64_t i = 0; i < n; ++i) {
    z2 += z[i] * z[i];
    dmax = std::max(dmax, d[i]);
    dmin = std::min(dmin, d[i]);
  }
  return {std::sqrt(z2), dmax, dmin};
}

inline float norm_contig(const float* __restrict__ y, int64_t n) {
  float y2 = 0.0f;
#pragma omp simd reduction(+ : y2)
  for (int64_t i = 0; i < n; ++i) y2 += y[i] * y[i];
  return std::sqrt(y2);
}

// Exact group lasso (SPEC section 4) for one contiguous group; w -> z.
inline void newton_contig(float* __restrict__ z, const float* __restrict__ d, int64_t n,
                          float thr, float inv_thr) {
  const GroupStats st = stats_contig(z, d, n);
  const NewtonStart s0 = newton_start(st.znorm, st.dmax, st.dmin, thr);
  if (!s0.active) {
    std::fill(z, z + n, 0.0f);
    return;
  }
  float sigma = s0.sigma;
  bool done = s0.done;
  for (int it = 0; it < kNewtonMaxIters && !done; ++it) {
    float r2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : r2, s3)
    for (int64_t i = 0; i < n; ++i) newton_terms(z[i], d[i], sigma, r2, s3);
    sigma = newton_update(sigma, r2, s3, thr, inv_thr, done);
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) z[i] = newton_solution(z[i], d[i], sigma);
}

// Proximal gradient (SPEC section 5) for one contiguous group, warm started
// at x; `l1` picks the elementwise prox (whole-tensor l1) over the group
// prox. The solution is written to z.
inline void pg_contig(float* __restrict__ z, const float* __restrict__ d,
                      const float* __restrict__ x, float* __restrict__ Z, float* __restrict__ y,
                      int64_t n, bool l1, float thr, float tol, int max_iters) {
  const GroupStats st = stats_contig(z, d, n);
  if (!l1 && st.znorm <= thr) {  // screened: exactly zero, no iteration
    std::fill(z, z + n, 0.0f);
    return;
  }
  const float theta = 1.0f / st.dmax;
  const float inv_theta = 1.0f / theta;
  const float pthr = theta * thr;
  std::copy(x, x + n, Z);
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
      float y2 = 0.0f;
#pragma omp simd reduction(+ : y2)
      for (int64_t i = 0; i < n; ++i) {
        y[i] = pg_gradient_point(Z[i], z[i], d[i], theta);
        y2 += y[i] * y[i];
      }
      const float scale = group_shrink(std::sqrt(y2), pthr);
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
  std::copy(Z, Z + n, z);
}

// RMDA / ProxSGD group soft-threshold of y (scalar d: closed form).
inline void shrink_contig(float* __restrict__ y, int64_t n, float thr) {
  const float scale = group_shrink(norm_contig(y, n), thr);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] *= scale;
}

// The same three solves for J groups interleaved as [element][group].
inline void newton_cols(float* __restrict__ z, const float* __restrict__ d, int64_t E, int64_t J,
                        float thr, float inv_thr) {
  float z2[kMaxCols], dmax[kMaxCols], dmin[kMaxCols], sigma[kMaxCols], r2[kMaxCols],
      s3[kMaxCols];
  bool active[kMaxCols], done[kMaxCols];
  for (int64_t j = 0; j < J; ++j) z2[j] = 0.0f, dmax[j] = -INFINITY, dmin[j] = INFINITY;
  for (int64_t e = 0; e < E; ++e) {
    const float* ze = z + e * J;
    const float* de = d + e * J;
#pragma omp simd
    for (int64_t j = 0; j < J; ++j) {
      z2[j] += ze[j] * ze[j];
      dmax[j] = std::max(dmax[j], de[j]);
      dmin[j] = std::min(dmin[j], de[j]);
    }
  }
  int64_t pending = 0;
  for (int64_t j = 0; j < J; ++j) {
    const NewtonStart s = newton_start(std::sqrt(z2[j]), dmax[j], dmin[j], thr);
    active[j] = s.active;
    done[j] = s.done;
    sigma[j] = s.sigma;
    pending += !s.done;
  }
  for (int it = 0; it < kNewtonMaxIters && pending > 0; ++it) {
    for (int64_t j = 0; j < J; ++j) r2[j] = 0.0f, s3[j] = 0.0f;
    for (int64_t e = 0; e < E; ++e) {
      const float* ze = z + e * J;
      const float* de = d + e * J;
#pragma omp simd
      for (int64_t j = 0; j < J; ++j) newton_terms(ze[j], de[j], sigma[j], r2[j], s3[j]);
    }
    pending = 0;
    for (int64_t j = 0; j < J; ++j) {
      if (done[j]) continue;
      bool dj;
      sigma[j] = newton_update(sigma[j], r2[j], s3[j], thr, inv_thr, dj);
      done[j] = dj;
      pending += !dj;
    }
  }
  for (int64_t e = 0; e < E; ++e) {
    float* ze = z + e * J;
    const float* de = d + e * J;
#pragma omp simd
    for (int64_t j = 0; j < J; ++j)
      ze[j] = active[j] ? newton_solution(ze[j], de[j], sigma[j]) : 0.0f;
  }
}

inline void pg_cols(float* __restrict__ z, const float* __restrict__ d, const float* __restrict__ x,
                    float* __restrict__ Z, float* __restrict__ y, int64_t E, int64_t J, float thr,
                    float tol, int max_iters) {
  float z2[kMaxCols], dmax[kMaxCols], theta[kMaxCols], inv_theta[kMaxCols], pthr[kMaxCols],
      y2[kMaxCols], s2[kMaxCols], scale[kMaxCols];
  bool live[kMaxCols];
  for (int64_t j = 0; j < J; ++j) z2[j] = 0.0f, dmax[j] = -INFINITY;
  for (int64_t e = 0; e < E; ++e) {
#pragma omp simd
    for (int64_t j = 0; j < J; ++j) {
      z2[j] += z[e * J + j] * z[e * J + j];
      dmax[j] = std::max(dmax[j], d[e * J + j]);
    }
  }
  int64_t pending = 0;
  for (int64_t j = 0; j < J; ++j) {
    live[j] = std::sqrt(z2[j]) > thr;  // screened groups are exactly zero
    theta[j] = 1.0f / dmax[j];
    inv_theta[j] = 1.0f / theta[j];
    pthr[j] = theta[j] * thr;
    pending += live[j];
  }
  for (int64_t i = 0; i < E * J; ++i) Z[i] = live[i % J] ? x[i] : 0.0f;
  for (int it = 0; it < max_iters && pending > 0; ++it) {
    for (int64_t j = 0; j < J; ++j) y2[j] = 0.0f, s2[j] = 0.0f;
    for (int64_t e = 0; e < E; ++e) {
#pragma omp simd
      for (int64_t j = 0; j < J; ++j) {
        const int64_t i = e * J + j;
        y[i] = pg_gradient_point(Z[i], z[i], d[i], theta[j]);
        y2[j] += y[i] * y[i];
      }
    }
    for (int64_t j = 0; j < J; ++j) scale[j] = live[j] ? group_shrink(std::sqrt(y2[j]), pthr[j]) : 1.0f;
    for (int64_t e = 0; e < E; ++e) {
#pragma omp simd
      for (int64_t j = 0; j < J; ++j) {
        const int64_t i = e * J + j;
        const float zn = live[j] ? y[i] * scale[j] : Z[i];
        const float s = pg_residual(Z[i], zn, d[i], inv_theta[j]);
        s2[j] += s * s;
        Z[i] = zn;
      }
    }
    pending = 0;
    for (int64_t j = 0; j < J; ++j) {
      live[j] = live[j] && std::sqrt(s2[j]) > tol;
      pending += live[j];
    }
  }
  std::copy(Z, Z + E * J, z);
}

inline void shrink_cols(float* __restrict__ y, int64_t E, int64_t J, float thr) {
  float y2[kMaxCols], scale[kMaxCols];
  for (int64_t j = 0; j < J; ++j) y2[j] = 0.0f;
  for (int64_t e = 0; e < E; ++e) {
#pragma omp simd
    for (int64_t j = 0; j < J; ++j) y2[j] += y[e * J + j] * y[e * J + j];
  }
  for (int64_t j = 0; j < J; ++j) scale[j] = group_shrink(std::sqrt(y2[j]), thr);
  for (int64_t e = 0; e < E; ++e) {
#pragma omp simd
    for (int64_t j = 0; j < J; ++j) y[e * J + j] *= scale[j];
  }
}

// ---------------------------------------------------------------------------
// Work items
// ---------------------------------------------------------------------------

struct WorkItem {
  int32_t tensor;
  bool cols;        // "columns" tile (else rows tile or elementwise range)
  int64_t begin;    // elementwise: storage offset; groups: first group
  int64_t end;
};

// Solve for one tile whose buffers are filled; `cols` -> J = groups, E = elements.
template <Optim O>
inline void solve_tile(const TensorArgs& t, const StepArgs& a, Buffers& B, bool cols,
                       int64_t groups, int64_t gsize) {
  constexpr bool kDual = O == Optim::kRamda || O == Optim::kProxAdamW;
  const bool pg = kDual && a.solver == Solver::kPg;
  const bool l1 = a.reg == Reg::kL1;  // only reaches here as whole-tensor PG
  if (cols) {
    if (!kDual) shrink_cols(B.b[0], gsize, groups, t.thr);
    else if (pg) pg_cols(B.b[0], B.b[1], B.b[2], B.b[3], B.b[4], gsize, groups, t.thr, t.pg_tol, a.max_iters);
    else newton_cols(B.b[0], B.b[1], gsize, groups, t.thr, t.inv_thr);
    return;
  }
  for (int64_t j = 0; j < groups; ++j) {
    const int64_t o = j * gsize;
    if (!kDual) shrink_contig(B.b[0] + o, gsize, t.thr);
    else if (pg) pg_contig(B.b[0] + o, B.b[1] + o, B.b[2] + o, B.b[3] + o, B.b[4] + o, gsize, l1, t.thr, t.pg_tol, a.max_iters);
    else newton_contig(B.b[0] + o, B.b[1] + o, gsize, t.thr, t.inv_thr);
  }
}

template <typename P, Optim O>
void run_item(const TensorArgs& t, const StepArgs& a, const WorkItem& w, Buffers& B) {
  if (t.path == Path::kElementwise) {
    B.reserve(kChunk);
    for (int64_t o = w.begin; o < w.end; o += kChunk) {
      const int64_t n = std::min(kChunk, w.end - o);
      pass1<P, O>(t, a, o, n, B.b[0], B.b[1], B.b[2]);
      closed_form<O>(t, a, n, B.b[0], B.b[1]);
      pass2<P, O>(t, a, o, n, B.b[0], B.b[2]);
    }
    return;
  }
  const GroupLayout& L = t.layout;
  const int64_t gsize = L.group_size;
  const int64_t groups = w.end - w.begin;
  B.reserve(groups * gsize);
  if (w.cols) {
    // J adjacent groups: element e of all of them is one contiguous run.
    const int64_t base = block_offset(w.begin, L.n_kept, L.kept_size, L.kept_stride);
    for (int64_t e = 0; e < gsize; ++e) {
      const int64_t o = base + block_offset(e, L.n_red, L.red_size, L.red_stride);
      pass1<P, O>(t, a, o, groups, B.b[0] + e * groups, B.b[1] + e * groups, B.b[2] + e * groups);
    }
    solve_tile<O>(t, a, B, true, groups, gsize);
    for (int64_t e = 0; e < gsize; ++e) {
      const int64_t o = base + block_offset(e, L.n_red, L.red_size, L.red_stride);
      pass2<P, O>(t, a, o, groups, B.b[0] + e * groups, B.b[2] + e * groups);
    }
    return;
  }
  // Rows: each group is runs of its innermost (stride-1) reduced block.
  const int64_t run = L.red_size[L.n_red - 1];
  const int64_t outer = gsize / run;
  for (int64_t j = 0; j < groups; ++j) {
    const int64_t base = block_offset(w.begin + j, L.n_kept, L.kept_size, L.kept_stride);
    for (int64_t r = 0; r < outer; ++r) {
      const int64_t o = base + block_offset(r, L.n_red - 1, L.red_size, L.red_stride);
      const int64_t bi = j * gsize + r * run;
      pass1<P, O>(t, a, o, run, B.b[0] + bi, B.b[1] + bi, B.b[2] + bi);
    }
  }
  solve_tile<O>(t, a, B, false, groups, gsize);
  for (int64_t j = 0; j < groups; ++j) {
    const int64_t base = block_offset(w.begin + j, L.n_kept, L.kept_size, L.kept_stride);
    for (int64_t r = 0; r < outer; ++r) {
      const int64_t o = base + block_offset(r, L.n_red - 1, L.red_size, L.red_stride);
      const int64_t bi = j * gsize + r * run;
      pass2<P, O>(t, a, o, run, B.b[0] + bi, B.b[2] + bi);
    }
  }
}

void split(const std::vector<TensorArgs>& tensors, std::vector<WorkItem>& items) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorArgs& t = tensors[i];
    const int32_t ti = static_cast<int32_t>(i);
    if (t.numel == 0) continue;
    if (t.path == Path::kElementwise) {
      for (int64_t o = 0; o < t.numel; o += kElemItem)
        items.push_back({ti, false, o, std::min(t.numel, o + kElemItem)});
      continue;
    }
    const GroupLayout& L = t.layout;
    const int64_t gsize = L.group_size;
    if (L.inner_reduced()) {
      const int64_t per = std::max<int64_t>(1, kTileElems / gsize);
      for (int64_t g = 0; g < L.n_groups; g += per)
        items.push_back({ti, false, g, std::min(L.n_groups, g + per)});
      continue;
    }
    // Columns: tiles never cross the innermost kept block, whose groups are
    // adjacent in memory (stride 1).
    const int64_t inner = L.kept_size[L.n_kept - 1];
    const int64_t per = std::min(kMaxCols, std::max(kMinCols, kTileElems / gsize));
    for (int64_t g0 = 0; g0 < L.n_groups; g0 += inner)
      for (int64_t g = g0; g < g0 + inner; g += per)
        items.push_back({ti, true, g, std::min(g0 + inner, g + per)});
  }
}

template <Optim O>
void run_dtype(const TensorArgs& t, const StepArgs& a, const WorkItem& w, Buffers& B) {
  switch (t.dtype) {
    case DType::kFp32: return run_item<float, O>(t, a, w, B);
    case DType::kBf16: return run_item<c10::BFloat16, O>(t, a, w, B);
    case DType::kFp16: return run_item<c10::Half, O>(t, a, w, B);
  }
}

void run(const TensorArgs& t, const StepArgs& a, const WorkItem& w, Buffers& B) {
  switch (a.optim) {
    case Optim::kRamda: return run_dtype<Optim::kRamda>(t, a, w, B);
    case Optim::kRmda: return run_dtype<Optim::kRmda>(t, a, w, B);
    case Optim::kProxAdamW: return run_dtype<Optim::kProxAdamW>(t, a, w, B);
    case Optim::kProxSgd: return run_dtype<Optim::kProxSgd>(t, a, w, B);
  }
}

}  // namespace

void step(const StepArgs& args, const std::vector<TensorArgs>& tensors) {
  std::vector<WorkItem> items;
  split(tensors, items);
  if (items.empty()) return;
  // Work items differ in cost (Newton iterations vary per group), so threads
  // take them from a shared counter instead of a static split.
  std::atomic<int64_t> next{0};
  const int64_t n = static_cast<int64_t>(items.size());
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    thread_local Buffers buffers;
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1))
      run(tensors[items[i].tensor], args, items[i], buffers);
  });
}

}  // namespace cpu
}  // namespace ramda
