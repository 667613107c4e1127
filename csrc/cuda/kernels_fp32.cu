// The fused step kernel for float parameters (NOTE: [CUDA tiling] in kernels.cuh).
#include <c10/cuda/CUDAException.h>

#include "kernels.cuh"

namespace ramda {
namespace cuda {

void launch_fp32(const Launch& l, const StepArgs& a, cudaStream_t stream) {
  launch<float>(l, a, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace ramda
