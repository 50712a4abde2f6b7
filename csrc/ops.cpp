// Operator schemas of the stable_dfl library and the Python module stub.
// Kernels register themselves per device in their own files
// (TORCH_LIBRARY_IMPL); autograd and fake kernels are registered in Python.
#include <Python.h>
#include <torch/library.h>

#include <exception>
#include <string>
#include <vector>

#include "cpu_block_cache.h"
#include "cpu_kernels.h"

namespace {

// Runs body (which returns a new reference) and turns a C++ exception into the Python
// exception of the same meaning: ValueError for a bad value, else RuntimeError.
template <class Body>
PyObject* translating_errors(Body&& body) {
  try {
    return body();
  } catch (const c10::ValueError& error) {
    PyErr_SetString(PyExc_ValueError, error.what_without_backtrace());
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
  }
  return nullptr;
}

// _C.cpu_kernel_isa() -> str: the SIMD level of the CPU kernels in use (loads them).
PyObject* cpu_kernel_isa(PyObject*, PyObject*) {
  return translating_errors([] { return PyUnicode_FromString(stable_dfl::cpu_kernels().isa); });
}

// _C.cpu_kernel_isas() -> tuple[str, ...]: the levels installed, lowest first.
PyObject* cpu_kernel_isas(PyObject*, PyObject*) {
  return translating_errors([]() -> PyObject* {
    const std::vector<std::string> levels = stable_dfl::cpu_kernel_isas_built();
    PyObject* result = PyTuple_New(static_cast<Py_ssize_t>(levels.size()));
    if (result == nullptr) return nullptr;
    for (size_t i = 0; i < levels.size(); ++i) {
      PyTuple_SET_ITEM(result, static_cast<Py_ssize_t>(i), PyUnicode_FromString(levels[i].c_str()));
    }
    return result;
  });
}

// _C.cpu_block_cache_info() -> dict[str, int]: see cpu_block_cache.h.
PyObject* cpu_block_cache_info(PyObject*, PyObject*) {
  return translating_errors([] {
    const stable_dfl::CpuBlockCacheInfo info = stable_dfl::cpu_block_cache_info();
    return Py_BuildValue("{s:L,s:L,s:L,s:L,s:L}", "limit_bytes", info.limit_bytes, "cached_bytes",
                         info.cached_bytes, "cached_blocks", info.cached_blocks, "reused",
                         info.reused, "allocated", info.allocated);
  });
}

// _C.empty_cpu_block_cache() -> None.
PyObject* empty_cpu_block_cache(PyObject*, PyObject*) {
  return translating_errors([] {
    stable_dfl::empty_cpu_block_cache();
    Py_RETURN_NONE;
  });
}

// _C.set_cpu_block_cache_limit(limit_bytes: int) -> None.
PyObject* set_cpu_block_cache_limit(PyObject*, PyObject* limit) {
  const long long limit_bytes = PyLong_AsLongLong(limit);
  if (limit_bytes == -1 && PyErr_Occurred()) return nullptr;
  return translating_errors([limit_bytes] {
    stable_dfl::set_cpu_block_cache_limit(limit_bytes);
    Py_RETURN_NONE;
  });
}

PyMethodDef module_methods[] = {
    {"cpu_kernel_isa", cpu_kernel_isa, METH_NOARGS,
     "The SIMD level of the CPU kernels in use: default, avx2 or avx512."},
    {"cpu_kernel_isas", cpu_kernel_isas, METH_NOARGS,
     "The SIMD levels whose CPU kernels are installed, lowest first."},
    {"cpu_block_cache_info", cpu_block_cache_info, METH_NOARGS,
     "The limit, contents and counters of the cache of large CPU buffers."},
    {"empty_cpu_block_cache", empty_cpu_block_cache, METH_NOARGS,
     "Frees the large CPU buffers kept for reuse."},
    {"set_cpu_block_cache_limit", set_cpu_block_cache_limit, METH_O,
     "Sets the most bytes of large CPU buffers kept for reuse (0 keeps none)."},
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
