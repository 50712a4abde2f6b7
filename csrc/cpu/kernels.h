// The kernels of one SIMD level's library (see kernel_table.h), gathered into its
// table by table.cpp.
#pragma once

#include "kernel_table.h"

namespace stable_dfl::cpu {

double dfl_forward_rows(const DflForwardArgs& args, int64_t begin, int64_t end);
GradChunkResult grad_chunk(const GradChunkArgs& args);

}  // namespace stable_dfl::cpu
