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

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "cpu_kernels.h"
#include "dfl_checks.h"

namespace stable_dfl {
namespace {

// Rows per deterministic partial sum; also the unit of parallel work.
constexpr int64_t kRowsPerChunk = 256;

// A gradient this large is usually fresh memory that the allocator just mapped, and the
// kernel's first touch of each 4 KiB page costs more than computing its contents. Asking
// for transparent huge pages (where the system grants them on request) cuts those faults
// by 512x; memory the allocator reuses is unaffected. The same as torch's opt-in
// THP_MEM_ALLOC_ENABLE, for this one buffer.
constexpr size_t kHugePageBytes = size_t{2} << 20;
constexpr size_t kHugePageMinBytes = 2 * kHugePageBytes;

void advise_huge_pages(const at::Tensor& buffer) {
#ifdef __linux__
  const size_t bytes = buffer.nbytes();
  if (bytes < kHugePageMinBytes) return;
  const auto begin = reinterpret_cast<uintptr_t>(buffer.data_ptr());
  const uintptr_t aligned_begin = (begin + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
  const uintptr_t aligned_end = (begin + bytes) & ~(kHugePageBytes - 1);
  if (aligned_end > aligned_begin) {
    // Advice only: any failure leaves ordinary pages, which are correct too.
    (void)madvise(reinterpret_cast<void*>(aligned_begin), aligned_end - aligned_begin,
                  MADV_HUGEPAGE);
  }
#else
  (void)buffer;
#endif
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
  if (need_grad) advise_huge_pages(grad);

  cpu::DflForwardArgs args{};
  args.dtype = pred.scalar_type();
  args.n_bins = static_cast<int>(pred.size(1));
  args.log_eps = eps > 0 ? std::log(eps) : -std::numeric_limits<double>::infinity();
  args.pred = pred.const_data_ptr();
  args.target = target.const_data_ptr();
  args.weight = weight.has_value() ? weight->const_data_ptr() : nullptr;
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
