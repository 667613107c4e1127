// Which fused path a tensor takes, the group layout of the whole-tensor l1
// PG group, and whether a tensor's warm-start state can be addressed by the
// kernels' group index: the one decision csrc/bindings.cpp makes for the CPU and CUDA
// ops and the CUDA-on-CPU driver (csrc/tests/cuda_host/module.cpp) makes for
// the tests, so neither restates it. Torch- and CUDA-free.
#pragma once

#include <cstdint>
#include <vector>

#include "../ramda_args.h"

namespace ramda {

// Closed form per element (no regularizer, tau == 0, l1 except the dual
// optimizers' PG) or a solve per group (NOTE: [CUDA tiling] in kernels.cuh).
inline Path fused_path(Optim optim, Reg reg, Solver solver, double thr_base) {
  const bool dual = optim == Optim::kRamda || optim == Optim::kProxAdamW;
  const bool closed = thr_base == 0.0 || reg == Reg::kNone || (reg == Reg::kL1 && !(dual && solver == Solver::kPg));
  return closed ? Path::kElementwise : Path::kGroups;
}

// l1 solved by PG is one group over the whole tensor, in flat storage order.
inline void whole_tensor_group(int64_t numel, std::vector<int64_t>& shape, std::vector<int64_t>& strides,
                               std::vector<bool>& reduced) {
  shape = {numel};
  strides = {1};
  reduced = {true};
}

// Whether the kernels' group numbering (memory order of the kept blocks:
// make_group_layout sorts dims by stride) is the reference's (row-major over
// the kept dims of the grouped view), which the per-group warm-start state
// follows (docs/math.md section 4): true when the kept dims of size > 1
// have decreasing strides in view order.
inline bool kept_dims_in_memory_order(const std::vector<int64_t>& shape, const std::vector<int64_t>& strides,
                                      const std::vector<bool>& reduced) {
  int64_t prev = -1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (reduced[i] || shape[i] == 1) continue;
    if (prev >= 0 && strides[i] >= prev) return false;
    prev = strides[i];
  }
  return true;
}

}  // namespace ramda
