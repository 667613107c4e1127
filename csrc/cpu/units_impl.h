// Unit groups (csrc/cpu/units.h): the body compiled once per instruction set
// right after kernels_impl.h (csrc/cpu/kernels_{default,avx2,avx512}.cpp), whose
// optimizer functors, passes and contiguous Newton solve it reuses.
//
// A unit is one work item: its thread walks the unit's segments in table
// order, running each element's state update into compact buffers z, d (the
// unit's union, contiguous), solves the union with newton_contig_sigma (the
// zero test, the exact Newton from the unit's previous sigma; docs/math.md
// section 4) or the scalar-d shrink of its norm (RMDA, ProxSGD), then walks
// the segments again to write the parameters. Units never overlap, so no two
// threads touch one element.

namespace ramda {
namespace cpu {
namespace RAMDA_CPU_ISA {
namespace {

// fn(P{}) with P the parameter type of `dtype`.
template <typename Fn>
inline void with_param_type(DType dtype, const Fn& fn) {
  switch (dtype) {
    case DType::kFp32: return fn(float{});
    case DType::kBf16: return fn(c10::BFloat16{});
    case DType::kFp16: return fn(c10::Half{});
  }
}

// fn(tensor, storage offset, count, stride, buffer index) for each inner run of
// the unit's segments, in table order (the order of the unit's buffers).
template <typename Fn>
inline void unit_runs(const UnitsArgs& ua, int64_t unit, const Fn& fn) {
  int64_t bi = 0;
  for (int64_t r = ua.unit_start[unit]; r < ua.unit_start[unit + 1]; ++r) {
    const Segment& s = ua.segments[r];
    for (int64_t o = 0; o < s.outer_count; ++o, bi += s.count)
      fn(s.tensor, s.offset + o * s.outer_stride, s.count, s.stride, bi);
  }
}

// pass1 / pass2_with over n elements `stride` apart from storage offset o (a
// column, a channel of a channels_last tensor): the same loops, indices
// scaled; pass1's element i goes to z[i * ld], d[i * ld].
template <typename P, typename U>
inline void pass1_strided(const U& u, const TensorArgs& t, int64_t o, int64_t n, int64_t stride,
                          float* __restrict__ z, float* __restrict__ d, int64_t ld = 1) {
  const Run<P> r(t, o);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const Elem e = u.step(r, i * stride);
    z[i * ld] = e.z;
    if constexpr (!U::kScalarD) d[i * ld] = e.d;
  }
}

template <typename P, typename U, typename Sol>
inline void pass2_strided(const U& u, const TensorArgs& t, int64_t o, int64_t n, int64_t stride, Sol w_at) {
  P* __restrict__ p = static_cast<P*>(t.param) + o;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    p[i * stride] = static_cast<P>(u.finish(static_cast<float>(p[i * stride]), w_at(i)));
}

template <typename U>
void unit_item(const StepArgs& a, const TensorArgs* ts, const UnitsArgs& ua, int64_t unit) {
  const U u(a);
  const int64_t n = ua.unit_size[unit];
  const Buffers B(n);
  float* __restrict__ z = B.b[0];
  float* __restrict__ d = B.b[1];
  unit_runs(ua, unit, [&](int64_t ti, int64_t o, int64_t cnt, int64_t st, int64_t bi) {
    with_param_type(ts[ti].dtype, [&](auto tag) {
      using P = decltype(tag);
      if (st == 1) return pass1<P, false>(u, ts[ti], o, cnt, z + bi, d + bi, nullptr);
      pass1_strided<P>(u, ts[ti], o, cnt, st, z + bi, d + bi);
    });
  });
  const float thr = ua.thr[unit];
  // w of element k of the union: y * scale (scalar d), z/(d + sigma) (exact,
  // NaN sigma: a zero unit), z/d (tau == 0)
  float scale = 1.0f, sigma = 0.0f;
  if (ua.solve) {
    if constexpr (U::kScalarD) scale = group_shrink(norm_contig(z, n), thr);
    else sigma = newton_contig_sigma(z, d, B.b[3], n, thr, ua.sigma ? ua.sigma + unit : nullptr);
  }
  unit_runs(ua, unit, [&](int64_t ti, int64_t o, int64_t cnt, int64_t st, int64_t bi) {
    const float* __restrict__ zr = z + bi;
    const float* __restrict__ dr = d + bi;
    const auto w_at = [=](int64_t i) {
      if constexpr (U::kScalarD) return zr[i] * scale;
      else return lane_solution(zr[i], dr[i], sigma);
    };
    with_param_type(ts[ti].dtype, [&](auto tag) {
      using P = decltype(tag);
      if (st == 1) return pass2_with<P>(u, ts[ti], o, cnt, w_at);
      pass2_strided<P>(u, ts[ti], o, cnt, st, w_at);
    });
  });
}

// NOTE: [Laned unit blocks]
// L <= kMaxUnitLanes consecutive units of one shape whose "lane" rows are
// neighbours in memory (row j of unit first + l at row j's offset + l: the
// columns k..k+L-1 of a consumer, entries of a bias) run together: such a
// row is read as L contiguous elements per (outer, inner) index, one cache
// line for fp32 where a unit alone would read one element per line, and
// scattered to the units' compact buffers (unit l's union at l * n); the
// other rows run unit by unit. Each unit is then solved on its own buffer.
template <typename U>
void unit_block(const StepArgs& a, const TensorArgs* ts, const UnitsArgs& ua, int64_t first, int64_t L) {
  const U u(a);
  const int64_t n = ua.unit_size[first];
  const Buffers B(L * n, n);
  float* __restrict__ z = B.b[0];
  float* __restrict__ d = B.b[1];
  const int64_t r0 = ua.unit_start[first], R = ua.unit_start[first + 1] - r0;
  // fn(lane row?, tensor, storage offset, count, stride, buffer index, unit) per inner run:
  // a lane row's run is unit 0's, the others' follow at +l
  const auto block_runs = [&](const auto& fn) {
    int64_t bi = 0;
    for (int64_t j = 0; j < R; ++j) {
      const Segment& s = ua.segments[r0 + j];
      const bool lane = ua.segments[ua.unit_start[first + 1] + j].offset - s.offset == 1;
      for (int64_t l = 0; l < (lane ? 1 : L); ++l) {
        const Segment& sl = ua.segments[ua.unit_start[first + l] + j];
        for (int64_t o = 0; o < s.outer_count; ++o)
          fn(lane, sl.tensor, sl.offset + o * sl.outer_stride, sl.count, sl.stride, bi + o * s.count, l);
      }
      bi += s.outer_count * s.count;
    }
  };
  block_runs([&](bool lane, int64_t ti, int64_t o, int64_t cnt, int64_t st, int64_t bi, int64_t l) {
    with_param_type(ts[ti].dtype, [&](auto tag) {
      using P = decltype(tag);
      if (lane) {
        for (int64_t i = 0; i < cnt; ++i) pass1_strided<P>(u, ts[ti], o + i * st, L, 1, z + bi + i, d + bi + i, n);
      } else if (st == 1) {
        pass1<P, false>(u, ts[ti], o, cnt, z + l * n + bi, d + l * n + bi, nullptr);
      } else {
        pass1_strided<P>(u, ts[ti], o, cnt, st, z + l * n + bi, d + l * n + bi);
      }
    });
  });
  float scale[kMaxUnitLanes], sigma[kMaxUnitLanes];
  for (int64_t l = 0; l < L; ++l) {
    const int64_t k = first + l;
    scale[l] = 1.0f, sigma[l] = 0.0f;
    if (!ua.solve) continue;
    if constexpr (U::kScalarD) scale[l] = group_shrink(norm_contig(z + l * n, n), ua.thr[k]);
    else sigma[l] = newton_contig_sigma(z + l * n, d + l * n, B.b[3], n, ua.thr[k], ua.sigma ? ua.sigma + k : nullptr);
  }
  block_runs([&](bool lane, int64_t ti, int64_t o, int64_t cnt, int64_t st, int64_t bi, int64_t l) {
    with_param_type(ts[ti].dtype, [&](auto tag) {
      using P = decltype(tag);
      if (lane) {  // element l of a run: unit l's buffer
        for (int64_t i = 0; i < cnt; ++i) {
          const float* __restrict__ zr = z + bi + i;
          const float* __restrict__ dr = d + bi + i;
          pass2_with<P>(u, ts[ti], o + i * st, L, [&](int64_t m) {
            if constexpr (U::kScalarD) return zr[m * n] * scale[m];
            else return lane_solution(zr[m * n], dr[m * n], sigma[m]);
          });
        }
        return;
      }
      const float* __restrict__ zr = z + l * n + bi;
      const float* __restrict__ dr = d + l * n + bi;
      const float sc = scale[l], sg = sigma[l];
      const auto w_at = [=](int64_t i) {
        if constexpr (U::kScalarD) return zr[i] * sc;
        else return lane_solution(zr[i], dr[i], sg);
      };
      if (st == 1) pass2_with<P>(u, ts[ti], o, cnt, w_at);
      else pass2_strided<P>(u, ts[ti], o, cnt, st, w_at);
    });
  });
}

template <typename U>
void free_item(const StepArgs& a, const TensorArgs& t, int64_t offset, int64_t count) {
  const U u(a);
  with_param_type(t.dtype, [&](auto tag) { elementwise_run<decltype(tag), false>(u, t, offset, count); });
}

// fn(U{}) with U the optimizer's update functor type.
template <typename Fn>
inline void with_update(const StepArgs& a, const Fn& fn) {
  switch (a.optim) {
    case Optim::kRamda: return fn(static_cast<RamdaUpdate*>(nullptr));
    case Optim::kRmda: return fn(static_cast<RmdaUpdate*>(nullptr));
    case Optim::kProxAdamW:
      if (a.amsgrad) return fn(static_cast<ProxAdamWUpdate<true>*>(nullptr));
      return fn(static_cast<ProxAdamWUpdate<false>*>(nullptr));
    case Optim::kProxSgd: return fn(static_cast<ProxSgdUpdate*>(nullptr));
  }
}

}  // namespace

void run_units(const StepArgs& a, const TensorArgs* t, const UnitsArgs& u, int64_t first, int64_t last,
               bool laned) {
  with_update(a, [&](auto* tag) {
    using U = std::remove_pointer_t<decltype(tag)>;
    if (laned) return unit_block<U>(a, t, u, first, last - first);
    for (int64_t k = first; k < last; ++k) unit_item<U>(a, t, u, k);
  });
}

void run_free(const StepArgs& a, const TensorArgs& t, int64_t offset, int64_t count) {
  with_update(a, [&](auto* tag) { free_item<std::remove_pointer_t<decltype(tag)>>(a, t, offset, count); });
}

}  // namespace RAMDA_CPU_ISA
}  // namespace cpu
}  // namespace ramda
