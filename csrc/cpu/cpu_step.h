#pragma once

#include <vector>

#include "../ramda_args.h"

namespace ramda {
namespace cpu {

// One fused step over all tensors of a call (any mix of fp32/bf16/fp16).
void step(const StepArgs& args, const std::vector<TensorArgs>& tensors);

}  // namespace cpu
}  // namespace ramda
