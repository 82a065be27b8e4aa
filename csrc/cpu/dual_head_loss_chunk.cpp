// CPU implementation of dho_fast::dual_head_loss_chunk: the row kernel of dual_head_loss run over one chunk of a
// batch's rows, with the batch's row counts, writing the logit gradients into their buffers or over the logits.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../op_checks.h"
#include "kernel_dispatch.h"

namespace dho_fast {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> dual_head_loss_chunk_cpu(at::Tensor& ce_logits, at::Tensor& kd_logits,
                                                            const at::Tensor& teacher_logits, const at::Tensor& labels,
                                                            int64_t start, int64_t num_labelled, double temperature,
                                                            bool kd_split, int64_t ignore_index,
                                                            double label_smoothing, bool ce_grad, bool kd_grad,
                                                            const std::optional<at::Tensor>& ce_bias,
                                                            const std::optional<at::Tensor>& kd_bias,
                                                            double ce_grad_scale, double kd_grad_scale,
                                                            const std::optional<at::Tensor>& ce_grad_out,
                                                            const std::optional<at::Tensor>& kd_grad_out,
                                                            int64_t teacher_form,
                                                            const std::optional<at::Tensor>& teacher_indices,
                                                            const std::optional<at::Tensor>& teacher_row_terms) {
  check_chunk_inputs(ce_logits, kd_logits, teacher_logits, labels, start, num_labelled, temperature, label_smoothing,
                     ce_bias, kd_bias, teacher_form, teacher_indices, teacher_row_terms);
  check_chunk_grad_out("ce_grad_out", ce_grad_out, "ce_logits", ce_logits, ce_grad);
  check_chunk_grad_out("kd_grad_out", kd_grad_out, "kd_logits", kd_logits, kd_grad);
  const int64_t N = labels.size(0), C = kd_logits.size(1), R = kd_logits.size(0);
  const bool sparse = teacher_form == row_math::kTeacherSparse;
  const int64_t k = sparse ? teacher_logits.size(1) : 0;
  const int64_t* y = labels.const_data_ptr<int64_t>() + start;
  std::vector<int64_t> ce_row(R);
  const int64_t chunk_labelled = index_labelled(y, R, C, ignore_index, start, ce_row.data());
  check_chunk_labelled(ce_logits, chunk_labelled, num_labelled);
  const LossParams p{.num_rows = N,
                     .num_classes = C,
                     .num_labelled = num_labelled,
                     .ignore_index = ignore_index,
                     .temperature = temperature,
                     .label_smoothing = label_smoothing,
                     .kd_split = kd_split,
                     .ce_grad_scale = ce_grad_scale,
                     .kd_grad_scale = kd_grad_scale,
                     .teacher_form = int(teacher_form),
                     .teacher_k = k};

  std::vector<double> row_ce(R), row_kl(R);
  std::vector<int> status(R);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kd_logits.scalar_type(), "dual_head_loss_chunk_cpu", [&] {
    // Where a gradient goes: its buffer, or over the logits (then of the accumulation dtype: checked above).
    auto grad_ptr = [](bool wanted, const std::optional<at::Tensor>& out, at::Tensor& logits) {
      return wanted ? (out ? *out : logits).mutable_data_ptr<acc_type<scalar_t>>() : nullptr;
    };
    const RowsIO<scalar_t> io{.rows = R,
                              .ce = ce_logits.const_data_ptr<scalar_t>(),
                              .ce_row = ce_row.data(),
                              .kd = kd_logits.const_data_ptr<scalar_t>(),
                              .teacher = sparse ? nullptr : teacher_logits.const_data_ptr<scalar_t>() + start * C,
                              .labels = y,
                              .g_ce = grad_ptr(ce_grad, ce_grad_out, ce_logits),
                              .g_kd = grad_ptr(kd_grad, kd_grad_out, kd_logits),
                              .row_ce = row_ce.data(),
                              .row_kl = row_kl.data(),
                              .row_status = status.data(),
                              .ce_bias = ce_bias ? ce_bias->const_data_ptr<scalar_t>() : nullptr,
                              .kd_bias = kd_bias ? kd_bias->const_data_ptr<scalar_t>() : nullptr,
                              .sparse_probs =
                                  sparse ? teacher_logits.const_data_ptr<acc_type<scalar_t>>() + start * k : nullptr,
                              .sparse_indices = sparse ? teacher_indices->const_data_ptr<int64_t>() + start * k
                                                       : nullptr,
                              .sparse_row_terms = sparse ? teacher_row_terms->const_data_ptr<acc_type<scalar_t>>() +
                                                               2 * start
                                                         : nullptr};
    run_rows(io, p);
  });

  const auto [ce_term, kd_term] = reduce_rows(y, R, start, row_ce.data(), row_kl.data(), status.data(), p);
  const auto acc_dtype = kd_logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto scalar = [&](double v) { return at::scalar_tensor(v, kd_logits.options().dtype(acc_dtype)); };
  return {scalar(ce_term), scalar(kd_term)};
}

}  // namespace
}  // namespace cpu
}  // namespace dho_fast

TORCH_LIBRARY_IMPL(dho_fast, CPU, m) {
  m.impl("dual_head_loss_chunk", &dho_fast::cpu::dual_head_loss_chunk_cpu);
}
