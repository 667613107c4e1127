// Host side of the CUDA step: the per-call metadata table (TensorArgs +
// BlockItems, int64 offsets), cached on the device keyed by everything that
// goes into it, so repeated steps upload nothing; one launch per dtype on the
// current stream.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstring>
#include <list>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "cuda_step.h"

namespace ramda {
namespace cuda {
namespace {

constexpr size_t kCacheEntries = 64;

struct Plan {
  at::Tensor table;              // uint8 on the device: per dtype, TensorArgs then BlockItems
  int64_t offsets[3][3] = {};    // per dtype: byte offset, n_tensors, n_items
  int64_t scratch_elems = 0;     // fp32 scratch for the grouped tensors
};

// Everything a plan depends on, as raw bytes: the TensorArgs (pointers,
// sizes, layout, path, weights) minus the per-step thresholds.
std::string plan_key(const StepArgs& a, const std::vector<TensorArgs>& tensors, int device) {
  std::string key;
  key.reserve(tensors.size() * sizeof(TensorArgs) + 16);
  const int32_t head[3] = {device, static_cast<int32_t>(a.optim), static_cast<int32_t>(a.amsgrad)};
  key.append(reinterpret_cast<const char*>(head), sizeof(head));
  for (TensorArgs t : tensors) {
    t.thr = t.inv_thr = t.pg_tol = 0.0f;
    key.append(reinterpret_cast<const char*>(&t), sizeof(t));
  }
  return key;
}

int dtype_slot(DType d) { return static_cast<int>(d); }

Plan build_plan(const std::vector<TensorArgs>& tensors, int device) {
  Plan plan;
  std::vector<TensorArgs> by_dtype[3];
  std::vector<BlockItem> items[3];
  for (TensorArgs t : tensors) {
    if (t.numel == 0) continue;
    const int slot = dtype_slot(t.dtype);
    const int32_t ti = static_cast<int32_t>(by_dtype[slot].size());
    if (t.path == Path::kGroups) {
      t.scratch = plan.scratch_elems;
      plan.scratch_elems += 3 * t.numel;
      for (int64_t g = 0; g < t.layout.n_groups; ++g) items[slot].push_back({ti, 1, g, g + 1});
    } else {
      for (int64_t o = 0; o < t.numel; o += 4096)
        items[slot].push_back({ti, 0, o, std::min(t.numel, o + 4096)});
    }
    by_dtype[slot].push_back(t);
  }
  size_t bytes = 0;
  for (int k = 0; k < 3; ++k) {
    bytes = (bytes + 15) / 16 * 16;
    plan.offsets[k][0] = static_cast<int64_t>(bytes);
    plan.offsets[k][1] = static_cast<int64_t>(by_dtype[k].size());
    plan.offsets[k][2] = static_cast<int64_t>(items[k].size());
    bytes += by_dtype[k].size() * sizeof(TensorArgs) + items[k].size() * sizeof(BlockItem);
  }
  at::Tensor host = at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* h = host.data_ptr<uint8_t>();
  for (int k = 0; k < 3; ++k) {
    uint8_t* dst = h + plan.offsets[k][0];
    std::memcpy(dst, by_dtype[k].data(), by_dtype[k].size() * sizeof(TensorArgs));
    std::memcpy(dst + by_dtype[k].size() * sizeof(TensorArgs), items[k].data(),
                items[k].size() * sizeof(BlockItem));
  }
  // Asynchronous upload on the current stream; the caching host allocator
  // keeps the pinned buffer alive until the copy has run.
  plan.table = host.to(at::Device(at::kCUDA, device), /*non_blocking=*/true);
  return plan;
}

// LRU cache of plans (the table lives on the device).
struct Cache {
  std::mutex mu;
  std::list<std::pair<std::string, Plan>> lru;
  std::unordered_map<std::string, std::list<std::pair<std::string, Plan>>::iterator> index;

  Plan get(const std::string& key, const std::vector<TensorArgs>& tensors, int device) {
    std::lock_guard<std::mutex> lock(mu);
    auto it = index.find(key);
    if (it != index.end()) {
      lru.splice(lru.begin(), lru, it->second);
      return it->second->second;
    }
    lru.emplace_front(key, build_plan(tensors, device));
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
  const Plan plan = cache().get(plan_key(a, tensors, device), tensors, device);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  at::Tensor scratch;
  if (plan.scratch_elems > 0)
    scratch = at::empty({plan.scratch_elems},
                        at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, device));
  const uint8_t* table = plan.table.data_ptr<uint8_t>();
  using Fn = void (*)(const Launch&, const StepArgs&, cudaStream_t);
  const Fn fns[3] = {&launch_fp32, &launch_bf16, &launch_fp16};
  for (int k = 0; k < 3; ++k) {
    const Launch l{table + plan.offsets[k][0], plan.offsets[k][1], plan.offsets[k][2],
                   scratch.defined() ? scratch.data_ptr<float>() : nullptr};
    fns[k](l, a, stream);
  }
}

}  // namespace cuda
}  // namespace ramda
