// The unit-group kernel under nvcc (NOTE: [CUDA unit blocks] in units.h).
#include <c10/cuda/CUDAException.h>

#include "units.cuh"

namespace ramda {
namespace cuda {

void launch_units(const UnitLaunch& l, const StepArgs& a, cudaStream_t stream) {
  launch_units_kernel(l, a, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace ramda
