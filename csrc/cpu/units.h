// Unit groups on the CPU (docs/math.md section 3, "Coupled groups"): one call
// per param group steps all its tensors and solves each unit, the union of
// its slices of several tensors, exactly (section 4). The units arrive as a
// segment table (NOTE: [Unit segment table] in ramda_kernels/backends/_units.py).
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_step.h"

namespace ramda {
namespace cpu {

// One row of the segment table: elements offset + o * outer_stride + i * stride
// (o < outer_count, i < count) of tensor `tensor`, in elements from its data pointer.
struct Segment {
  int64_t tensor, offset, count, stride, outer_count, outer_stride;
};
// A run of consecutive elements in no unit (unregularized: w = z/d).
struct FreeRun {
  int64_t tensor, offset, count;
};

struct UnitsArgs {
  const Segment* segments = nullptr;
  const int64_t* unit_start = nullptr;  // unit u's rows: [unit_start[u], unit_start[u + 1])
  int64_t n_units = 0;
  const int64_t* unit_size = nullptr;   // elements per unit
  const float* thr = nullptr;           // T = tau * c_g (or the prox threshold times c_g) per unit
  float* sigma = nullptr;               // per-unit warm start, updated; nullptr: no Newton solve
  bool solve = false;                   // tau != 0: the units are regularized
};

// Every tensor's state and parameter, each unit solved by one thread walking
// its segments, the free runs elementwise.
void units_step(const StepArgs& a, const std::vector<TensorArgs>& tensors, const UnitsArgs& u,
                const std::vector<FreeRun>& free);

// Consecutive units share a work item up to this many elements: neighbouring
// units' strided slices (columns) share cache lines, which one thread then
// owns instead of two writing them in turn.
constexpr int64_t kUnitItemElems = 16384;
// Units of one laned block, at most (NOTE: [Laned unit blocks] in units_impl.h).
constexpr int64_t kMaxUnitLanes = 16;

// Units [first, last) (one laned block, or one by one), and elements [offset, offset + count) of a free run, per instruction set
// (csrc/cpu/units_impl.h, compiled with the kernels).
#define RAMDA_CPU_UNIT_FUNCTIONS                                                          \
  void run_units(const StepArgs& a, const TensorArgs* t, const UnitsArgs& u, int64_t first, int64_t last, \
                 bool laned);                                                                         \
  void run_free(const StepArgs& a, const TensorArgs& t, int64_t offset, int64_t count);
namespace isa_default { RAMDA_CPU_UNIT_FUNCTIONS }
namespace isa_avx2 { RAMDA_CPU_UNIT_FUNCTIONS }
namespace isa_avx512 { RAMDA_CPU_UNIT_FUNCTIONS }
#undef RAMDA_CPU_UNIT_FUNCTIONS

}  // namespace cpu
}  // namespace ramda
