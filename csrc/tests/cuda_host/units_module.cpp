// C entry point of the CUDA unit-group kernel on CPU threads for
// tests/test_cuda_units.py (ctypes, no torch; NOTE: [CUDA on CPU] in
// cuda_runtime.h): the caller passes CPU buffers, the segment table and the
// step scalars as the op gets them (cuda/units_table.cpp), the launch table
// is laid out by cuda/units.h as the op lays it out, the scratch is
// NaN-filled and the blocks run in a shuffled order.
#include <cstdio>
#include <exception>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "../../cuda/units.cuh"

extern "C" {

// desc: 7 int64 per tensor: param, grad, state lists 0-2 (addresses, 0: none), numel, dtype.
// sigma: one fp32 per unit, or null. Returns 0, or 1 with a message in err.
int ramda_cuda_host_units_step(const char* optimizer, const double* scalars, int n_scalars, int amsgrad,
                               int reweight, int n_tensors, const int64_t* desc, const int64_t* segments,
                               int64_t n_rows, const int64_t* unit_start, int64_t n_units, const int64_t* free,
                               int64_t n_free, float* sigma, uint64_t order_seed, int drop_sync, char* err,
                               int err_len) {
  try {
    using namespace ramda;
    StepArgs a;
    const char* lists[3];
    std::string why = cuda::unit_step_args(optimizer, scalars, static_cast<size_t>(n_scalars), amsgrad != 0, a, lists);
    if (!why.empty()) throw std::invalid_argument(why);
    std::vector<TensorArgs> ts;
    auto ptr = [](int64_t v) { return reinterpret_cast<void*>(static_cast<intptr_t>(v)); };
    for (int i = 0; i < n_tensors; ++i) {
      const int64_t* d = desc + 7 * i;
      void* const st[3] = {ptr(d[2]), ptr(d[3]), ptr(d[4])};
      ts.push_back(cuda::unit_tensor_args(a.optim, ptr(d[0]), ptr(d[1]), st, d[5], static_cast<DType>(d[6])));
    }
    why = cuda::check_unit_table(segments, n_rows, unit_start, n_units, free, n_free, ts);
    if (!why.empty()) throw std::invalid_argument(why);
    const cuda::UnitPlan plan =
        cuda::lay_out_units(a, ts, segments, n_rows, unit_start, n_units, free, n_free, reweight != 0);
    // 256-byte aligned as cudaMalloc's memory, NaN-filled: a read before a write shows
    constexpr size_t kAlign = 256 / sizeof(float);
    std::vector<float> buffer(static_cast<size_t>(plan.scratch_elems) + kAlign,
                              std::numeric_limits<float>::quiet_NaN());
    float* scratch = buffer.data() + (kAlign - reinterpret_cast<uintptr_t>(buffer.data()) / sizeof(float) % kAlign) % kAlign;
    // the scratch is the region after the caller's, as in host_step.h (ramda_cuda_host_meter_start)
    if (cuda_host::meter().on)
      cuda_host::meter_region(scratch, static_cast<size_t>(plan.scratch_elems) * sizeof(float));
    cuda::UnitLaunch l = plan.launch;
    l.table = plan.bytes.data();
    l.sigma = sigma;
    l.scratch = plan.scratch_elems > 0 ? scratch : nullptr;
    cuda_host::set_block_order(order_seed);
    cuda_host::drop_sync(drop_sync);
    cuda::launch_units_kernel(l, a, nullptr);
    cuda_host::drop_sync(0);
    return 0;
  } catch (const std::exception& e) {
    cuda_host::drop_sync(0);
    std::snprintf(err, static_cast<size_t>(err_len), "%s", e.what());
    return 1;
  }
}

}  // extern "C"
