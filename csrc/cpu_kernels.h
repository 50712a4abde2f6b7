// Run-time choice of the CPU kernel library (one per SIMD level, see
// cpu/kernel_table.h) for this process.
#pragma once

#include <string>
#include <vector>

#include "cpu/kernel_table.h"

namespace stable_dfl {

// The kernels of the level in use, loaded on first call: ATen's CPU capability
// (which honours ATEN_CPU_CAPABILITY=default|avx2|avx512), lowered to what this CPU
// runs and to the levels installed. Throws when no kernel library can be loaded.
const cpu::CpuKernelTable& cpu_kernels();

// The levels whose kernel libraries are installed next to stable_dfl._C, lowest first.
std::vector<std::string> cpu_kernel_isas_built();

}  // namespace stable_dfl
