// Python entry point of stripeconv._C. The kernels register themselves with torch.library
// (TORCH_LIBRARY blocks in cpu/ and cuda/) when the shared library loads; importing the
// module from Python is all it takes.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}
