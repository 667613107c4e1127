// Stand-in for c10::Half in the CUDA-on-CPU build (NOTE: [CUDA on CPU] in
// ../../cuda_runtime.h): IEEE binary16 conversions, round to nearest even,
// subnormals kept, overflow to infinity, NaN stays a quiet NaN.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace c10 {

struct Half {
  uint16_t x = 0;
  Half() = default;
  Half(float f) {  // NOLINT: implicit like c10's
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) {
      x = sign | 0x7e00;
    } else if (a >= 0x477ff000u) {  // >= 65520 (halfway above 65504, odd mantissa): inf
      x = sign | 0x7c00;
    } else if (a < 0x38800000u) {  // below 2^-14: a multiple of 2^-24, rounded by the FPU
      float m;
      std::memcpy(&m, &a, sizeof(m));
      x = sign | static_cast<uint16_t>(std::nearbyint(m * 0x1p24f));
    } else {  // rebias the exponent (127 -> 15), round off 13 mantissa bits
      const uint32_t r = a - 0x38000000u;
      x = sign | static_cast<uint16_t>((r + 0xfffu + ((r >> 13) & 1u)) >> 13);
    }
  }
  operator float() const {  // NOLINT
    const uint32_t sign = static_cast<uint32_t>(x & 0x8000u) << 16;
    const uint32_t e = (x >> 10) & 0x1fu, m = x & 0x3ffu;
    float f;
    if (e == 0) {
      f = static_cast<float>(m) * 0x1p-24f;
      return sign ? -f : f;
    }
    const uint32_t u = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112u) << 23) | (m << 13));
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
};
static_assert(sizeof(Half) == 2);

}  // namespace c10
