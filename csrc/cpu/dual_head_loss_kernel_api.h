// What the per-instruction-set CPU kernels export to the op implementations (dual_head_loss.cpp and
// dual_head_loss_chunk.cpp, through kernel_dispatch.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace dho_fast {
namespace cpu {

// The batch the loss is defined over: num_rows and num_labelled set every row's weight (row_math::row_weights),
// also when a kernel call processes only a chunk of the batch's rows.
struct LossParams {
  int64_t num_rows;
  int64_t num_classes;
  int64_t num_labelled;
  int64_t ignore_index;
  double temperature;
  double label_smoothing;
  bool kd_split;
  // Factors of the gradients written (the chunk op's ce_grad_scale, kd_grad_scale); the loss terms are unscaled.
  double ce_grad_scale = 1.0;
  double kd_grad_scale = 1.0;
  // row_math::TeacherForm of RowsIO's teacher, and k of a sparse one.
  int teacher_form = 0;
  int64_t teacher_k = 0;
};

// The dtype the kernel computes in, and writes the gradients in: float32 for float32 and half inputs, so that the
// gradients are rounded to a half dtype only once, after the backward has scaled them (by a loss scale, say).
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The dtype dual_head_loss writes the logits' gradients in (saved_gradients.h loss_gradient_dtype): bfloat16 for
// bfloat16 inputs, whose float32 exponent range a loss scale cannot underflow, so the usual backward has no rounding
// pass left; acc_type otherwise. The chunk op always writes acc_type.
template <typename scalar_t>
using loss_grad_type = std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, c10::BFloat16, acc_type<scalar_t>>;

// The rows one kernel call processes (the whole batch, or a chunk of it), each of num_classes columns; the
// gradients are written as grad_t: acc_type, or bfloat16 for bfloat16 inputs (computed in acc_type, rounded once).
template <typename scalar_t, typename grad_t = acc_type<scalar_t>>
struct RowsIO {
  int64_t rows;
  // CE-head logits: row i's are row ce_row[i] of ce; ce_row[i] = -1 for a row without CE logits, which must be
  // unlabelled. ce_row == nullptr: row i's are row i, and g_ce's rows of unlabelled rows are set to 0.
  const scalar_t* ce;
  const int64_t* ce_row;
  const scalar_t* kd;       // (rows, C)
  const scalar_t* teacher;  // (rows, C) logits or probabilities; unused for a sparse teacher (below)
  const int64_t* labels;    // (rows,), already validated
  // Gradients of ce_term and kd_term times the grad scales (nullptr: not wanted), laid out as ce and kd. For
  // float32 and float64 inputs they may be ce and kd themselves: the kernel reads a block of a row before it
  // overwrites it.
  grad_t* g_ce;
  grad_t* g_kd;
  double* row_ce;   // (rows,) CE of each labelled row
  double* row_kl;   // (rows,) KL of each row
  int* row_status;  // (rows,) row_math::TeacherRowStatus
  // (C,) added to every row of ce / kd before the loss (nullptr: none).
  const scalar_t* ce_bias = nullptr;
  const scalar_t* kd_bias = nullptr;
  // A sparse teacher (row_math::kTeacherSparse): (rows, k) probabilities at (rows, k) class indices, and (rows, 2)
  // [u, sum_c p_c log p_c] per row; validated (in range, no repeats) by the caller.
  const acc_type<scalar_t>* sparse_probs = nullptr;
  const int64_t* sparse_indices = nullptr;
  const acc_type<scalar_t>* sparse_row_terms = nullptr;
};

#define DHO_FAST_DECLARE_ROWS(NS)                                                    \
  namespace NS {                                                                     \
  template <typename scalar_t, typename grad_t>                                      \
  void dual_head_loss_rows(const RowsIO<scalar_t, grad_t>& io, const LossParams& p); \
  }

DHO_FAST_DECLARE_ROWS(DEFAULT)
DHO_FAST_DECLARE_ROWS(AVX2)
DHO_FAST_DECLARE_ROWS(AVX512)
#undef DHO_FAST_DECLARE_ROWS

}  // namespace cpu
}  // namespace dho_fast
