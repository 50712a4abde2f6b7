// Fused Distribution Focal Loss on CUDA.
//
// Each thread block owns a tile of consecutive rows. The tile is one contiguous
// span of logits, so the block copies it into shared memory with 16-byte vector
// loads whatever n_bins is (scalar loads only for a misaligned base or the
// tail). A group of kLanesPerRow threads of one warp then handles a row: max and
// sum of exponentials by warp shuffles, the rest through dfl_row.h in fp32 (fp64
// for fp64 logits). Gradients overwrite the row in shared memory and leave with
// 16-byte vector stores. A reduced loss is a fixed-order sum of one fp64 partial
// per block, added up by a second one-block kernel: no atomics, same bits on
// every run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dfl_kernels.h"
#include "dfl_row.h"

namespace stable_dfl {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;
// Threads of the kernel that adds the per-block partial sums.
constexpr int kSumThreads = 1024;
// Logits per tile: 8 KiB (fp16) to 32 KiB (fp64) of shared memory, below the
// 48 KiB a block may use without opting in.
constexpr int kTileElements = 4096;
constexpr int kVectorBytes = 16;
// Tiles hold a multiple of 8 rows, so with >= 2-byte logits every tile starts
// 16-byte aligned when pred does.
constexpr int kRowGranule = 8;
static_assert(kTileElements / kMaxBins >= kRowGranule, "a tile must hold a whole row granule");

__host__ __device__ inline int rows_per_tile(int n_bins) {
  return kTileElements / n_bins / kRowGranule * kRowGranule;
}

// Compute type and conversions of each logits type.
template <typename scalar_t>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};

__device__ __forceinline__ float to_compute(float v) { return v; }
__device__ __forceinline__ double to_compute(double v) { return v; }
__device__ __forceinline__ float to_compute(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_compute(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_compute(typename Compute<scalar_t>::type v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_compute<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_compute<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }

// Reductions over the kLanes threads of a row group (aligned lanes of one warp).
// Every thread of the warp must call them.
template <int kLanes, typename T>
__device__ __forceinline__ T group_max(T v) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) {
    v = math_max(v, __shfl_xor_sync(kFullWarp, v, offset));
  }
  return v;
}

template <int kLanes, typename T>
__device__ __forceinline__ T group_sum(T v) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullWarp, v, offset);
  return v;
}

// Sum over the block in a fixed order; the result is valid in thread 0.
// Every thread of the block must call it.
template <int kThreads>
__device__ double block_sum(double v) {
  static_assert(kThreads % kWarpSize == 0 && kThreads <= kWarpSize * kWarpSize, "block shape");
  __shared__ double warp_sums[kThreads / kWarpSize];
  v = group_sum<kWarpSize>(v);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / kWarpSize ? warp_sums[lane] : 0.0;
    v = group_sum<kWarpSize>(v);
  }
  return v;
}

// Copies `count` elements with the whole block, 16 bytes per access where both
// sides are 16-byte aligned.
template <typename scalar_t>
__device__ void copy_span(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, int count) {
  constexpr int kPerVector = kVectorBytes / sizeof(scalar_t);
  int copied = 0;
  if ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) % kVectorBytes == 0) {
    const int n_vectors = count / kPerVector;
    const uint4* src_vectors = reinterpret_cast<const uint4*>(src);
    uint4* dst_vectors = reinterpret_cast<uint4*>(dst);
    for (int i = threadIdx.x; i < n_vectors; i += blockDim.x) dst_vectors[i] = src_vectors[i];
    copied = n_vectors * kPerVector;
  }
  for (int i = copied + threadIdx.x; i < count; i += blockDim.x) dst[i] = src[i];
}

template <typename scalar_t>
struct ForwardParams {
  using acc_t = typename Compute<scalar_t>::type;
  const scalar_t* pred;
  const acc_t* target;
  const acc_t* weight;  // nullptr: weight 1
  int64_t rows_per_weight;
  acc_t* row_loss;       // written when !reduce_sum
  double* partial_sums;  // one per block, written when reduce_sum
  scalar_t* grad;        // nullptr: no gradient
  int64_t n_rows;
  int n_bins;
  acc_t log_eps;
  bool reduce_sum;
};

// kLanesPerRow threads per row, each holding up to kBinsPerLane logits:
// kLanesPerRow * kBinsPerLane >= n_bins.
template <typename scalar_t, int kLanesPerRow, int kBinsPerLane>
__global__ void __launch_bounds__(kThreadsPerBlock)
    dfl_forward_kernel(const ForwardParams<scalar_t> p) {
  static_assert(kLanesPerRow <= kWarpSize && kWarpSize % kLanesPerRow == 0,
                "row groups tile a warp");
  using acc_t = typename Compute<scalar_t>::type;
  constexpr int kGroups = kThreadsPerBlock / kLanesPerRow;
  const acc_t kInf = static_cast<acc_t>(INFINITY);

  extern __shared__ __align__(kVectorBytes) unsigned char shared_bytes[];
  scalar_t* tile = reinterpret_cast<scalar_t*>(shared_bytes);
  const int n_bins = p.n_bins;
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * rows_per_tile(n_bins);
  const int rows =
      static_cast<int>(min(static_cast<int64_t>(rows_per_tile(n_bins)), p.n_rows - first_row));
  const int64_t tile_offset = first_row * n_bins;
  copy_span(p.pred + tile_offset, tile, rows * n_bins);
  __syncthreads();

  const int lane = threadIdx.x % kLanesPerRow;
  const int group = threadIdx.x / kLanesPerRow;
  const acc_t upper_limit = target_upper_limit<acc_t>(n_bins);
  double thread_loss = 0.0;
  // Every thread runs the same number of iterations, so whole warps reach the
  // shuffles; groups past the last row run on neutral values and store nothing.
  for (int group_first_row = 0; group_first_row < rows; group_first_row += kGroups) {
    const int row_in_tile = group_first_row + group;
    const bool active = row_in_tile < rows;
    const int valid_bins = active ? n_bins : 0;
    scalar_t* row = tile + row_in_tile * n_bins;
    const int64_t global_row = first_row + row_in_tile;

    acc_t target = 0;
    acc_t weight = 1;
    if (active) {
      target = p.target[global_row];
      if (p.weight != nullptr) weight = p.weight[global_row / p.rows_per_weight];
    }
    const TwoHot<acc_t> th = two_hot(target, acc_t(0), acc_t(1), upper_limit);
    const int left = static_cast<int>(th.left);
    const acc_t x_left = active ? to_compute(row[left]) : acc_t(0);
    const acc_t x_right = active ? to_compute(row[left + 1]) : acc_t(0);

    acc_t values[kBinsPerLane];
    acc_t row_max = -kInf;
#pragma unroll
    for (int k = 0; k < kBinsPerLane; ++k) {
      const int bin = lane + k * kLanesPerRow;
      values[k] = bin < valid_bins ? to_compute(row[bin]) : -kInf;
      row_max = math_max(row_max, values[k]);
    }
    row_max = group_max<kLanesPerRow>(row_max);

    // sum_j exp(x_j - m) + sum_j (x_j - x_j), see dfl_row.h; values become exp(x_j - m).
    acc_t sum_exp = 0;
#pragma unroll
    for (int k = 0; k < kBinsPerLane; ++k) {
      const int bin = lane + k * kLanesPerRow;
      if (bin < valid_bins) {
        const acc_t e = exp_of(values[k] - row_max);
        sum_exp += e + (values[k] - values[k]);
        values[k] = e;
      }
    }
    sum_exp = group_sum<kLanesPerRow>(sum_exp);

    const RowResult<acc_t> r =
        finish_row(th, x_left - row_max, x_right - row_max, sum_exp, weight, target, p.log_eps);
    if (active && lane == 0) {
      if (p.reduce_sum) {
        thread_loss += static_cast<double>(r.loss);
      } else {
        p.row_loss[global_row] = r.loss;
      }
    }
    if (p.grad != nullptr) {
      // The group's reads of row[left] and row[left + 1] above precede the gradient writes.
      __syncwarp();
#pragma unroll
      for (int k = 0; k < kBinsPerLane; ++k) {
        const int bin = lane + k * kLanesPerRow;
        if (bin < valid_bins) {
          acc_t g = values[k] * r.grad_scale;
          if (bin == left) g -= r.grad_left;
          if (bin == left + 1) g -= r.grad_right;
          row[bin] = from_compute<scalar_t>(g);
        }
      }
    }
  }

  if (p.grad != nullptr) {
    __syncthreads();
    copy_span(tile, p.grad + tile_offset, rows * n_bins);
  }
  if (p.reduce_sum) {
    const double block_loss = block_sum<kThreadsPerBlock>(thread_loss);
    if (threadIdx.x == 0) p.partial_sums[blockIdx.x] = block_loss;
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kSumThreads)
    sum_partials_kernel(const double* __restrict__ partial_sums, int64_t count, acc_t* loss_sum) {
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += kSumThreads) sum += partial_sums[i];
  sum = block_sum<kSumThreads>(sum);
  if (threadIdx.x == 0) *loss_sum = static_cast<acc_t>(sum);
}

template <typename scalar_t, int kLanesPerRow, int kBinsPerLane>
void launch_forward_kernel(const ForwardParams<scalar_t>& params, int64_t n_blocks,
                           cudaStream_t stream) {
  const size_t shared_bytes =
      static_cast<size_t>(rows_per_tile(params.n_bins)) * params.n_bins * sizeof(scalar_t);
  dfl_forward_kernel<scalar_t, kLanesPerRow, kBinsPerLane>
      <<<static_cast<unsigned>(n_blocks), kThreadsPerBlock, shared_bytes, stream>>>(params);
}

template <typename scalar_t>
cudaError_t launch_typed(const DflForwardArgs& args, cudaStream_t stream) {
  using acc_t = typename Compute<scalar_t>::type;
  ForwardParams<scalar_t> params;
  params.pred = static_cast<const scalar_t*>(args.pred);
  params.target = static_cast<const acc_t*>(args.target);
  params.weight = static_cast<const acc_t*>(args.weight);
  params.rows_per_weight = args.rows_per_weight;
  params.row_loss = static_cast<acc_t*>(args.row_loss);
  params.partial_sums = args.partial_sums;
  params.grad = static_cast<scalar_t*>(args.grad);
  params.n_rows = args.n_rows;
  params.n_bins = args.n_bins;
  params.log_eps = static_cast<acc_t>(args.log_eps);
  params.reduce_sum = args.reduce_sum;

  // One lane per bin up to a warp, then 2 or 4 bins per lane.
  const int64_t n_blocks = dfl_forward_block_count(args.n_rows, args.n_bins);
  const int n_bins = args.n_bins;
  if (n_bins <= 2) {
    launch_forward_kernel<scalar_t, 2, 1>(params, n_blocks, stream);
  } else if (n_bins <= 4) {
    launch_forward_kernel<scalar_t, 4, 1>(params, n_blocks, stream);
  } else if (n_bins <= 8) {
    launch_forward_kernel<scalar_t, 8, 1>(params, n_blocks, stream);
  } else if (n_bins <= 16) {
    launch_forward_kernel<scalar_t, 16, 1>(params, n_blocks, stream);
  } else if (n_bins <= 32) {
    launch_forward_kernel<scalar_t, 32, 1>(params, n_blocks, stream);
  } else if (n_bins <= 64) {
    launch_forward_kernel<scalar_t, 32, 2>(params, n_blocks, stream);
  } else {
    static_assert(kMaxBins <= 32 * 4, "the widest kernel covers kMaxBins");
    launch_forward_kernel<scalar_t, 32, 4>(params, n_blocks, stream);
  }
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess || !args.reduce_sum) return error;
  sum_partials_kernel<acc_t><<<1, kSumThreads, 0, stream>>>(args.partial_sums, n_blocks,
                                                            static_cast<acc_t*>(args.loss_sum));
  return cudaGetLastError();
}

}  // namespace

int64_t dfl_forward_block_count(int64_t n_rows, int n_bins) {
  const int64_t tile_rows = rows_per_tile(n_bins);
  return (n_rows + tile_rows - 1) / tile_rows;
}

cudaError_t launch_dfl_forward(LogitsDtype dtype, const DflForwardArgs& args, cudaStream_t stream) {
  switch (dtype) {
    case LogitsDtype::kFloat16:
      return launch_typed<__half>(args, stream);
    case LogitsDtype::kBFloat16:
      return launch_typed<__nv_bfloat16>(args, stream);
    case LogitsDtype::kFloat32:
      return launch_typed<float>(args, stream);
    case LogitsDtype::kFloat64:
      return launch_typed<double>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace stable_dfl
