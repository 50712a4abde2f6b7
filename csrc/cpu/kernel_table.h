// The interface between the baseline-compiled part of stable_dfl._C and the CPU
// kernel libraries, one per SIMD level (_cpu_kernels_{default,avx2,avx512}).
//
// Each level's sources are compiled with that level's flags into a shared library of
// their own, loaded with dlopen only on a CPU that runs the level (cpu_kernels.cpp).
// A library of its own, rather than objects linked into _C, keeps the inline functions
// of the headers it includes (compiled with, say, AVX-512 enabled) from being merged
// with the baseline copies that the registration code calls on every CPU.
//
// The kernels work on raw pointers over a range of rows or elements; tensors, checks,
// threads and the order of partial sums stay in the baseline code.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace stable_dfl::cpu {

// Bumped whenever anything in this header changes, so that a stale kernel library
// (left behind by an older build) is refused instead of called with the wrong layout.
constexpr int32_t kKernelAbiVersion = 3;

// dfl_forward over rows [begin, end) of pred[N, n_bins] (contiguous, `dtype`).
// target, weight and row_loss are of the accumulation type (float64 for float64
// logits, else float32); weight may be null (all ones), row_loss and grad may be null
// (not wanted). Row r's weight is weight[r / rows_per_weight]: one weight per row, or one
// per group of consecutive rows (an anchor's four sides). grad is [N, n_bins] of `dtype`: the
// gradient of the summed loss. A row of weight 0 costs a finiteness check and its zero writes (NaN
// when not finite).
struct DflForwardArgs {
  c10::ScalarType dtype;
  int n_bins;
  double log_eps;  // log of the probability floor; -inf for no floor
  const void* pred;
  const void* target;
  const void* weight;
  int64_t rows_per_weight;  // >= 1
  void* row_loss;
  void* grad;
};

enum class GradChunkMode : int32_t {
  kMeasure,           // sum of squares and non-finite check of the values as they are
  kUnscale,           // of (value * inv_scale) rounded to the dtype; data untouched
  kUnscaleWriteBack,  // as kUnscale, and the unscaled values are stored into data
};

struct GradChunkArgs {
  c10::ScalarType dtype;
  void* data;  // written only in kUnscaleWriteBack
  int64_t numel;
  float inv_scale;
  GradChunkMode mode;
};

struct GradChunkResult {
  double sumsq = 0.0;  // float64 sum of squares of the chunk's values
  bool nonfinite = false;
};

struct CpuKernelTable {
  int32_t abi_version;
  // The level the library was compiled for: "default", "avx2" or "avx512".
  const char* isa;
  // Returns the float64 sum, in row order, of the rows' losses.
  double (*dfl_forward_rows)(const DflForwardArgs& args, int64_t begin, int64_t end);
  GradChunkResult (*grad_chunk)(const GradChunkArgs& args);
};

// The one symbol each kernel library exports.
#define STABLE_DFL_CPU_KERNEL_TABLE_SYMBOL "stable_dfl_cpu_kernel_table"
using CpuKernelTableFn = const CpuKernelTable* (*)();

}  // namespace stable_dfl::cpu
