// Per-row Distribution Focal Loss math shared by the CPU and CUDA kernels.
//
// A kernel reduces one row of logits x[0..n_bins) to its max m and
//   sum_exp = sum_j exp(x_j - m) + sum_j (x_j - x_j).
// The second sum is 0 for a finite row and NaN as soon as one logit is NaN or
// +-Inf, so a bad row can never produce a finite loss (the clamps alone would
// hide a -Inf logit). The functions below turn that into the row's loss and
// gradient. They are templates over the value type `T`: float or double for one
// row at a time (CUDA), or a SIMD vector holding one row per lane (CPU; its
// overloads of the math_* helpers must be declared before this header).
// Arithmetic is fp32 for fp16/bf16/fp32 logits and fp64 for fp64, so the
// target-bin terms p - q are formed before any rounding to fp16/bf16.
#pragma once

#include <math.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SDFL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SDFL_HOST_DEVICE inline
#endif

namespace stable_dfl {

// Largest bin count the kernels accept.
constexpr int kMaxBins = 128;

SDFL_HOST_DEVICE float math_log(float x) { return logf(x); }
SDFL_HOST_DEVICE double math_log(double x) { return log(x); }
SDFL_HOST_DEVICE float math_floor(float x) { return floorf(x); }
SDFL_HOST_DEVICE double math_floor(double x) { return floor(x); }
// fmax/fmin return the non-NaN operand.
SDFL_HOST_DEVICE float math_max(float a, float b) { return fmaxf(a, b); }
SDFL_HOST_DEVICE double math_max(double a, double b) { return fmax(a, b); }
SDFL_HOST_DEVICE float math_min(float a, float b) { return fminf(a, b); }
SDFL_HOST_DEVICE double math_min(double a, double b) { return fmin(a, b); }
SDFL_HOST_DEVICE float math_neg(float x) { return -x; }
SDFL_HOST_DEVICE double math_neg(double x) { return -x; }
// value where a >= b, else 0 (false for NaN).
SDFL_HOST_DEVICE float keep_if_ge(float a, float b, float value) { return a >= b ? value : 0.0f; }
SDFL_HOST_DEVICE double keep_if_ge(double a, double b, double value) {
  return a >= b ? value : 0.0;
}
// value where a > b, else 0 (false for NaN).
SDFL_HOST_DEVICE float keep_if_gt(float a, float b, float value) { return a > b ? value : 0.0f; }
SDFL_HOST_DEVICE double keep_if_gt(double a, double b, double value) { return a > b ? value : 0.0; }

// Upper clamp of the continuous target, `n_bins - 1 - 0.01` rounded once to
// the compute type, exactly as `tensor.clamp(0, n_bins - 1 - 0.01)` does.
template <typename scalar_t>
SDFL_HOST_DEVICE scalar_t target_upper_limit(int n_bins) {
  return static_cast<scalar_t>(static_cast<double>(n_bins - 1) - 0.01);
}

// The two-hot target: weight w_left on bin `left`, w_right on bin `left + 1`.
// `left` is held as a value of T (an integer-valued float).
template <typename T>
struct TwoHot {
  T left;
  T w_left;
  T w_right;
};

template <typename T>
SDFL_HOST_DEVICE TwoHot<T> two_hot(T target, T zero, T one, T upper_limit) {
  // math_max/math_min map a NaN target to a bound, which keeps the bin index
  // in range; the NaN is still reported through the poison term of finish_row.
  const T t = math_min(math_max(target, zero), upper_limit);
  const T left = math_floor(t);
  TwoHot<T> th;
  th.left = left;
  th.w_left = (left + one) - t;
  th.w_right = t - left;
  return th;
}

// What a row contributes. The gradient of the row's weighted loss is
//   g_j = exp(x_j - m) * grad_scale - [j == left] * grad_left - [j == left + 1] * grad_right.
template <typename T>
struct RowResult {
  T loss;
  T grad_scale;
  T grad_left;
  T grad_right;
};

// x_left, x_right: the logits of the two target bins minus the row max.
// log_eps: log of the probability floor (-inf when the floor is 0).
template <typename T>
SDFL_HOST_DEVICE RowResult<T> finish_row(const TwoHot<T>& th, T x_left, T x_right, T sum_exp,
                                         T weight, T target, T log_eps) {
  const T log_sum = math_log(sum_exp);
  // 0 for finite input, NaN when a logit, the target or the weight is NaN/Inf.
  const T poison = (log_sum - log_sum) + (target - target) + (weight - weight);
  const T logp_left = x_left - log_sum;
  const T logp_right = x_right - log_sum;
  // torch.clamp(p, min=eps) passes the gradient where p >= eps and blocks it below.
  const T active_left = keep_if_ge(logp_left, log_eps, th.w_left);
  const T active_right = keep_if_ge(logp_right, log_eps, th.w_right);
  const T clamped_left = math_max(logp_left, log_eps);
  const T clamped_right = math_max(logp_right, log_eps);
  RowResult<T> r;
  // A target on a bin (w_right == 0) adds exactly 0, even where eps == 0 leaves the log
  // of a probability that underflowed at -inf (w_left is never 0).
  const T zero = th.w_right - th.w_right;
  const T right_term = keep_if_gt(th.w_right, zero, th.w_right * clamped_right);
  r.loss = weight * math_neg(th.w_left * clamped_left + right_term) + poison;
  r.grad_scale = weight * (active_left + active_right) / sum_exp + poison;
  r.grad_left = weight * active_left;
  r.grad_right = weight * active_right;
  return r;
}

}  // namespace stable_dfl
