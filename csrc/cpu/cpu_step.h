// CPU fused step: work split and thread pool in dispatch.cpp, per-item
// kernels compiled once per instruction set from kernels_impl.h.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "../ramda_args.h"

namespace ramda {
namespace cpu {

// See NOTE: [Tiling per layout] in kernels_impl.h.
constexpr int64_t kTileElems = 65536;  // elements per group tile (buffers + lines in L2)
constexpr int64_t kElemItem = 65536;   // elementwise: elements per work item
constexpr int64_t kMinLanes = 32;      // "lanes" tile: at least two cache lines per run
constexpr int64_t kMaxLanes = 512;     // lanes of one "lanes" tile (stack arrays)
constexpr int64_t kMaxLaneRun = 64;    // longer inner runs use the "rows" tiling
constexpr int kScratchArrays = 5;
// "lanes" panel: elements per work item, at most. Large enough that the
// panels of the largest convolutions and projections of a ResNet-50
// (512x512x3x3, 2048x1024) are whole rows, so that pass 1 and pass 2 stream
// contiguous memory (NOTE: [Tiling per layout]). The cost is thread-local
// scratch: two panel-sized float buffers, up to 32 MiB per thread that steps
// a tensor this large.
constexpr int64_t kPanelElems = 1 << 22;
constexpr int64_t kParallelGrain = 1 << 18;  // elements per thread, at least (dispatch.cpp: for_each_item)

struct WorkItem {
  int32_t tensor;
  int64_t run;    // "lanes" tile: elements per group per run (1 for columns); 0 otherwise
  int64_t begin;  // elementwise: storage offset; groups: first group
  int64_t end;
  int64_t tile = 0;  // "lanes" panel: groups per solver tile (0: the item is one tile)
};

// The instruction set the CPU kernels run with here: "avx512", "avx2" or "default".
const char* isa_name();

// kScratchArrays thread-local float arrays: the first two of at least n
// elements, the others of at least `rest` (default n) elements.
float* const* scratch(int64_t n, int64_t rest = -1);

// One fused step over all tensors of a call (any mix of fp32/bf16/fp16).
void step(const StepArgs& args, const std::vector<TensorArgs>& tensors);

// fn(i) for i in [0, n) on the thread pool, as the step runs its work items
// (dispatch.cpp: for_each_item; `elems` sizes the thread count).
void parallel_items(int64_t n, int64_t elems, const std::function<void(int64_t)>& fn);

// NaN/Inf screen of dense tensors (the optimizers' gradient check,
// python/ramda_ref/optim.py `_finite_flags`): finite[i] = 1 when tensor i
// holds no NaN or +-Inf. One pass, threads across chunks of all tensors.
enum class ScreenType : int32_t { kFp32, kBf16, kFp16, kFp64 };
struct ScreenArgs {
  const void* data;
  int64_t numel;
  ScreenType type;
};
void finite_flags(const std::vector<ScreenArgs>& tensors, uint8_t* finite);

// One work item, and whether elements [begin, end) of a screened tensor are
// all finite, per instruction set.
#define RAMDA_CPU_ISA_FUNCTIONS                                             \
  void run(const TensorArgs& t, const StepArgs& a, const WorkItem& w);      \
  bool all_finite(const ScreenArgs& t, int64_t begin, int64_t end);
namespace isa_default { RAMDA_CPU_ISA_FUNCTIONS }
namespace isa_avx2 { RAMDA_CPU_ISA_FUNCTIONS }
namespace isa_avx512 { RAMDA_CPU_ISA_FUNCTIONS }
#undef RAMDA_CPU_ISA_FUNCTIONS

}  // namespace cpu
}  // namespace ramda
