// Stand-in for c10::BFloat16 in the CUDA-on-CPU build (NOTE: [CUDA on CPU]
// in ../../cuda_runtime.h): the conversions the kernels use, with torch's
// rounding (round to nearest even; NaN stays a quiet NaN).
#pragma once

#include <cstdint>
#include <cstring>

namespace c10 {

struct BFloat16 {
  uint16_t x = 0;
  BFloat16() = default;
  BFloat16(float f) {  // NOLINT: implicit like c10's
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      x = 0x7fc0;
      return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    x = static_cast<uint16_t>(u >> 16);
  }
  operator float() const {  // NOLINT
    const uint32_t u = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
};
static_assert(sizeof(BFloat16) == 2);

}  // namespace c10
