// Stand-in for c10::Half in the CUDA-on-CPU build (NOTE: [CUDA on CPU] in
// ../../cuda_runtime.h): IEEE binary16 conversions, round to nearest even,
// subnormals kept, overflow to infinity, NaN stays a quiet NaN.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

#include "float16_storage.h"

namespace c10 {
namespace host {

inline uint16_t half_from_float(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00;
  if (a >= 0x477ff000u) return sign | 0x7c00;  // >= 65520 (halfway above 65504, odd mantissa): inf
  if (a < 0x38800000u)  // below 2^-14: a multiple of 2^-24, rounded by the FPU
    return sign | static_cast<uint16_t>(std::nearbyint(std::bit_cast<float>(a) * 0x1p24f));
  const uint32_t r = a - 0x38000000u;  // rebias the exponent (127 -> 15), round off 13 mantissa bits
  return sign | static_cast<uint16_t>((r + 0xfffu + ((r >> 13) & 1u)) >> 13);
}

inline float half_to_float(uint16_t x) {
  const uint32_t sign = static_cast<uint32_t>(x & 0x8000u) << 16;
  const uint32_t e = (x >> 10) & 0x1fu, m = x & 0x3ffu;
  if (e == 0) {
    const float f = static_cast<float>(m) * 0x1p-24f;
    return sign ? -f : f;
  }
  return std::bit_cast<float>(sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112u) << 23) | (m << 13)));
}

}  // namespace host

struct Half : host::Float16Storage<host::half_from_float, host::half_to_float> {
  using Float16Storage::Float16Storage;
};
static_assert(sizeof(Half) == 2);

}  // namespace c10
