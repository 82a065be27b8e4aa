// What the CPU ops share around their kernels: the run-time choice of the instruction-set variant; for the loss ops
// also label validation and the reduction of per-row results into the two loss terms.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <string>
#include <utility>

#include "../op_checks.h"
#include "../row_math.h"
#include "dual_head_loss_kernel_api.h"
#include "kcenter_kernel_api.h"

namespace dho_fast {
namespace cpu {

enum class Isa { Default, Avx2, Avx512 };

// The best instruction set this CPU has; ATEN_CPU_CAPABILITY (default / avx2 / avx512) lowers it, as for ATen.
inline Isa select_isa() {
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

template <typename scalar_t, typename grad_t>
void run_rows(const RowsIO<scalar_t, grad_t>& io, const LossParams& p) {
  switch (select_isa()) {
#if defined(__x86_64__) && defined(__GNUC__)
    case Isa::Avx512:
      return AVX512::dual_head_loss_rows(io, p);
    case Isa::Avx2:
      return AVX2::dual_head_loss_rows(io, p);
#endif
    default:
      return DEFAULT::dual_head_loss_rows(io, p);
  }
}

template <typename scalar_t>
KcenterResult run_kcenter(const KcenterIO<scalar_t>& io) {
  switch (select_isa()) {
#if defined(__x86_64__) && defined(__GNUC__)
    case Isa::Avx512:
      return AVX512::kcenter_rows(io);
    case Isa::Avx2:
      return AVX2::kcenter_rows(io);
#endif
    default:
      return DEFAULT::kcenter_rows(io);
  }
}

// Counts the labelled rows among labels[0, n) and rejects labels that are neither ignore_index nor a class index.
// rank (when given) receives each row's index among the labelled rows, -1 for an unlabelled row. first_row is the
// batch index of labels[0], for messages.
inline int64_t index_labelled(const int64_t* labels, int64_t n, int64_t num_classes, int64_t ignore_index,
                              int64_t first_row = 0, int64_t* rank = nullptr) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t y = labels[i];
    if (y == ignore_index) {
      if (rank) rank[i] = -1;
      continue;
    }
    check_label(first_row + i, y, num_classes, ignore_index);
    if (rank) rank[i] = count;
    ++count;
  }
  return count;
}

// (ce_term, kd_term) contributions of rows [0, rows) of the batch p describes, summed serially in row order so the
// result does not depend on the number of threads. Raises on a teacher row the kernel reported as invalid.
inline std::pair<double, double> reduce_rows(const int64_t* labels, int64_t rows, int64_t first_row,
                                             const double* row_ce, const double* row_kl, const int* status,
                                             const LossParams& p) {
  double ce_term = 0, kd_term = 0;
  for (int64_t i = 0; i < rows; ++i) {
    check_teacher_row(first_row + i, status[i], p.teacher_form);
    const bool labelled = labels[i] != p.ignore_index;
    const auto w = row_math::row_weights<double>(labelled, p.num_labelled, p.num_rows, p.kd_split, p.temperature);
    ce_term += w.ce * row_ce[i];
    kd_term += w.kd * row_kl[i];
  }
  return {ce_term, kd_term};
}

}  // namespace cpu
}  // namespace dho_fast
