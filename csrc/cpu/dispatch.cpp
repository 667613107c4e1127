// CPU step: splits the call into work items, runs them on ATen's thread pool
// and picks the kernels' instruction set once per process.

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <numeric>
#include <string>
#include <vector>

#include "cpu_step.h"

namespace ramda {
namespace cpu {
namespace {

using RunFn = void (*)(const TensorArgs&, const StepArgs&, const WorkItem&);
using FiniteFn = bool (*)(const ScreenArgs&, int64_t, int64_t);

struct Isa {
  RunFn run;
  FiniteFn all_finite;
  const char* name;
};

// The best instruction set this CPU has, or a lower one named by the
// environment variable RAMDA_CPU_ISA (avx2, default): the tests run every
// build of the kernels that way on one machine.
const Isa& isa() {
  static const Isa chosen = []() -> Isa {
    const char* env = std::getenv("RAMDA_CPU_ISA");
    const std::string cap = env ? env : "";
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if ((cap.empty() || cap == "avx512") && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq"))
      return {&isa_avx512::run, &isa_avx512::all_finite, "avx512"};
    if ((cap.empty() || cap == "avx512" || cap == "avx2") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return {&isa_avx2::run, &isa_avx2::all_finite, "avx2"};
#endif
    return {&isa_default::run, &isa_default::all_finite, "default"};
  }();
  return chosen;
}

// See NOTE: [Tiling per layout] (kernels_impl.h).
void split(const StepArgs& a, const std::vector<TensorArgs>& tensors, std::vector<WorkItem>& items) {
  // Panels for the exact group-lasso solve (NOTE: [Tiling per layout]).
  const bool panels = (a.optim == Optim::kRamda || a.optim == Optim::kProxAdamW) &&
                      a.solver == Solver::kExact;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorArgs& t = tensors[i];
    const int32_t ti = static_cast<int32_t>(i);
    if (t.numel == 0) continue;
    if (t.path == Path::kElementwise) {
      for (int64_t o = 0; o < t.numel; o += kElemItem)
        items.push_back({ti, 0, o, std::min(t.numel, o + kElemItem)});
      continue;
    }
    const GroupLayout& L = t.layout;
    const int64_t gsize = L.group_size;
    // Lanes: neighbouring groups are neighbouring runs of `run` elements,
    // i.e. the innermost kept block has stride `run` and sits right outside
    // the inner reduced run (run = 1: the inner block is kept, "columns").
    int64_t run = 0;
    if (L.n_kept > 0) {
      const int64_t kst = L.kept_stride[L.n_kept - 1];
      if (!L.inner_reduced() && kst == 1) {
        run = 1;
      } else if (L.inner_reduced() && L.red_stride[L.n_red - 1] == 1 &&
                 kst == L.red_size[L.n_red - 1] && kst < gsize && kst <= kMaxLaneRun) {
        run = kst;
      }
    }
    if (run > 0) {
      const int64_t inner = L.kept_size[L.n_kept - 1];
      // J groups per tile: about kTileElems elements, runs of at least
      // kMinLanes floats, and J*R a multiple of 16 where kMaxLanes allows
      // (whole vectors: a remainder of lanes runs every sweep as scalar code).
      const int64_t max_groups = std::max<int64_t>(1, kMaxLanes / run);
      int64_t want = std::max<int64_t>((kMinLanes + run - 1) / run, kTileElems / gsize);
      const int64_t m = 16 / std::gcd<int64_t>(run, 16);  // J granule for whole vectors
      if (max_groups >= m) want = std::min(std::max(m, (want + m / 2) / m * m), max_groups / m * m);
      const int64_t per = std::max<int64_t>(1, std::min(max_groups, want));
      // Panels: whole rows of up to kPanelElems elements, a multiple of the tile.
      const int64_t panel = kPanelElems / gsize / per * per;
      if (panels && panel >= 2 * per) {
        for (int64_t g0 = 0; g0 < L.n_groups; g0 += inner)
          for (int64_t g = g0; g < g0 + inner; g += panel)
            items.push_back({ti, run, g, std::min(g0 + inner, g + panel), per});
        continue;
      }
      // tiles never cross the innermost kept block (its groups are the adjacent ones)
      for (int64_t g0 = 0; g0 < L.n_groups; g0 += inner)
        for (int64_t g = g0; g < g0 + inner; g += per)
          items.push_back({ti, run, g, std::min(g0 + inner, g + per)});
      continue;
    }
    const int64_t per = std::max<int64_t>(1, kTileElems / gsize);
    for (int64_t g = 0; g < L.n_groups; g += per)
      items.push_back({ti, 0, g, std::min(L.n_groups, g + per)});
  }
}

}  // namespace

const char* isa_name() { return isa().name; }

float* const* scratch(int64_t n, int64_t rest) {
  // Arrays start 64 bytes past a multiple of 4 KiB from each other, so that
  // same-index accesses to them do not alias in L1 (4K aliasing).
  const auto padded = [](int64_t m) { return (m + 1023) / 1024 * 1024 + 16; };
  const int64_t head = padded(n), tail = padded(rest < 0 ? n : rest);
  const int64_t total = 2 * head + (kScratchArrays - 2) * tail;
  thread_local std::vector<float> mem;
  thread_local float* arrays[kScratchArrays];
  if (static_cast<int64_t>(mem.size()) < total) mem.resize(total);
  for (int i = 0; i < kScratchArrays; ++i) arrays[i] = mem.data() + (i < 2 ? i * head : 2 * head + (i - 2) * tail);
  return arrays;
}

namespace {

// Runs fn(i) for i in [0, n) on ATen's thread pool. Items may differ in cost
// (Newton iterations vary per group), so threads take them from a shared
// counter instead of a static split. A thread per kParallelGrain of the
// call's `elems` elements at most: waking the pool costs microseconds when
// cores are idle and a scheduler tick when they are not, which small steps
// (tests, small models) would pay on every step.
template <typename Fn>
void for_each_item(int64_t n, int64_t elems, const Fn& fn) {
  if (n == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(
      1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), n, elems / kParallelGrain}));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  });
}

}  // namespace

void parallel_items(int64_t n, int64_t elems, const std::function<void(int64_t)>& fn) {
  for_each_item(n, elems, fn);
}

void step(const StepArgs& args, const std::vector<TensorArgs>& tensors) {
  const RunFn run = isa().run;
  std::vector<WorkItem> items;
  split(args, tensors, items);
  int64_t elems = 0;
  for (const TensorArgs& t : tensors) elems += t.numel;
  for_each_item(static_cast<int64_t>(items.size()), elems,
                [&](int64_t i) { run(tensors[items[i].tensor], args, items[i]); });
}

void finite_flags(const std::vector<ScreenArgs>& tensors, uint8_t* finite) {
  const FiniteFn check = isa().all_finite;
  // Chunks of kElemItem elements; a tensor is finite when all its chunks are.
  struct Chunk {
    int64_t tensor, begin, end;
  };
  std::vector<Chunk> chunks;
  int64_t elems = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    finite[i] = 1;
    elems += tensors[i].numel;
    for (int64_t o = 0; o < tensors[i].numel; o += kElemItem)
      chunks.push_back({static_cast<int64_t>(i), o, std::min(tensors[i].numel, o + kElemItem)});
  }
  std::vector<uint8_t> ok(chunks.size(), 1);
  for_each_item(static_cast<int64_t>(chunks.size()), elems, [&](int64_t c) {
    ok[c] = check(tensors[chunks[c].tensor], chunks[c].begin, chunks[c].end);
  });
  for (size_t c = 0; c < chunks.size(); ++c)
    if (!ok[c]) finite[chunks[c].tensor] = 0;
}

}  // namespace cpu
}  // namespace ramda
