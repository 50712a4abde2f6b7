// CUDA registration of the gradient-guard ops: builds the tensor and chunk
// tables of a multi-tensor apply, copies them to the device in one transfer
// and launches the kernels of grad_norm_kernels.cu on the current stream. Two
// launches per call, however many tensors.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "grad_norm_checks.h"
#include "grad_norm_kernels.h"

namespace stable_dfl {
namespace {

GradDtype grad_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return GradDtype::kFloat32;
    case at::kHalf:
      return GradDtype::kFloat16;
    case at::kBFloat16:
      return GradDtype::kBFloat16;
    case at::kDouble:
      return GradDtype::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, "stable_dfl::grad_sumsq_nonfinite: unsupported dtype ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grad_sumsq_nonfinite_launch(
    const std::vector<at::Tensor>& grads, const c10::optional<at::Tensor>& inv_scale,
    bool write_back) {
  TORCH_CHECK_VALUE(!grads.empty(), "stable_dfl::grad_sumsq_nonfinite: empty tensor list");
  const at::Device device = grads[0].device();
  const c10::cuda::CUDAGuard device_guard(device);
  // The chunk tables are built on the host for each call and copied in: a captured graph
  // would replay that copy from a host buffer long since reused.
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
              "stable_dfl::grad_sumsq_nonfinite: the CUDA gradient check cannot be captured in a "
              "CUDA graph (its chunk tables are built on the host for each call); run it outside "
              "the captured region");

  std::vector<GradTensorMeta> tensors;
  std::vector<GradChunkMeta> chunks;
  tensors.reserve(grads.size());
  for (size_t t = 0; t < grads.size(); ++t) {
    const at::Tensor& g = grads[t];
    const int64_t numel = g.numel();
    const int64_t first_chunk = static_cast<int64_t>(chunks.size());
    for (int64_t begin = 0; begin < numel; begin += kCudaChunkElements) {
      chunks.push_back({begin, static_cast<int32_t>(t),
                        static_cast<int32_t>(std::min(kCudaChunkElements, numel - begin))});
    }
    tensors.push_back({g.data_ptr(), numel, first_chunk,
                       static_cast<int32_t>(chunks.size() - first_chunk),
                       grad_dtype(g.scalar_type())});
  }

  // Both tables in one pinned buffer and one asynchronous copy; the caching
  // host allocator keeps the buffer alive until the copy has run.
  const size_t tensor_bytes = tensors.size() * sizeof(GradTensorMeta);
  const size_t chunk_bytes = chunks.size() * sizeof(GradChunkMeta);
  at::Tensor host_tables = at::empty({static_cast<int64_t>(tensor_bytes + chunk_bytes)},
                                     at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host_tables.mutable_data_ptr<uint8_t>(), tensors.data(), tensor_bytes);
  std::memcpy(host_tables.mutable_data_ptr<uint8_t>() + tensor_bytes, chunks.data(), chunk_bytes);
  const at::Tensor tables = host_tables.to(device, /*non_blocking=*/true);
  const uint8_t* tables_ptr = tables.const_data_ptr<uint8_t>();

  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  const int64_t n_tensors = static_cast<int64_t>(tensors.size());
  const auto options = grads[0].options();
  at::Tensor chunk_partial = at::empty({n_chunks}, options.dtype(at::kDouble));
  at::Tensor chunk_nonfinite = at::empty({n_chunks}, options.dtype(at::kByte));
  at::Tensor sumsq = at::empty({}, options.dtype(at::kDouble));
  at::Tensor found_nonfinite = at::empty({}, options.dtype(at::kFloat));
  at::Tensor nonfinite = at::empty({n_tensors}, options.dtype(at::kBool));

  C10_CUDA_CHECK(launch_grad_sumsq_nonfinite(
      reinterpret_cast<const GradTensorMeta*>(tables_ptr), n_tensors,
      reinterpret_cast<const GradChunkMeta*>(tables_ptr + tensor_bytes), n_chunks,
      inv_scale.has_value() ? inv_scale->const_data_ptr<float>() : nullptr, write_back,
      chunk_partial.mutable_data_ptr<double>(), chunk_nonfinite.mutable_data_ptr<uint8_t>(),
      sumsq.mutable_data_ptr<double>(), found_nonfinite.mutable_data_ptr<float>(),
      nonfinite.mutable_data_ptr<bool>(), c10::cuda::getCurrentCUDAStream(device.index())));
  return {sumsq, found_nonfinite, nonfinite};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grad_sumsq_nonfinite_cuda(
    at::TensorList grads, const c10::optional<at::Tensor>& inv_scale) {
  check_grad_list(grads, inv_scale, "stable_dfl::grad_sumsq_nonfinite");
  const DenseGrads dense(grads);
  return grad_sumsq_nonfinite_launch(dense.tensors(), inv_scale, /*write_back=*/false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unscale_grad_sumsq_nonfinite_cuda(
    at::TensorList grads, const at::Tensor& inv_scale) {
  check_grad_list(grads, inv_scale, "stable_dfl::unscale_grad_sumsq_nonfinite_");
  const DenseGrads dense(grads);
  auto outputs = grad_sumsq_nonfinite_launch(dense.tensors(), inv_scale, /*write_back=*/true);
  dense.copy_back();
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(stable_dfl, CUDA, m) {
  m.impl("grad_sumsq_nonfinite", &grad_sumsq_nonfinite_cuda);
  m.impl("unscale_grad_sumsq_nonfinite_", &unscale_grad_sumsq_nonfinite_cuda);
}

}  // namespace stable_dfl
