// Sum of squares and non-finite check of one chunk of a gradient, optionally fused
// with GradScaler's unscale, compiled once per SIMD level. Chunking, threads and the
// fixed order of the chunk sums live in grad_norm_cpu.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "kernels.h"

namespace stable_dfl::cpu {
namespace {

// Independent running sums per chunk (see LaneSums).
constexpr int kLanes = 16;

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

  GradChunkResult finish() const {
    GradChunkResult result;
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
GradChunkResult reduce_chunk(scalar_t* data, int64_t n, at::opmath_type<scalar_t> inv_scale) {
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

}  // namespace

GradChunkResult grad_chunk(const GradChunkArgs& args) {
  GradChunkResult result;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, args.dtype, "grad_sumsq_nonfinite_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        auto* data = static_cast<scalar_t*>(args.data);
        const auto inv_scale = static_cast<opmath_t>(args.inv_scale);
        switch (args.mode) {
          case GradChunkMode::kMeasure:
            result = reduce_chunk<scalar_t, false, false>(data, args.numel, inv_scale);
            break;
          case GradChunkMode::kUnscale:
            result = reduce_chunk<scalar_t, true, false>(data, args.numel, inv_scale);
            break;
          case GradChunkMode::kUnscaleWriteBack:
            result = reduce_chunk<scalar_t, true, true>(data, args.numel, inv_scale);
            break;
        }
      });
  return result;
}

}  // namespace stable_dfl::cpu
