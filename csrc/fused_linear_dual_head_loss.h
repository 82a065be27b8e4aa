// The arguments of dho_fast::fused_linear_dual_head_loss and of its _with_grads variant (schemas: csrc/dho_fast.cpp)
// as one struct: built once from the op's arguments where the dispatcher calls in, then passed as a whole.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace dho_fast {

struct LinearLossArgs {
  at::Tensor features;                 // (N, D)
  at::Tensor ce_weight;                // (C, D)
  std::optional<at::Tensor> ce_bias;   // (C,) or None
  at::Tensor kd_weight;                // (C, D)
  std::optional<at::Tensor> kd_bias;   // (C,) or None
  at::Tensor teacher_logits;           // (N, C), or (N, k) for a sparse teacher (teacher_form below)
  at::Tensor labels;                   // (N,) int64
  bool kd_cosine;
  double kd_logit_scale;
  int64_t chunk_size;
  double temperature;
  double ce_loss_weight;
  double kd_loss_weight;
  bool kd_split;
  int64_t ignore_index;
  double label_smoothing;
  // The gradients the forward computes (the _with_grads variant's flags; the plain op computes none).
  bool grad_features = false;
  bool grad_ce_head = false;
  bool grad_kd_head = false;
  // The teacher's form (row_math::TeacherForm) and a sparse teacher's other tensors (csrc/dho_fast.cpp).
  int64_t teacher_form = 0;
  std::optional<at::Tensor> teacher_indices;    // (N, k) int64
  std::optional<at::Tensor> teacher_row_terms;  // (N, 2)
};

}  // namespace dho_fast
