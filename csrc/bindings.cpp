// The one binding file of ramda_kernels._C: argument checks, plain-struct
// construction, GIL release, and registration of the four fused steps as
// torch.library operators (mutated arguments declared in the schema, so
// they compose with torch.compile; fake kernels are registered from Python
// in ramda_kernels/backends/_ext.py).
//
// Every op takes the tensor lists of the matching ramda_ref.functional
// function and that step's named scalars (ramda_ref.definitions), minus
// what Python routes to the reference (nuclear, pg_stop="rtol", fp64), and
// updates them in place.

#include <ATen/ATen.h>
#include <ATen/InferSize.h>
#include <ATen/TensorUtils.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "cpu/cpu_step.h"
#include "cpu/units_op.h"
#include "cuda/fused_path.h"
#include "group_layout.h"
#include "ramda_args.h"
#include "tensor_layout.h"

#ifdef RAMDA_WITH_CUDA
#include "cuda/cuda_step.h"
#include "cuda/units_op.h"
#endif

namespace ramda {
namespace {

using at::Tensor;
using at::TensorList;
using OptInts = std::optional<at::IntArrayRef>;

// Releases the GIL for the duration of a step when the caller holds it (a
// call through torch.ops from Python does; a C++ or compiled caller may not).
class GilRelease {
 public:
  GilRelease() : state_(Py_IsInitialized() && PyGILState_Check() ? PyEval_SaveThread() : nullptr) {}
  ~GilRelease() {
    if (state_) PyEval_RestoreThread(state_);
  }
  GilRelease(const GilRelease&) = delete;
  GilRelease& operator=(const GilRelease&) = delete;

 private:
  PyThreadState* state_;
};

Reg parse_reg(const std::string& op, const std::string& r) {
  if (r == "none") return Reg::kNone;
  if (r == "l1") return Reg::kL1;
  if (r == "group_lasso") return Reg::kGroupLasso;
  TORCH_CHECK(false, op, ": regularizer must be 'none', 'l1' or 'group_lasso' (nuclear runs on "
              "the reference), got '", r, "'");
}

Solver parse_solver(const std::string& op, const std::string& s) {
  if (s == "exact") return Solver::kExact;
  if (s == "pg") return Solver::kPg;
  TORCH_CHECK(false, op, ": solver must be 'exact' or 'pg', got '", s, "'");
}

DType parse_dtype(const std::string& op, int64_t i, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFp32;
    case at::kBFloat16: return DType::kBf16;
    case at::kHalf: return DType::kFp16;
    default:
      TORCH_CHECK(false, op, ": params[", i, "] has dtype ", t,
                  "; the fused step takes float32, bfloat16 or float16 (float64 runs on the reference)");
  }
}

// `x` (parameter, gradient or state) must match params[i] in shape, strides and device.
void check_like(const std::string& op, const char* name, int64_t i, const Tensor& x,
                const Tensor& p, std::optional<at::ScalarType> dtype) {
  TORCH_CHECK(x.device() == p.device(), op, ": ", name, "[", i, "] is on ", x.device(),
              " but params[", i, "] is on ", p.device());
  TORCH_CHECK(same_layout(x, p), op, ": ", name, "[", i, "] has shape ", x.sizes(), " and strides ",
              x.strides(), "; expected those of params[", i, "]: ", p.sizes(), " ", p.strides());
  if (dtype) {
    TORCH_CHECK(x.scalar_type() == *dtype, op, ": ", name, "[", i, "] has dtype ", x.scalar_type(),
                ", expected ", *dtype);
  }
}

void check_list(const std::string& op, const char* name, TensorList xs, size_t n) {
  TORCH_CHECK(xs.size() == n, op, ": ", name, " has ", xs.size(), " tensors but params has ", n);
}

// Shape and strides of `p` seen through `view` (no copy).
void viewed(const std::string& op, int64_t i, const Tensor& p, const OptInts& view,
            std::vector<int64_t>& shape, std::vector<int64_t>& strides) {
  shape.assign(p.sizes().begin(), p.sizes().end());
  strides.assign(p.strides().begin(), p.strides().end());
  if (!view) return;
  const at::DimVector inferred = at::infer_size_dv(*view, p.numel());
  auto st = at::detail::computeStride(p.sizes(), p.strides(), inferred);
  TORCH_CHECK(st.has_value(), op, ": params[", i, "] of shape ", p.sizes(), " cannot be viewed as ",
              *view, " in place");
  shape.assign(inferred.begin(), inferred.end());
  strides.assign(st->begin(), st->end());
}

// Per-call description of the optimizer: which tensors it reads and how
// each one's subproblem is solved.
struct Call {
  std::string op;
  Optim optim;
  Reg reg;
  Solver solver = Solver::kExact;
  OptInts dims;
  OptInts view;
  bool reweight;
};

// How the groups of a tensor are numbered: the layout's order (memory order of
// the kept dims, NOTE: [Group layout]) against the reference's (row-major over
// the kept dims of the grouped view), which the sigma state uses.
struct GroupOrder {
  std::vector<int64_t> kept_sizes;  // sizes of the kept dims (size > 1), in dim order
  std::vector<int64_t> perm;        // those dims (indices into kept_sizes) in memory order
  bool identity() const {
    for (size_t k = 0; k < perm.size(); ++k)
      if (perm[k] != static_cast<int64_t>(k)) return false;
    return true;
  }
};

GroupOrder group_order(const std::vector<int64_t>& shape, const std::vector<int64_t>& strides,
                       const std::vector<bool>& reduced) {
  GroupOrder o;
  std::vector<int64_t> kept_strides;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (reduced[d] || shape[d] == 1) continue;
    o.kept_sizes.push_back(shape[d]);
    kept_strides.push_back(strides[d]);
  }
  o.perm.resize(o.kept_sizes.size());
  std::iota(o.perm.begin(), o.perm.end(), 0);
  // the stable sort of make_group_layout: largest stride first
  std::stable_sort(o.perm.begin(), o.perm.end(),
                   [&](int64_t x, int64_t y) { return kept_strides[x] > kept_strides[y]; });
  return o;
}

// TensorArgs::sigma is set on every path: nullptr unless this tensor runs the
// exact group-lasso solve with a warm-start list (then the caller points it at
// the sigmas in the layout's group order).
TensorArgs tensor_args(const Call& c, const StepArgs& a, int64_t i, const Tensor& p,
                       const Tensor& g, float* s0, float* s1, float* s2, GroupOrder* order) {
  TensorArgs t;
  t.param = p.data_ptr();
  t.grad = g.data_ptr();
  t.s0 = s0;
  t.s1 = s1;
  t.s2 = s2;
  t.sigma = nullptr;
  t.numel = p.numel();
  t.dtype = parse_dtype(c.op, i, p.scalar_type());
  t.path = fused_path(c.optim, c.reg, c.solver, a.thr_base);
  if (t.path == Path::kGroups && t.numel > 0) {
    std::vector<int64_t> shape, strides;
    if (c.reg == Reg::kL1) {  // whole-tensor PG (its reduced flags are set below)
      std::vector<bool> whole;
      whole_tensor_group(t.numel, shape, strides, whole);
    } else {
      viewed(c.op, i, p, c.view, shape, strides);
    }
    const int64_t nd = static_cast<int64_t>(shape.size());
    TORCH_CHECK(nd >= 1 && nd <= kMaxDims, c.op, ": params[", i, "] has rank ", nd,
                " (viewed); group lasso needs a rank in [1, ", kMaxDims, "]");
    std::vector<bool> reduced(nd, c.reg == Reg::kL1 || !c.dims);
    if (c.reg == Reg::kGroupLasso && c.dims) {
      TORCH_CHECK(!c.dims->empty(), c.op, ": dims must name at least one dimension");
      for (int64_t d : *c.dims) {
        TORCH_CHECK(d >= -nd && d < nd, c.op, ": dims entry ", d, " is out of range for params[", i,
                    "] of rank ", nd);
        const int64_t dd = d < 0 ? d + nd : d;
        TORCH_CHECK(!reduced[dd], c.op, ": dims ", *c.dims, " repeats a dimension");
        reduced[dd] = true;
      }
    }
    t.layout = make_group_layout(shape, strides, reduced);
    if (order && c.reg == Reg::kGroupLasso) *order = group_order(shape, strides, reduced);
    const double gsize = static_cast<double>(t.layout.group_size);
    t.cg = (c.reg == Reg::kGroupLasso && c.reweight) ? std::sqrt(gsize) : 1.0;
    t.tol_scale = std::sqrt(gsize / static_cast<double>(t.numel));
  }
  fill_thresholds(t, a);
  return t;
}

// Points t.sigma at sigmas[i] (one fp32 value per group, in the reference's
// order) when tensor i runs the exact group-lasso solve; where the layout
// numbers the groups in another order (kept dims whose memory order is not
// their dim order), at a copy in the layout's order, returned in `staged`
// with the view of sigmas[i] to copy it back to after the step.
void attach_sigma(const Call& c, int64_t i, const Tensor& p, const Tensor& sigma,
                  const GroupOrder& order, TensorArgs& t,
                  std::vector<std::pair<Tensor, Tensor>>& staged) {
  TORCH_CHECK(sigma.device() == p.device(), c.op, ": sigmas[", i, "] is on ", sigma.device(),
              " but params[", i, "] is on ", p.device());
  TORCH_CHECK(sigma.scalar_type() == at::kFloat, c.op, ": sigmas[", i, "] has dtype ",
              sigma.scalar_type(), ", expected Float");
  const bool grouped = t.path == Path::kGroups && c.reg == Reg::kGroupLasso &&
                       c.solver == Solver::kExact && t.numel > 0;
  if (!grouped) return;  // nothing is solved with Newton here: the sigmas stay as they are
  TORCH_CHECK(sigma.dim() == 1 && sigma.is_contiguous() && sigma.numel() == t.layout.n_groups, c.op,
              ": sigmas[", i, "] has shape ", sigma.sizes(), " and strides ", sigma.strides(),
              "; expected one contiguous value per group of params[", i, "]: (", t.layout.n_groups, ")");
  if (order.identity()) {
    t.sigma = sigma.data_ptr<float>();
    return;
  }
  const Tensor logical = sigma.view(order.kept_sizes).permute(order.perm);
  Tensor mem = logical.contiguous();
  t.sigma = mem.data_ptr<float>();
  staged.emplace_back(logical, std::move(mem));
}

void run(const Call& c, const StepArgs& a, TensorList params, TensorList grads, TensorList st0,
         TensorList st1, TensorList st2, TensorList sigmas = {}) {
  const size_t n = params.size();
  check_list(c.op, "grads", grads, n);
  TORCH_CHECK(sigmas.empty() || sigmas.size() == n, c.op, ": sigmas has ", sigmas.size(),
              " tensors but params has ", n, " (one per parameter, or none)");
  if (n == 0) return;
  const at::Device device = params[0].device();
  std::vector<TensorArgs> tensors;
  tensors.reserve(n);
  std::vector<std::pair<Tensor, Tensor>> staged;
  for (size_t k = 0; k < n; ++k) {
    const int64_t i = static_cast<int64_t>(k);
    const Tensor& p = params[k];
    TORCH_CHECK(p.device() == device, c.op, ": params[", i, "] is on ", p.device(), " but params[0] is on ",
                device, "; one call takes tensors on one device");
    TORCH_CHECK(p.layout() == at::kStrided && is_dense(p), c.op, ": params[", i,
                "] must be a dense strided tensor (strides ", p.strides(), ")");
    check_like(c.op, "grads", i, grads[k], p, p.scalar_type());
    float* s[3] = {nullptr, nullptr, nullptr};
    TensorList lists[3] = {st0, st1, st2};
    const char* names[3] = {"", "", ""};
    switch (c.optim) {
      case Optim::kRamda: names[0] = "initial_points"; names[1] = "grad_sums"; names[2] = "grad_sum_sqs"; break;
      case Optim::kRmda: names[0] = "initial_points"; names[1] = "grad_sums"; break;
      case Optim::kProxAdamW: names[0] = "exp_avgs"; names[1] = "exp_avg_sqs"; names[2] = "max_exp_avg_sqs"; break;
      case Optim::kProxSgd: names[0] = "momentum_buffers"; break;
    }
    // RAMDA, RMDA: list 0 is W0, kept in the parameter's dtype (TensorArgs::w0)
    const bool has_w0 = c.optim == Optim::kRamda || c.optim == Optim::kRmda;
    const void* w0 = nullptr;
    for (int r = 0; r < 3; ++r) {
      if (names[r][0] == '\0' || (c.optim == Optim::kProxAdamW && r == 2 && !a.amsgrad)) continue;
      const Tensor& x = lists[r][k];
      if (has_w0 && r == 0) {
        check_like(c.op, names[r], i, x, p, p.scalar_type());
        w0 = x.data_ptr();
        continue;
      }
      check_like(c.op, names[r], i, x, p, at::kFloat);
      s[r] = x.data_ptr<float>();
    }
    GroupOrder order;
    tensors.push_back(tensor_args(c, a, i, p, grads[k], s[0], s[1], s[2], &order));
    tensors.back().w0 = w0;
    if (!sigmas.empty()) attach_sigma(c, i, p, sigmas[k], order, tensors.back(), staged);
  }
  {
    GilRelease nogil;
    if (device.is_cpu()) {
      cpu::step(a, tensors);
    } else {
#ifdef RAMDA_WITH_CUDA
      TORCH_CHECK(device.is_cuda(), c.op, ": tensors on ", device, " are not supported");
      cuda::step(a, tensors, device.index());
#else
      TORCH_CHECK(false, c.op, ": ramda_kernels._C was built without CUDA; tensors on ", device,
                  " are not supported");
#endif
    }
  }
  for (auto& [logical, mem] : staged) logical.copy_(mem);
}

// The four steps take the named per-step scalars that Python computes once
// per step from the step counters and the hyperparameters
// (python/ramda_ref/definitions.py; docs/math.md section 1), in double, and
// round them to fp32 here the way torch rounds a Python scalar operand.

void check_max_iters(const std::string& op, int64_t max_iters) {
  TORCH_CHECK(max_iters >= 1, op, ": max_iters must be >= 1, got ", max_iters);
}

void ramda_(TensorList params, TensorList grads, TensorList initial_points, TensorList grad_sums,
            TensorList grad_sum_sqs, TensorList sigmas, double s, double epsilon, double keep, double c, double tau,
            double eps_t, std::string regularizer, OptInts dims, OptInts view, bool reweight,
            std::string solver, int64_t max_iters) {
  const std::string op = "ramda_";
  check_max_iters(op, max_iters);
  const size_t n = params.size();
  check_list(op, "initial_points", initial_points, n);
  check_list(op, "grad_sums", grad_sums, n);
  check_list(op, "grad_sum_sqs", grad_sum_sqs, n);
  Call call{op, Optim::kRamda, parse_reg(op, regularizer), parse_solver(op, solver), dims, view, reweight};
  StepArgs a;
  a.optim = call.optim;
  a.reg = call.reg;
  a.solver = call.solver;
  a.max_iters = static_cast<int32_t>(max_iters);
  a.s = static_cast<float>(s);
  a.eps = static_cast<float>(epsilon);
  a.keep = static_cast<float>(keep);
  a.c = static_cast<float>(c);
  a.thr_base = tau;
  a.eps_t = eps_t;
  run(call, a, params, grads, initial_points, grad_sums, grad_sum_sqs, sigmas);
}

void rmda_(TensorList params, TensorList grads, TensorList initial_points, TensorList grad_sums,
           double s, double beta, double keep, double c, double thr, std::string regularizer,
           OptInts dims, OptInts view, bool reweight) {
  const std::string op = "rmda_";
  const size_t n = params.size();
  check_list(op, "initial_points", initial_points, n);
  check_list(op, "grad_sums", grad_sums, n);
  Call call{op, Optim::kRmda, parse_reg(op, regularizer), Solver::kExact, dims, view, reweight};
  StepArgs a;
  a.optim = call.optim;
  a.reg = call.reg;
  a.s = static_cast<float>(s);
  a.beta = static_cast<float>(beta);
  a.keep = static_cast<float>(keep);
  a.c = static_cast<float>(c);
  a.thr_base = thr;
  run(call, a, params, grads, initial_points, grad_sums, {});
}

void proxadamw_(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                TensorList max_exp_avg_sqs, TensorList sigmas, double decay, double beta1, double one_minus_beta1,
                double beta2, double one_minus_beta2, double bias2_sqrt, double epsilon,
                double step_size, double tau, double eps_t, bool amsgrad, std::string regularizer,
                OptInts dims, OptInts view, bool reweight, std::string solver, int64_t max_iters) {
  const std::string op = "proxadamw_";
  check_max_iters(op, max_iters);
  const size_t n = params.size();
  check_list(op, "exp_avgs", exp_avgs, n);
  check_list(op, "exp_avg_sqs", exp_avg_sqs, n);
  if (amsgrad) check_list(op, "max_exp_avg_sqs", max_exp_avg_sqs, n);
  Call call{op, Optim::kProxAdamW, parse_reg(op, regularizer), parse_solver(op, solver), dims, view, reweight};
  StepArgs a;
  a.optim = call.optim;
  a.reg = call.reg;
  a.solver = call.solver;
  a.max_iters = static_cast<int32_t>(max_iters);
  a.amsgrad = amsgrad;
  a.adam = AdamCoeffs{static_cast<float>(beta1), static_cast<float>(one_minus_beta1),
                      static_cast<float>(beta2), static_cast<float>(one_minus_beta2),
                      static_cast<float>(bias2_sqrt), static_cast<float>(epsilon),
                      static_cast<float>(step_size)};
  a.decay = static_cast<float>(decay);
  a.thr_base = tau;
  a.eps_t = eps_t;
  run(call, a, params, grads, exp_avgs, exp_avg_sqs, amsgrad ? max_exp_avg_sqs : TensorList{}, sigmas);
}

void proxsgd_(TensorList params, TensorList grads, TensorList momentum_buffers, double keep,
              double c, double lr, double thr, std::string regularizer, OptInts dims,
              OptInts view, bool reweight) {
  const std::string op = "proxsgd_";
  check_list(op, "momentum_buffers", momentum_buffers, params.size());
  Call call{op, Optim::kProxSgd, parse_reg(op, regularizer), Solver::kExact, dims, view, reweight};
  StepArgs a;
  a.optim = call.optim;
  a.reg = call.reg;
  a.keep = static_cast<float>(keep);
  a.c = static_cast<float>(c);
  a.lr = static_cast<float>(lr);
  a.thr_base = thr;
  run(call, a, params, grads, momentum_buffers, {}, {});
}

// The optimizers' NaN/Inf gradient screen on CPU tensors: one bool per
// tensor, true when it is free of NaN and +-Inf.
Tensor finite_flags(TensorList tensors) {
  const std::string op = "finite_flags";
  std::vector<cpu::ScreenArgs> args;
  args.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& x = tensors[i];
    TORCH_CHECK(x.layout() == at::kStrided && x.device().is_cpu(), op, ": tensors[", i,
                "] must be a dense CPU tensor, got ", x.layout(), " on ", x.device());
    // dense: the elements fill numel consecutive slots from data_ptr() (torch has
    // no negative strides), in whatever order (channels_last, transposed)
    TORCH_CHECK(is_dense(x), op, ": tensors[", i, "] must be dense (no gaps, no overlap)");
    cpu::ScreenType type;
    switch (x.scalar_type()) {
      case at::kFloat: type = cpu::ScreenType::kFp32; break;
      case at::kBFloat16: type = cpu::ScreenType::kBf16; break;
      case at::kHalf: type = cpu::ScreenType::kFp16; break;
      case at::kDouble: type = cpu::ScreenType::kFp64; break;
      default:
        TORCH_CHECK(false, op, ": tensors[", i, "] has dtype ", x.scalar_type(),
                    "; expected float32, bfloat16, float16 or float64");
    }
    args.push_back({x.data_ptr(), x.numel(), type});
  }
  Tensor out = at::empty({static_cast<int64_t>(tensors.size())}, at::TensorOptions().dtype(at::kBool));
  {
    GilRelease nogil;
    cpu::finite_flags(args, reinterpret_cast<uint8_t*>(out.data_ptr<bool>()));
  }
  return out;
}

// Unit groups (csrc/cpu/units.h): one call per param group with `units`.
void units_(std::string optimizer, TensorList params, TensorList grads, TensorList state0,
            TensorList state1, TensorList state2, const std::optional<Tensor>& unit_sigma,
            const Tensor& segments, const Tensor& unit_start, const Tensor& free,
            at::ArrayRef<double> scalars, bool amsgrad, bool reweight) {
  const cpu::UnitsCall call = cpu::prepare_units(optimizer, params, grads, state0, state1, state2, unit_sigma,
                                                 segments, unit_start, free, scalars, amsgrad, reweight);
  GilRelease nogil;
  cpu::run_units(call);
}

#ifdef RAMDA_WITH_CUDA
// Unit groups on CUDA (csrc/cuda/units.h): the same arguments, one launch per call.
void cuda_units_(std::string optimizer, TensorList params, TensorList grads, TensorList state0,
                 TensorList state1, TensorList state2, const std::optional<Tensor>& unit_sigma,
                 const Tensor& segments, const Tensor& unit_start, const Tensor& free,
                 at::ArrayRef<double> scalars, bool amsgrad, bool reweight) {
  GilRelease nogil;
  cuda::units_step(optimizer, params, grads, state0, state1, state2, unit_sigma, segments, unit_start, free,
                   scalars, amsgrad, reweight);
}
#endif

}  // namespace
}  // namespace ramda

TORCH_LIBRARY(ramda_kernels, m) {
  // NaN/Inf screen of the optimizers (CPU): one bool per tensor, true when finite.
  m.def("finite_flags(Tensor[] tensors) -> Tensor");
  // The steps update params and the mutated state lists in place; the float
  // arguments after the tensor lists are the named step scalars of
  // ramda_ref.definitions, in the order it lists them.
  // RAMDA: V, U, p updated; initial_points read only. sigmas (RAMDA,
  // ProxAdamW): the exact group-lasso solve's per-group warm start, read and
  // written; empty for other solves.
  m.def("ramda_(Tensor(a!)[] params, Tensor[] grads, Tensor[] initial_points, "
        "Tensor(b!)[] grad_sums, Tensor(c!)[] grad_sum_sqs, Tensor(d!)[] sigmas, float s, float epsilon, float keep, "
        "float c, float tau, float eps_t, str regularizer, int[]? dims, int[]? view, "
        "bool reweight, str solver, int max_iters) -> ()");
  // RMDA: V and p updated.
  m.def("rmda_(Tensor(a!)[] params, Tensor[] grads, Tensor[] initial_points, "
        "Tensor(b!)[] grad_sums, float s, float beta, float keep, float c, float thr, "
        "str regularizer, int[]? dims, int[]? view, bool reweight) -> ()");
  // ProxAdamW: m, v (, vmax) and p updated; max_exp_avg_sqs empty unless amsgrad.
  m.def("proxadamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] sigmas, float decay, float beta1, "
        "float one_minus_beta1, float beta2, float one_minus_beta2, float bias2_sqrt, "
        "float epsilon, float step_size, float tau, float eps_t, bool amsgrad, str regularizer, "
        "int[]? dims, int[]? view, bool reweight, str solver, int max_iters) -> ()");
  // ProxSGD: the momentum buffer and p updated.
  m.def("proxsgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
        "float keep, float c, float lr, float thr, str regularizer, int[]? dims, int[]? view, "
        "bool reweight) -> ()");
  // Unit groups (CPU and CUDA): every tensor of one param group with `units` and its
  // state lists in the order of ramda_ref.definitions (empty where absent),
  // the per-unit warm start, the segment table (NOTE: [Unit segment table] in
  // ramda_kernels/backends/_units.py) and the step scalars of _units.OP_SCALARS.
  m.def("units_(str optimizer, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state0, "
        "Tensor(c!)[] state1, Tensor(d!)[] state2, Tensor(e!)? unit_sigma, Tensor segments, "
        "Tensor unit_start, Tensor free, float[] scalars, bool amsgrad, bool reweight) -> ()");
}

TORCH_LIBRARY_IMPL(ramda_kernels, CPU, m) {
  m.impl("finite_flags", &ramda::finite_flags);
  m.impl("ramda_", &ramda::ramda_);
  m.impl("rmda_", &ramda::rmda_);
  m.impl("proxadamw_", &ramda::proxadamw_);
  m.impl("proxsgd_", &ramda::proxsgd_);
  m.impl("units_", &ramda::units_);
}

#ifdef RAMDA_WITH_CUDA
TORCH_LIBRARY_IMPL(ramda_kernels, CUDA, m) {
  m.impl("ramda_", &ramda::ramda_);
  m.impl("rmda_", &ramda::rmda_);
  m.impl("proxadamw_", &ramda::proxadamw_);
  m.impl("proxsgd_", &ramda::proxsgd_);
  m.impl("units_", &ramda::cuda_units_);
}
#endif

#ifdef TORCH_EXTENSION_NAME
#include <pybind11/pybind11.h>

// The Python module only reports how it was built; the ops live in
// torch.ops.ramda_kernels (registered above when this module is imported).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ramda_kernels._C: fused RAMDA/RMDA/ProxAdamW/ProxSGD steps (torch.ops.ramda_kernels)";
  m.def(
      "with_cuda",
      []() {
#ifdef RAMDA_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True if the CUDA kernels were compiled into this build.");
  m.def(
      "cpu_panel_elems", []() { return ramda::cpu::kPanelElems; },
      "Elements of one CPU \"lanes\" panel, at most (csrc/cpu/cpu_step.h; tests size their tensors by it).");
  m.def(
      "cpu_isa", []() { return std::string(ramda::cpu::isa_name()); },
      "Instruction set the CPU kernels use on this machine: 'avx512', 'avx2' or 'default'.");
}
#endif
