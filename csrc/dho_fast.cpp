// Every op schema of dho_fast. Backends only implement them (csrc/cpu, csrc/cuda); Python adds the fake
// implementations and the Triton ops' autograd (dho_fast/ops/registry.py), C++ the compiled ops' autograd.
#include <torch/library.h>

#include "cpu/kernel_isa.h"

TORCH_LIBRARY(dho_fast, m) {
  // Loss terms of both heads and, when asked, their gradients times a factor (grad-in-forward):
  //   loss = ce_loss_weight * ce_term + kd_loss_weight * kd_term
  //   ce_grad_out = ce_grad_scale * d ce_term / d ce_logits, kd_grad_out = kd_grad_scale * d kd_term / d kd_logits
  //   (empty when not asked), computed in the accumulation dtype and returned in loss_gradient_dtype
  //   (csrc/saved_gradients.h): bfloat16 for bfloat16 logits, float32 for float16 ones (backward scales them before
  //   rounding to float16). Autograd passes the loss weights as the factors (dho_fast/ops/registry.py), so
  //   that a plain loss.backward() can hand the gradients on as they are (csrc/saved_gradients.h).
  // The teacher, in every loss op (csrc/row_math.h TeacherForm): teacher_form 0, teacher_logits (N, C) logits;
  //   1, teacher_logits holds (N, C) probabilities; 2 (sparse), teacher_logits holds (N, k) probabilities in the
  //   accumulation dtype at the int64 classes teacher_indices (N, k), with teacher_row_terms (N, 2) = [u, sum_c p_c log
  //   p_c] per row, u the probability of each unlisted class (dho_fast/ops/teacher.py builds them).
  m.def(
      "dual_head_loss(Tensor ce_logits, Tensor kd_logits, Tensor teacher_logits, Tensor labels, float temperature, "
      "float ce_loss_weight, float kd_loss_weight, bool kd_split, int ignore_index, float label_smoothing, "
      "bool ce_grad, bool kd_grad, float ce_grad_scale=1.0, float kd_grad_scale=1.0, int teacher_form=0, "
      "Tensor? teacher_indices=None, Tensor? teacher_row_terms=None) -> (Tensor loss, Tensor ce_term, "
      "Tensor kd_term, Tensor ce_grad_out, Tensor kd_grad_out)");

  // One row chunk of the batch's loss: the per-chunk step of fused_linear_dual_head_loss (below).
  //   kd_logits (R, C): the KD logits of rows [start, start + R) of the batch;
  //   ce_logits (L, C): the CE logits of the labelled rows among them, in row order;
  //   teacher_logits (N, C), labels (N,): the whole batch (a sparse teacher's (N, k) values in the accumulation
  //   dtype, with its indices and row terms, also cover the whole batch); num_labelled: its labelled rows.
  //   ce_bias, kd_bias (C,) or None: added to every row of ce_logits / kd_logits (the heads' biases, so that the
  //   GEMMs producing the logits need not add them).
  // Returns this chunk's contributions to ce_term and kd_term (the batch's terms are their sums over the chunks)
  // and, when ce_grad / kd_grad, writes ce_grad_scale * d ce_term / d ce_logits and kd_grad_scale * d kd_term /
  // d kd_logits in the accumulation dtype: into ce_grad_out / kd_grad_out (the logits' shape) when given, else over
  // ce_logits / kd_logits, which must then be float32 or float64 (half logits need float32 buffers: a loss scale
  // applied later must come before the rounding to half). All tensors contiguous, logits, biases and a dense teacher
  // of one dtype.
  m.def(
      "dual_head_loss_chunk(Tensor(a!) ce_logits, Tensor(b!) kd_logits, Tensor teacher_logits, Tensor labels, "
      "int start, int num_labelled, float temperature, bool kd_split, int ignore_index, float label_smoothing, "
      "bool ce_grad, bool kd_grad, Tensor? ce_bias=None, Tensor? kd_bias=None, float ce_grad_scale=1.0, "
      "float kd_grad_scale=1.0, Tensor(c!)? ce_grad_out=None, Tensor(d!)? kd_grad_out=None, int teacher_form=0, "
      "Tensor? teacher_indices=None, Tensor? teacher_row_terms=None) -> (Tensor ce_term, Tensor kd_term)");

  // The DHO loss of two linear heads over shared features, in row chunks (csrc/fused_linear_dual_head_loss.cpp):
  //   ce_logits = features @ ce_weight.T + ce_bias,
  //   kd_logits = kd_logit_scale * (g(features) @ kd_weight.T + kd_bias), g = normalize if kd_cosine else identity,
  //   loss = ce_loss_weight * ce_term + kd_loss_weight * kd_term as in dual_head_loss.
  m.def(
      "fused_linear_dual_head_loss(Tensor features, Tensor ce_weight, Tensor? ce_bias, Tensor kd_weight, "
      "Tensor? kd_bias, Tensor teacher_logits, Tensor labels, bool kd_cosine, float kd_logit_scale, int chunk_size, "
      "float temperature, float ce_loss_weight, float kd_loss_weight, bool kd_split, int ignore_index, "
      "float label_smoothing, int teacher_form=0, Tensor? teacher_indices=None, Tensor? teacher_row_terms=None) -> "
      "(Tensor loss, Tensor ce_term, Tensor kd_term)");
  // Its forward as its autograd kernel runs it: also the gradients (d_*_ce) of s_ce * ce_term and (d_*_kd) of
  // s_kd * kd_term that the grad flags ask for, each a (0,) placeholder when not asked for (or when its bias is None),
  // in the accumulation dtype (float32 for half inputs: backward rounds them to the inputs' dtype after scaling).
  // s = the term's loss weight, or 1 where that is 0: the usual loss.backward() then scales nothing.
  m.def(
      "fused_linear_dual_head_loss_with_grads(Tensor features, Tensor ce_weight, Tensor? ce_bias, Tensor kd_weight, "
      "Tensor? kd_bias, Tensor teacher_logits, Tensor labels, bool kd_cosine, float kd_logit_scale, int chunk_size, "
      "float temperature, float ce_loss_weight, float kd_loss_weight, bool kd_split, int ignore_index, "
      "float label_smoothing, bool grad_features, bool grad_ce_head, bool grad_kd_head, int teacher_form=0, "
      "Tensor? teacher_indices=None, Tensor? teacher_row_terms=None) -> (Tensor loss, Tensor ce_term, "
      "Tensor kd_term, Tensor d_features_ce, Tensor d_features_kd, Tensor d_ce_weight, Tensor d_ce_bias, "
      "Tensor d_kd_weight, Tensor d_kd_bias)");

  // One step of greedy k-center (dho_fast/ops/kcenter.py): for each point i with min_sq_dist[i] >= 0,
  //   min_sq_dist[i] = min(min_sq_dist[i], min_k sum_c (points[i, c] - centres[k, c])^2)   (in place; the sum's order:
  //   csrc/kcenter_row.h), and returns (index, value): the first (lowest) index of the largest updated entry (int64)
  //   and that entry (float32), (-1, -inf) when no entry is >= 0. points (N, C) float32 or bfloat16, centres (K, C)
  //   float32, K >= 1, min_sq_dist (N,) float32, all contiguous; a non-finite squared distance is a ValueError naming
  //   the first such row. Rows with min_sq_dist < 0 (picked points) are not read.
  m.def("kcenter_update(Tensor points, Tensor centres, Tensor(a!) min_sq_dist) -> (Tensor index, Tensor value)");

  // The instruction set the CPU kernels run with here: "avx512", "avx2" or "default" (after ATEN_CPU_CAPABILITY).
  // It takes no tensor, so its one kernel is registered with the schema, for every dispatch key.
  m.def("cpu_kernel_isa() -> str", &dho_fast::cpu::kernel_isa_name);
}
