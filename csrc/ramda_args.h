// Plain structs the kernels see (no tensor objects): one TensorArgs per
// parameter tensor and one StepArgs per call. Built by csrc/bindings.cpp.
#pragma once

#include <cstdint>

#include "ramda_math.h"

namespace ramda {

// A canonical group layout has at most one block per tensor dimension.
constexpr int kMaxDims = 8;

enum class Optim : int32_t { kRamda = 0, kRmda = 1, kProxAdamW = 2, kProxSgd = 3 };
enum class Reg : int32_t { kNone = 0, kL1 = 1, kGroupLasso = 2 };
enum class Solver : int32_t { kExact = 0, kPg = 1 };
enum class DType : int32_t { kFp32 = 0, kBf16 = 1, kFp16 = 2 };

// NOTE: [Group layout] (ramda_kernels/layout.py): groups and their elements
// numbered in memory order over merged "kept" and "reduced" blocks, each
// (size, stride) in elements, outermost first.
struct GroupLayout {
  int64_t n_groups = 0;
  int64_t group_size = 0;
  int32_t n_kept = 0;
  int32_t n_red = 0;
  int64_t kept_size[kMaxDims] = {};
  int64_t kept_stride[kMaxDims] = {};
  int64_t red_size[kMaxDims] = {};
  int64_t red_stride[kMaxDims] = {};

  // The innermost memory block belongs to a group ("rows" tiling) rather
  // than indexing groups ("columns" tiling); see NOTE: [Tiling per layout].
  bool inner_reduced() const {
    if (n_red == 0) return false;
    if (n_kept == 0) return true;
    return red_stride[n_red - 1] < kept_stride[n_kept - 1];
  }
};

// Offset of item `idx` decoded over blocks (last block fastest).
RAMDA_HD int64_t block_offset(int64_t idx, int32_t n, const int64_t* size, const int64_t* stride) {
  int64_t off = 0;
  for (int32_t b = n - 1; b >= 0; --b) {
    off += (idx % size[b]) * stride[b];
    idx /= size[b];
  }
  return off;
}

// How a tensor's subproblem is solved in the fused path.
enum class Path : int32_t {
  kElementwise = 0,  // closed form per element (none, l1 exact, tau == 0)
  kGroups = 1,       // per group: exact Newton / PG / group soft-threshold
};

// One parameter tensor. State roles by optimizer:
//   RAMDA:     w0 = initial_point (read only), s1 = grad_sum, s2 = grad_sum_sq
//   RMDA:      w0 = initial_point (read only), s1 = grad_sum
//   ProxAdamW: s0 = exp_avg, s1 = exp_avg_sq, s2 = max_exp_avg_sq (amsgrad only)
//   ProxSGD:   s0 = momentum_buffer
// All pointers address the lowest element of a dense tensor; every tensor of
// one entry shares the parameter's strides, so one offset serves them all.
struct TensorArgs {
  void* param = nullptr;
  const void* grad = nullptr;
  // W0 in the parameter's dtype (a copy of the parameter at the last restart,
  // docs/math.md section 9); nullptr for ProxAdamW and ProxSGD.
  const void* w0 = nullptr;
  float* s0 = nullptr;
  float* s1 = nullptr;
  float* s2 = nullptr;
  float* sigma = nullptr;  // per-group warm start (docs/math.md section 4); nullptr: cold start
  int64_t numel = 0;      // elements (== extent of the dense storage)
  DType dtype = DType::kFp32;
  Path path = Path::kElementwise;
  GroupLayout layout;     // used when path == kGroups
  float thr = 0.0f;       // T = tau * c_g (group lasso), tau (l1), prox threshold (RMDA/ProxSGD)
  float inv_thr = 0.0f;   // 1/T in double, rounded (the reference's `1.0 / thr`)
  float pg_tol = 0.0f;    // PG per-group test: eps_t * sqrt(|g| / n)
  int64_t scratch = 0;    // CUDA grouped paths: offset of this tensor's fp32 scratch (z, d, Z)
  double cg = 1.0;        // group weight c_g (sqrt(|g|) or 1); thr = float(thr_base * c_g)
  double tol_scale = 1.0; // sqrt(|g| / n); pg_tol = float(eps_t * tol_scale)
};

// Hyperparameters of one call, rounded to fp32 the way torch rounds a Python
// scalar in the reference's tensor ops.
struct StepArgs {
  Optim optim = Optim::kRamda;
  Reg reg = Reg::kNone;
  Solver solver = Solver::kExact;
  int32_t max_iters = 100;
  bool amsgrad = false;
  float s = 0.0f;       // RAMDA/RMDA: lr * sqrt(t)
  float eps = 0.0f;     // RAMDA epsilon
  float keep = 0.0f;    // 1 - c (RAMDA, RMDA, ProxSGD)
  float c = 0.0f;       // momentum c
  float beta = 1.0f;    // RMDA: sqrt(t)
  float lr = 0.0f;      // ProxSGD
  float decay = 1.0f;   // ProxAdamW: 1 - lr * weight_decay
  AdamCoeffs adam{};
  double thr_base = 0.0;  // tau (RAMDA, ProxAdamW) or the prox threshold (RMDA, ProxSGD)
  double eps_t = 0.0;     // PG tolerance eps_0 * t^-0.6
};

// The per-tensor thresholds, from double like the reference's Python floats
// and rounded once to fp32 the way torch rounds a scalar operand. The CPU
// path stores them in TensorArgs; CUDA kernels recompute them per block, so
// that the cached metadata table does not change from step to step.
RAMDA_HD void fill_thresholds(TensorArgs& t, const StepArgs& a) {
  const double T = a.reg == Reg::kGroupLasso ? a.thr_base * t.cg : a.thr_base;
  t.thr = static_cast<float>(T);
  t.inv_thr = T != 0.0 ? static_cast<float>(1.0 / T) : 0.0f;
  t.pg_tol = static_cast<float>(a.eps_t * t.tol_scale);
}

}  // namespace ramda
