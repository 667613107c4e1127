// C entry points of the CUDA-on-CPU step for tests/test_cuda_on_cpu.py
// (ctypes; no torch in this library): the caller passes CPU buffers and the
// per-call scalars the bindings would compute, the step runs the CUDA
// kernels on CPU threads (host_step.h).
#include <cstdio>
#include <exception>
#include <stdexcept>
#include <vector>

#include "../../cuda/fused_path.h"
#include "../../group_layout.h"
#include "host_step.h"

namespace {

constexpr int kStepFields = 21;
constexpr int kTensorFields = 10 + 3 * ramda::kMaxDims;

ramda::StepArgs step_args(const double* v) {
  ramda::StepArgs a;
  a.optim = static_cast<ramda::Optim>(static_cast<int32_t>(v[0]));
  a.reg = static_cast<ramda::Reg>(static_cast<int32_t>(v[1]));
  a.solver = static_cast<ramda::Solver>(static_cast<int32_t>(v[2]));
  a.max_iters = static_cast<int32_t>(v[3]);
  a.amsgrad = v[4] != 0.0;
  a.s = static_cast<float>(v[5]);
  a.eps = static_cast<float>(v[6]);
  a.keep = static_cast<float>(v[7]);
  a.c = static_cast<float>(v[8]);
  a.beta = static_cast<float>(v[9]);
  a.lr = static_cast<float>(v[10]);
  a.decay = static_cast<float>(v[11]);
  a.adam = ramda::AdamCoeffs{static_cast<float>(v[12]), static_cast<float>(v[13]),
                             static_cast<float>(v[14]), static_cast<float>(v[15]),
                             static_cast<float>(v[16]), static_cast<float>(v[17]),
                             static_cast<float>(v[18])};
  a.thr_base = v[19];
  a.eps_t = v[20];
  return a;
}

// desc: param, grad, s0, s1, s2, sigma (addresses), numel, dtype, (unused),
// ndim, then the grouped view's shape, strides and reduced flags (kMaxDims
// each); the path and the l1 group are decided here (fused_path.h), as the
// bindings decide them. weights: cg, tol_scale.
// sigma (0: none) is one fp32 per group in the reference's group order, which
// is the kernels' order when the kept dims are in memory order
// (kept_dims_in_memory_order, csrc/cuda/fused_path.h).
ramda::TensorArgs tensor_args(const ramda::StepArgs& a, const int64_t* desc, const double* weights) {
  ramda::TensorArgs t;
  auto ptr = [](int64_t v) { return reinterpret_cast<void*>(static_cast<intptr_t>(v)); };
  t.param = ptr(desc[0]);
  t.grad = ptr(desc[1]);
  // RAMDA, RMDA: slot 2 is W0, in the parameter's dtype (TensorArgs::w0)
  if (a.optim == ramda::Optim::kRamda || a.optim == ramda::Optim::kRmda)
    t.w0 = ptr(desc[2]);
  else
    t.s0 = static_cast<float*>(ptr(desc[2]));
  t.s1 = static_cast<float*>(ptr(desc[3]));
  t.s2 = static_cast<float*>(ptr(desc[4]));
  t.sigma = static_cast<float*>(ptr(desc[5]));
  t.numel = desc[6];
  t.dtype = static_cast<ramda::DType>(desc[7]);
  t.path = ramda::fused_path(a.optim, a.reg, a.solver, a.thr_base);
  const int64_t nd = desc[9];
  if (t.path == ramda::Path::kGroups && t.numel > 0) {
    const int64_t* f = desc + 10;
    std::vector<int64_t> shape(f, f + nd), strides(f + ramda::kMaxDims, f + ramda::kMaxDims + nd);
    std::vector<bool> reduced;
    for (int64_t d = 0; d < nd; ++d) reduced.push_back(f[2 * ramda::kMaxDims + d] != 0);
    if (a.reg == ramda::Reg::kL1) ramda::whole_tensor_group(t.numel, shape, strides, reduced);
    if (t.sigma != nullptr && !ramda::kept_dims_in_memory_order(shape, strides, reduced))
      throw std::invalid_argument("sigma: the warm start needs the kept dims in memory order "
                                  "(the kernels number groups in memory order)");
    t.layout = ramda::make_group_layout(shape, strides, reduced);
  }
  t.cg = weights[0];
  t.tol_scale = weights[1];
  return t;
}

}  // namespace

extern "C" {

int ramda_cuda_host_fields(int which) { return which == 0 ? kStepFields : kTensorFields; }

// Counts the global accesses of the next step (NOTE: [Counted global memory]
// in cuda_runtime.h) by region: `regions` holds n (start address, bytes)
// pairs; the step's scratch is region n and every other address region n+1.
void ramda_cuda_host_meter_start(int n, const int64_t* regions) {
  cuda_host::meter_start();
  for (int i = 0; i < n; ++i)
    cuda_host::meter_region(reinterpret_cast<const void*>(static_cast<intptr_t>(regions[2 * i])),
                            static_cast<size_t>(regions[2 * i + 1]));
}

// Stops the meter; out: read bytes, written bytes, read sectors, written
// sectors per region (n + 2 regions, as ramda_cuda_host_meter_start numbers them).
void ramda_cuda_host_meter_read(int64_t* out) {
  cuda_host::meter_stop();
  const cuda_host::Meter& m = cuda_host::meter();
  auto put = [&out](const cuda_host::RegionCount& r) {
    *out++ = static_cast<int64_t>(r.read);
    *out++ = static_cast<int64_t>(r.written);
    *out++ = static_cast<int64_t>(r.sectors_r);
    *out++ = static_cast<int64_t>(r.sectors_w);
  };
  for (const auto& r : m.regions) put(r);
  put(m.other);
}

// Returns 0, or 1 with a message in err.
int ramda_cuda_host_step(const double* step, int n_tensors, const int64_t* desc,
                         const double* weights, uint64_t order_seed, int drop_sync, char* err,
                         int err_len) {
  try {
    const ramda::StepArgs a = step_args(step);
    std::vector<ramda::TensorArgs> tensors;
    for (int i = 0; i < n_tensors; ++i)
      tensors.push_back(tensor_args(a, desc + static_cast<size_t>(i) * kTensorFields, weights + 2 * i));
    cuda_host::drop_sync(drop_sync);
    ramda::cuda_host_step::step(a, tensors, order_seed);
    cuda_host::drop_sync(0);
    return 0;
  } catch (const std::exception& e) {
    cuda_host::drop_sync(0);
    std::snprintf(err, static_cast<size_t>(err_len), "%s", e.what());
    return 1;
  }
}

// The 16-bit conversions of the stand-in (c10/util/*.h here), for a test
// against torch's.
void ramda_cuda_host_to_16bit(const float* x, int64_t n, uint16_t* half, uint16_t* bf16) {
  for (int64_t i = 0; i < n; ++i) {
    half[i] = c10::Half(x[i]).x;
    bf16[i] = c10::BFloat16(x[i]).x;
  }
}

void ramda_cuda_host_from_16bit(const uint16_t* half, const uint16_t* bf16, int64_t n, float* h,
                                float* b) {
  for (int64_t i = 0; i < n; ++i) {
    c10::Half hv;
    hv.x = half[i];
    c10::BFloat16 bv;
    bv.x = bf16[i];
    h[i] = static_cast<float>(hv);
    b[i] = static_cast<float>(bv);
  }
}

}  // extern "C"
