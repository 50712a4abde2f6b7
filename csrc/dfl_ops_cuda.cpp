// CUDA registration of stable_dfl::dfl_forward: argument checks, buffers and the
// launch on the current stream. The kernels themselves live in dfl_kernels.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "dfl_checks.h"
#include "dfl_kernels.h"

namespace stable_dfl {
namespace {

LogitsDtype logits_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf:
      return LogitsDtype::kFloat16;
    case at::kBFloat16:
      return LogitsDtype::kBFloat16;
    case at::kFloat:
      return LogitsDtype::kFloat32;
    case at::kDouble:
      return LogitsDtype::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, "stable_dfl::dfl_forward: unsupported logits dtype ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor> dfl_forward_cuda(const at::Tensor& pred_in,
                                                    const at::Tensor& target_in,
                                                    const c10::optional<at::Tensor>& weight_in,
                                                    double eps, bool reduce_sum, bool need_grad) {
  check_dfl_forward_args(pred_in, target_in, weight_in, eps);
  const c10::cuda::CUDAGuard device_guard(pred_in.device());
  const at::Tensor pred = pred_in.contiguous();
  const auto acc_dtype = dfl_acc_dtype(pred.scalar_type());
  const at::Tensor target = target_in.to(acc_dtype).contiguous();
  c10::optional<at::Tensor> weight;
  if (weight_in.has_value()) weight = weight_in->to(acc_dtype).contiguous();

  const int64_t n_rows = pred.size(0);
  const int n_bins = static_cast<int>(pred.size(1));
  const auto acc_options = pred.options().dtype(acc_dtype);
  at::Tensor grad =
      need_grad ? at::empty(pred.sizes(), pred.options()) : at::empty({0}, pred.options());
  if (n_rows == 0) {
    at::Tensor loss = reduce_sum ? at::zeros({}, acc_options) : at::empty({0}, acc_options);
    return {loss, grad};
  }

  const int64_t n_blocks = dfl_forward_block_count(n_rows, n_bins);
  TORCH_CHECK_VALUE(n_blocks <= std::numeric_limits<int32_t>::max(),
                    "stable_dfl::dfl_forward: too many rows for one launch: ", n_rows);
  at::Tensor loss = reduce_sum ? at::empty({}, acc_options) : at::empty({n_rows}, acc_options);
  at::Tensor partial_sums =
      at::empty({reduce_sum ? n_blocks : 0}, pred.options().dtype(at::kDouble));

  DflForwardArgs args;
  args.pred = pred.const_data_ptr();
  args.target = target.const_data_ptr();
  args.weight = weight.has_value() ? weight->const_data_ptr() : nullptr;
  args.rows_per_weight = weight.has_value() ? dfl_rows_per_weight(n_rows, weight->size(0)) : 1;
  args.row_loss = reduce_sum ? nullptr : loss.mutable_data_ptr();
  args.partial_sums = reduce_sum ? partial_sums.mutable_data_ptr<double>() : nullptr;
  args.loss_sum = reduce_sum ? loss.mutable_data_ptr() : nullptr;
  args.grad = need_grad ? grad.mutable_data_ptr() : nullptr;
  args.n_rows = n_rows;
  args.n_bins = n_bins;
  args.log_eps = eps > 0 ? std::log(eps) : -std::numeric_limits<double>::infinity();
  args.reduce_sum = reduce_sum;
  C10_CUDA_CHECK(launch_dfl_forward(logits_dtype(pred.scalar_type()), args,
                                    c10::cuda::getCurrentCUDAStream()));
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(stable_dfl, CUDA, m) { m.impl("dfl_forward", &dfl_forward_cuda); }

}  // namespace stable_dfl
