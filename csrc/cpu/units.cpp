// Unit groups on the CPU (csrc/cpu/units.h): the op's checks, the work items
// (one per unit, chunks of the free runs) and the instruction-set choice.

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "../tensor_layout.h"
#include "../unit_args.h"
#include "../units_checks.h"
#include "units_op.h"

namespace ramda {
namespace cpu {
namespace {

struct UnitItem {
  int64_t first, last;
  bool laned;
};

// Units k and m have one shape: as many rows, each of the same tensor, counts and strides.
bool same_shape(const UnitsArgs& u, int64_t k, int64_t m) {
  const int64_t rk = u.unit_start[k], rm = u.unit_start[m], R = u.unit_start[k + 1] - rk;
  if (u.unit_start[m + 1] - rm != R) return false;
  for (int64_t j = 0; j < R; ++j) {
    const Segment &a = u.segments[rk + j], &b = u.segments[rm + j];
    if (a.tensor != b.tensor || a.count != b.count || a.stride != b.stride || a.outer_count != b.outer_count ||
        a.outer_stride != b.outer_stride)
      return false;
  }
  return true;
}

// The work items: laned blocks (NOTE: [Laned unit blocks] in units_impl.h) where
// consecutive units allow, else runs of consecutive units up to kUnitItemElems.
std::vector<UnitItem> unit_items(const UnitsArgs& u) {
  std::vector<UnitItem> items;
  int64_t k = 0;
  while (k < u.n_units) {
    int64_t L = 1;
    if (k + 1 < u.n_units && same_shape(u, k, k + 1)) {
      const int64_t r0 = u.unit_start[k], r1 = u.unit_start[k + 1], R = r1 - r0;
      bool any = false;
      for (int64_t j = 0; j < R; ++j) any |= u.segments[r1 + j].offset - u.segments[r0 + j].offset == 1;
      // every lane row of unit k + L is row j of unit k shifted by L
      const auto fits = [&](int64_t m) {
        if (!same_shape(u, k, m)) return false;
        for (int64_t j = 0; j < R; ++j) {
          const bool lane = u.segments[r1 + j].offset - u.segments[r0 + j].offset == 1;
          if (lane && u.segments[u.unit_start[m] + j].offset != u.segments[r0 + j].offset + (m - k)) return false;
        }
        return true;
      };
      if (any)
        while (L < kMaxUnitLanes && k + L < u.n_units && fits(k + L)) ++L;
    }
    if (L > 1) {
      items.push_back({k, k + L, true});
      k += L;
      continue;
    }
    int64_t last = k, run = 0;
    while (last < u.n_units && (last == k || run < kUnitItemElems)) run += u.unit_size[last++];
    items.push_back({k, last, false});
    k = last;
  }
  return items;
}

}  // namespace

UnitsCall prepare_units(const std::string& optimizer, at::TensorList params, at::TensorList grads,
                        at::TensorList state0, at::TensorList state1, at::TensorList state2,
                        const std::optional<at::Tensor>& unit_sigma, const at::Tensor& segments,
                        const at::Tensor& unit_start, const at::Tensor& free,
                        at::ArrayRef<double> scalars, bool amsgrad, bool reweight) {
  UnitsCall c;
  StepArgs& a = c.a;
  const char* names[3];
  const std::string why = unit_step_args(optimizer, scalars.data(), scalars.size(), amsgrad, a, names);
  TORCH_CHECK(why.empty(), "units_: ", why);

  const size_t n = check_unit_lists(params, grads, state0, state1, state2, names);
  const at::TensorList lists[3] = {state0, state1, state2};
  for (size_t k = 0; k < n; ++k) {
    const int64_t i = static_cast<int64_t>(k);
    const at::Tensor& p = params[k];
    TORCH_CHECK(p.device().is_cpu() && p.layout() == at::kStrided && is_dense(p), "units_: params[", i,
                "] must be a dense strided CPU tensor (got strides ", p.strides(), " on ", p.device(), ")");
    const at::Tensor& g = grads[k];
    TORCH_CHECK(g.device() == p.device() && g.scalar_type() == p.scalar_type() && same_layout(g, p),
                "units_: grads[", i, "] must have the dtype, shape and strides of params[", i, "] (",
                p.scalar_type(), " ", p.sizes(), " ", p.strides(), "), got ", g.scalar_type(), " ",
                g.sizes(), " ", g.strides());
    TensorArgs t;
    t.param = p.data_ptr();
    t.grad = g.data_ptr();
    t.numel = p.numel();
    t.dtype = unit_param_type(i, p.scalar_type());
    float* s[3] = {nullptr, nullptr, nullptr};
    // RAMDA, RMDA: list 0 is W0, kept in the parameter's dtype (TensorArgs::w0)
    const bool has_w0 = a.optim == Optim::kRamda || a.optim == Optim::kRmda;
    for (int r = 0; r < 3; ++r) {
      if (!names[r][0]) continue;
      const at::Tensor& x = lists[r][k];
      const at::ScalarType want = has_w0 && r == 0 ? p.scalar_type() : at::kFloat;
      TORCH_CHECK(x.device() == p.device() && x.scalar_type() == want && same_layout(x, p),
                  "units_: ", names[r], "[", i, "] must be ",
                  want == at::kFloat ? "float32" : "in the parameter's dtype", " with the shape and strides of params[", i,
                  "] (", p.sizes(), " ", p.strides(), "), got ", x.scalar_type(), " ", x.sizes(), " ", x.strides());
      if (has_w0 && r == 0)
        t.w0 = x.data_ptr();
      else
        s[r] = x.data_ptr<float>();
    }
    t.s0 = s[0], t.s1 = s[1], t.s2 = s[2];
    c.tensors.push_back(t);
  }

  // The segment table: every element it names inside its tensor.
  const int64_t* seg = unit_table_part(segments, "segments", 6);
  const int64_t* start = unit_table_part(unit_start, "unit_start", 0);
  const int64_t* fr = unit_table_part(free, "free", 3);
  const int64_t n_rows = segments.size(0), n_units = unit_start.numel() - 1;
  TORCH_CHECK(n_units >= 1 && start[0] == 0 && start[n_units] == n_rows, "units_: unit_start must run from 0 to ",
              n_rows, " (the segment rows) over at least one unit");
  const auto in_range = [&](int64_t ti, const char* what, int64_t r) {
    TORCH_CHECK(ti >= 0 && ti < static_cast<int64_t>(n), "units_: ", what, " row ", r, " names tensor ", ti,
                " of ", n);
  };
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t* x = seg + 6 * r;
    in_range(x[0], "segments", r);
    const int64_t last = x[1] + (x[2] - 1) * x[3] + (x[4] - 1) * x[5];
    TORCH_CHECK(x[1] >= 0 && x[2] >= 1 && x[3] >= 0 && x[4] >= 1 && x[5] >= 0 && last < c.tensors[x[0]].numel,
                "units_: segments row ", r, " (offset ", x[1], ", count ", x[2], ", stride ", x[3], ", outer ",
                x[4], " x ", x[5], ") leaves tensor ", x[0], " of ", c.tensors[x[0]].numel, " elements");
  }
  c.sizes.assign(n_units, 0);
  for (int64_t k = 0; k < n_units; ++k) {
    TORCH_CHECK(start[k + 1] > start[k], "units_: unit ", k, " has no segment (unit_start must increase)");
    for (int64_t r = start[k]; r < start[k + 1]; ++r) c.sizes[k] += seg[6 * r + 2] * seg[6 * r + 4];
  }
  for (int64_t r = 0; r < free.size(0); ++r) {
    const int64_t* x = fr + 3 * r;
    in_range(x[0], "free", r);
    TORCH_CHECK(x[1] >= 0 && x[2] >= 1 && x[1] + x[2] <= c.tensors[x[0]].numel, "units_: free row ", r,
                " (offset ", x[1], ", count ", x[2], ") leaves tensor ", x[0]);
    c.free.push_back({x[0], x[1], x[2]});
  }

  // Thresholds T = thr_base * c_g from double, rounded once (the reference's
  // (tau * sqrt(size)).to(float32)).
  c.thr.resize(n_units);
  for (int64_t k = 0; k < n_units; ++k)
    c.thr[k] = static_cast<float>(a.thr_base * (reweight ? std::sqrt(static_cast<double>(c.sizes[k])) : 1.0));
  UnitsArgs& u = c.u;
  u.segments = reinterpret_cast<const Segment*>(seg);
  u.unit_start = start;
  u.n_units = n_units;
  u.unit_size = c.sizes.data();
  u.thr = c.thr.data();
  u.solve = a.thr_base != 0.0;
  const bool newton = a.optim == Optim::kRamda || a.optim == Optim::kProxAdamW;
  if (newton && u.solve && unit_sigma && unit_sigma->defined()) {
    const at::Tensor& sg = *unit_sigma;
    TORCH_CHECK(sg.device().is_cpu() && sg.scalar_type() == at::kFloat && sg.is_contiguous() && sg.dim() == 1 &&
                    sg.numel() == n_units,
                "units_: unit_sigma must be a contiguous float32 CPU tensor of one value per unit (", n_units,
                "), got ", sg.scalar_type(), " ", sg.sizes(), " on ", sg.device());
    u.sigma = sg.data_ptr<float>();
  }
  return c;
}

void units_step(const StepArgs& a, const std::vector<TensorArgs>& tensors, const UnitsArgs& u,
                const std::vector<FreeRun>& free) {
  using UnitFn = void (*)(const StepArgs&, const TensorArgs*, const UnitsArgs&, int64_t, int64_t, bool);
  using FreeFn = void (*)(const StepArgs&, const TensorArgs&, int64_t, int64_t);
  UnitFn unit = &isa_default::run_units;
  FreeFn rest = &isa_default::run_free;
#if defined(__x86_64__) && defined(__GNUC__)
  // the instruction set the step kernels chose (dispatch.cpp)
  if (std::strcmp(isa_name(), "avx512") == 0) unit = &isa_avx512::run_units, rest = &isa_avx512::run_free;
  if (std::strcmp(isa_name(), "avx2") == 0) unit = &isa_avx2::run_units, rest = &isa_avx2::run_free;
#endif
  std::vector<FreeRun> chunks;
  int64_t elems = 0;
  for (const TensorArgs& t : tensors) elems += t.numel;
  for (const FreeRun& r : free)
    for (int64_t o = 0; o < r.count; o += kElemItem)
      chunks.push_back({r.tensor, r.offset + o, std::min(kElemItem, r.count - o)});
  const std::vector<UnitItem> items = unit_items(u);
  const int64_t n_items = static_cast<int64_t>(items.size());
  parallel_items(n_items + static_cast<int64_t>(chunks.size()), elems, [&](int64_t i) {
    if (i < n_items) return unit(a, tensors.data(), u, items[i].first, items[i].last, items[i].laned);
    const FreeRun& r = chunks[i - n_items];
    rest(a, tensors[r.tensor], r.offset, r.count);
  });
}

}  // namespace cpu
}  // namespace ramda
