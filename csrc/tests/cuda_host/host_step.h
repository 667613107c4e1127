// One fused CUDA step run on CPU threads: the table csrc/cuda/plan.h lays out
// (what table.cpp uploads), the kernels of csrc/cuda/kernels.cuh, one launch
// per dtype, with the scratch pre-filled with NaN so that a read of a slot
// the kernel did not write first shows in the result. NOTE: [CUDA on CPU]
// in cuda_runtime.h.
#pragma once

#include <cmath>
#include <limits>
#include <span>
#include <vector>

#include "../../cuda/kernels.cuh"
#include "../../cuda/plan.h"

namespace ramda {
namespace cuda_host_step {

inline void step(const StepArgs& a, const std::vector<TensorArgs>& tensors, uint64_t order_seed) {
  const cuda::PlanLayout plan = cuda::lay_out_plan(a, tensors);
  // 256-byte aligned, as cudaMalloc's memory, so that sectors count as on a device
  constexpr size_t kAlign = 256 / sizeof(float);
  std::vector<float> buffer(static_cast<size_t>(plan.scratch_elems) + kAlign,
                            std::numeric_limits<float>::quiet_NaN());
  const size_t skip = (kAlign - reinterpret_cast<uintptr_t>(buffer.data()) / sizeof(float) % kAlign) % kAlign;
  const std::span<float> scratch(buffer.data() + skip, static_cast<size_t>(plan.scratch_elems));
  // the scratch is the region after the caller's (ramda_cuda_host_meter_start)
  if (cuda_host::meter().on) cuda_host::meter_region(scratch.data(), scratch.size() * sizeof(float));
  cuda_host::set_block_order(order_seed);
  using Fn = void (*)(const cuda::Launch&, const StepArgs&, cudaStream_t);
  const Fn fns[3] = {&cuda::launch<float>, &cuda::launch<c10::BFloat16>, &cuda::launch<c10::Half>};
  for (int k = 0; k < 3; ++k) {
    const cuda::Launch l{plan.bytes.data() + plan.offsets[k][0], plan.offsets[k][1],
                         plan.offsets[k][2], scratch.empty() ? nullptr : scratch.data()};
    fns[k](l, a, nullptr);
  }
}

}  // namespace cuda_host_step
}  // namespace ramda
