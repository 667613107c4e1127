// The CPU kernels (kernels_impl.h) compiled for the default instruction set.
// All headers are included before the target switch, so only the kernel
// bodies (and what they inline) use it.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#include "cpu_step.h"
#include "units.h"

#define RAMDA_CPU_ISA isa_default
#include "kernels_impl.h"
#include "units_impl.h"  // unit groups (csrc/cpu/units.h)

