// Host-side port of ramda_kernels.layout.group_layout (NOTE: [Group layout]).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ramda_args.h"

namespace ramda {

// `reduced[i]` says whether dim i belongs to a group. Size-1 dims are
// dropped, dims are put in memory order (largest stride first) and
// neighbours with the same role that are contiguous relative to each other
// are merged.
inline GroupLayout make_group_layout(const std::vector<int64_t>& shape,
                                     const std::vector<int64_t>& strides,
                                     const std::vector<bool>& reduced) {
  GroupLayout out;
  int64_t n_groups = 1, gsize = 1;
  for (size_t i = 0; i < shape.size(); ++i) (reduced[i] ? gsize : n_groups) *= shape[i];
  if (n_groups == 0 || gsize == 0) {
    out.n_groups = gsize == 0 ? 0 : n_groups;
    out.group_size = gsize;
    return out;
  }
  std::vector<size_t> order;
  for (size_t i = 0; i < shape.size(); ++i)
    if (shape[i] != 1) order.push_back(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return strides[a] > strides[b]; });
  struct Block { bool red; int64_t size, stride; };
  std::vector<Block> blocks;
  for (size_t i : order) {
    const bool role = reduced[i];
    if (!blocks.empty() && blocks.back().red == role &&
        blocks.back().stride == shape[i] * strides[i]) {
      blocks.back().size *= shape[i];
      blocks.back().stride = strides[i];
    } else {
      blocks.push_back({role, shape[i], strides[i]});
    }
  }
  out.n_groups = n_groups;
  out.group_size = gsize;
  for (const Block& b : blocks) {
    if (b.red) {
      out.red_size[out.n_red] = b.size;
      out.red_stride[out.n_red++] = b.stride;
    } else {
      out.kept_size[out.n_kept] = b.size;
      out.kept_stride[out.n_kept++] = b.stride;
    }
  }
  if (out.n_red == 0 && out.n_kept == 0) {  // one element: a one-element "rows" group
    out.red_size[0] = 1;
    out.red_stride[0] = 1;
    out.n_red = 1;
  }
  return out;
}

}  // namespace ramda
