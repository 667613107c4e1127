// The CUDA unit-group op (csrc/bindings.cpp registers it as the CUDA kernel of
// ramda_kernels::units_): cuda/units_table.cpp. Arguments as the CPU op's
// (csrc/cpu/units_op.h: prepare_units), params, grads, state and unit_sigma on
// one CUDA device, the segment table on the CPU.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace ramda {
namespace cuda {

void units_step(const std::string& optimizer, at::TensorList params, at::TensorList grads, at::TensorList state0,
                at::TensorList state1, at::TensorList state2, const std::optional<at::Tensor>& unit_sigma,
                const at::Tensor& segments, const at::Tensor& unit_start, const at::Tensor& free,
                at::ArrayRef<double> scalars, bool amsgrad, bool reweight);

}  // namespace cuda
}  // namespace ramda
