// CPU implementation of dho_fast::dual_head_loss: checks, run-time choice of the vectorised kernel, reduction.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "../op_checks.h"
#include "../saved_gradients.h"
#include "gradient_buffers.h"
#include "kernel_dispatch.h"

namespace dho_fast {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dual_head_loss_cpu(
    const at::Tensor& ce_logits, const at::Tensor& kd_logits, const at::Tensor& teacher_logits,
    const at::Tensor& labels, double temperature, double ce_loss_weight, double kd_loss_weight, bool kd_split,
    int64_t ignore_index, double label_smoothing, bool ce_grad, bool kd_grad, double ce_grad_scale,
    double kd_grad_scale, int64_t teacher_form, const std::optional<at::Tensor>& teacher_indices,
    const std::optional<at::Tensor>& teacher_row_terms) {
  check_loss_inputs(ce_logits, kd_logits, teacher_logits, labels, temperature, ce_loss_weight, kd_loss_weight,
                    label_smoothing, teacher_form, teacher_indices, teacher_row_terms);
  const at::Tensor ce = ce_logits.contiguous(), kd = kd_logits.contiguous(), t = teacher_logits.contiguous();
  const bool sparse = teacher_form == row_math::kTeacherSparse;
  const at::Tensor y = labels.contiguous();
  const int64_t N = ce.size(0), C = ce.size(1);
  const int64_t* y_ptr = y.const_data_ptr<int64_t>();
  const LossParams p{.num_rows = N,
                     .num_classes = C,
                     .num_labelled = index_labelled(y_ptr, N, C, ignore_index),
                     .ignore_index = ignore_index,
                     .temperature = temperature,
                     .label_smoothing = label_smoothing,
                     .kd_split = kd_split,
                     .ce_grad_scale = ce_grad_scale,
                     .kd_grad_scale = kd_grad_scale,
                     .teacher_form = int(teacher_form),
                     .teacher_k = sparse ? t.size(1) : 0};

  const auto acc_dtype = ce.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto grad_dtype = loss_gradient_dtype(ce.scalar_type());
  at::Tensor g_ce = ce_grad ? empty_gradient_like(ce, grad_dtype) : at::empty({0}, ce.options());
  at::Tensor g_kd = kd_grad ? empty_gradient_like(kd, grad_dtype) : at::empty({0}, kd.options());
  if (std::getenv("DHO_FAST_POISON_OUTPUTS")) {  // tests: an element the kernel fails to write stays NaN
    g_ce.fill_(std::numeric_limits<double>::quiet_NaN());
    g_kd.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  std::vector<double> row_ce(N), row_kl(N);
  std::vector<int> status(N);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ce.scalar_type(), "dual_head_loss_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    using grad_t = loss_grad_type<scalar_t>;
    const RowsIO<scalar_t, grad_t> io{
        .rows = N,
        .ce = ce.const_data_ptr<scalar_t>(),
        .ce_row = nullptr,
        .kd = kd.const_data_ptr<scalar_t>(),
        .teacher = sparse ? nullptr : t.const_data_ptr<scalar_t>(),
        .labels = y_ptr,
        .g_ce = ce_grad ? g_ce.mutable_data_ptr<grad_t>() : nullptr,
        .g_kd = kd_grad ? g_kd.mutable_data_ptr<grad_t>() : nullptr,
        .row_ce = row_ce.data(),
        .row_kl = row_kl.data(),
        .row_status = status.data(),
        .sparse_probs = sparse ? t.const_data_ptr<acc_t>() : nullptr,
        .sparse_indices = sparse ? teacher_indices->const_data_ptr<int64_t>() : nullptr,
        .sparse_row_terms = sparse ? teacher_row_terms->const_data_ptr<acc_t>() : nullptr};
    run_rows(io, p);
  });

  const auto [ce_term, kd_term] = reduce_rows(y_ptr, N, 0, row_ce.data(), row_kl.data(), status.data(), p);
  auto scalar = [&](double v) { return at::scalar_tensor(v, ce.options().dtype(acc_dtype)); };
  return {scalar(ce_loss_weight * ce_term + kd_loss_weight * kd_term), scalar(ce_term), scalar(kd_term), g_ce,
          g_kd};
}

}  // namespace
}  // namespace cpu
}  // namespace dho_fast

TORCH_LIBRARY_IMPL(dho_fast, CPU, m) {
  m.impl("dual_head_loss", &dho_fast::cpu::dual_head_loss_cpu);
}
