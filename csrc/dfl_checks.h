// Argument checks shared by the CPU and CUDA registrations of the DFL ops.
// The Python front end validates user input with friendlier messages; these
// checks keep a direct call of the op from reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "dfl_row.h"

namespace stable_dfl {

inline at::ScalarType dfl_acc_dtype(at::ScalarType pred_dtype) {
  return pred_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Consecutive rows that share one weight of a checked weight[G]: N / G, or 1 where there is no row.
inline int64_t dfl_rows_per_weight(int64_t n_rows, int64_t n_weights) {
  return n_rows > 0 ? n_rows / n_weights : 1;
}

inline void check_dfl_forward_args(const at::Tensor& pred, const at::Tensor& target,
                                   const c10::optional<at::Tensor>& weight, double eps) {
  TORCH_CHECK_VALUE(pred.dim() == 2, "stable_dfl::dfl_forward: pred must be [N, n_bins], got ",
                    pred.sizes());
  const auto dtype = pred.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
      "stable_dfl::dfl_forward: pred must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(pred.size(1) >= 2 && pred.size(1) <= kMaxBins,
                    "stable_dfl::dfl_forward: n_bins must be in [2, ", kMaxBins, "], got ",
                    pred.size(1));
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == pred.size(0),
                    "stable_dfl::dfl_forward: target must be [N] with N = ", pred.size(0), ", got ",
                    target.sizes());
  TORCH_CHECK_TYPE(target.is_floating_point(),
                   "stable_dfl::dfl_forward: target must be floating point, got ",
                   target.scalar_type());
  TORCH_CHECK_VALUE(target.device() == pred.device(), "stable_dfl::dfl_forward: target is on ",
                    target.device(), " but pred is on ", pred.device());
  if (weight.has_value()) {
    const int64_t n_rows = pred.size(0);
    const bool groups_rows =
        weight->dim() == 1 && (weight->size(0) > 0 ? n_rows % weight->size(0) == 0 : n_rows == 0);
    TORCH_CHECK_VALUE(
        groups_rows, "stable_dfl::dfl_forward: weight must be [G] with G dividing N = ", n_rows,
        " (a weight per row, or per group of N / G consecutive rows), got ", weight->sizes());
    TORCH_CHECK_TYPE(weight->is_floating_point(),
                     "stable_dfl::dfl_forward: weight must be floating point, got ",
                     weight->scalar_type());
    TORCH_CHECK_VALUE(weight->device() == pred.device(), "stable_dfl::dfl_forward: weight is on ",
                      weight->device(), " but pred is on ", pred.device());
  }
  TORCH_CHECK_VALUE(eps >= 0.0 && eps < 1.0, "stable_dfl::dfl_forward: eps must be in [0, 1), got ",
                    eps);
}

}  // namespace stable_dfl
