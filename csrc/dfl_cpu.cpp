// Fused Distribution Focal Loss on the CPU: one pass over each row computes
// the max, the sum of exponentials, the loss and (when asked) the gradient.
// Rows are spread over threads in fixed chunks whose partial sums are added in
// a fixed order, so the reduced loss has the same bits whatever the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace stable_dfl {
// SIMD overloads of the math helpers, declared before dfl_row.h's templates use them.
template <typename T>
using SimdVec = at::vec::Vectorized<T>;
template <typename T>
inline SimdVec<T> math_log(const SimdVec<T>& x) {
  return x.log();
}
template <typename T>
inline SimdVec<T> math_floor(const SimdVec<T>& x) {
  return x.floor();
}
template <typename T>
inline SimdVec<T> math_max(const SimdVec<T>& a, const SimdVec<T>& b) {
  return at::vec::maximum(a, b);
}
template <typename T>
inline SimdVec<T> math_min(const SimdVec<T>& a, const SimdVec<T>& b) {
  return at::vec::minimum(a, b);
}
template <typename T>
inline SimdVec<T> math_neg(const SimdVec<T>& x) {
  return x.neg();
}
template <typename T>
inline SimdVec<T> keep_if_ge(const SimdVec<T>& a, const SimdVec<T>& b, const SimdVec<T>& value) {
  return value & (a >= b);
}
}  // namespace stable_dfl

#include "dfl_checks.h"
#include "dfl_row.h"

namespace stable_dfl {
namespace {

// Rows per deterministic partial sum; also the unit of parallel work.
constexpr int64_t kRowsPerChunk = 256;

// Rows are processed in blocks of one SIMD vector's width, transposed so that
// each lane holds one row: the max, exp, sum and the per-row scalar math of
// dfl_row.h all run vertically, with no horizontal reductions.
template <typename scalar_t, typename acc_t>
struct BlockKernel {
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int kLanes = Vec::size();

  const int n_bins;
  const Vec log_eps;
  const Vec upper_limit;
  // cols[j * kLanes + i]: bin j of the block's row i (logits, then exp, then gradient).
  alignas(64) acc_t cols[kMaxBins * kLanes];
  alignas(64) acc_t lanes[kLanes];
  // Row-major [kLanes, n_bins] staging tile for fp16/bf16 rows widened to acc_t.
  alignas(64) acc_t tile[kMaxBins * kLanes];

  BlockKernel(int n_bins_, acc_t log_eps_)
      : n_bins(n_bins_), log_eps(log_eps_), upper_limit(target_upper_limit<acc_t>(n_bins_)) {}

  // Loads up to kLanes values, zero-filling the lanes past `count`.
  Vec load_lanes(const acc_t* values, int count) {
    for (int i = 0; i < kLanes; ++i) lanes[i] = i < count ? values[i] : acc_t(0);
    return Vec::loadu(lanes);
  }

  // Rows [0, count) of the block starting at `logits`; writes each row's loss
  // to loss_out[i] and, when grad is not null, the rows' gradients.
  void operator()(const scalar_t* logits, const acc_t* target, const acc_t* weight, int count,
                  acc_t* loss_out, scalar_t* grad) {
    // The block's rows are contiguous: widen them in one vectorised pass, then
    // transpose the tile with SIMD shuffles.
    const acc_t* rows = nullptr;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      rows = logits;
    } else {
      at::vec::convert(logits, tile, static_cast<int64_t>(count) * n_bins);
      rows = tile;
    }
    at::vec::transpose_mxn<acc_t>(rows, n_bins, cols, kLanes, count, n_bins);
    for (int i = count; i < kLanes; ++i) {
      for (int j = 0; j < n_bins; ++j) cols[j * kLanes + i] = acc_t(0);
    }
    const Vec zero(acc_t(0));
    const Vec one(acc_t(1));
    const Vec t = load_lanes(target, count);
    const Vec w = weight != nullptr ? load_lanes(weight, count) : one;
    const TwoHot<Vec> th = two_hot(t, zero, one, upper_limit);
    const Vec right = th.left + one;

    Vec row_max = Vec::loadu(cols);
    for (int j = 1; j < n_bins; ++j)
      row_max = at::vec::maximum(row_max, Vec::loadu(cols + j * kLanes));

    Vec sum_exp = zero;
    Vec x_left = zero;
    Vec x_right = zero;
    for (int j = 0; j < n_bins; ++j) {
      const Vec x = Vec::loadu(cols + j * kLanes);
      const Vec bin(static_cast<acc_t>(j));
      x_left = Vec::blendv(x_left, x, bin == th.left);
      x_right = Vec::blendv(x_right, x, bin == right);
      // exp_u20: an inlined polynomial, ~1e-6 relative error, exact at 0 (so sum_exp >= 1);
      // NaN/Inf rows are caught by the poison term, not by exp.
      const Vec e = (x - row_max).exp_u20();
      e.store(cols + j * kLanes);
      sum_exp = sum_exp + e + (x - x);
    }
    const RowResult<Vec> r =
        finish_row(th, x_left - row_max, x_right - row_max, sum_exp, w, t, log_eps);
    r.loss.store(lanes);
    for (int i = 0; i < count; ++i) loss_out[i] = lanes[i];
    if (grad == nullptr) return;

    for (int j = 0; j < n_bins; ++j) {
      const Vec bin(static_cast<acc_t>(j));
      const Vec e = Vec::loadu(cols + j * kLanes);
      const Vec g =
          e * r.grad_scale - (r.grad_left & (bin == th.left)) - (r.grad_right & (bin == right));
      g.store(cols + j * kLanes);
    }
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      at::vec::transpose_mxn<acc_t>(cols, kLanes, grad, n_bins, n_bins, count);
    } else {
      at::vec::transpose_mxn<acc_t>(cols, kLanes, tile, n_bins, n_bins, count);
      at::vec::convert(tile, grad, static_cast<int64_t>(count) * n_bins);
    }
  }
};

template <typename scalar_t>
void dfl_forward_typed(const at::Tensor& pred, const at::Tensor& target,
                       const c10::optional<at::Tensor>& weight, double eps, bool reduce_sum,
                       at::Tensor& loss, at::Tensor* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_rows = pred.size(0);
  const int n_bins = static_cast<int>(pred.size(1));
  const scalar_t* pred_ptr = pred.const_data_ptr<scalar_t>();
  const acc_t* target_ptr = target.const_data_ptr<acc_t>();
  const acc_t* weight_ptr = weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr;
  scalar_t* grad_ptr = grad != nullptr ? grad->mutable_data_ptr<scalar_t>() : nullptr;
  const acc_t log_eps =
      eps > 0 ? static_cast<acc_t>(std::log(eps)) : -std::numeric_limits<acc_t>::infinity();

  const int64_t n_chunks = (n_rows + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<double> partial(reduce_sum ? n_chunks : 0, 0.0);
  acc_t* row_loss_ptr = reduce_sum ? nullptr : loss.mutable_data_ptr<acc_t>();

  at::parallel_for(0, n_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    BlockKernel<scalar_t, acc_t> kernel(n_bins, log_eps);
    constexpr int kLanes = BlockKernel<scalar_t, acc_t>::kLanes;
    acc_t block_loss[kLanes];
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t row_end = std::min(n_rows, (chunk + 1) * kRowsPerChunk);
      double chunk_sum = 0.0;
      for (int64_t i = chunk * kRowsPerChunk; i < row_end; i += kLanes) {
        const int count = static_cast<int>(std::min<int64_t>(kLanes, row_end - i));
        acc_t* loss_out = reduce_sum ? block_loss : row_loss_ptr + i;
        kernel(pred_ptr + i * n_bins, target_ptr + i,
               weight_ptr != nullptr ? weight_ptr + i : nullptr, count, loss_out,
               grad_ptr != nullptr ? grad_ptr + i * n_bins : nullptr);
        if (reduce_sum) {
          for (int k = 0; k < count; ++k) chunk_sum += static_cast<double>(block_loss[k]);
        }
      }
      if (reduce_sum) partial[chunk] = chunk_sum;
    }
  });

  if (reduce_sum) {
    double total = 0.0;
    for (const double p : partial) total += p;
    *loss.mutable_data_ptr<acc_t>() = static_cast<acc_t>(total);
  }
}

std::tuple<at::Tensor, at::Tensor> dfl_forward_cpu(const at::Tensor& pred_in,
                                                   const at::Tensor& target_in,
                                                   const c10::optional<at::Tensor>& weight_in,
                                                   double eps, bool reduce_sum, bool need_grad) {
  check_dfl_forward_args(pred_in, target_in, weight_in, eps);
  const at::Tensor pred = pred_in.contiguous();
  const auto acc_dtype = dfl_acc_dtype(pred.scalar_type());
  const at::Tensor target = target_in.to(acc_dtype).contiguous();
  c10::optional<at::Tensor> weight;
  if (weight_in.has_value()) weight = weight_in->to(acc_dtype).contiguous();

  const auto acc_options = pred.options().dtype(acc_dtype);
  at::Tensor loss =
      reduce_sum ? at::empty({}, acc_options) : at::empty({pred.size(0)}, acc_options);
  at::Tensor grad =
      need_grad ? at::empty(pred.sizes(), pred.options()) : at::empty({0}, pred.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, pred.scalar_type(), "dfl_forward_cpu", [&] {
        dfl_forward_typed<scalar_t>(pred, target, weight, eps, reduce_sum, loss,
                                    need_grad ? &grad : nullptr);
      });
  return {loss, grad};
}

// grad[N, n_bins] times grad_loss (0-dim: one factor; [N]: one per row), in
// fp32 (fp64 for fp64) and rounded once to grad's dtype, into a new tensor.
at::Tensor dfl_backward_cpu(const at::Tensor& grad_in, const at::Tensor& grad_loss_in) {
  TORCH_CHECK_VALUE(grad_in.dim() == 2, "stable_dfl::dfl_backward: grad must be [N, n_bins], got ",
                    grad_in.sizes());
  const bool per_row = grad_loss_in.dim() == 1;
  TORCH_CHECK_VALUE(grad_loss_in.dim() == 0 || (per_row && grad_loss_in.size(0) == grad_in.size(0)),
                    "stable_dfl::dfl_backward: grad_loss must be 0-dim or [N] with N = ",
                    grad_in.size(0), ", got ", grad_loss_in.sizes());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor grad_loss = grad_loss_in.to(dfl_acc_dtype(grad.scalar_type())).contiguous();
  at::Tensor out = at::empty(grad.sizes(), grad.options());
  const int64_t n_rows = grad.size(0);
  const int64_t n_bins = grad.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "dfl_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* src = grad.const_data_ptr<scalar_t>();
        const acc_t* factor = grad_loss.const_data_ptr<acc_t>();
        scalar_t* dst = out.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, n_rows, kRowsPerChunk, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const acc_t scale = factor[per_row ? i : 0];
            for (int64_t j = i * n_bins; j < (i + 1) * n_bins; ++j) {
              dst[j] = static_cast<scalar_t>(static_cast<acc_t>(src[j]) * scale);
            }
          }
        });
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(stable_dfl, CPU, m) {
  m.impl("dfl_forward", &dfl_forward_cpu);
  m.impl("dfl_backward", &dfl_backward_cpu);
}

}  // namespace stable_dfl
