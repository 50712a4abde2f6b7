// Sum of squares and non-finite check of a list of gradients on the CPU, in one
// pass, optionally fused with GradScaler's unscale.
//
// Every tensor is cut into chunks of kChunkElements; each chunk is reduced in
// float64 into its own slot by the kernel library of the SIMD level in use
// (cpu/grad_norm_kernel.cpp), and the slots are added in a fixed order. The chunk
// boundaries and the order do not depend on which thread reduced which chunk, so
// the result has the same bits whatever the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "cpu_kernels.h"
#include "grad_norm_checks.h"

namespace stable_dfl {
namespace {

constexpr int64_t kChunkElements = int64_t{1} << 16;
// Below this many elements per thread, waking threads costs more than it saves.
constexpr int64_t kMinElementsPerThread = int64_t{1} << 15;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

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

  std::vector<cpu::GradChunkResult> results(chunks.size());
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  // Chunks are handed out one at a time from a shared counter, so threads stay
  // busy when tensor sizes are uneven; each result lands in its chunk's slot.
  std::atomic<int64_t> next_chunk{0};
  const int64_t n_workers =
      std::clamp<int64_t>(total_elements / kMinElementsPerThread, 1, at::get_num_threads());
  const auto mode = !unscale     ? cpu::GradChunkMode::kMeasure
                    : write_back ? cpu::GradChunkMode::kUnscaleWriteBack
                                 : cpu::GradChunkMode::kUnscale;
  const auto& kernels = cpu_kernels();
  at::parallel_for(0, n_workers, 1, [&](int64_t, int64_t) {
    for (int64_t c = next_chunk++; c < n_chunks; c = next_chunk++) {
      const at::Tensor& tensor = grads[chunks[c].tensor];
      cpu::GradChunkArgs args{};
      args.dtype = tensor.scalar_type();
      // const_cast: only written in kUnscaleWriteBack, which only the in-place op asks for.
      args.data = static_cast<char*>(const_cast<void*>(tensor.const_data_ptr())) +
                  chunks[c].begin * tensor.element_size();
      args.numel = chunks[c].end - chunks[c].begin;
      args.inv_scale = inv_scale;
      args.mode = mode;
      results[c] = kernels.grad_chunk(args);
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
  const auto options = at::TensorOptions().device(device);
  at::Tensor sumsq = at::empty({}, options.dtype(at::kDouble));
  at::Tensor found_nonfinite = at::empty({}, options.dtype(at::kFloat));
  *sumsq.mutable_data_ptr<double>() = total;
  *found_nonfinite.mutable_data_ptr<float>() = any_nonfinite || !std::isfinite(total) ? 1.0f : 0.0f;
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
