// The Python module dho_fast._C. Importing it loads the library, whose static initialisers register the ops; the
// module itself has no attributes. Kept apart so that CMake builds the C++ library without Python.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
