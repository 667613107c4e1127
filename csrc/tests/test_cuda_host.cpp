// Native test of the CUDA kernels on CPU threads (NOTE: [CUDA on CPU] in
// csrc/tests/cuda_host/cuda_runtime.h), no torch: RAMDA + group lasso, exact
// Newton, fp32, on rows, columns, NCHW and channels-last channel-wise and
// strided layouts with groups of 1 to 300 elements (> one block), checked by
// the KKT conditions (docs/math.md section 4); the same bits for two block
// orders; a self-test that the shuffled order exposes a block that reads
// another block's output; and the meter's counts on a copy (bytes), strided
// reads (sectors) and a tensor read twice. Built plain and with ThreadSanitizer (CMakeLists.txt).
//
//   test_cuda_host [--quick] [--drop-sync K]
//     --quick: fewer, smaller cases (the TSan build)
//     --drop-sync K: the K-th __syncthreads of every block is skipped; expected
//                    to race under TSan (and to give wrong results when the
//                    threads happen to interleave badly)
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda_host/host_step.h"
#include "group_layout.h"

namespace {

using ramda::GroupLayout;
using ramda::TensorArgs;

int failures = 0;

void fail(const std::string& what) {
  std::printf("FAIL %s\n", what.c_str());
  ++failures;
}

struct Case {
  const char* name;
  std::vector<int64_t> shape, strides;  // strides of a dense tensor, any order
  std::vector<bool> reduced;
};

struct Buffers {
  std::vector<float> p, g, w0, v, u;
};

Buffers make_buffers(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  Buffers b;
  for (int64_t i = 0; i < n; ++i) {
    // group scales differ through the gradient's magnitude (seeded per element)
    b.p.push_back(0.5f * nd(rng));
    b.g.push_back(nd(rng) * (0.2f + static_cast<float>(i % 7) * 0.3f));
    b.w0.push_back(0.5f * nd(rng));
    b.v.push_back(0.2f * nd(rng));
    b.u.push_back(0.5f * std::fabs(nd(rng)));
  }
  return b;
}

ramda::StepArgs ramda_step_args() {
  ramda::StepArgs a;
  a.optim = ramda::Optim::kRamda;
  a.reg = ramda::Reg::kGroupLasso;
  a.solver = ramda::Solver::kExact;
  a.s = static_cast<float>(0.1 * std::sqrt(3.0));
  a.eps = 1e-6f;
  a.keep = 0.0f;  // momentum 1: the parameter is the subproblem's solution w
  a.c = 1.0f;
  a.thr_base = 0.3 * 0.4;
  return a;
}

TensorArgs tensor(const Case& c, Buffers& b) {
  TensorArgs t;
  t.param = b.p.data();
  t.grad = b.g.data();
  t.w0 = b.w0.data();
  t.s1 = b.v.data();
  t.s2 = b.u.data();
  t.numel = static_cast<int64_t>(b.p.size());
  t.path = ramda::Path::kGroups;
  t.layout = ramda::make_group_layout(c.shape, c.strides, c.reduced);
  t.cg = std::sqrt(static_cast<double>(t.layout.group_size));
  return t;
}

// Worst KKT residual over the case's groups; counts wrongly zero / nonzero groups.
double check_kkt(const Case& c, const TensorArgs& t, const Buffers& before, const Buffers& after,
                 const ramda::StepArgs& a) {
  const GroupLayout& L = t.layout;
  const double T = static_cast<float>(a.thr_base * t.cg);
  double worst = 0.0;
  for (int64_t gi = 0; gi < L.n_groups; ++gi) {
    const int64_t base = ramda::block_offset(gi, L.n_kept, L.kept_size, L.kept_stride);
    std::vector<double> z, d, w;
    for (int64_t e = 0; e < L.group_size; ++e) {
      const int64_t o = base + ramda::block_offset(e, L.n_red, L.red_size, L.red_stride);
      float v = before.v[o], u = before.u[o], dd, zz;
      ramda::ramda_dz(before.g[o], before.w0[o], v, u, a.s, a.eps, dd, zz);
      z.push_back(zz);
      d.push_back(dd);
      w.push_back(after.p[o]);
    }
    double zn = 0.0, wn = 0.0;
    for (size_t i = 0; i < z.size(); ++i) {
      zn += z[i] * z[i];
      wn += w[i] * w[i];
    }
    zn = std::sqrt(zn);
    wn = std::sqrt(wn);
    if (zn <= T) {
      if (wn != 0.0) fail(std::string(c.name) + ": group " + std::to_string(gi) + " should be zero");
      continue;
    }
    if (wn == 0.0) {
      fail(std::string(c.name) + ": group " + std::to_string(gi) + " should be nonzero");
      continue;
    }
    double r = 0.0;
    for (size_t i = 0; i < z.size(); ++i) {
      const double ri = d[i] * w[i] - z[i] + T * w[i] / wn;
      r += ri * ri;
    }
    worst = std::max(worst, std::sqrt(r) / zn);
  }
  return worst;
}

// Dense strides of `shape` with dims laid out in `order` (outermost first).
std::vector<int64_t> strides_in_order(const std::vector<int64_t>& shape, const std::vector<int>& order) {
  std::vector<int64_t> st(shape.size());
  int64_t s = 1;
  for (size_t k = order.size(); k-- > 0;) {
    st[order[k]] = s;
    s *= shape[order[k]];
  }
  return st;
}

// quick: a few small groups of each kind, for the ThreadSanitizer build.
std::vector<Case> cases(bool quick) {
  if (quick)
    return {
        {"rows 3x13", {3, 13}, {13, 1}, {false, true}},
        {"columns 300x2 (group > block)", {300, 2}, {2, 1}, {true, false}},
        {"channels_last channel-wise 4x2x3x3", {4, 2, 3, 3}, strides_in_order({4, 2, 3, 3}, {0, 2, 3, 1}),
         {true, false, true, true}},
        {"nchw channel-wise 3x5x3x3 (run tile)", {3, 5, 3, 3}, {45, 9, 3, 1}, {true, false, true, true}},
    };
  return {
      {"rows 7x13", {7, 13}, {13, 1}, {false, true}},
      {"columns 37x5", {37, 5}, {5, 1}, {true, false}},
      {"columns 300x3 (group > block)", {300, 3}, {3, 1}, {true, false}},
      {"nchw channel-wise 8x3x3x3", {8, 3, 3, 3}, {27, 9, 3, 1}, {true, false, true, true}},
      // run tiles (NOTE: [Run tiles] in csrc/cuda/kernels.cuh): 32 + 8 groups, 20 rows
      {"nchw channel-wise 20x40x3x3", {20, 40, 3, 3}, {360, 9, 3, 1}, {true, false, true, true}},
      {"channels_last channel-wise 8x3x3x3", {8, 3, 3, 3}, strides_in_order({8, 3, 3, 3}, {0, 2, 3, 1}),
       {true, false, true, true}},
      {"transposed 9x11 rows", {9, 11}, {1, 9}, {false, true}},
      {"groups of 1", {5, 1}, {1, 1}, {false, true}},
      // past the rows held in registers (NOTE: [Register rows] in csrc/cuda/kernels.cuh)
      {"rows 2x4099 (two-pass plan)", {2, 4099}, {4099, 1}, {false, true}},
  };
}

int run_kkt(bool quick, int drop_sync, uint64_t order_seed, std::vector<Buffers>* out) {
  const ramda::StepArgs a = ramda_step_args();
  std::vector<Case> cs = cases(quick);
  std::vector<Buffers> before, after;
  std::vector<TensorArgs> tensors;
  for (size_t i = 0; i < cs.size(); ++i) {
    int64_t n = 1;
    for (int64_t s : cs[i].shape) n *= s;
    before.push_back(make_buffers(n, static_cast<uint32_t>(i + 1)));
  }
  after = before;
  for (size_t i = 0; i < cs.size(); ++i) tensors.push_back(tensor(cs[i], after[i]));
  cuda_host::drop_sync(drop_sync);
  ramda::cuda_host_step::step(a, tensors, order_seed);
  cuda_host::drop_sync(0);
  double worst = 0.0;
  for (size_t i = 0; i < cs.size(); ++i) worst = std::max(worst, check_kkt(cs[i], tensors[i], before[i], after[i], a));
  std::printf("exact group lasso on %zu layouts: worst KKT residual %.3g\n", cs.size(), worst);
  if (!(worst < 1e-5)) fail("KKT residual " + std::to_string(worst) + " (limit 1e-5)");
  if (out) *out = after;
  return failures;
}

// A kernel whose blocks depend on each other: the order check must see it.
__global__ void chained(float* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = (blockIdx.x > 0 ? out[blockIdx.x - 1] : 0.0f) + 1.0f;
}

void test_order_detects_dependent_blocks() {
  std::vector<float> x(64, 0.0f), y(64, 0.0f);
  cuda_host::set_block_order(1);
  cuda_host::launch(dim3(64), dim3(32), &chained, x.data());
  cuda_host::set_block_order(2);
  cuda_host::launch(dim3(64), dim3(32), &chained, y.data());
  if (x == y) fail("two block orders gave the same result for dependent blocks");
}

// --- the meter (NOTE: [Counted global memory] in cuda_runtime.h)

__global__ void copy_kernel(const float* in, float* out, int stride) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  gstore(out + i, gload(in + static_cast<int64_t>(i) * stride));
}

__global__ void read_twice_kernel(const float* in, float* out) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  const float x = gload(in + i);
  gstore(out + i, x + gload(in + i));
}

// Read passes over a region: bytes read over its size; the single-pass check
// a traffic test applies to every input.
bool single_pass(const cuda_host::RegionCount& r) { return r.read <= r.nbytes && r.written <= r.nbytes; }

void test_meter() {
  constexpr int kN = 4096, kBlock = 256;
  alignas(128) static float in[8 * kN];
  alignas(128) static float out[kN];
  for (int stride : {1, 2, 8}) {
    cuda_host::meter_start();
    const size_t ri = cuda_host::meter_region(in, sizeof(in));
    const size_t ro = cuda_host::meter_region(out, sizeof(out));
    cuda_host::launch(dim3(kN / kBlock), dim3(kBlock), &copy_kernel, static_cast<const float*>(in), out, stride);
    cuda_host::meter_stop();
    const auto& m = cuda_host::meter();
    const auto &r = m.regions[ri], &w = m.regions[ro];
    // a warp's 32 lanes read 128 bytes spread over 32 * 4 * stride bytes
    const uint64_t sectors_in = static_cast<uint64_t>(kN / 32) * (stride == 1 ? 4 : stride == 2 ? 8 : 32);
    if (r.read != 4u * kN || r.written != 0 || r.sectors_r != sectors_in)
      fail("meter: copy with stride " + std::to_string(stride) + ": read " + std::to_string(r.read) +
           " B in " + std::to_string(r.sectors_r) + " sectors, expected " + std::to_string(4 * kN) +
           " in " + std::to_string(sectors_in));
    if (w.written != 4u * kN || w.read != 0 || w.sectors_w != kN / 8)
      fail("meter: copy: written " + std::to_string(w.written) + " B in " + std::to_string(w.sectors_w) +
           " sectors");
    if (m.other.read + m.other.written != 0) fail("meter: accesses outside the registered regions");
  }
  cuda_host::meter_start();
  const size_t ri = cuda_host::meter_region(in, kN * sizeof(float));
  cuda_host::meter_region(out, sizeof(out));
  cuda_host::launch(dim3(kN / kBlock), dim3(kBlock), &read_twice_kernel, static_cast<const float*>(in), out);
  cuda_host::meter_stop();
  const auto& r = cuda_host::meter().regions[ri];
  if (r.read != 8u * kN || single_pass(r)) fail("meter: a tensor read twice was not counted twice");
  std::printf("meter: copy bytes and strided sectors counted; a second read detected\n");
}

}  // namespace

int main(int argc, char** argv) {
  int drop = 0;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else if (std::strcmp(argv[i], "--drop-sync") == 0 && i + 1 < argc) {
      drop = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--quick] [--drop-sync K]\n", argv[0]);
      return 2;
    }
  }
  if (drop > 0) {
    run_kkt(quick, drop, 1, nullptr);
    std::printf("%s with __syncthreads #%d dropped\n", failures ? "FAILED" : "passed", drop);
    return failures ? 1 : 0;
  }
  std::vector<Buffers> r1, r2;
  run_kkt(quick, 0, 1, &r1);
  if (!quick) run_kkt(quick, 0, 2, &r2);
  for (size_t i = 0; i < r2.size(); ++i)
    if (std::memcmp(r1[i].p.data(), r2[i].p.data(), r1[i].p.size() * sizeof(float)) != 0)
      fail("case " + std::to_string(i) + ": the result depends on the block order");
  test_order_detects_dependent_blocks();
  test_meter();
  std::printf("%s\n", failures ? "FAILED" : "all passed");
  return failures ? 1 : 0;
}
