// Native test of the CUDA unit-group kernel on CPU threads (NOTE: [CUDA on
// CPU] in cuda_host/cuda_runtime.h; NOTE: [CUDA unit blocks] in
// csrc/cuda/units.h): one RAMDA step (c = 1, so the parameter is the
// subproblem's solution) on units spanning three tensors (a row of A, an
// entry of b, a column of B: 501 elements, over one block), checked by each
// unit's optimality conditions (docs/math.md section 4): a zero unit has
// ||z|| <= T, a nonzero one d w - z + T w / ||w|| = 0. Built plain and under
// ThreadSanitizer, which must flag a dropped __syncthreads.
//
//   test_cuda_units [--drop-sync K]
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "../cuda/units.cuh"

int main(int argc, char** argv) {
  using namespace ramda;
  int drop = 0;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--drop-sync") == 0) drop = std::atoi(argv[i + 1]);
  constexpr int64_t kUnits = 6, kFree = 1, kRows = kUnits + kFree, kA = 300, kB = 200;
  const int64_t numel[3] = {kRows * kA, kB * kRows, kRows};  // A [7, 300], B [200, 7], b [7]
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  std::vector<float> p[3], g[3], w0[3], v[3], u[3];
  for (int t = 0; t < 3; ++t) {
    for (int64_t i = 0; i < numel[t]; ++i) {
      const int64_t unit = t == 0 ? i / kA : i % kRows;  // A rows, B columns, b entries
      const float scale = 0.05f * static_cast<float>(1 + unit);
      p[t].push_back(normal(rng) * scale);
      g[t].push_back(normal(rng) * scale);
    }
    w0[t] = p[t];
    v[t].assign(numel[t], 0.0f);
    u[t].assign(numel[t], 0.0f);
  }
  // segments: per unit, row k of A, column k of B, entry k of b; row 6 etc. free
  std::vector<int64_t> seg, start = {0}, fr;
  for (int64_t k = 0; k < kUnits; ++k) {
    const int64_t rows[3][6] = {{0, k * kA, kA, 1, 1, 0}, {1, k, kB, kRows, 1, 0}, {2, k, 1, 1, 1, 0}};
    for (const auto& r : rows) seg.insert(seg.end(), r, r + 6);
    start.push_back(static_cast<int64_t>(seg.size() / 6));
  }
  fr = {0, kUnits * kA, kA, 2, kUnits, 1};
  for (int64_t i = 0; i < kB; ++i) fr.insert(fr.end(), {1, i * kRows + kUnits, 1});
  StepArgs a;
  const char* lists[3];
  const double scalars[5] = {0.1, 1e-6, 0.0, 1.0, 0.016};  // s, epsilon, keep, c, tau: units 0, 1 zero
  if (!cuda::unit_step_args("ramda", scalars, 5, false, a, lists).empty()) return 2;
  std::vector<TensorArgs> ts;
  for (int t = 0; t < 3; ++t) {
    void* const st[3] = {w0[t].data(), v[t].data(), u[t].data()};
    ts.push_back(cuda::unit_tensor_args(a.optim, p[t].data(), g[t].data(), st, numel[t], DType::kFp32));
  }
  const int64_t n_free = static_cast<int64_t>(fr.size() / 3);
  const std::string bad = cuda::check_unit_table(seg.data(), start.back(), start.data(), kUnits, fr.data(), n_free, ts);
  if (!bad.empty()) return std::printf("table: %s\n", bad.c_str()), 2;
  const cuda::UnitPlan plan =
      cuda::lay_out_units(a, ts, seg.data(), start.back(), start.data(), kUnits, fr.data(), n_free, true);
  std::vector<float> sigma(kUnits, 0.0f);
  cuda::UnitLaunch l = plan.launch;
  l.table = plan.bytes.data();
  l.sigma = sigma.data();
  cuda_host::set_block_order(3);
  cuda_host::drop_sync(drop);
  cuda::launch_units_kernel(l, a, nullptr);
  cuda_host::drop_sync(0);

  // z, d from the state the step wrote (ramda_math.h), the conditions per unit
  int failures = 0, zeros = 0;
  const double T = scalars[4] * std::sqrt(static_cast<double>(kA + kB + 1));
  for (int64_t k = 0; k < kUnits; ++k) {
    std::vector<float> z, d, w;
    for (int64_t r = start[k]; r < start[k + 1]; ++r) {
      const int64_t* x = seg.data() + 6 * r;
      for (int64_t i = 0; i < x[2]; ++i) {
        const int64_t o = x[1] + i * x[3];
        float zz, dd;
        ramda_dz_of_state(w0[x[0]][o], v[x[0]][o], u[x[0]][o], a.eps, dd, zz);
        z.push_back(zz), d.push_back(dd), w.push_back(p[x[0]][o]);
      }
    }
    double zn = 0, wn = 0, zmax = 0;
    for (size_t i = 0; i < z.size(); ++i) zn += double(z[i]) * z[i], wn += double(w[i]) * w[i], zmax = std::fmax(zmax, std::fabs(z[i]));
    zn = std::sqrt(zn), wn = std::sqrt(wn);
    double res = 0;
    if (wn == 0) {
      res = zn <= T * (1 + 1e-5) ? 0 : zn - T;
    } else {
      for (size_t i = 0; i < z.size(); ++i) res = std::fmax(res, std::fabs(d[i] * w[i] - z[i] + T * w[i] / wn));
      res /= zmax;
    }
    const bool ok = res <= 1e-5 && (wn == 0) == (zn <= T);
    std::printf("unit %lld: ||z|| %.4g T %.4g ||w|| %.4g residual %.2g sigma %.4g %s\n", static_cast<long long>(k),
                zn, T, wn, res, sigma[k], ok ? "ok" : "FAIL");
    failures += !ok;
    zeros += wn == 0;
  }
  if (zeros == 0 || zeros == kUnits) std::printf("FAIL: %d zero units, expected some but not all\n", zeros);
  return failures == 0 && zeros > 0 && zeros < kUnits ? 0 : 1;
}
