// The exported entry point of one SIMD level's kernel library.
#include "kernels.h"
#include "level.h"

extern "C" __attribute__((visibility("default"))) const stable_dfl::cpu::CpuKernelTable*
stable_dfl_cpu_kernel_table() {
  static const stable_dfl::cpu::CpuKernelTable table{
      stable_dfl::cpu::kKernelAbiVersion,
      STABLE_DFL_CPU_LEVEL,
      &stable_dfl::cpu::dfl_forward_rows,
      &stable_dfl::cpu::grad_chunk,
  };
  return &table;
}
