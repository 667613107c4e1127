// Native test of the shared math header (csrc/ramda_math.h), no torch needed:
// the cube root against libm, the exact group-lasso Newton solve against its
// KKT conditions, soft-thresholding, and one PG iteration's residual. Run by
// ctest (CMakeLists.txt).
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "ramda_math.h"

namespace {

int failures = 0;

void check(bool ok, const char* what, double got, double limit) {
  if (!ok) {
    std::printf("FAIL %s: %.3g (limit %.3g)\n", what, got, limit);
    ++failures;
  }
}

void test_cbrt() {
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> expo(-44.0f, 30.0f);
  double worst = 0.0;
  for (int i = 0; i < 200000; ++i) {
    const float x = std::pow(10.0f, expo(rng));
    const double exact = std::cbrt(static_cast<double>(x));
    worst = std::max(worst, std::fabs(ramda::cbrt_nonneg(x) - exact) / exact);
  }
  check(worst < 1.2e-7, "cbrt_nonneg relative error", worst, 1.2e-7);
  check(ramda::cbrt_nonneg(0.0f) == 0.0f, "cbrt_nonneg(0)", ramda::cbrt_nonneg(0.0f), 0.0);
}

// Newton as a kernel runs it (sums in fp64 like the CPU path), then the KKT
// residual ||d*w - z + T w/||w|| || / ||z|| in fp64 (docs/math.md section 4).
double newton_kkt(const std::vector<float>& z, const std::vector<float>& d, float thr, int* iters) {
  double z2 = 0.0;
  float dmax = -INFINITY, dmin = INFINITY;
  for (size_t i = 0; i < z.size(); ++i) {
    z2 += static_cast<double>(z[i]) * z[i];
    dmax = std::max(dmax, d[i]);
    dmin = std::min(dmin, d[i]);
  }
  const float znorm = static_cast<float>(std::sqrt(z2));
  const ramda::NewtonStart st = ramda::newton_start(znorm, dmax, dmin, thr);
  if (!st.active) return 0.0;
  float sigma = st.sigma;
  bool done = st.done;
  *iters = 0;
  while (!done && *iters < ramda::kNewtonMaxIters) {
    double sa = 0.0, sb = 0.0, sc = 0.0;
    for (size_t i = 0; i < z.size(); ++i) {
      float a, b, c;
      ramda::newton_terms(z[i] / st.norm, d[i], sigma, a, b, c);
      sa += a;
      sb += b;
      sc += c;
    }
    sigma = ramda::newton_update(sigma, static_cast<float>(sa), static_cast<float>(sb),
                                 static_cast<float>(sc), st.rel_excess, done);
    ++*iters;
  }
  std::vector<double> w(z.size());
  double wn = 0.0;
  for (size_t i = 0; i < z.size(); ++i) {
    w[i] = ramda::newton_solution(z[i], d[i], sigma);
    wn += w[i] * w[i];
  }
  wn = std::sqrt(wn);
  double res = 0.0;
  for (size_t i = 0; i < z.size(); ++i) {
    const double r = d[i] * w[i] - z[i] + thr * w[i] / wn;
    res += r * r;
  }
  return std::sqrt(res) / znorm;
}

void test_newton() {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> logd(0.0f, 6.0f);
  double worst = 0.0;
  int max_iters = 0;
  for (int trial = 0; trial < 200; ++trial) {
    const size_t n = 1 + trial * 7 % 600;
    std::vector<float> z(n), d(n);
    double z2 = 0.0;
    for (size_t i = 0; i < n; ++i) {
      z[i] = normal(rng);
      d[i] = std::pow(10.0f, logd(rng));  // d spread over 1 .. 1e6
      z2 += static_cast<double>(z[i]) * z[i];
    }
    const float thr = static_cast<float>(std::sqrt(z2) * (0.05 + 0.9 * (trial % 10) / 10.0));
    int iters = 0;
    worst = std::max(worst, newton_kkt(z, d, thr, &iters));
    max_iters = std::max(max_iters, iters);
  }
  check(worst < 1e-5, "Newton KKT residual", worst, 1e-5);
  check(max_iters < ramda::kNewtonMaxIters, "Newton iterations", max_iters, ramda::kNewtonMaxIters);
  // Constant d: closed form, no iteration; the solution is the group soft-threshold.
  std::vector<float> z = {3.0f, 4.0f}, d = {2.0f, 2.0f};
  int iters = -1;
  const double kkt = newton_kkt(z, d, 1.0f, &iters);
  check(iters == 0 && kkt < 1e-6, "Newton, constant d", kkt, 1e-6);
  // Below the threshold the group is zero.
  const ramda::NewtonStart zero = ramda::newton_start(1.0f, 2.0f, 1.0f, 1.5f);
  check(!zero.active, "Newton screen", zero.active, 0);
}

void test_prox() {
  check(ramda::soft_threshold(3.0f, 1.0f) == 2.0f, "soft_threshold(3, 1)", ramda::soft_threshold(3.0f, 1.0f), 2);
  check(ramda::soft_threshold(-0.5f, 1.0f) == 0.0f, "soft_threshold(-0.5, 1)", ramda::soft_threshold(-0.5f, 1.0f), 0);
  check(ramda::group_shrink(5.0f, 1.0f) == 0.8f, "group_shrink(5, 1)", ramda::group_shrink(5.0f, 1.0f), 0.8);
  check(ramda::group_shrink(0.0f, 1.0f) == 0.0f, "group_shrink(0, 1)", ramda::group_shrink(0.0f, 1.0f), 0);
  // A PG step from the solution stays there (residual 0).
  const float z = 3.0f, d = 2.0f, theta = 0.5f, w = z / d;
  const float y = ramda::pg_gradient_point(w, z, d, theta);
  check(y == w && ramda::pg_residual(w, y, d, 1.0f / theta) == 0.0f, "PG fixed point", y - w, 0);
}

}  // namespace

int main() {
  test_cbrt();
  test_newton();
  test_prox();
  if (failures == 0) std::printf("ramda_math: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
