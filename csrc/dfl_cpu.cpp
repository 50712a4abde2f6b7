// CPU registration of the DFL ops: argument checks, buffers, threads and the
// deterministic sum. The rows themselves are computed by the kernel library of the
// SIMD level in use (cpu/dfl_kernel.cpp, picked at run time by cpu_kernels.cpp).
// Rows are spread over threads in fixed chunks whose partial sums are added in a
// fixed order, so the reduced loss has the same bits whatever the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_block_cache.h"
#include "cpu_kernels.h"
#include "dfl_checks.h"

namespace stable_dfl {
namespace {

// Rows per deterministic partial sum; also the unit of parallel work.
constexpr int64_t kRowsPerChunk = 256;

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
  // The gradient is the one buffer as large as the logits: reused from step to step.
  at::Tensor grad = need_grad ? empty_reusing_blocks(pred.sizes(), pred.scalar_type())
                              : at::empty({0}, pred.options());

  cpu::DflForwardArgs args{};
  args.dtype = pred.scalar_type();
  args.n_bins = static_cast<int>(pred.size(1));
  args.log_eps = eps > 0 ? std::log(eps) : -std::numeric_limits<double>::infinity();
  args.pred = pred.const_data_ptr();
  args.target = target.const_data_ptr();
  args.weight = weight.has_value() ? weight->const_data_ptr() : nullptr;
  args.rows_per_weight =
      weight.has_value() ? dfl_rows_per_weight(pred.size(0), weight->size(0)) : 1;
  args.row_loss = reduce_sum ? nullptr : loss.mutable_data_ptr();
  args.grad = need_grad ? grad.mutable_data_ptr() : nullptr;

  const auto& kernels = cpu_kernels();
  const int64_t n_rows = pred.size(0);
  const int64_t n_chunks = (n_rows + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<double> partial(n_chunks, 0.0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t row_end = std::min(n_rows, (chunk + 1) * kRowsPerChunk);
      partial[chunk] = kernels.dfl_forward_rows(args, chunk * kRowsPerChunk, row_end);
    }
  });

  if (reduce_sum) {
    double total = 0.0;
    for (const double p : partial) total += p;
    if (acc_dtype == at::kDouble) {
      *loss.mutable_data_ptr<double>() = total;
    } else {
      *loss.mutable_data_ptr<float>() = static_cast<float>(total);
    }
  }
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(stable_dfl, CPU, m) { m.impl("dfl_forward", &dfl_forward_cpu); }

}  // namespace stable_dfl
