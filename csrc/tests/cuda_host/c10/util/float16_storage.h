// The storage both 16-bit stand-ins share (NOTE: [CUDA on CPU] in
// ../../cuda_runtime.h): 16 bits, converted from and to float by the
// type's own rounding rule, implicitly like c10's types.
#pragma once

#include <cstdint>

namespace c10 {
namespace host {

template <uint16_t (*Encode)(float), float (*Decode)(uint16_t)>
struct Float16Storage {
  uint16_t x = 0;
  Float16Storage() = default;
  Float16Storage(float f) : x(Encode(f)) {}  // NOLINT: implicit like c10's
  operator float() const { return Decode(x); }  // NOLINT
};

}  // namespace host
}  // namespace c10
