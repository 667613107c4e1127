// Host side of the CUDA unit op (cuda/units_op.h): the checks, the launch
// table of cuda/units.h cached on the device keyed by its bytes (pointers,
// table and weights; the step scalars and sigma are launch arguments), so
// repeated steps upload and allocate nothing; one launch on the current stream.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "../tensor_layout.h"
#include "../units_checks.h"
#include "units.h"
#include "units_op.h"

namespace ramda {
namespace cuda {
namespace {

constexpr size_t kCacheEntries = 16;

struct DeviceTable {
  at::Tensor table;    // uint8 on the device: UnitPlan::bytes
  at::Tensor scratch;  // fp32 (RMDA / ProxSGD units over kUnitCachedElems), or undefined
  std::shared_ptr<at::cuda::CUDAEvent> uploaded;  // recorded after the upload on `stream`
  c10::cuda::CUDAStream stream = c10::cuda::getDefaultCUDAStream();
};

struct TableCache {
  std::mutex mu;
  std::list<std::pair<std::string, DeviceTable>> lru;
  std::unordered_map<std::string, std::list<std::pair<std::string, DeviceTable>>::iterator> index;

  DeviceTable get(const UnitPlan& plan, int device) {
    std::string key(reinterpret_cast<const char*>(plan.bytes.data()), plan.bytes.size());
    key.append(reinterpret_cast<const char*>(&device), sizeof(device));
    std::lock_guard<std::mutex> lock(mu);
    auto it = index.find(key);
    if (it != index.end()) {
      lru.splice(lru.begin(), lru, it->second);
      return it->second->second;
    }
    DeviceTable t;
    at::Tensor host = at::empty({static_cast<int64_t>(plan.bytes.size())},
                                at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr<uint8_t>(), plan.bytes.data(), plan.bytes.size());
    t.table = host.to(at::Device(at::kCUDA, device), /*non_blocking=*/true);
    t.stream = at::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device));
    t.uploaded = std::make_shared<at::cuda::CUDAEvent>();
    t.uploaded->record(t.stream);
    if (plan.scratch_elems > 0)
      t.scratch = at::empty({plan.scratch_elems}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, device));
    lru.emplace_front(std::move(key), t);
    index[lru.front().first] = lru.begin();
    if (lru.size() > kCacheEntries) {
      index.erase(lru.back().first);
      lru.pop_back();
    }
    return t;
  }
};

TableCache& cache() {
  static TableCache c;
  return c;
}

}  // namespace

void units_step(const std::string& optimizer, at::TensorList params, at::TensorList grads, at::TensorList state0,
                at::TensorList state1, at::TensorList state2, const std::optional<at::Tensor>& unit_sigma,
                const at::Tensor& segments, const at::Tensor& unit_start, const at::Tensor& free,
                at::ArrayRef<double> scalars, bool amsgrad, bool reweight) {
  StepArgs a;
  const char* names[3];
  const std::string why = unit_step_args(optimizer, scalars.data(), scalars.size(), amsgrad, a, names);
  TORCH_CHECK(why.empty(), "units_: ", why);
  const size_t n = check_unit_lists(params, grads, state0, state1, state2, names);
  const at::TensorList lists[3] = {state0, state1, state2};
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "units_: params[0] is on ", device, ", not a CUDA device");
  const bool has_w0 = a.optim == Optim::kRamda || a.optim == Optim::kRmda;
  std::vector<TensorArgs> ts;
  for (size_t k = 0; k < n; ++k) {
    const int64_t i = static_cast<int64_t>(k);
    const at::Tensor& p = params[k];
    TORCH_CHECK(p.device() == device && p.layout() == at::kStrided && is_dense(p), "units_: params[", i,
                "] must be a dense strided tensor on ", device, " (got strides ", p.strides(), " on ", p.device(), ")");
    const at::Tensor& g = grads[k];
    TORCH_CHECK(g.device() == device && g.scalar_type() == p.scalar_type() && same_layout(g, p), "units_: grads[", i,
                "] must have the dtype, shape and strides of params[", i, "] (", p.scalar_type(), " ", p.sizes(), " ",
                p.strides(), "), got ", g.scalar_type(), " ", g.sizes(), " ", g.strides(), " on ", g.device());
    void* st[3] = {nullptr, nullptr, nullptr};
    for (int r = 0; r < 3; ++r) {
      if (!names[r][0]) continue;
      const at::Tensor& x = lists[r][k];
      // RAMDA, RMDA: list 0 is W0, kept in the parameter's dtype (TensorArgs::w0)
      const at::ScalarType want = has_w0 && r == 0 ? p.scalar_type() : at::kFloat;
      TORCH_CHECK(x.device() == device && x.scalar_type() == want && same_layout(x, p), "units_: ", names[r], "[",
                  i, "] must be ", want == at::kFloat ? "float32" : "in the parameter's dtype",
                  " with the shape and strides of params[", i, "] (", p.sizes(), " ", p.strides(), "), got ",
                  x.scalar_type(), " ", x.sizes(), " ", x.strides(), " on ", x.device());
      st[r] = x.data_ptr();
    }
    void* const lists_k[3] = {st[0], st[1], st[2]};
    ts.push_back(unit_tensor_args(a.optim, p.data_ptr(), g.data_ptr(), lists_k, p.numel(),
                                  unit_param_type(i, p.scalar_type())));
  }
  const int64_t* seg = unit_table_part(segments, "segments", 6);
  const int64_t* start = unit_table_part(unit_start, "unit_start", 0);
  const int64_t* fr = unit_table_part(free, "free", 3);
  const int64_t n_rows = segments.size(0), n_units = unit_start.numel() - 1, n_free = free.size(0);
  const std::string bad = check_unit_table(seg, n_rows, start, n_units, fr, n_free, ts);
  TORCH_CHECK(bad.empty(), "units_: ", bad);
  float* sigma = nullptr;
  const bool newton = a.optim == Optim::kRamda || a.optim == Optim::kProxAdamW;
  if (newton && a.thr_base != 0.0 && unit_sigma && unit_sigma->defined()) {
    const at::Tensor& sg = *unit_sigma;
    TORCH_CHECK(sg.device() == device && sg.scalar_type() == at::kFloat && sg.is_contiguous() && sg.dim() == 1 &&
                    sg.numel() == n_units,
                "units_: unit_sigma must be a contiguous float32 tensor on ", device, " of one value per unit (",
                n_units, "), got ", sg.scalar_type(), " ", sg.sizes(), " on ", sg.device());
    sigma = sg.data_ptr<float>();
  }
  const UnitPlan plan = lay_out_units(a, ts, seg, n_rows, start, n_units, fr, n_free, reweight);

  const int dev = device.index();
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(dev));
  const DeviceTable t = cache().get(plan, dev);
  const c10::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(dev));
  if (stream != t.stream) {
    // Uploaded on another stream: wait for the upload on the device (not
    // inside a graph capture, which cannot wait on an outside event), and keep
    // an evicted table's memory from reuse while this stream reads it.
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &capturing));
    if (capturing == cudaStreamCaptureStatusNone) t.uploaded->block(stream);
    t.table.record_stream(stream);
    if (t.scratch.defined()) t.scratch.record_stream(stream);
  }
  UnitLaunch l = plan.launch;
  l.table = t.table.data_ptr<uint8_t>();
  l.sigma = sigma;
  l.scratch = t.scratch.defined() ? t.scratch.data_ptr<float>() : nullptr;
  launch_units(l, a, stream.stream());
}

}  // namespace cuda
}  // namespace ramda
