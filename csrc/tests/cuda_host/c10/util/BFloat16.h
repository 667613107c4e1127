// Stand-in for c10::BFloat16 in the CUDA-on-CPU build (NOTE: [CUDA on CPU]
// in ../../cuda_runtime.h): the conversions the kernels use, with torch's
// rounding (round to nearest even; NaN stays a quiet NaN).
#pragma once

#include <bit>
#include <cstdint>

#include "float16_storage.h"

namespace c10 {
namespace host {

inline uint16_t bf16_from_float(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_to_float(uint16_t x) { return std::bit_cast<float>(static_cast<uint32_t>(x) << 16); }

}  // namespace host

struct BFloat16 : host::Float16Storage<host::bf16_from_float, host::bf16_to_float> {
  using Float16Storage::Float16Storage;
};
static_assert(sizeof(BFloat16) == 2);

}  // namespace c10
