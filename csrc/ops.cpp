// Operator schemas of the stable_dfl library and the Python module stub.
// Kernels register themselves per device in their own files
// (TORCH_LIBRARY_IMPL); autograd and fake kernels are registered in Python.
#include <Python.h>
#include <torch/library.h>

#include <exception>
#include <string>
#include <vector>

#include "cpu_kernels.h"

namespace {

// _C.cpu_kernel_isa() -> str: the SIMD level of the CPU kernels in use (loads them).
PyObject* cpu_kernel_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(stable_dfl::cpu_kernels().isa);
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
}

// _C.cpu_kernel_isas() -> tuple[str, ...]: the levels installed, lowest first.
PyObject* cpu_kernel_isas(PyObject*, PyObject*) {
  try {
    const std::vector<std::string> levels = stable_dfl::cpu_kernel_isas_built();
    PyObject* result = PyTuple_New(static_cast<Py_ssize_t>(levels.size()));
    if (result == nullptr) return nullptr;
    for (size_t i = 0; i < levels.size(); ++i) {
      PyTuple_SET_ITEM(result, static_cast<Py_ssize_t>(i), PyUnicode_FromString(levels[i].c_str()));
    }
    return result;
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
}

PyMethodDef module_methods[] = {
    {"cpu_kernel_isa", cpu_kernel_isa, METH_NOARGS,
     "The SIMD level of the CPU kernels in use: default, avx2 or avx512."},
    {"cpu_kernel_isas", cpu_kernel_isas, METH_NOARGS,
     "The SIMD levels whose CPU kernels are installed, lowest first."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
// `import stable_dfl._C` loads this library so that the static registrations below
// run; the module itself only says which CPU kernels it uses.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(stable_dfl, m) {
  // Per-row DFL of pred[N, n_bins] against continuous targets[N] (bin units).
  // Returns (loss, grad): loss is the weighted sum as a 0-dim tensor when
  // reduce_sum, else per-row [N]; grad has pred's shape and dtype when
  // need_grad (the gradient of sum(loss), computed in fp32 or fp64 and rounded
  // once), else it is empty. A loss's backward is this op again, with the
  // incoming gradient folded into the weights (stable_dfl/ops/dfl.py).
  m.def(
      "dfl_forward(Tensor pred, Tensor target, Tensor? weight, float eps, bool reduce_sum, "
      "bool need_grad) -> (Tensor, Tensor)");
}
