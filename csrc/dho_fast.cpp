// Every op schema of dho_fast. Backends only implement them (csrc/cpu, csrc/cuda); Python adds the fake and
// autograd implementations (dho_fast/_ops.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing dho_fast._C runs the static registrations below; the module itself has no attributes.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(dho_fast, m) {
  // Loss terms of both heads and, when asked, their unweighted gradients (grad-in-forward):
  //   loss = ce_weight * ce_term + kd_weight * kd_term
  //   ce_grad_out = d ce_term / d ce_logits, kd_grad_out = d kd_term / d kd_logits (empty when not asked)
  m.def(
      "dual_head_loss(Tensor ce_logits, Tensor kd_logits, Tensor teacher_logits, Tensor labels, float temperature, "
      "float ce_weight, float kd_weight, bool kd_split, int ignore_index, float label_smoothing, bool ce_grad, "
      "bool kd_grad) -> (Tensor loss, Tensor ce_term, Tensor kd_term, Tensor ce_grad_out, Tensor kd_grad_out)");
}
