// Argument and value checks of the loss ops and the k-center step, shared by their CPU and CUDA implementations so
// both raise the same errors: each names the argument, the expectation and what was given. One exception type per
// kind of mistake, as the Python checks (dho_fast/_validation.py) raise: a wrong dtype is a TypeError
// (TORCH_CHECK_TYPE), a bad shape, device or value a ValueError (TORCH_CHECK_VALUE).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "fused_linear_dual_head_loss.h"
#include "row_math.h"

namespace dho_fast {

// The dtypes the kernels are instantiated for.
inline void check_floating(const char* name, const at::Tensor& x) {
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, name,
                   " must be float32, float64, bfloat16 or float16, got ", t);
}

// x must have the dtype and the device of ref.
inline void check_like(const char* name, const at::Tensor& x, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_TYPE(x.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
                   ref.scalar_type(), "), got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == ref.device(), name, " must be on ", ref.device(), " (as ", ref_name, "), got ",
                    x.device());
}

// labels: int64 of shape (n,), on ref's device.
inline void check_labels(const at::Tensor& labels, int64_t n, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64 of shape (", n, ",), got ",
                   labels.scalar_type(), " of shape ", labels.sizes());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == n, "labels must be int64 of shape (", n, ",), got ",
                    labels.scalar_type(), " of shape ", labels.sizes());
  TORCH_CHECK_VALUE(labels.device() == ref.device(), "labels must be on ", ref.device(), " (as ", ref_name, "), got ",
                    labels.device());
}

inline void check_temperature(double temperature) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature must be finite and > 0, got ",
                    temperature);
}

// NaN fails both comparisons, so the range check also rejects every non-finite value.
inline void check_label_smoothing(double label_smoothing) {
  TORCH_CHECK_VALUE(label_smoothing >= 0 && label_smoothing <= 1, "label_smoothing must be in [0, 1], got ",
                    label_smoothing);
}

inline void check_loss_weight(const char* name, double weight) {
  TORCH_CHECK_VALUE(std::isfinite(weight) && weight >= 0, name, " must be finite and >= 0, got ", weight);
}

// The public argument a teacher of form `form` (row_math::TeacherForm) comes from, for messages.
inline const char* teacher_name(int64_t form) {
  return form == row_math::kTeacherProbs ? "teacher_probs"
         : form == row_math::kTeacherSparse ? "teacher_topk_values"
                                             : "teacher_logits";
}

// A loss op's teacher (the schemas' teacher_form, teacher, teacher_indices, teacher_row_terms) for `rows` rows of C
// classes, against `logits`, the student logits: logits or probabilities (rows, C) of the logits' dtype; or sparse:
// probabilities (rows, k) with 1 <= k <= C and row terms (rows, 2) in the accumulation dtype, and int64 class
// indices (rows, k); their values are check_sparse_indices's, for the rows a kernel reads.
inline void check_teacher(int64_t form, const at::Tensor& t, const std::optional<at::Tensor>& indices,
                          const std::optional<at::Tensor>& row_terms, int64_t rows, int64_t C,
                          const char* logits_name, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(form >= row_math::kTeacherLogits && form <= row_math::kTeacherSparse,
                    "teacher_form must be 0 (logits), 1 (probabilities) or 2 (sparse), got ", form);
  const char* name = teacher_name(form);
  if (form != row_math::kTeacherSparse) {
    TORCH_CHECK_VALUE(!indices && !row_terms, "teacher_indices and teacher_row_terms are only for a sparse teacher");
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == C, name, " must have shape (", rows, ", ", C,
                      "), got ", t.sizes());
    check_like(name, t, logits_name, logits);
    return;
  }
  TORCH_CHECK_VALUE(indices && row_terms, "a sparse teacher needs teacher_indices and teacher_row_terms");
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) >= 1 && t.size(1) <= C, name,
                    " must have shape (", rows, ", k) with 1 <= k <= ", C, ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == acc && row_terms->scalar_type() == acc, name, " and teacher_row_terms must be ",
                   acc, " (the accumulation dtype of ", logits_name, "), got ", t.scalar_type(), " and ",
                   row_terms->scalar_type());
  TORCH_CHECK_TYPE(indices->scalar_type() == at::kLong, "teacher_indices must be int64, got ", indices->scalar_type());
  TORCH_CHECK_VALUE(indices->sizes() == t.sizes(), "teacher_indices must have the shape of ", name, " ", t.sizes(),
                    ", got ", indices->sizes());
  TORCH_CHECK_VALUE(row_terms->dim() == 2 && row_terms->size(0) == rows && row_terms->size(1) == 2,
                    "teacher_row_terms must have shape (", rows, ", 2), got ", row_terms->sizes());
  for (const auto& [what, x] : {std::pair<const char*, const at::Tensor&>{name, t},
                                {"teacher_indices", *indices},
                                {"teacher_row_terms", *row_terms}}) {
    TORCH_CHECK_VALUE(x.device() == logits.device(), what, " must be on ", logits.device(), " (as ", logits_name,
                      "), got ", x.device());
    TORCH_CHECK_VALUE(x.is_contiguous(), what, " must be contiguous");
  }
}

// A sparse teacher's class indices of the rows [first_row, first_row + indices.size(0)) a kernel is about to read:
// in [0, C) and none repeated within a row, as dho_fast.ops.teacher checks them (the kernels index with them, so a
// direct caller of an op is checked too). One device-to-host copy when they are valid.
inline void check_sparse_indices(const at::Tensor& indices, int64_t C, int64_t first_row) {
  if (indices.numel() == 0) return;
  const at::Tensor outside = ((indices < 0) | (indices >= C)).any(1);
  const at::Tensor sorted = std::get<0>(indices.sort(1));
  const int64_t k = indices.size(1);
  const at::Tensor repeated = (sorted.narrow(1, 1, k - 1) == sorted.narrow(1, 0, k - 1)).any(1);
  if (!(outside | repeated).any().item<bool>()) return;
  const bool out_of_range = outside.any().item<bool>();
  const int64_t row = (out_of_range ? outside : repeated).nonzero()[0][0].item<int64_t>();
  TORCH_CHECK_VALUE(!out_of_range, "teacher_indices row ", first_row + row, " has a class outside [0, ", C, ")");
  TORCH_CHECK_VALUE(false, "teacher_indices row ", first_row + row, " repeats a class");
}

inline void check_loss_inputs(const at::Tensor& ce, const at::Tensor& kd, const at::Tensor& t,
                              const at::Tensor& labels, double temperature, double ce_loss_weight,
                              double kd_loss_weight, double label_smoothing, int64_t teacher_form,
                              const std::optional<at::Tensor>& teacher_indices,
                              const std::optional<at::Tensor>& teacher_row_terms) {
  TORCH_CHECK_VALUE(ce.dim() == 2 && ce.size(1) >= 1, "ce_logits must have shape (N, C) with C >= 1, got ",
                    ce.sizes());
  check_floating("ce_logits", ce);
  TORCH_CHECK_VALUE(kd.sizes() == ce.sizes(), "kd_logits must have the shape of ce_logits ", ce.sizes(), ", got ",
                    kd.sizes());
  check_like("kd_logits", kd, "ce_logits", ce);
  check_teacher(teacher_form, t, teacher_indices, teacher_row_terms, ce.size(0), ce.size(1), "ce_logits", ce);
  if (teacher_indices) check_sparse_indices(*teacher_indices, ce.size(1), 0);
  check_labels(labels, ce.size(0), "ce_logits", ce);
  check_temperature(temperature);
  check_loss_weight("ce_loss_weight", ce_loss_weight);
  check_loss_weight("kd_loss_weight", kd_loss_weight);
  check_label_smoothing(label_smoothing);
}

// fused_linear_dual_head_loss's arguments: features (N, D); ce_weight and kd_weight (C, D) with C >= 1; ce_bias and
// kd_bias (C,) or None; teacher_logits (N, C); labels int64 (N,); every floating tensor of features' dtype and device.
inline void check_linear_loss_inputs(const LinearLossArgs& a) {
  const at::Tensor& x = a.features;
  TORCH_CHECK_VALUE(x.dim() == 2, "features must have shape (N, D), got ", x.sizes());
  check_floating("features", x);
  const int64_t N = x.size(0), D = x.size(1);
  const at::Tensor& w = a.ce_weight;
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) >= 1 && w.size(1) == D, "ce_weight must have shape (C, D) with C >= 1 "
                    "and D = ", D, " (as features), got ", w.sizes());
  const int64_t C = w.size(0);
  TORCH_CHECK_VALUE(a.kd_weight.sizes() == w.sizes(), "kd_weight must have shape (C, D) = (", C, ", ", D,
                    ") as ce_weight, got ", a.kd_weight.sizes());
  check_like("ce_weight", w, "features", x);
  check_like("kd_weight", a.kd_weight, "features", x);
  for (const auto& [name, bias] : {std::pair<const char*, const std::optional<at::Tensor>&>{"ce_bias", a.ce_bias},
                                   {"kd_bias", a.kd_bias}}) {
    if (!bias) continue;
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == C, name, " must have shape (C,) = (", C,
                      ",) as the weights' rows, got ", bias->sizes());
    check_like(name, *bias, "features", x);
  }
  check_teacher(a.teacher_form, a.teacher_logits, a.teacher_indices, a.teacher_row_terms, N, C, "features", x);
  check_labels(a.labels, N, "features", x);
  TORCH_CHECK_VALUE(a.chunk_size >= 1, "chunk_size must be >= 1, got ", a.chunk_size);
  TORCH_CHECK_VALUE(std::isfinite(a.kd_logit_scale) && a.kd_logit_scale > 0,
                    "kd_logit_scale must be finite and > 0, got ", a.kd_logit_scale);
  check_temperature(a.temperature);
  check_loss_weight("ce_loss_weight", a.ce_loss_weight);
  check_loss_weight("kd_loss_weight", a.kd_loss_weight);
  check_label_smoothing(a.label_smoothing);
}

// A chunk's optional bias: (C,), contiguous, of the logits' dtype and device.
inline void check_chunk_bias(const char* name, const std::optional<at::Tensor>& bias, const char* logits_name,
                             const at::Tensor& logits) {
  if (!bias) return;
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == logits.size(1), name, " must have shape (", logits.size(1),
                    ",), got ", bias->sizes());
  check_like(name, *bias, logits_name, logits);
  TORCH_CHECK_VALUE(bias->is_contiguous(), name, " must be contiguous");
}

// The chunk op's tensors: the batch's N rows are the labels'; the teacher covers the whole batch.
inline void check_chunk_inputs(const at::Tensor& ce, const at::Tensor& kd, const at::Tensor& t,
                               const at::Tensor& labels, int64_t start, int64_t num_labelled, double temperature,
                               double label_smoothing, const std::optional<at::Tensor>& ce_bias,
                               const std::optional<at::Tensor>& kd_bias, int64_t teacher_form,
                               const std::optional<at::Tensor>& teacher_indices,
                               const std::optional<at::Tensor>& teacher_row_terms) {
  TORCH_CHECK_VALUE(kd.dim() == 2 && kd.size(1) >= 1, "kd_logits must have shape (R, C) with C >= 1, got ",
                    kd.sizes());
  check_floating("kd_logits", kd);
  TORCH_CHECK_VALUE(labels.dim() == 1, "labels must have shape (N,), got ", labels.sizes());
  const int64_t N = labels.size(0), C = kd.size(1);
  check_labels(labels, N, "kd_logits", kd);
  check_teacher(teacher_form, t, teacher_indices, teacher_row_terms, N, C, "kd_logits", kd);
  TORCH_CHECK_VALUE(ce.dim() == 2 && ce.size(1) == C, "ce_logits must have shape (L, ", C, "), got ", ce.sizes());
  TORCH_CHECK_VALUE(start >= 0 && start + kd.size(0) <= N, "rows [start, start + R) = [", start, ", ",
                    start + kd.size(0), ") must lie in the batch's ", N, " rows");
  TORCH_CHECK_VALUE(num_labelled >= 0 && num_labelled <= N, "num_labelled must be in [0, ", N, "], got ",
                    num_labelled);
  if (teacher_indices) check_sparse_indices(teacher_indices->narrow(0, start, kd.size(0)), C, start);
  check_like("ce_logits", ce, "kd_logits", kd);
  for (const auto& [name, x] : {std::pair<const char*, const at::Tensor&>{"ce_logits", ce},
                                {"kd_logits", kd},
                                {teacher_name(teacher_form), t},
                                {"labels", labels}}) {
    TORCH_CHECK_VALUE(x.is_contiguous(), name, " must be contiguous");
  }
  check_temperature(temperature);
  check_label_smoothing(label_smoothing);
  check_chunk_bias("ce_bias", ce_bias, "ce_logits", ce);
  check_chunk_bias("kd_bias", kd_bias, "kd_logits", kd);
}

// A chunk's gradient buffer of `logits` when `wanted`: the gradient is written in the accumulation dtype, into
// grad_out when given (contiguous, of the logits' shape and device), else over the logits, which must then be float32
// or float64 (half logits need a float32 grad_out).
inline void check_chunk_grad_out(const char* name, const std::optional<at::Tensor>& grad_out, const char* logits_name,
                                 const at::Tensor& logits, bool wanted) {
  if (!wanted) return;
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (!grad_out) {
    TORCH_CHECK_TYPE(logits.scalar_type() == acc, name, " must be given for ", logits.scalar_type(), " ",
                     logits_name, ": their gradient is written in ", acc);
    return;
  }
  TORCH_CHECK_TYPE(grad_out->scalar_type() == acc, name, " must be ", acc, " (the accumulation dtype of ",
                   logits_name, "), got ", grad_out->scalar_type());
  TORCH_CHECK_VALUE(grad_out->sizes() == logits.sizes() && grad_out->device() == logits.device() &&
                        grad_out->is_contiguous(),
                    name, " must be contiguous, of the shape of ", logits_name, " ", logits.sizes(), " on ",
                    logits.device(), ", got shape ", grad_out->sizes(), " on ", grad_out->device());
}

// The chunk's labelled rows, counted from its labels: one row of ce_logits each, and no more than the batch's.
inline void check_chunk_labelled(const at::Tensor& ce, int64_t chunk_labelled, int64_t num_labelled) {
  TORCH_CHECK_VALUE(ce.size(0) == chunk_labelled, "ce_logits must have one row per labelled row of the chunk (",
                    chunk_labelled, "), got ", ce.size(0));
  TORCH_CHECK_VALUE(chunk_labelled <= num_labelled, "num_labelled = ", num_labelled, " is less than the chunk's ",
                    chunk_labelled, " labelled rows");
}

// labels[row] = label must be ignore_index or a class index.
inline void check_label(int64_t row, int64_t label, int64_t num_classes, int64_t ignore_index) {
  TORCH_CHECK_VALUE(label == ignore_index || (label >= 0 && label < num_classes), "labels[", row, "] = ", label,
                    " is out of range for ", num_classes,
                    " classes (unlabelled rows must be ignore_index = ", ignore_index, ")");
}

// status: the row_math::TeacherRowStatus a kernel reported for teacher row `row` of form `form` (the messages are
// dho_fast.ops.validation.teacher_row_error's).
inline void check_teacher_row(int64_t row, int status, int64_t form) {
  if (form == row_math::kTeacherProbs) {
    TORCH_CHECK_VALUE(status != row_math::kTeacherNonFinite && status != row_math::kTeacherOverflow,
                      "teacher_probs row ", row, " contains a negative, NaN or +inf probability");
    TORCH_CHECK_VALUE(status != row_math::kTeacherAllMasked, "teacher_probs row ", row,
                      " is 0 in every class: the teacher distribution is undefined");
    return;
  }
  TORCH_CHECK_VALUE(status != row_math::kTeacherNonFinite, "teacher_logits row ", row,
                    " contains NaN or +inf (only -inf is allowed, for masked classes)");
  TORCH_CHECK_VALUE(status != row_math::kTeacherAllMasked, "teacher_logits row ", row,
                    " is -inf in every class: the teacher distribution is undefined");
  TORCH_CHECK_VALUE(status != row_math::kTeacherOverflow, "teacher_logits / temperature overflows float32 (float64 "
                    "for float64 input) in row ", row, ": the teacher logits are finite, but too large for the "
                    "temperature");
}

// kcenter_update's arguments (dho_fast.ops.validation.check_kcenter_args checks the same for every backend): points
// (N, C) float32 or bfloat16, centres (K, C) float32 with K >= 1, min_sq_dist (N,) float32, all contiguous and on
// one device; N below 2^32 - 1, the rows kcenter::argmax_key can name.
inline void check_kcenter_inputs(const at::Tensor& points, const at::Tensor& centres, const at::Tensor& min_sq_dist) {
  TORCH_CHECK_VALUE(points.dim() == 2, "points must be of shape (N, C), got shape ", points.sizes());
  TORCH_CHECK_TYPE(points.scalar_type() == at::kFloat || points.scalar_type() == at::kBFloat16,
                   "points must be float32 or bfloat16, got ", points.scalar_type());
  const int64_t N = points.size(0), C = points.size(1);
  TORCH_CHECK_VALUE(N < int64_t(UINT32_MAX), "points must have fewer than 2^32 - 1 rows, got ", N);
  TORCH_CHECK_VALUE(centres.dim() == 2 && centres.size(0) >= 1 && centres.size(1) == C,
                    "centres must be of shape (K >= 1, ", C, "), got shape ", centres.sizes());
  TORCH_CHECK_TYPE(centres.scalar_type() == at::kFloat, "centres must be float32, got ", centres.scalar_type());
  TORCH_CHECK_VALUE(min_sq_dist.dim() == 1 && min_sq_dist.size(0) == N, "min_sq_dist must be of shape (", N,
                    ",), got shape ", min_sq_dist.sizes());
  TORCH_CHECK_TYPE(min_sq_dist.scalar_type() == at::kFloat, "min_sq_dist must be float32, got ",
                   min_sq_dist.scalar_type());
  for (const auto& [name, x] : {std::pair<const char*, const at::Tensor&>{"points", points},
                                {"centres", centres},
                                {"min_sq_dist", min_sq_dist}}) {
    TORCH_CHECK_VALUE(x.device() == points.device(), name, " must be on ", points.device(), " (as points), got ",
                      x.device());
    TORCH_CHECK_VALUE(x.is_contiguous(), name, " must be contiguous, got strides ", x.strides(), " for shape ",
                      x.sizes());
  }
}

// bad_row: the first row of points whose squared distance to a centre a kernel found not finite, -1 for none. The
// message is dho_fast.ops.validation.kcenter_row_error's (tests/test_kcenter_op.py compares them).
inline void check_kcenter_row(int64_t bad_row) {
  TORCH_CHECK_VALUE(bad_row < 0, "points row ", bad_row, ": its squared distance to a centre is not finite (NaN or inf "
                    "in the row or in a centre, or an overflow)");
}

}  // namespace dho_fast
