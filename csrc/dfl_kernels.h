// Launch interface of the CUDA DFL kernels (dfl_kernels.cu).
//
// Plain pointers and a stream: neither side of this interface sees the other's
// headers, so the .cu file compiles without torch (seconds instead of minutes)
// and the torch glue (dfl_ops_cuda.cpp) compiles without nvcc.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace stable_dfl {

enum class LogitsDtype { kFloat16, kBFloat16, kFloat32, kFloat64 };

// Buffers of one dfl_forward call. "acc" is the compute dtype: double for
// kFloat64 logits, float otherwise. All arrays are contiguous.
struct DflForwardArgs {
  const void* pred;         // [n_rows, n_bins] logits
  const void* target;       // [n_rows] acc
  const void* weight;       // [n_rows / rows_per_weight] acc, or nullptr for weight 1
  int64_t rows_per_weight;  // consecutive rows sharing one weight, >= 1
  void* row_loss;           // [n_rows] acc when !reduce_sum, else unused
  double* partial_sums;     // [dfl_forward_block_count(...)] workspace when reduce_sum
  void* loss_sum;           // 0-dim acc when reduce_sum, else unused
  void* grad;               // [n_rows, n_bins] logits dtype, or nullptr
  int64_t n_rows;           // > 0
  int n_bins;               // in [2, kMaxBins]
  double log_eps;           // log of the probability floor, -inf for eps = 0
  bool reduce_sum;
};

// Thread blocks of one launch; a reduce_sum launch writes one partial sum per block.
int64_t dfl_forward_block_count(int64_t n_rows, int n_bins);

// Enqueues the forward kernels on `stream`; returns the launch error, if any.
cudaError_t launch_dfl_forward(LogitsDtype dtype, const DflForwardArgs& args, cudaStream_t stream);

}  // namespace stable_dfl
