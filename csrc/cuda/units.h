// Unit groups on CUDA (docs/math.md section 3, "Coupled groups"; section 4):
// one launch per param group steps every tensor and solves each unit, the
// union of its slices of several tensors, exactly. The units arrive as the
// segment table of NOTE: [Unit segment table] (ramda_kernels/backends/_units.py).
// This header is torch- and CUDA-free: the op (cuda/units_table.cpp) and the
// CUDA-on-CPU driver (csrc/tests/cuda_host/units_module.cpp) build the same
// launch table with it. The kernel: cuda/units.cuh.
//
// NOTE: [CUDA unit blocks]
// Block b runs item b: a unit (one block per unit, walking its segments in
// table order, so the unit's sums are reduced in one fixed order whatever
// the block order) or a chunk of kElemChunk elements of a free run
// (unregularized, w = z/d). A unit of at most kUnitCachedElems elements
// keeps z, d in registers (NOTE: [Register rows] in kernels.cuh): one read
// of the state, one write, whatever the Newton steps. A larger one follows
// NOTE: [two-pass plan] (RAMDA / ProxAdamW recompute z, d from the new state
// per Newton pass; RMDA / ProxSGD keep y in an fp32 scratch, kUnitScratch).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "../ramda_args.h"
#include "../unit_args.h"
#include "cuda_step.h"

namespace ramda {
namespace cuda {

// Elements of a unit held in registers: kCached * kThreads (kernels.cuh; checked in units.cuh).
constexpr int64_t kUnitCachedElems = 16 * 256;

// One block of the unit launch.
struct UnitItem {
  int32_t kind;    // 0: elements [begin, end) of tensor `tensor`, in no unit; 1: unit `begin`
  int32_t tensor;
  int64_t begin;
  int64_t end;
};

// Per unit: its elements, the offset of its fp32 scratch (RMDA / ProxSGD
// units over kUnitCachedElems, else 0) and its weight c_g (sqrt(size) or 1).
struct UnitMeta {
  int64_t size;
  int64_t scratch;
  double cg;
};

// What the unit kernel reads: at `table`, n_tensors TensorArgs, then (at the
// byte offsets) the items, the segment rows (int64, 6 per row), unit_start
// (n_units + 1) and the UnitMeta of each unit. sigma and scratch are per call.
struct UnitLaunch {
  const uint8_t* table = nullptr;
  int64_t n_tensors = 0, n_items = 0, n_units = 0;
  int64_t items_at = 0, rows_at = 0, start_at = 0, meta_at = 0;
  float* sigma = nullptr;    // per-unit warm start (RAMDA / ProxAdamW solving), read and written
  float* scratch = nullptr;  // fp32, UnitPlan::scratch_elems
};

struct UnitPlan {
  std::vector<uint8_t> bytes;  // the table (UnitLaunch::table's contents)
  UnitLaunch launch;           // offsets and counts; table, sigma, scratch unset
  int64_t scratch_elems = 0;
};

using ramda::unit_step_args;  // csrc/unit_args.h

// The TensorArgs of one tensor, zero-filled first so that its bytes (padding
// included) key the plan cache: RAMDA / RMDA read list 0 as W0 in the
// parameter's dtype, the others list r as s_r.
inline TensorArgs unit_tensor_args(Optim optim, void* param, const void* grad, void* const (&lists)[3], int64_t numel,
                                   DType dtype) {
  TensorArgs t;
  std::memset(static_cast<void*>(&t), 0, sizeof(t));
  t.param = param;
  t.grad = grad;
  const bool w0 = optim == Optim::kRamda || optim == Optim::kRmda;
  if (w0) t.w0 = lists[0];
  else t.s0 = static_cast<float*>(lists[0]);
  t.s1 = static_cast<float*>(lists[1]);
  t.s2 = static_cast<float*>(lists[2]);
  t.numel = numel;
  t.dtype = dtype;
  return t;
}

// Every element the table names inside its tensor, every unit non-empty.
// Returns an error, or "".
inline std::string check_unit_table(const int64_t* seg, int64_t n_rows, const int64_t* start, int64_t n_units,
                                    const int64_t* fr, int64_t n_free, const std::vector<TensorArgs>& ts) {
  const int64_t n = static_cast<int64_t>(ts.size());
  if (n_units < 1 || start[0] != 0 || start[n_units] != n_rows)
    return "unit_start must run from 0 to " + std::to_string(n_rows) + " (the segment rows) over at least one unit";
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t* x = seg + 6 * r;
    if (x[0] < 0 || x[0] >= n)
      return "segments row " + std::to_string(r) + " names tensor " + std::to_string(x[0]) + " of " + std::to_string(n);
    const int64_t last = x[1] + (x[2] - 1) * x[3] + (x[4] - 1) * x[5];
    if (!(x[1] >= 0 && x[2] >= 1 && x[3] >= 0 && x[4] >= 1 && x[5] >= 0 && last < ts[x[0]].numel))
      return "segments row " + std::to_string(r) + " leaves tensor " + std::to_string(x[0]) + " of " +
             std::to_string(ts[x[0]].numel) + " elements";
  }
  for (int64_t k = 0; k < n_units; ++k)
    if (start[k + 1] <= start[k]) return "unit " + std::to_string(k) + " has no segment (unit_start must increase)";
  for (int64_t r = 0; r < n_free; ++r) {
    const int64_t* x = fr + 3 * r;
    if (x[0] < 0 || x[0] >= n || x[1] < 0 || x[2] < 1 || x[1] + x[2] > ts[x[0]].numel)
      return "free row " + std::to_string(r) + " (tensor " + std::to_string(x[0]) + ", offset " +
             std::to_string(x[1]) + ", count " + std::to_string(x[2]) + ") leaves its tensor";
  }
  return "";
}

// The launch table of one call (a checked table: check_unit_table).
inline UnitPlan lay_out_units(const StepArgs& a, const std::vector<TensorArgs>& ts, const int64_t* seg, int64_t n_rows,
                              const int64_t* start, int64_t n_units, const int64_t* fr, int64_t n_free,
                              bool reweight) {
  UnitPlan p;
  const bool dual = a.optim == Optim::kRamda || a.optim == Optim::kProxAdamW;
  std::vector<UnitItem> items;
  std::vector<UnitMeta> meta(static_cast<size_t>(n_units));
  for (int64_t k = 0; k < n_units; ++k) {
    int64_t size = 0;
    for (int64_t r = start[k]; r < start[k + 1]; ++r) size += seg[6 * r + 2] * seg[6 * r + 4];
    UnitMeta& m = meta[static_cast<size_t>(k)];
    m.size = size;
    m.cg = reweight ? std::sqrt(static_cast<double>(size)) : 1.0;
    m.scratch = 0;
    if (!dual && size > kUnitCachedElems) {
      p.scratch_elems = (p.scratch_elems + 31) / 32 * 32;  // 128-byte aligned
      m.scratch = p.scratch_elems;
      p.scratch_elems += size;
    }
    items.push_back({1, 0, k, k + 1});
  }
  for (int64_t r = 0; r < n_free; ++r) {
    const int64_t* x = fr + 3 * r;
    for (int64_t o = x[1]; o < x[1] + x[2]; o += kElemChunk)
      items.push_back({0, static_cast<int32_t>(x[0]), o, std::min(x[1] + x[2], o + kElemChunk)});
  }
  UnitLaunch& l = p.launch;
  l.n_tensors = static_cast<int64_t>(ts.size());
  l.n_items = static_cast<int64_t>(items.size());
  l.n_units = n_units;
  const auto align = [](size_t b) { return (b + 15) / 16 * 16; };
  size_t b = ts.size() * sizeof(TensorArgs);
  l.items_at = static_cast<int64_t>(b = align(b));
  l.rows_at = static_cast<int64_t>(b = align(b + items.size() * sizeof(UnitItem)));
  l.start_at = static_cast<int64_t>(b = align(b + static_cast<size_t>(n_rows) * 6 * sizeof(int64_t)));
  l.meta_at = static_cast<int64_t>(b = align(b + static_cast<size_t>(n_units + 1) * sizeof(int64_t)));
  b += meta.size() * sizeof(UnitMeta);
  p.bytes.assign(b, 0);
  std::memcpy(p.bytes.data(), ts.data(), ts.size() * sizeof(TensorArgs));
  std::memcpy(p.bytes.data() + l.items_at, items.data(), items.size() * sizeof(UnitItem));
  std::memcpy(p.bytes.data() + l.rows_at, seg, static_cast<size_t>(n_rows) * 6 * sizeof(int64_t));
  std::memcpy(p.bytes.data() + l.start_at, start, static_cast<size_t>(n_units + 1) * sizeof(int64_t));
  std::memcpy(p.bytes.data() + l.meta_at, meta.data(), meta.size() * sizeof(UnitMeta));
  return p;
}

// The unit launch on the current stream (cuda/units.cu).
void launch_units(const UnitLaunch& l, const StepArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace ramda
