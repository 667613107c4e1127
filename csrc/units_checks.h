// Argument checks shared by the CPU and CUDA unit ops (csrc/cpu/units.cpp,
// csrc/cuda/units_table.cpp): the member dtypes and the segment table's parts
// (NOTE: [Unit segment table] in ramda_kernels/backends/_units.py).
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "ramda_args.h"

namespace ramda {

inline DType unit_param_type(int64_t i, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFp32;
    case at::kBFloat16: return DType::kBf16;
    case at::kHalf: return DType::kFp16;
    default:
      TORCH_CHECK(false, "units_: params[", i, "] has dtype ", t,
                  "; the fused step takes float32, bfloat16 or float16 (float64 runs on the reference)");
  }
}

// int64, contiguous, on the CPU, of `cols` columns (0: 1-D).
inline const int64_t* unit_table_part(const at::Tensor& x, const char* name, int64_t cols) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kLong && x.is_contiguous() &&
                  (cols == 0 ? x.dim() == 1 : (x.dim() == 2 && x.size(1) == cols)),
              "units_: ", name, " must be a contiguous int64 CPU tensor of shape ",
              cols == 0 ? "(n,)" : "(n, " + std::to_string(cols) + ")", ", got ", x.scalar_type(), " ",
              x.sizes(), " on ", x.device());
  return x.data_ptr<int64_t>();
}

// At least one member, one gradient per member, and one tensor per member in
// each state list the optimizer uses (names[r] empty: list r unused, and empty).
inline size_t check_unit_lists(at::TensorList params, at::TensorList grads, at::TensorList state0,
                               at::TensorList state1, at::TensorList state2, const char* const names[3]) {
  const size_t n = params.size();
  TORCH_CHECK(n > 0, "units_: a unit group has at least one tensor");
  TORCH_CHECK(grads.size() == n, "units_: grads has ", grads.size(), " tensors but params has ", n);
  const at::TensorList lists[3] = {state0, state1, state2};
  for (int r = 0; r < 3; ++r) {
    const size_t want = names[r][0] ? n : 0;
    TORCH_CHECK(lists[r].size() == want, "units_: state list ", r, " (", names[r][0] ? names[r] : "unused",
                ") has ", lists[r].size(), " tensors, expected ", want);
  }
  return n;
}

}  // namespace ramda
