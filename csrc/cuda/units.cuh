// The unit-group kernel (NOTE: [CUDA unit blocks] in units.h), built from the
// element functions, reductions and Newton pieces of kernels.cuh. Included by
// exactly one translation unit per build: cuda/units.cu (nvcc) or the
// CUDA-on-CPU driver csrc/tests/cuda_host/units_module.cpp.
#pragma once

#include <type_traits>

#include "kernels.cuh"
#include "units.h"

namespace ramda {
namespace cuda {

static_assert(kUnitCachedElems == static_cast<int64_t>(kCached) * kThreads, "units.h restates kCached * kThreads");

// fn(static_cast<P*>(nullptr)) with P the parameter type of `dtype`: a unit mixes dtypes.
template <typename Fn>
__device__ __forceinline__ void with_dtype(DType dtype, const Fn& fn) {
  switch (dtype) {
    case DType::kFp32: return fn(static_cast<float*>(nullptr));
    case DType::kBf16: return fn(static_cast<c10::BFloat16*>(nullptr));
    case DType::kFp16: return fn(static_cast<c10::Half*>(nullptr));
  }
}

#define RAMDA_P std::remove_pointer_t<decltype(tag)>
__device__ __forceinline__ void unit_pass1(const TensorArgs& t, const StepArgs& a, int64_t o, float& z, float& d) {
  with_dtype(t.dtype, [&](auto* tag) { element_pass1<RAMDA_P>(t, a, o, z, d); });
}
__device__ __forceinline__ void unit_dz(const TensorArgs& t, const StepArgs& a, int64_t o, float& z, float& d) {
  with_dtype(t.dtype, [&](auto* tag) { element_dz<RAMDA_P>(t, a, o, z, d); });
}
__device__ __forceinline__ void unit_write(const TensorArgs& t, const StepArgs& a, int64_t o, float w) {
  with_dtype(t.dtype, [&](auto* tag) { write_param<RAMDA_P>(t, a, o, w); });
}
#undef RAMDA_P

// Element e of a unit's union (its segments in table order, NOTE: [Unit
// segment table]) as (tensor, storage offset). A thread asks for increasing
// e, so the cursor only moves forward over the unit's rows.
struct UnitCursor {
  const int64_t* row;  // the current row: tensor, offset, count, stride, outer_count, outer_stride
  int64_t base = 0;    // union index of the row's first element
  __device__ __forceinline__ int64_t at(int64_t e, int64_t& tensor) {
    while (e >= base + row[2] * row[4]) base += row[2] * row[4], row += 6;
    const int64_t k = e - base;
    tensor = row[0];
    if (row[4] == 1) return row[1] + k * row[3];
    const int64_t o = k / row[2];
    return row[1] + o * row[5] + (k - o * row[2]) * row[3];
  }
};

// fn(tensor, storage offset, e) for this thread's elements e = threadIdx.x,
// threadIdx.x + blockDim.x, ... < n of a unit (rows: its segment rows).
template <typename Fn>
__device__ __forceinline__ void for_unit_elements(const TensorArgs* ts, const int64_t* rows, int64_t n, const Fn& fn) {
  UnitCursor c{rows};
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
    int64_t ti;
    const int64_t o = c.at(e, ti);
    fn(ts[ti], o, e);
  }
}

// A unit of at most kUnitCachedElems elements: z, d in registers (NOTE:
// [Register rows]); the Newton steps as cached_rows_block takes them.
__device__ __forceinline__ void cached_unit(const TensorArgs* ts, const StepArgs& a, const int64_t* rows, int64_t n,
                                            float thr, float s0, float* sigma_out) {
  const bool dual = a.optim == Optim::kRamda || a.optim == Optim::kProxAdamW;
  float zr[kCached], dr[kCached];
  float acc[kPass1Sums] = {0.0f, -INFINITY, INFINITY, 0.0f, 0.0f, 0.0f, 0.0f};
  UnitCursor c{rows};
#pragma unroll
  for (int j = 0; j < kCached; ++j) {
    const int64_t e = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
    zr[j] = 0.0f;
    dr[j] = 1.0f;
    if (e < n) {
      int64_t ti;
      const int64_t o = c.at(e, ti);
      unit_pass1(ts[ti], a, o, zr[j], dr[j]);
      add_pass1(acc, zr[j], dr[j], s0);
    }
  }
  const int ops[kPass1Sums] = {0, 1, 2, 0, 0, 0, 0};
  block_reduce<kPass1Sums>(acc, ops);
  float scale = 1.0f, sigma = 0.0f;
  bool active = true;
  if (!dual) {  // RMDA / ProxSGD: group soft-threshold of y
    scale = group_shrink(sqrtf(acc[0]), thr);
  } else {
    const NewtonStart st = newton_start(sqrtf(acc[0]), acc[1], acc[2], thr);
    active = st.active;
    sigma = register_newton(zr, dr, n, st, s0, acc);
  }
  UnitCursor w{rows};
#pragma unroll
  for (int j = 0; j < kCached; ++j) {
    const int64_t e = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
    if (e < n) {
      int64_t ti;
      const int64_t o = w.at(e, ti);
      const float x = !dual ? zr[j] * scale : (active ? newton_solution(zr[j], dr[j], sigma) : 0.0f);
      unit_write(ts[ti], a, o, x);
    }
  }
  // A zero unit keeps its previous sigma.
  if (dual && sigma_out != nullptr && active && threadIdx.x == 0) gstore(sigma_out, sigma);
}

// A larger unit: the passes of NOTE: [two-pass plan] (RAMDA / ProxAdamW), or
// y through the fp32 scratch `ys` (RMDA / ProxSGD).
__device__ __forceinline__ void streamed_unit(const TensorArgs* ts, const StepArgs& a, const int64_t* rows, int64_t n,
                                              float thr, float s0, float* sigma_out, float* ys) {
  const bool dual = a.optim == Optim::kRamda || a.optim == Optim::kProxAdamW;
  float acc[kPass1Sums] = {0.0f, -INFINITY, INFINITY, 0.0f, 0.0f, 0.0f, 0.0f};
  for_unit_elements(ts, rows, n, [&](const TensorArgs& t, int64_t o, int64_t e) {
    float z, d;
    unit_pass1(t, a, o, z, d);
    if (!dual) gstore(ys + e, z);
    add_pass1(acc, z, d, s0);
  });
  const int ops[kPass1Sums] = {0, 1, 2, 0, 0, 0, 0};
  block_reduce<kPass1Sums>(acc, ops);
  if (!dual) {
    const float scale = group_shrink(sqrtf(acc[0]), thr);
    for_unit_elements(ts, rows, n,
                      [&](const TensorArgs& t, int64_t o, int64_t e) { unit_write(t, a, o, gload(ys + e) * scale); });
    return;
  }
  const NewtonStart st = newton_start(sqrtf(acc[0]), acc[1], acc[2], thr);
  float sigma = st.sigma;
  bool done = st.done;
  if (!done) sigma = warm_start(s0, acc, st, done);
  const int sum4[4] = {0, 0, 0, 0};
  for (int it = 0; it < kNewtonMaxIters && !done; ++it) {
    float r[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for_unit_elements(ts, rows, n, [&](const TensorArgs& t, int64_t o, int64_t) {
      float z, d;
      unit_dz(t, a, o, z, d);
      add_newton_terms(r, z / st.norm, d, sigma);
    });
    block_reduce<4>(r, sum4);
    sigma = newton_pass_step(sigma, r, st.rel_excess, done);
  }
  for_unit_elements(ts, rows, n, [&](const TensorArgs& t, int64_t o, int64_t) {
    float w = 0.0f;
    if (st.active) {
      float z, d;
      unit_dz(t, a, o, z, d);
      w = newton_solution(z, d, sigma);
    }
    unit_write(t, a, o, w);
  });
  if (sigma_out != nullptr && st.active && threadIdx.x == 0) gstore(sigma_out, sigma);
}

__device__ __forceinline__ void unit_block(const UnitLaunch& l, const StepArgs& a, int64_t u) {
  const auto* ts = reinterpret_cast<const TensorArgs*>(l.table);
  const auto* start = reinterpret_cast<const int64_t*>(l.table + l.start_at);
  const UnitMeta& m = reinterpret_cast<const UnitMeta*>(l.table + l.meta_at)[u];
  const int64_t* rows = reinterpret_cast<const int64_t*>(l.table + l.rows_at) + 6 * start[u];
  const int64_t n = m.size;
  const bool dual = a.optim == Optim::kRamda || a.optim == Optim::kProxAdamW;
  if (a.thr_base == 0.0) {  // unregularized: w = z/d (y for RMDA / ProxSGD), no reduction
    for_unit_elements(ts, rows, n, [&](const TensorArgs& t, int64_t o, int64_t) {
      float z, d;
      unit_pass1(t, a, o, z, d);
      unit_write(t, a, o, dual ? z / d : z);
    });
    return;
  }
  // T = float(thr_base * c_g) from double, as the reference rounds it
  const float thr = static_cast<float>(a.thr_base * m.cg);
  float* sigma = dual && l.sigma != nullptr ? l.sigma + u : nullptr;
  // The previous sigma (NOTE: [Warm start]): one lane per warp reads it.
  float s0 = 0.0f;
  if (sigma != nullptr) s0 = warp_sum((threadIdx.x & 31) == 0 ? gload(sigma) : 0.0f);
  if (n <= kUnitCachedElems) return cached_unit(ts, a, rows, n, thr, s0, sigma);
  streamed_unit(ts, a, rows, n, thr, s0, sigma, l.scratch + m.scratch);
}

__global__ void __launch_bounds__(kThreads) units_kernel(UnitLaunch l, StepArgs a) {
  const UnitItem it = reinterpret_cast<const UnitItem*>(l.table + l.items_at)[blockIdx.x];
  if (it.kind == 1) return unit_block(l, a, it.begin);
  const TensorArgs& t = reinterpret_cast<const TensorArgs*>(l.table)[it.tensor];
  with_dtype(t.dtype, [&](auto* tag) {
    elementwise_block<std::remove_pointer_t<decltype(tag)>>(t, a, 0.0f, it.begin, it.end);
  });
}

// units_kernel over the plan's items: on the stream under nvcc, on CPU
// threads in the stand-in (NOTE: [CUDA on CPU]).
inline void launch_units_kernel(const UnitLaunch& l, const StepArgs& a, cudaStream_t stream) {
  if (l.n_items == 0) return;
#ifdef __CUDACC__
  units_kernel<<<static_cast<unsigned>(l.n_items), kThreads, 0, stream>>>(l, a);
#else
  (void)stream;
  cuda_host::launch(dim3(static_cast<unsigned>(l.n_items)), dim3(kThreads), &units_kernel, l, a);
#endif
}

}  // namespace cuda
}  // namespace ramda
