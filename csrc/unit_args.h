// The step arguments of the unit-group op, shared by its CPU (csrc/cpu/units.cpp)
// and CUDA (csrc/cuda/units_table.cpp, and the CUDA-on-CPU tests) front ends:
// the optimizer's name, its step scalars in the order of
// ramda_kernels.backends._units.OP_SCALARS, and the state lists it uses.
#pragma once

#include <cstddef>
#include <string>

#include "ramda_args.h"

namespace ramda {

// The step of `optimizer` from the scalars of ramda_kernels.backends._units.OP_SCALARS;
// lists[r] names state list r (empty: none). Returns an error, or "".
inline std::string unit_step_args(const std::string& optimizer, const double* v, size_t n, bool amsgrad,
                                  StepArgs& a, const char* (&lists)[3]) {
  size_t want = 0;
  lists[0] = lists[1] = lists[2] = "";
  if (optimizer == "ramda") {
    a.optim = Optim::kRamda, want = 5;
    lists[0] = "initial_points", lists[1] = "grad_sums", lists[2] = "grad_sum_sqs";
  } else if (optimizer == "rmda") {
    a.optim = Optim::kRmda, want = 5;
    lists[0] = "initial_points", lists[1] = "grad_sums";
  } else if (optimizer == "proxadamw") {
    a.optim = Optim::kProxAdamW, want = 9;
    lists[0] = "exp_avgs", lists[1] = "exp_avg_sqs";
    if (amsgrad) lists[2] = "max_exp_avg_sqs";
  } else if (optimizer == "proxsgd") {
    a.optim = Optim::kProxSgd, want = 4;
    lists[0] = "momentum_buffers";
  } else {
    return "optimizer must be ramda, rmda, proxadamw or proxsgd, got '" + optimizer + "'";
  }
  if (n != want)
    return optimizer + " takes " + std::to_string(want) + " step scalars, got " + std::to_string(n);
  const auto f = [&](size_t k) { return static_cast<float>(v[k]); };
  a.reg = Reg::kGroupLasso;
  a.amsgrad = amsgrad;
  switch (a.optim) {
    case Optim::kRamda: a.s = f(0), a.eps = f(1), a.keep = f(2), a.c = f(3), a.thr_base = v[4]; break;
    case Optim::kRmda: a.s = f(0), a.beta = f(1), a.keep = f(2), a.c = f(3), a.thr_base = v[4]; break;
    case Optim::kProxAdamW:
      a.decay = f(0);
      a.adam = AdamCoeffs{f(1), f(2), f(3), f(4), f(5), f(6), f(7)};
      a.thr_base = v[8];
      break;
    case Optim::kProxSgd: a.keep = f(0), a.c = f(1), a.lr = f(2), a.thr_base = v[3]; break;
  }
  return "";
}

}  // namespace ramda
