// What the per-instruction-set CPU kernels export to the op implementation (dual_head_loss.cpp).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace dho_fast {
namespace cpu {

struct LossParams {
  int64_t num_rows;
  int64_t num_classes;
  int64_t num_labelled;
  int64_t ignore_index;
  double temperature;
  double label_smoothing;
  bool kd_split;
};

// Computes per-row CE and KL values, teacher-row status codes (row_math::TeacherRowStatus) and, where the
// pointers are non-null, the unweighted gradients of ce_term and kd_term. Labels must already be validated.
#define DHO_FAST_DECLARE_ROWS(NS)                                                                               \
  namespace NS {                                                                                                \
  template <typename scalar_t>                                                                                  \
  void dual_head_loss_rows(const scalar_t* ce, const scalar_t* kd, const scalar_t* t, const int64_t* labels,     \
                           scalar_t* g_ce, scalar_t* g_kd, const LossParams& p, double* row_ce, double* row_kl, \
                           int* row_status);                                                                    \
  }

DHO_FAST_DECLARE_ROWS(DEFAULT)
DHO_FAST_DECLARE_ROWS(AVX2)
DHO_FAST_DECLARE_ROWS(AVX512)
#undef DHO_FAST_DECLARE_ROWS

}  // namespace cpu
}  // namespace dho_fast
