// Interface between the torch-facing CUDA registration (grad_norm_cuda.cpp)
// and the CUDA kernels (grad_norm_kernels.cu), on raw pointers so that the .cu
// file compiles without torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace stable_dfl {

enum class GradDtype : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Elements per chunk; a chunk never crosses a tensor boundary.
constexpr int64_t kCudaChunkElements = int64_t{1} << 16;

struct GradTensorMeta {
  void* data;
  int64_t numel;
  int64_t first_chunk;  // its chunks are [first_chunk, first_chunk + n_chunks)
  int32_t n_chunks;
  GradDtype dtype;
};

struct GradChunkMeta {
  int64_t begin;   // first element within its tensor
  int32_t tensor;  // index into the tensor table
  int32_t length;  // elements, at most kCudaChunkElements
};

// Multi-tensor apply: one launch reduces every chunk of every tensor into
// chunk_partial / chunk_nonfinite (n_chunks slots each), a second adds them in
// a fixed order into sumsq, found_nonfinite (1.0 or 0.0) and nonfinite[n_tensors].
// inv_scale (device, one float) may be null; write_back stores the unscaled
// values. All pointers are device pointers; both launches go on `stream`.
cudaError_t launch_grad_sumsq_nonfinite(const GradTensorMeta* tensors, int64_t n_tensors,
                                        const GradChunkMeta* chunks, int64_t n_chunks,
                                        const float* inv_scale, bool write_back,
                                        double* chunk_partial, uint8_t* chunk_nonfinite,
                                        double* sumsq, float* found_nonfinite, bool* nonfinite,
                                        cudaStream_t stream);

}  // namespace stable_dfl
