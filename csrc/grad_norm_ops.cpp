// Schemas of the gradient-guard ops. Kernels register per device in
// grad_norm_cpu.cpp and grad_norm_cuda.cpp; fake kernels in Python
// (stable_dfl/ops/grad_norm.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(stable_dfl, m) {
  // One pass over `grads` (float32/float16/bfloat16/float64, one device).
  // Returns (sumsq, found_nonfinite, nonfinite):
  //   sumsq            0-dim float64: sum of squares of the elements of the
  //                    tensors that hold no NaN/Inf, squared and accumulated in
  //                    float64, so that no finite float32/16 gradient overflows
  //                    it and no tiny one underflows it;
  //   found_nonfinite  0-dim float32, 1.0 when any element is NaN/Inf or sumsq
  //                    overflowed (float64 gradients only), else 0.0
  //                    (GradScaler's found_inf format);
  //   nonfinite        bool [len(grads)]: which tensors hold a NaN/Inf.
  // With inv_scale (1-element float32), every element is first multiplied by
  // it and rounded to its dtype, as GradScaler's unscale does; the inputs are
  // not modified.
  m.def(
      "grad_sumsq_nonfinite(Tensor[] grads, Tensor? inv_scale) -> (Tensor sumsq, "
      "Tensor found_nonfinite, Tensor nonfinite)");
  // As above, but stores the unscaled values back into `grads`.
  m.def(
      "unscale_grad_sumsq_nonfinite_(Tensor(a!)[] grads, Tensor inv_scale) -> (Tensor sumsq, "
      "Tensor found_nonfinite, Tensor nonfinite)");
}
