// Host side of the CUDA step: the per-call metadata table (TensorArgs +
// BlockItems, int64 offsets; laid out by plan.h) and the solver's scratch,
// cached on the device keyed by everything that goes into them, so repeated
// steps upload and allocate nothing; one launch per dtype on the current stream.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "plan.h"

namespace ramda {
namespace cuda {
namespace {

constexpr size_t kCacheEntries = 64;

struct Plan {
  at::Tensor table;              // uint8 on the device: per dtype, TensorArgs then BlockItems
  int64_t offsets[3][3] = {};    // per dtype: byte offset, n_tensors, n_items
  at::Tensor scratch;            // fp32 scratch of the grouped tensors, or undefined
  // Recorded on the upload stream after the table's copy: a step on another
  // stream waits for it on the device (no host synchronization).
  std::shared_ptr<at::cuda::CUDAEvent> uploaded;
  c10::cuda::CUDAStream stream = c10::cuda::getDefaultCUDAStream();  // the upload stream
};

// Everything a plan depends on, field by field (hashing a TensorArgs' raw
// bytes would hash its padding too, which is indeterminate): the pointers,
// sizes, layout, path and weights; not the per-step thresholds.
std::string plan_key(const StepArgs& a, const std::vector<TensorArgs>& tensors, int device) {
  std::string key;
  key.reserve(tensors.size() * 96 + 16);
  auto put = [&key](const auto& v) { key.append(reinterpret_cast<const char*>(&v), sizeof(v)); };
  put(static_cast<int32_t>(device));
  put(static_cast<int32_t>(a.optim));
  put(static_cast<int32_t>(a.solver));  // scratch slots per element (plan.h)
  for (const TensorArgs& t : tensors) {
    put(t.param);
    put(t.grad);
    put(t.w0);
    put(t.s0);
    put(t.s1);
    put(t.s2);
    put(t.sigma);  // the warm-start state is addressed from the table too
    put(t.numel);
    put(static_cast<int32_t>(t.dtype));
    put(static_cast<int32_t>(t.path));
    put(t.cg);
    put(t.tol_scale);
    if (t.path != Path::kGroups) continue;
    const GroupLayout& L = t.layout;
    put(L.n_groups);
    put(L.group_size);
    put(L.n_kept);
    put(L.n_red);
    for (int32_t b = 0; b < L.n_kept; ++b) {
      put(L.kept_size[b]);
      put(L.kept_stride[b]);
    }
    for (int32_t b = 0; b < L.n_red; ++b) {
      put(L.red_size[b]);
      put(L.red_stride[b]);
    }
  }
  return key;
}

Plan build_plan(const StepArgs& a, const std::vector<TensorArgs>& tensors, int device) {
  const PlanLayout layout = lay_out_plan(a, tensors);
  Plan plan;
  std::memcpy(plan.offsets, layout.offsets, sizeof(plan.offsets));
  at::Tensor host = at::empty({static_cast<int64_t>(layout.bytes.size())},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr<uint8_t>(), layout.bytes.data(), layout.bytes.size());
  // Asynchronous upload on the current stream; the caching host allocator
  // keeps the pinned buffer alive until the copy has run.
  plan.table = host.to(at::Device(at::kCUDA, device), /*non_blocking=*/true);
  plan.stream = at::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device));
  plan.uploaded = std::make_shared<at::cuda::CUDAEvent>();
  plan.uploaded->record(plan.stream);
  if (layout.scratch_elems > 0)
    plan.scratch = at::empty({layout.scratch_elems},
                             at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, device));
  return plan;
}

// LRU cache of plans (the table lives on the device).
struct Cache {
  std::mutex mu;
  std::list<std::pair<std::string, Plan>> lru;
  std::unordered_map<std::string, std::list<std::pair<std::string, Plan>>::iterator> index;

  Plan get(const std::string& key, const StepArgs& a, const std::vector<TensorArgs>& tensors, int device) {
    std::lock_guard<std::mutex> lock(mu);
    auto it = index.find(key);
    if (it != index.end()) {
      lru.splice(lru.begin(), lru, it->second);
      return it->second->second;
    }
    lru.emplace_front(key, build_plan(a, tensors, device));
    index[key] = lru.begin();
    if (lru.size() > kCacheEntries) {
      index.erase(lru.back().first);
      lru.pop_back();
    }
    return lru.front().second;
  }
};

Cache& cache() {
  static Cache c;
  return c;
}

}  // namespace

void step(const StepArgs& a, const std::vector<TensorArgs>& tensors, int device) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const Plan plan = cache().get(plan_key(a, tensors, device), a, tensors, device);
  const c10::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device));
  if (stream != plan.stream) {
    // Built and uploaded on another stream: this stream waits for the upload on
    // the device (torch.cuda.graph synchronizes before a capture begins, and a
    // capture may not wait on an event recorded outside it), and the allocator
    // must not reuse an evicted plan's memory while this stream still reads it.
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &capturing));
    if (capturing == cudaStreamCaptureStatusNone) plan.uploaded->block(stream);
    plan.table.record_stream(stream);
    if (plan.scratch.defined()) plan.scratch.record_stream(stream);
  }
  const uint8_t* table = plan.table.data_ptr<uint8_t>();
  float* scratch = plan.scratch.defined() ? plan.scratch.data_ptr<float>() : nullptr;
  using Fn = void (*)(const Launch&, const StepArgs&, cudaStream_t);
  const Fn fns[3] = {&launch_fp32, &launch_bf16, &launch_fp16};
  for (int k = 0; k < 3; ++k) {
    const Launch l{table + plan.offsets[k][0], plan.offsets[k][1], plan.offsets[k][2], scratch};
    fns[k](l, a, stream.stream());
  }
}

}  // namespace cuda
}  // namespace ramda
