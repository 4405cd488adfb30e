// The Python module fastforget._C. Importing it runs the static TORCH_LIBRARY_IMPL registrations of every
// kernel linked into it; the op schemas themselves are defined in fastforget/_schemas.py.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastforget native kernels", -1, nullptr};
  return PyModule_Create(&module);
}
