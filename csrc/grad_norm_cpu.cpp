// Sum of squares and non-finite check of a list of gradients on the CPU, in one
// pass, optionally fused with GradScaler's unscale.
//
// Every tensor is cut into chunks of kChunkElements; each chunk is reduced in
// float64 into its own slot, and the slots are added in a fixed order. The
// chunk boundaries and the order do not depend on which thread reduced which
// chunk, so the result has the same bits whatever the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>

#include "grad_norm_checks.h"

namespace stable_dfl {
namespace {

constexpr int64_t kChunkElements = int64_t{1} << 16;
// Independent running sums per chunk (see LaneSums).
constexpr int kLanes = 16;
// Below this many elements per thread, waking threads costs more than it saves.
constexpr int64_t kMinElementsPerThread = int64_t{1} << 15;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

struct ChunkResult {
  double sumsq = 0.0;
  bool nonfinite = false;
};

// Per-lane float64 sums of squares. The loop over the lanes has no
// loop-carried dependency, so the compiler keeps the lanes in SIMD registers
// without reassociating any sum. Squares of float32 values cannot overflow
// float64, so a non-finite sum means a NaN/Inf element; float64 squares can
// overflow, so float64 values also sum x - x (0, or NaN for NaN/Inf).
template <typename value_t>
struct LaneSums {
  static constexpr bool kProbeFinite = std::is_same_v<value_t, double>;
  double sumsq[kLanes] = {};
  double probe[kLanes] = {};

  void add(const value_t* values, int64_t n) {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      for (int lane = 0; lane < kLanes; ++lane) add_one(values[i + lane], lane);
    }
    for (int lane = 0; i < n; ++i, ++lane) add_one(values[i], lane);
  }

  void add_one(value_t x, int lane) {
    const double v = static_cast<double>(x);
    sumsq[lane] += v * v;
    if constexpr (kProbeFinite) probe[lane] += v - v;
  }

  ChunkResult finish() const {
    ChunkResult result;
    double probe_sum = 0.0;
    for (int lane = 0; lane < kLanes; ++lane) {
      result.sumsq += sumsq[lane];
      probe_sum += probe[lane];
    }
    result.nonfinite = kProbeFinite ? !std::isfinite(probe_sum) : !std::isfinite(result.sumsq);
    return result;
  }
};

// GradScaler's unscale: multiply in opmath, round once to the dtype. Writes
// the opmath values of the rounded results to `out` (the values the norm
// must see) and, when kWriteBack, the rounded results to `data`.
template <typename scalar_t, bool kWriteBack>
void unscale_block(scalar_t* __restrict__ data, int64_t n, at::opmath_type<scalar_t> inv_scale,
                   at::opmath_type<scalar_t>* __restrict__ out) {
  using opmath_t = at::opmath_type<scalar_t>;
  if constexpr (c10::is_reduced_floating_point_v<scalar_t>) {
    // c10::Half/BFloat16 conversions do not vectorize; ATen's SIMD ones do,
    // with the same round-to-nearest-even.
    using Vec = at::vec::Vectorized<scalar_t>;
    using FloatVec = at::vec::Vectorized<float>;
    const FloatVec inv(inv_scale);
    for (int64_t i = 0; i < n; i += Vec::size()) {
      const int count = static_cast<int>(std::min<int64_t>(Vec::size(), n - i));
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vec::loadu(data + i, count));
      const Vec rounded = at::vec::convert_from_float<scalar_t>(lo * inv, hi * inv);
      if constexpr (kWriteBack) rounded.store(data + i, count);
      auto [rounded_lo, rounded_hi] = at::vec::convert_to_float<scalar_t>(rounded);
      if (count > FloatVec::size()) {
        rounded_lo.store(out + i);
        rounded_hi.store(out + i + FloatVec::size(), count - FloatVec::size());
      } else {
        rounded_lo.store(out + i, count);
      }
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t x = static_cast<scalar_t>(static_cast<opmath_t>(data[i]) * inv_scale);
      if constexpr (kWriteBack) data[i] = x;
      out[i] = x;
    }
  }
}

// Widens float16/bfloat16 values to float32 with ATen's SIMD conversions.
template <typename scalar_t>
void widen_block(const scalar_t* data, int64_t n, float* out) {
  using Vec = at::vec::Vectorized<scalar_t>;
  using FloatVec = at::vec::Vectorized<float>;
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int count = static_cast<int>(std::min<int64_t>(Vec::size(), n - i));
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vec::loadu(data + i, count));
    if (count > FloatVec::size()) {
      lo.store(out + i);
      hi.store(out + i + FloatVec::size(), count - FloatVec::size());
    } else {
      lo.store(out + i, count);
    }
  }
}

// Values pass through an L1-resident block of opmath values when they must be
// unscaled or widened first; plain float32/float64 are summed in place.
template <typename scalar_t, bool kUnscale, bool kWriteBack>
ChunkResult reduce_chunk(scalar_t* data, int64_t n, at::opmath_type<scalar_t> inv_scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int64_t kBlock = 1024;
  LaneSums<opmath_t> sums;
  if constexpr (!kUnscale && std::is_same_v<scalar_t, opmath_t>) {
    sums.add(data, n);
  } else {
    alignas(64) opmath_t block[kBlock];
    for (int64_t begin = 0; begin < n; begin += kBlock) {
      const int64_t count = std::min(kBlock, n - begin);
      if constexpr (kUnscale) {
        unscale_block<scalar_t, kWriteBack>(data + begin, count, inv_scale, block);
      } else {
        widen_block(data + begin, count, block);
      }
      sums.add(block, count);
    }
  }
  return sums.finish();
}

template <bool kUnscale, bool kWriteBack>
ChunkResult reduce_chunk_any_dtype(const at::Tensor& tensor, const Chunk& chunk, float inv_scale) {
  ChunkResult result;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, tensor.scalar_type(), "grad_sumsq_nonfinite_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        // const_cast: only written when kWriteBack,
        // which only the in-place op instantiates.
        scalar_t* data = const_cast<scalar_t*>(tensor.const_data_ptr<scalar_t>());
        result = reduce_chunk<scalar_t, kUnscale, kWriteBack>(
            data + chunk.begin, chunk.end - chunk.begin, static_cast<opmath_t>(inv_scale));
      });
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grad_sumsq_nonfinite_impl(
    const std::vector<at::Tensor>& grads, const c10::optional<at::Tensor>& inv_scale_tensor,
    bool write_back) {
  const int64_t n_tensors = static_cast<int64_t>(grads.size());
  std::vector<Chunk> chunks;
  int64_t total_elements = 0;
  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t numel = grads[t].numel();
    total_elements += numel;
    for (int64_t begin = 0; begin < numel; begin += kChunkElements) {
      chunks.push_back({t, begin, std::min(numel, begin + kChunkElements)});
    }
  }
  const bool unscale = inv_scale_tensor.has_value();
  const float inv_scale = unscale ? inv_scale_tensor->item<float>() : 1.0f;

  std::vector<ChunkResult> results(chunks.size());
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  // Chunks are handed out one at a time from a shared counter, so threads stay
  // busy when tensor sizes are uneven; each result lands in its chunk's slot.
  std::atomic<int64_t> next_chunk{0};
  const int64_t n_workers =
      std::clamp<int64_t>(total_elements / kMinElementsPerThread, 1, at::get_num_threads());
  at::parallel_for(0, n_workers, 1, [&](int64_t, int64_t) {
    for (int64_t c = next_chunk++; c < n_chunks; c = next_chunk++) {
      const at::Tensor& tensor = grads[chunks[c].tensor];
      if (!unscale) {
        results[c] = reduce_chunk_any_dtype<false, false>(tensor, chunks[c], inv_scale);
      } else if (write_back) {
        results[c] = reduce_chunk_any_dtype<true, true>(tensor, chunks[c], inv_scale);
      } else {
        results[c] = reduce_chunk_any_dtype<true, false>(tensor, chunks[c], inv_scale);
      }
    }
  });

  const auto device = grads.empty() ? at::Device(at::kCPU) : grads[0].device();
  at::Tensor nonfinite =
      at::empty({n_tensors}, at::TensorOptions().dtype(at::kBool).device(device));
  bool* nonfinite_ptr = nonfinite.mutable_data_ptr<bool>();
  std::fill(nonfinite_ptr, nonfinite_ptr + n_tensors, false);
  std::vector<double> tensor_sumsq(n_tensors, 0.0);
  for (int64_t c = 0; c < n_chunks; ++c) {
    tensor_sumsq[chunks[c].tensor] += results[c].sumsq;
    nonfinite_ptr[chunks[c].tensor] |= results[c].nonfinite;
  }
  double total = 0.0;
  bool any_nonfinite = false;
  for (int64_t t = 0; t < n_tensors; ++t) {
    any_nonfinite |= nonfinite_ptr[t];
    if (!nonfinite_ptr[t]) total += tensor_sumsq[t];
  }
  const float sumsq_value = static_cast<float>(total);
  const auto float_options = at::TensorOptions().dtype(at::kFloat).device(device);
  at::Tensor sumsq = at::empty({}, float_options);
  at::Tensor found_nonfinite = at::empty({}, float_options);
  *sumsq.mutable_data_ptr<float>() = sumsq_value;
  *found_nonfinite.mutable_data_ptr<float>() =
      any_nonfinite || !std::isfinite(sumsq_value) ? 1.0f : 0.0f;
  return {sumsq, found_nonfinite, nonfinite};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grad_sumsq_nonfinite_cpu(
    at::TensorList grads, const c10::optional<at::Tensor>& inv_scale) {
  check_grad_list(grads, inv_scale, "stable_dfl::grad_sumsq_nonfinite");
  const DenseGrads dense(grads);
  return grad_sumsq_nonfinite_impl(dense.tensors(), inv_scale, /*write_back=*/false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unscale_grad_sumsq_nonfinite_cpu(
    at::TensorList grads, const at::Tensor& inv_scale) {
  check_grad_list(grads, inv_scale, "stable_dfl::unscale_grad_sumsq_nonfinite_");
  const DenseGrads dense(grads);
  auto outputs = grad_sumsq_nonfinite_impl(dense.tensors(), inv_scale, /*write_back=*/true);
  dense.copy_back();
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(stable_dfl, CPU, m) {
  m.impl("grad_sumsq_nonfinite", &grad_sumsq_nonfinite_cpu);
  m.impl("unscale_grad_sumsq_nonfinite_", &unscale_grad_sumsq_nonfinite_cpu);
}

}  // namespace stable_dfl
