// Argument and value checks of the loss ops, shared by their CPU and CUDA implementations so both raise the same
// errors: each names the argument, the expectation and what was given.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "row_math.h"

namespace dho_fast {

inline void check_loss_inputs(const at::Tensor& ce, const at::Tensor& kd, const at::Tensor& t,
                              const at::Tensor& labels, double temperature) {
  TORCH_CHECK(ce.dim() == 2, "ce_logits must have shape (N, C), got ", ce.sizes());
  TORCH_CHECK(kd.sizes() == ce.sizes(), "kd_logits must have the shape of ce_logits ", ce.sizes(), ", got ",
              kd.sizes());
  TORCH_CHECK(t.sizes() == ce.sizes(), "teacher_logits must have the shape of ce_logits ", ce.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(ce.size(1) >= 1, "ce_logits must have at least one class, got shape ", ce.sizes());
  TORCH_CHECK(kd.scalar_type() == ce.scalar_type(), "kd_logits must have the dtype of ce_logits (",
              ce.scalar_type(), "), got ", kd.scalar_type());
  TORCH_CHECK(t.scalar_type() == ce.scalar_type(), "teacher_logits must have the dtype of ce_logits (",
              ce.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == ce.size(0),
              "labels must be int64 of shape (", ce.size(0), ",), got ", labels.scalar_type(), " of shape ",
              labels.sizes());
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
}

// A chunk's optional bias: (C,), contiguous, of the logits' dtype and device.
inline void check_chunk_bias(const char* name, const std::optional<at::Tensor>& bias, const at::Tensor& logits) {
  if (!bias) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == logits.size(1), name, " must have shape (", logits.size(1),
              ",), got ", bias->sizes());
  TORCH_CHECK(bias->scalar_type() == logits.scalar_type(), name, " must have the dtype of the logits (",
              logits.scalar_type(), "), got ", bias->scalar_type());
  TORCH_CHECK(bias->device() == logits.device(), name, " must be on ", logits.device(), ", got ", bias->device());
  TORCH_CHECK(bias->is_contiguous(), name, " must be contiguous");
}

inline void check_chunk_inputs(const at::Tensor& ce, const at::Tensor& kd, const at::Tensor& t,
                               const at::Tensor& labels, int64_t start, int64_t num_labelled, double temperature,
                               const std::optional<at::Tensor>& ce_bias, const std::optional<at::Tensor>& kd_bias) {
  TORCH_CHECK(t.dim() == 2 && t.size(1) >= 1, "teacher_logits must have shape (N, C) with C >= 1, got ", t.sizes());
  const int64_t N = t.size(0), C = t.size(1);
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == N,
              "labels must be int64 of shape (", N, ",), got ", labels.scalar_type(), " of shape ", labels.sizes());
  TORCH_CHECK(kd.dim() == 2 && kd.size(1) == C, "kd_logits must have shape (R, ", C, "), got ", kd.sizes());
  TORCH_CHECK(ce.dim() == 2 && ce.size(1) == C, "ce_logits must have shape (L, ", C, "), got ", ce.sizes());
  TORCH_CHECK(start >= 0 && start + kd.size(0) <= N, "rows [start, start + R) = [", start, ", ", start + kd.size(0),
              ") must lie in the batch's ", N, " rows");
  TORCH_CHECK(num_labelled >= 0 && num_labelled <= N, "num_labelled must be in [0, ", N, "], got ", num_labelled);
  for (const auto& [name, x] : {std::pair<const char*, const at::Tensor&>{"ce_logits", ce},
                                {"kd_logits", kd},
                                {"teacher_logits", t}}) {
    TORCH_CHECK(x.scalar_type() == t.scalar_type(), name, " must have the dtype of teacher_logits (",
                t.scalar_type(), "), got ", x.scalar_type());
    TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
  }
  TORCH_CHECK(labels.is_contiguous(), "labels must be contiguous");
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  check_chunk_bias("ce_bias", ce_bias, ce);
  check_chunk_bias("kd_bias", kd_bias, kd);
}

// The chunk's labelled rows, counted from its labels: one row of ce_logits each, and no more than the batch's.
inline void check_chunk_labelled(const at::Tensor& ce, int64_t chunk_labelled, int64_t num_labelled) {
  TORCH_CHECK(ce.size(0) == chunk_labelled, "ce_logits must have one row per labelled row of the chunk (",
              chunk_labelled, "), got ", ce.size(0));
  TORCH_CHECK(chunk_labelled <= num_labelled, "num_labelled = ", num_labelled, " is less than the chunk's ",
              chunk_labelled, " labelled rows");
}

// labels[row] = label must be ignore_index or a class index.
inline void check_label(int64_t row, int64_t label, int64_t num_classes, int64_t ignore_index) {
  TORCH_CHECK(label == ignore_index || (label >= 0 && label < num_classes), "labels[", row, "] = ", label,
              " is out of range for ", num_classes, " classes (unlabelled rows must be ignore_index = ", ignore_index,
              ")");
}

// status: the row_math::TeacherRowStatus a kernel reported for teacher_logits row `row`.
inline void check_teacher_row(int64_t row, int status) {
  TORCH_CHECK(status != row_math::kTeacherNonFinite, "teacher_logits row ", row,
              " contains NaN or +inf (only -inf is allowed, for masked classes)");
  TORCH_CHECK(status != row_math::kTeacherAllMasked, "teacher_logits row ", row,
              " is -inf in every class: the teacher distribution is undefined");
}

}  // namespace dho_fast
