// The launch table of the CUDA step (TensorArgs + BlockItems per dtype) and
// the scratch it needs, built on the host without torch, so that the
// CUDA-on-CPU tests (csrc/tests/cuda_host) run exactly the table the
// device backend uploads (table.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cuda_step.h"

namespace ramda {
namespace cuda {

// fp32 scratch slots per element of a grouped tensor: y (RMDA/ProxSGD), none
// (exact: NOTE: [two-pass plan] in kernels.cuh), z, d and the PG iterate Z.
inline int64_t scratch_per_element(const StepArgs& a) {
  const bool dual = a.optim == Optim::kRamda || a.optim == Optim::kProxAdamW;
  if (!dual) return 1;
  return a.solver == Solver::kPg ? 3 : 0;
}

// Whether a group-lasso tensor's path runs on tiles without scratch: the
// exact solve of RAMDA / ProxAdamW (NOTE: [Column tiles] in kernels.cuh) and
// the RMDA / ProxSGD shrink (NOTE: [Shrink tiles]).
inline bool tiled_path(const StepArgs& a, const TensorArgs& t) {
  const bool dual = a.optim == Optim::kRamda || a.optim == Optim::kProxAdamW;
  return t.path == Path::kGroups && a.reg == Reg::kGroupLasso && (!dual || a.solver == Solver::kExact);
}

// PG on group lasso (RAMDA / ProxAdamW): column tiles with the scratch laid
// out per tile (NOTE: [PG column tiles]); one group per block elsewhere.
inline bool pg_group_lasso(const StepArgs& a, const TensorArgs& t) {
  const bool dual = a.optim == Optim::kRamda || a.optim == Optim::kProxAdamW;
  return t.path == Path::kGroups && a.reg == Reg::kGroupLasso && dual && a.solver == Solver::kPg;
}

// Whether a grouped tensor runs as column tiles (NOTE: [Column tiles] in
// kernels.cuh): a tiled path or PG on a layout whose innermost memory block
// is kept (input-wise Linear, channels-last channel-wise Conv).
inline bool column_tiles(const StepArgs& a, const TensorArgs& t) {
  return (tiled_path(a, t) || pg_group_lasso(a, t)) && !t.layout.inner_reduced();
}

// Whether a grouped tensor runs as run tiles (NOTE: [Run tiles] in
// kernels.cuh): a tiled path on a rows layout of short runs.
inline bool run_tiles(const StepArgs& a, const TensorArgs& t) { return tiled_path(a, t) && run_length(t.layout) > 0; }

struct PlanLayout {
  std::vector<uint8_t> bytes;   // per dtype, 16-byte aligned: TensorArgs then BlockItems
  int64_t offsets[3][3] = {};   // per dtype: byte offset, n_tensors, n_items
  int64_t scratch_elems = 0;    // fp32 scratch for the grouped tensors
};

inline PlanLayout lay_out_plan(const StepArgs& a, const std::vector<TensorArgs>& tensors) {
  PlanLayout plan;
  std::vector<TensorArgs> by_dtype[3];
  std::vector<BlockItem> items[3];
  const int64_t per_elem = scratch_per_element(a);
  for (TensorArgs t : tensors) {
    if (t.numel == 0) continue;
    const int slot = static_cast<int>(t.dtype);
    const int32_t ti = static_cast<int32_t>(by_dtype[slot].size());
    // each tensor's scratch starts 128-byte aligned
    plan.scratch_elems = (plan.scratch_elems + 31) / 32 * 32;
    // every grouped path has scratch but the exact solve and the tiled shrink
    if (t.path == Path::kGroups && !(run_tiles(a, t) || (column_tiles(a, t) && !pg_group_lasso(a, t)))) {
      t.scratch = plan.scratch_elems;
      plan.scratch_elems += per_elem * t.numel;
    }
    if (run_tiles(a, t)) {
      // G = kRunRow / K adjacent groups, never across the innermost kept block
      const int64_t per = std::min<int64_t>(kTileGroups, kRunRow / run_length(t.layout));
      const int64_t inner = t.layout.kept_size[t.layout.n_kept - 1];
      for (int64_t g = 0; g < t.layout.n_groups;) {
        const int64_t end = std::min(g + per, (g / inner + 1) * inner);
        items[slot].push_back({ti, 3, g, end});
        g = end;
      }
    } else if (column_tiles(a, t)) {
      for (int64_t g = 0; g < t.layout.n_groups; g += kTileGroups)
        items[slot].push_back({ti, 2, g, std::min(t.layout.n_groups, g + kTileGroups)});
    } else if (t.path == Path::kGroups) {
      for (int64_t g = 0; g < t.layout.n_groups; ++g) items[slot].push_back({ti, 1, g, g + 1});
    } else {
      for (int64_t o = 0; o < t.numel; o += kElemChunk)
        items[slot].push_back({ti, 0, o, std::min(t.numel, o + kElemChunk)});
    }
    by_dtype[slot].push_back(t);
  }
  size_t bytes = 0;
  for (int k = 0; k < 3; ++k) {
    bytes = (bytes + 15) / 16 * 16;
    plan.offsets[k][0] = static_cast<int64_t>(bytes);
    plan.offsets[k][1] = static_cast<int64_t>(by_dtype[k].size());
    plan.offsets[k][2] = static_cast<int64_t>(items[k].size());
    bytes += by_dtype[k].size() * sizeof(TensorArgs) + items[k].size() * sizeof(BlockItem);
  }
  plan.bytes.assign(std::max<size_t>(bytes, 1), 0);
  for (int k = 0; k < 3; ++k) {
    uint8_t* dst = plan.bytes.data() + plan.offsets[k][0];
    std::memcpy(dst, by_dtype[k].data(), by_dtype[k].size() * sizeof(TensorArgs));
    std::memcpy(dst + by_dtype[k].size() * sizeof(TensorArgs), items[k].data(),
                items[k].size() * sizeof(BlockItem));
  }
  return plan;
}

}  // namespace cuda
}  // namespace ramda
