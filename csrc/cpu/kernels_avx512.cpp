// The CPU kernels (kernels_impl.h) compiled for the avx512 instruction set.
// All headers are included before the target switch, so only the kernel
// bodies (and what they inline) use it.
// cbrt_nonneg's FMA residual (ramda_math.h).
#define RAMDA_CPU_FMA 1

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "cpu_step.h"
#include "units.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define RAMDA_CPU_ISA isa_avx512
#define RAMDA_CPU_AVX512 1  // explicit AVX-512 code (NOTE: [Newton sums with a reciprocal estimate])
#include "kernels_impl.h"
#include "units_impl.h"  // unit groups (csrc/cpu/units.h)
#endif
