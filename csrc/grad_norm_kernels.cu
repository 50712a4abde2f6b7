// CUDA kernels of the gradient sum of squares and non-finite check
// (see grad_norm_kernels.h). Raw pointers only: no torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "grad_norm_kernels.h"

namespace stable_dfl {
namespace {

constexpr int kChunkThreads = 256;
constexpr int kFinalizeThreads = 1024;
constexpr int kWarp = 32;

// opmath: the type values are unscaled, squared and summed in per thread.
template <typename T>
struct Opmath {
  using type = float;
  __device__ static float load(T x) { return static_cast<float>(x); }
  __device__ static T store(float x) { return static_cast<T>(x); }
};
template <>
struct Opmath<__half> {
  using type = float;
  __device__ static float load(__half x) { return __half2float(x); }
  __device__ static __half store(float x) { return __float2half_rn(x); }
};
template <>
struct Opmath<__nv_bfloat16> {
  using type = float;
  __device__ static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Opmath<double> {
  using type = double;
  __device__ static double load(double x) { return x; }
  __device__ static double store(double x) { return x; }
};

// Fixed-shape tree sum over the block: the same bits on every run.
template <typename acc_t, int kThreads>
__device__ acc_t block_sum(acc_t value, acc_t* shared) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  constexpr int kWarps = kThreads / kWarp;
  value = threadIdx.x < kWarps ? shared[threadIdx.x] : acc_t(0);
  if (warp == 0) {
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      value += __shfl_down_sync(0xffffffffu, value, offset);
    }
  }
  return value;  // valid in thread 0
}

// One value: unscaled (GradScaler's rounding: multiply in opmath, round once to the dtype),
// then squared into the float64 sum (a float32 square overflows from |x| > 1.8e19 and
// underflows below 1e-19) and checked.
template <typename T>
__device__ __forceinline__ T visit(T x, typename Opmath<T>::type inv, bool unscale, double& sumsq,
                                   bool& bad) {
  if (unscale) x = Opmath<T>::store(Opmath<T>::load(x) * inv);
  const double v = static_cast<double>(Opmath<T>::load(x));
  sumsq += v * v;
  bad |= !isfinite(v);
  return x;
}

template <typename T>
__device__ void reduce_chunk(T* data, int length, const float* inv_scale, bool write_back,
                             double* partial, uint8_t* nonfinite) {
  using opmath_t = typename Opmath<T>::type;
  constexpr int kPerVector = 16 / sizeof(T);
  __shared__ double shared[kChunkThreads / kWarp];
  double sumsq = 0;
  bool bad = false;
  const bool unscale = inv_scale != nullptr;
  const opmath_t inv = unscale ? static_cast<opmath_t>(*inv_scale) : opmath_t(1);
  int scalar_begin = 0;
  if (reinterpret_cast<uintptr_t>(data) % 16 == 0) {
    // 16-byte loads (and stores) where the chunk is aligned; the tail goes one by one.
    const int n_vectors = length / kPerVector;
    uint4* vectors = reinterpret_cast<uint4*>(data);
    for (int v = threadIdx.x; v < n_vectors; v += kChunkThreads) {
      uint4 raw = vectors[v];
      T values[kPerVector];
      memcpy(values, &raw, sizeof(raw));
#pragma unroll
      for (int k = 0; k < kPerVector; ++k) values[k] = visit(values[k], inv, unscale, sumsq, bad);
      if (unscale && write_back) {
        memcpy(&raw, values, sizeof(raw));
        vectors[v] = raw;
      }
    }
    scalar_begin = n_vectors * kPerVector;
  }
  for (int i = scalar_begin + threadIdx.x; i < length; i += kChunkThreads) {
    const T x = visit(data[i], inv, unscale, sumsq, bad);
    if (unscale && write_back) data[i] = x;
  }
  const double total = block_sum<double, kChunkThreads>(sumsq, shared);
  const bool any_bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) {
    *partial = total;
    *nonfinite = any_bad ? 1 : 0;
  }
}

__global__ void __launch_bounds__(kChunkThreads)
    chunk_kernel(const GradTensorMeta* tensors, const GradChunkMeta* chunks, const float* inv_scale,
                 bool write_back, double* chunk_partial, uint8_t* chunk_nonfinite) {
  const GradChunkMeta chunk = chunks[blockIdx.x];
  const GradTensorMeta tensor = tensors[chunk.tensor];
  double* partial = chunk_partial + blockIdx.x;
  uint8_t* nonfinite = chunk_nonfinite + blockIdx.x;
  switch (tensor.dtype) {
    case GradDtype::kFloat32:
      reduce_chunk(static_cast<float*>(tensor.data) + chunk.begin, chunk.length, inv_scale,
                   write_back, partial, nonfinite);
      break;
    case GradDtype::kFloat16:
      reduce_chunk(static_cast<__half*>(tensor.data) + chunk.begin, chunk.length, inv_scale,
                   write_back, partial, nonfinite);
      break;
    case GradDtype::kBFloat16:
      reduce_chunk(static_cast<__nv_bfloat16*>(tensor.data) + chunk.begin, chunk.length, inv_scale,
                   write_back, partial, nonfinite);
      break;
    case GradDtype::kFloat64:
      reduce_chunk(static_cast<double*>(tensor.data) + chunk.begin, chunk.length, inv_scale,
                   write_back, partial, nonfinite);
      break;
  }
}

// One block. Warp w owns tensors w, w + kFinalizeWarps, ...; for each, lane l adds chunks
// l, l + kWarp, ... and the warp adds the lanes' sums in a fixed shuffle tree, so a tensor of
// many chunks is summed 32-wide. The block then sums the warps' totals in a fixed tree: the
// same bits on every run.
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const GradTensorMeta* tensors, int64_t n_tensors, const double* chunk_partial,
                    const uint8_t* chunk_nonfinite, double* sumsq, float* found_nonfinite,
                    bool* nonfinite) {
  constexpr int kFinalizeWarps = kFinalizeThreads / kWarp;
  __shared__ double shared[kFinalizeWarps];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  double total = 0.0;  // in lane 0 of each warp
  bool any_bad = false;
  for (int64_t t = warp; t < n_tensors; t += kFinalizeWarps) {
    const GradTensorMeta tensor = tensors[t];
    double tensor_sumsq = 0.0;
    bool bad = false;
    for (int64_t c = tensor.first_chunk + lane; c < tensor.first_chunk + tensor.n_chunks;
         c += kWarp) {
      tensor_sumsq += chunk_partial[c];
      bad |= chunk_nonfinite[c] != 0;
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      tensor_sumsq += __shfl_down_sync(0xffffffffu, tensor_sumsq, offset);
    }
    bad = __any_sync(0xffffffffu, bad);
    if (lane == 0) {
      nonfinite[t] = bad;
      if (!bad) total += tensor_sumsq;
    }
    any_bad |= bad;
  }
  total = block_sum<double, kFinalizeThreads>(total, shared);
  any_bad = __syncthreads_or(any_bad);
  if (threadIdx.x == 0) {
    *sumsq = total;
    *found_nonfinite = any_bad || isinf(total) ? 1.0f : 0.0f;
  }
}

}  // namespace

cudaError_t launch_grad_sumsq_nonfinite(const GradTensorMeta* tensors, int64_t n_tensors,
                                        const GradChunkMeta* chunks, int64_t n_chunks,
                                        const float* inv_scale, bool write_back,
                                        double* chunk_partial, uint8_t* chunk_nonfinite,
                                        double* sumsq, float* found_nonfinite, bool* nonfinite,
                                        cudaStream_t stream) {
  if (n_chunks > 0) {
    chunk_kernel<<<static_cast<unsigned>(n_chunks), kChunkThreads, 0, stream>>>(
        tensors, chunks, inv_scale, write_back, chunk_partial, chunk_nonfinite);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(
      tensors, n_tensors, chunk_partial, chunk_nonfinite, sumsq, found_nonfinite, nonfinite);
  return cudaGetLastError();
}

}  // namespace stable_dfl
