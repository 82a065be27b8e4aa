// How the GPU kernels reduce a row with the statistics of row_math.h: each thread folds the columns it holds into
// a RowStat, the threads' statistics are merged (warp shuffles, then across warps), and each column's gradient
// follows from the merged statistic. Host and device code: tests/cpp/test_row_fold.cpp runs exactly this
// arithmetic on the CPU, with the column-to-thread split and merge order of csrc/cuda/dual_head_loss.cu.
#pragma once

#include <cstdint>

#include "row_math.h"

// Loops over a thread's columns must unroll on the GPU: a register array indexed by a loop variable would live in
// local memory.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define DHO_UNROLL _Pragma("unroll")
#else
#define DHO_UNROLL
#endif

namespace dho_fast {
namespace row_math {

// One thread's share of a row: softmax statistic of the CE-head logits (labelled rows only), KL statistic of
// teacher / T and student / T, and the label-smoothing sum sum_c (h x_c - h x_y) of cross_entropy_value.
template <typename T>
struct RowStat {
  SoftmaxStat<T> ce;
  KlStat<T> kl;
  T ce_sum;
};

template <typename T>
DHO_HD RowStat<T> row_empty() {
  return {softmax_empty<T>(), kl_empty<T>(), T(0)};
}

// Commutative bit for bit, so every lane of a butterfly ends with the same statistic.
template <typename T>
DHO_HD RowStat<T> row_merge(const RowStat<T>& x, const RowStat<T>& y) {
  return {softmax_merge(x.ce, y.ce), kl_merge(x.kl, y.kl), x.ce_sum + y.ce_sum};
}

// Folds E columns into s with one rescaling per statistic. x: CE-head logits (-inf when the row has no CE head),
// a: teacher / T, b: student / T. A column outside the row is -inf in all three and has no bit in `valid` (bit j:
// column j is in the row). target: the label's CE-head logit x_y, which every thread reads before the fold;
// h = smoothing_scale(C).
template <typename T, int E>
DHO_HD RowStat<T> row_fold(RowStat<T> s, const T (&x)[E], const T (&a)[E], const T (&b)[E], uint32_t valid,
                           T target, T h, bool do_ce) {
  static_assert(E <= 32, "valid has one bit per column");
  if (do_ce) {
    T m = s.ce.max;
    DHO_UNROLL for (int j = 0; j < E; ++j) m = nan_max(m, x[j]);
    const T base = exp_base(m), h_target = h * target;
    T sum = 0;
    DHO_UNROLL for (int j = 0; j < E; ++j) {
      sum += std::exp(x[j] - base);
      if (valid >> j & 1u) s.ce_sum += h * x[j] - h_target;
    }
    s.ce = softmax_merge(s.ce, SoftmaxStat<T>{m, sum});
  }
  T ma = s.kl.teacher.max, mb = s.kl.student.max;
  DHO_UNROLL for (int j = 0; j < E; ++j) {
    ma = nan_max(ma, a[j]);
    mb = nan_max(mb, b[j]);
  }
  const T base_a = exp_base(ma), base_b = exp_base(mb);
  T sa = 0, sb = 0, cross = 0;
  DHO_UNROLL for (int j = 0; j < E; ++j) {
    const T da = a[j] - base_a;
    const T ea = std::exp(da);
    sa += ea;
    if (ea > T(0)) cross += ea * (da - (b[j] - mb));  // masked teacher classes add exactly 0
    sb += std::exp(b[j] - base_b);
  }
  s.kl = kl_merge(s.kl, KlStat<T>{{ma, sa}, {mb, sb}, cross});
  return s;
}

// A row's loss values from its merged statistic and the label's logit: CE (0 without a CE head), KL and the teacher
// row status (kTeacherNonFinite also for an overflowing t / T: the kernels refine it with teacher_overflow_status).
template <typename T>
struct RowValues {
  T ce;
  T kl;
  int status;
};

template <typename T>
DHO_HD RowValues<T> row_values(const RowStat<T>& s, T target, T eps, long long num_classes, bool do_ce) {
  const T ce = do_ce ? cross_entropy_value(s.ce, target, s.ce_sum, eps, num_classes) : T(0);
  return {ce, kl_value(s.kl), teacher_row_status(s.kl.teacher.max)};
}

// Per-column gradients of the weighted terms, from the merged statistic and the row's weights w:
//   d ce_term / d x_c = w.ce (softmax(x)_c - eps / C - (1 - eps) [c = y]),  d kd_term / d z_c = w.kd (q_c - p_c) / T
template <typename T>
struct GradScales {
  T ce_base, ce_scale, ce_off, ce_target;
  T a_base, p_scale, b_base, q_scale;
};

template <typename T>
DHO_HD GradScales<T> grad_scales(const RowStat<T>& s, RowWeights<T> w, T eps, long long num_classes, T inv_t) {
  return {exp_base(s.ce.max),         w.ce / s.ce.sum,
          w.ce * eps / T(num_classes), w.ce * (T(1) - eps),
          exp_base(s.kl.teacher.max), w.kd * inv_t / s.kl.teacher.sum,
          exp_base(s.kl.student.max), w.kd * inv_t / s.kl.student.sum};
}

template <typename T>
DHO_HD T ce_grad(T x, bool is_target, const GradScales<T>& g) {
  return std::exp(x - g.ce_base) * g.ce_scale - g.ce_off - (is_target ? g.ce_target : T(0));
}

template <typename T>
DHO_HD T kd_grad(T a, T b, const GradScales<T>& g) {
  return std::exp(b - g.b_base) * g.q_scale - std::exp(a - g.a_base) * g.p_scale;
}

}  // namespace row_math
}  // namespace dho_fast
