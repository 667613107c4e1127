// The checks and argument structs of the unit-group op (csrc/bindings.cpp
// registers it as ramda_kernels::units_): csrc/cpu/units.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "units.h"

namespace ramda {
namespace cpu {

// Everything one units_ call runs on, built and checked before anything is written.
struct UnitsCall {
  StepArgs a;
  std::vector<TensorArgs> tensors;
  std::vector<FreeRun> free;
  std::vector<int64_t> sizes;
  std::vector<float> thr;
  UnitsArgs u;
};

// `optimizer`: ramda, rmda, proxadamw or proxsgd; `states` its state lists in
// the order of ramda_ref.definitions (initial_point, grad_sum, grad_sum_sq; ...),
// empty where absent; `scalars` the step scalars in the order of
// ramda_kernels.backends._units.OP_SCALARS; `segments`, `unit_start`, `free`
// the segment table (NOTE: [Unit segment table] in ramda_kernels/backends/_units.py).
UnitsCall prepare_units(const std::string& optimizer, at::TensorList params, at::TensorList grads,
                        at::TensorList state0, at::TensorList state1, at::TensorList state2,
                        const std::optional<at::Tensor>& unit_sigma, const at::Tensor& segments,
                        const at::Tensor& unit_start, const at::Tensor& free,
                        at::ArrayRef<double> scalars, bool amsgrad, bool reweight);

inline void run_units(const UnitsCall& c) { units_step(c.a, c.tensors, c.u, c.free); }

}  // namespace cpu
}  // namespace ramda
