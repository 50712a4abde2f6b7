// Argument checks and dense-layout handling shared by the CPU and CUDA
// registrations of the gradient-guard ops. The Python front end validates
// user input with friendlier messages; these checks keep a direct call of an
// op from reading memory it should not.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

namespace stable_dfl {

inline bool is_grad_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
         dtype == at::kDouble;
}

inline void check_grad_list(at::TensorList grads, const c10::optional<at::Tensor>& inv_scale,
                            const char* op_name) {
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK_TYPE(g.layout() == at::kStrided, op_name, ": tensor ", i,
                     " is sparse or otherwise not strided (layout ", g.layout(),
                     "); densify sparse gradients first");
    TORCH_CHECK_TYPE(is_grad_dtype(g.scalar_type()), op_name, ": tensor ", i,
                     " must be float32, float16, bfloat16 or float64, got ", g.scalar_type());
    TORCH_CHECK_VALUE(g.device() == grads[0].device(), op_name,
                      ": all tensors must be on one "
                      "device; tensor 0 is on ",
                      grads[0].device(), ", tensor ", i, " on ", g.device());
  }
  if (inv_scale.has_value()) {
    TORCH_CHECK_TYPE(inv_scale->scalar_type() == at::kFloat, op_name,
                     ": inv_scale must be float32, got ", inv_scale->scalar_type());
    TORCH_CHECK_VALUE(inv_scale->numel() == 1, op_name, ": inv_scale must hold one element, got ",
                      inv_scale->numel());
    TORCH_CHECK_VALUE(grads.empty() || inv_scale->device() == grads[0].device(), op_name,
                      ": inv_scale is on ", inv_scale->device(), " but the tensors are on ",
                      grads[0].device());
  }
}

// Kernels walk each tensor's memory as one flat run of numel() elements, which
// is exact for any non-overlapping dense layout (contiguous, channels_last,
// permuted). Other tensors are replaced by contiguous copies here; after an
// in-place kernel, copy_back() writes those copies into the originals.
class DenseGrads {
 public:
  explicit DenseGrads(at::TensorList grads) : originals_(grads) {
    dense_.reserve(grads.size());
    for (const at::Tensor& g : grads) {
      dense_.push_back(g.is_non_overlapping_and_dense() ? g : g.contiguous());
    }
  }
  const std::vector<at::Tensor>& tensors() const { return dense_; }
  void copy_back() const {
    for (size_t i = 0; i < dense_.size(); ++i) {
      if (!dense_[i].is_same(originals_[i])) originals_[i].copy_(dense_[i]);
    }
  }

 private:
  at::TensorList originals_;
  std::vector<at::Tensor> dense_;
};

}  // namespace stable_dfl
