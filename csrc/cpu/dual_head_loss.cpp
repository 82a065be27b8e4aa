// CPU implementation of dho_fast::dual_head_loss: checks, run-time choice of the vectorised kernel, reduction.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "../row_math.h"
#include "dual_head_loss_kernel_api.h"

namespace dho_fast {
namespace cpu {
namespace {

enum class Isa { Default, Avx2, Avx512 };

// The best instruction set this CPU has; ATEN_CPU_CAPABILITY (default / avx2 / avx512) lowers it, as for ATen.
Isa select_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  Isa best = Isa::Default;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::Avx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = Isa::Avx512;
  if (const char* env = std::getenv("ATEN_CPU_CAPABILITY")) {
    const std::string want(env);
    if (want == "default") return Isa::Default;
    if (want == "avx2" && best != Isa::Default) return Isa::Avx2;
  }
  return best;
#else
  return Isa::Default;
#endif
}

template <typename scalar_t>
void run_rows(const scalar_t* ce, const scalar_t* kd, const scalar_t* t, const int64_t* labels, scalar_t* g_ce,
              scalar_t* g_kd, const LossParams& p, double* row_ce, double* row_kl, int* status) {
  switch (select_isa()) {
#if defined(__x86_64__) && defined(__GNUC__)
    case Isa::Avx512:
      return AVX512::dual_head_loss_rows(ce, kd, t, labels, g_ce, g_kd, p, row_ce, row_kl, status);
    case Isa::Avx2:
      return AVX2::dual_head_loss_rows(ce, kd, t, labels, g_ce, g_kd, p, row_ce, row_kl, status);
#endif
    default:
      return DEFAULT::dual_head_loss_rows(ce, kd, t, labels, g_ce, g_kd, p, row_ce, row_kl, status);
  }
}

void check_inputs(const at::Tensor& ce, const at::Tensor& kd, const at::Tensor& t, const at::Tensor& labels,
                  double temperature) {
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

// Counts the labelled rows and rejects labels that are neither ignore_index nor a class index.
int64_t count_labelled(const at::Tensor& labels, int64_t num_classes, int64_t ignore_index) {
  const int64_t* y = labels.data_ptr<int64_t>();
  int64_t n = 0;
  for (int64_t i = 0; i < labels.size(0); ++i) {
    if (y[i] == ignore_index) continue;
    TORCH_CHECK(y[i] >= 0 && y[i] < num_classes, "labels[", i, "] = ", y[i], " is out of range for ", num_classes,
                " classes (unlabelled rows must be ignore_index = ", ignore_index, ")");
    ++n;
  }
  return n;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dual_head_loss_cpu(
    const at::Tensor& ce_logits, const at::Tensor& kd_logits, const at::Tensor& teacher_logits,
    const at::Tensor& labels, double temperature, double ce_weight, double kd_weight, bool kd_split,
    int64_t ignore_index, double label_smoothing, bool ce_grad, bool kd_grad) {
  check_inputs(ce_logits, kd_logits, teacher_logits, labels, temperature);
  const at::Tensor ce = ce_logits.contiguous(), kd = kd_logits.contiguous(), t = teacher_logits.contiguous();
  const at::Tensor y = labels.contiguous();
  const int64_t N = ce.size(0), C = ce.size(1);
  const LossParams p{N, C, count_labelled(y, C, ignore_index), ignore_index, temperature, label_smoothing,
                     kd_split};

  at::Tensor g_ce = ce_grad ? at::empty_like(ce) : at::empty({0}, ce.options());
  at::Tensor g_kd = kd_grad ? at::empty_like(kd) : at::empty({0}, kd.options());
  std::vector<double> row_ce(N), row_kl(N);
  std::vector<int> status(N);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ce.scalar_type(), "dual_head_loss_cpu", [&] {
    run_rows<scalar_t>(ce.const_data_ptr<scalar_t>(), kd.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
                       y.const_data_ptr<int64_t>(), ce_grad ? g_ce.mutable_data_ptr<scalar_t>() : nullptr,
                       kd_grad ? g_kd.mutable_data_ptr<scalar_t>() : nullptr, p, row_ce.data(), row_kl.data(),
                       status.data());
  });

  // Summed serially in row order: the result does not depend on the number of threads.
  double ce_term = 0, kd_term = 0;
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(status[i] != row_math::kTeacherNonFinite, "teacher_logits row ", i,
                " contains NaN or +inf (only -inf is allowed, for masked classes)");
    TORCH_CHECK(status[i] != row_math::kTeacherAllMasked, "teacher_logits row ", i,
                " is -inf in every class: the teacher distribution is undefined");
    const bool labelled = y.const_data_ptr<int64_t>()[i] != ignore_index;
    const auto w = row_math::row_weights<double>(labelled, p.num_labelled, N, kd_split, temperature);
    ce_term += w.ce * row_ce[i];
    kd_term += w.kd * row_kl[i];
  }
  const auto acc_dtype = ce.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto scalar = [&](double v) { return at::scalar_tensor(v, ce.options().dtype(acc_dtype)); };
  return {scalar(ce_weight * ce_term + kd_weight * kd_term), scalar(ce_term), scalar(kd_term), g_ce, g_kd};
}

}  // namespace
}  // namespace cpu
}  // namespace dho_fast

TORCH_LIBRARY_IMPL(dho_fast, CPU, m) {
  m.impl("dual_head_loss", &dho_fast::cpu::dual_head_loss_cpu);
}
