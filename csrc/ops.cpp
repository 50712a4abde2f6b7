// Operator schemas of the stable_dfl library and the Python module stub.
// Kernels register themselves per device in their own files
// (TORCH_LIBRARY_IMPL); autograd and fake kernels are registered in Python.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import stable_dfl._C` only needs to load this library so that the static
// registrations below run; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(stable_dfl, m) {
  // Per-row DFL of pred[N, n_bins] against continuous targets[N] (bin units).
  // Returns (loss, grad): loss is the weighted sum as a 0-dim tensor when
  // reduce_sum, else per-row [N]; grad has pred's shape and dtype when
  // need_grad (the gradient of sum(loss)), else it is empty.
  m.def(
      "dfl_forward(Tensor pred, Tensor target, Tensor? weight, float eps, bool reduce_sum, "
      "bool need_grad) -> (Tensor, Tensor)");
  // Backward of dfl_forward: grad * grad_loss (0-dim, or one factor per row [N]),
  // computed in fp32 and rounded once to grad's dtype, into a new tensor.
  m.def("dfl_backward(Tensor grad, Tensor grad_loss) -> Tensor");
}
