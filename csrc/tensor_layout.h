// Layout tests of the ops' tensor arguments (csrc/bindings.cpp, csrc/cpu/units.cpp).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <utility>
#include <vector>

namespace ramda {

// The elements fill numel consecutive slots from data_ptr() (torch has no
// negative strides), in whatever order (channels_last, transposed).
inline bool is_dense(const at::Tensor& x) {
  if (x.numel() <= 1) return true;
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t d = 0; d < x.dim(); ++d)
    if (x.size(d) != 1) pairs.emplace_back(x.stride(d), x.size(d));
  std::sort(pairs.begin(), pairs.end());
  int64_t expected = 1;
  for (auto [st, s] : pairs) {
    if (st != expected) return false;
    expected *= s;
  }
  return true;
}

// Same shape, and the same strides wherever a dim has more than one entry.
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

}  // namespace ramda
