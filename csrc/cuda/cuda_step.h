// CUDA fused step: host side (cuda/table.cpp) and per-dtype launchers
// (cuda/kernels_{fp32,bf16,fp16}.cu). See NOTE: [CUDA tiling] in kernels.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "../ramda_args.h"

namespace ramda {
namespace cuda {

// Storage elements per block of an elementwise path.
constexpr int64_t kElemChunk = 4096;

// Adjacent groups per block of a column tile (NOTE: [Column tiles] in kernels.cuh): one per lane.
constexpr int64_t kTileGroups = 32;

// Positions of a run tile's row (NOTE: [Run tiles] in kernels.cuh): 32 groups of 9.
constexpr int kRunRow = 288;

// The run length K of a rows layout that runs as run tiles (NOTE: [Run
// tiles]): groups made of runs of K consecutive elements (the innermost
// block, reduced) at a larger stride (an outer reduced block), adjacent
// groups adjacent runs (the innermost kept block has stride K), at least two
// groups per row buffer; 0 for any other layout.
RAMDA_HD int run_length(const GroupLayout& L) {
  if (L.n_red < 2 || L.n_kept < 1 || L.red_stride[L.n_red - 1] != 1) return 0;
  const int64_t k = L.red_size[L.n_red - 1];
  return k >= 2 && 2 * k <= kRunRow && L.kept_stride[L.n_kept - 1] == k ? static_cast<int>(k) : 0;
}

// One block of the launch: an elementwise chunk, one group or a tile of groups.
struct BlockItem {
  int32_t tensor;  // index into this launch's TensorArgs
  int32_t group;   // 0: elementwise range [begin, end); 1: one group [begin, begin+1);
                   // 2: a column tile of groups [begin, end), begin a multiple of kTileGroups;
                   // 3: a run tile of groups [begin, end) within one innermost kept run
  int64_t begin;
  int64_t end;
};

// What a launch reads from the device: `n_tensors` TensorArgs followed by
// `n_items` BlockItems, at `table` (cached per set of tensors, table.cpp).
struct Launch {
  const uint8_t* table;
  int64_t n_tensors;
  int64_t n_items;
  float* scratch;  // fp32 scratch of the grouped tensors (plan.h: scratch_per_element), or null
};

void launch_fp32(const Launch& l, const StepArgs& a, cudaStream_t stream);
void launch_bf16(const Launch& l, const StepArgs& a, cudaStream_t stream);
void launch_fp16(const Launch& l, const StepArgs& a, cudaStream_t stream);

// One fused step on CUDA device `device`: one launch per parameter dtype, on
// the current stream, no host synchronization.
void step(const StepArgs& a, const std::vector<TensorArgs>& tensors, int device);

}  // namespace cuda
}  // namespace ramda
