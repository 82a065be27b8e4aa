// Per-row arithmetic of the DHO loss, shared by the CPU kernel and the CUDA kernel.
//
// Everything here is an inline function of scalars (float or double) usable on host and device, so the CPU
// tests execute exactly the merge/rescale logic that the GPU kernels run. A row is reduced in pieces (vector
// lanes, blocks of columns, warp lanes); each piece yields a statistic relative to its own maximum, and pieces are
// combined with the merge functions below. That is the "online softmax": no piece needs the row's final maximum.
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DHO_HD __host__ __device__ __forceinline__
#else
#define DHO_HD inline
#endif

namespace dho_fast {
namespace row_math {

template <typename T>
DHO_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// max that propagates NaN, so a NaN anywhere in a row surfaces in the row's maximum (and is then reported).
template <typename T>
DHO_HD T nan_max(T a, T b) {
  return (a != a || a > b) ? a : b;
}

// The maximum to subtract before exp: 0 for an empty piece (max -inf), so exp(-inf - base) is 0, not NaN.
template <typename T>
DHO_HD T exp_base(T m) {
  return m == neg_inf<T>() ? T(0) : m;
}

// exp(old_max - new_max), with an empty piece (max = -inf) contributing nothing instead of exp(-inf + inf) = NaN.
template <typename T>
DHO_HD T rescale(T old_max, T new_max) {
  return old_max == neg_inf<T>() ? T(0) : std::exp(old_max - new_max);
}

// A softmax statistic of a set of logits x: max = max(x), sum = sum(exp(x - max)).
template <typename T>
struct SoftmaxStat {
  T max;
  T sum;
};

template <typename T>
DHO_HD SoftmaxStat<T> softmax_empty() {
  return {neg_inf<T>(), T(0)};
}

template <typename T>
DHO_HD SoftmaxStat<T> softmax_merge(SoftmaxStat<T> x, SoftmaxStat<T> y) {
  const T m = nan_max(x.max, y.max);
  return {m, x.sum * rescale(x.max, m) + y.sum * rescale(y.max, m)};
}

template <typename T>
DHO_HD SoftmaxStat<T> softmax_push(SoftmaxStat<T> s, T x) {
  return softmax_merge(s, SoftmaxStat<T>{x, x == neg_inf<T>() ? T(0) : T(1)});
}

template <typename T>
DHO_HD T logsumexp(SoftmaxStat<T> s) {
  return s.max + std::log(s.sum);
}

// Factor that turns exp(x - piece_max) into softmax(x) once the row statistic is known.
template <typename T>
DHO_HD T probability_factor(T piece_max, SoftmaxStat<T> row) {
  return rescale(piece_max, row.max) / row.sum;
}

// KL(p || q) of a teacher row a = t / T and a student row b = z / T, accumulated online:
//   cross = sum_c exp(a_c - teacher.max) * ((a_c - teacher.max) - (b_c - student.max))
// so that KL = cross / teacher.sum - log(teacher.sum) + log(student.sum). Keeping both logits relative to their
// own maxima keeps every term small, so KL near 0 is not the difference of two large logsumexps.
template <typename T>
struct KlStat {
  SoftmaxStat<T> teacher;
  SoftmaxStat<T> student;
  T cross;
};

template <typename T>
DHO_HD KlStat<T> kl_empty() {
  return {softmax_empty<T>(), softmax_empty<T>(), T(0)};
}

// Re-express a statistic relative to larger maxima (new_teacher_max >= teacher.max, same for the student).
template <typename T>
DHO_HD KlStat<T> kl_rebase(KlStat<T> s, T new_teacher_max, T new_student_max) {
  const T r = rescale(s.teacher.max, new_teacher_max);
  T cross = T(0);
  // A piece whose teacher mass vanishes at the new maximum (r = 0) adds nothing, as a masked class does: its maxima
  // may be more than float's maximum below the new ones, and 0 * (cross - sum * inf) would be NaN.
  if (s.teacher.sum != T(0) && r != T(0)) {
    const T shift = (new_teacher_max - s.teacher.max) - (new_student_max - s.student.max);
    cross = r * (s.cross - s.teacher.sum * shift);
  }
  return {{new_teacher_max, s.teacher.sum * r},
          {new_student_max, s.student.sum * rescale(s.student.max, new_student_max)},
          cross};
}

template <typename T>
DHO_HD KlStat<T> kl_merge(KlStat<T> x, KlStat<T> y) {
  const T ma = nan_max(x.teacher.max, y.teacher.max);
  const T mb = nan_max(x.student.max, y.student.max);
  const KlStat<T> xr = kl_rebase(x, ma, mb);
  const KlStat<T> yr = kl_rebase(y, ma, mb);
  return {{ma, xr.teacher.sum + yr.teacher.sum}, {mb, xr.student.sum + yr.student.sum}, xr.cross + yr.cross};
}

// One column: teacher logit a, student logit b (both already divided by the temperature).
template <typename T>
DHO_HD KlStat<T> kl_push(KlStat<T> s, T a, T b) {
  const bool masked = a == neg_inf<T>();
  const KlStat<T> one{{a, masked ? T(0) : T(1)}, {b, b == neg_inf<T>() ? T(0) : T(1)}, T(0)};
  return kl_merge(s, one);
}

template <typename T>
DHO_HD T kl_value(KlStat<T> s) {
  return s.cross / s.teacher.sum - std::log(s.teacher.sum) + std::log(s.student.sum);
}

// How the teacher reaches a loss op (its schema's teacher_form; dho_fast/ops/teacher.py builds the arguments):
//   kTeacherLogits: teacher (N, C) logits t, p = softmax(t / T);
//   kTeacherProbs:  teacher (N, C) probabilities, read as the logits T log(p) (exp(-inf) = 0 is a masked class), so
//                   p = row / sum(row) and every statistic below is the logits form's;
//   kTeacherSparse: p given on k classes per row (teacher (N, k) in the accumulation dtype, normalised, at
//                   teacher_indices (N, k)) and u (teacher_row_terms[:, 0]) on each of the other C - k classes;
//                   teacher_row_terms[:, 1] = sum_c p_c log p_c, exact, computed once from the k values.
enum TeacherForm : int { kTeacherLogits = 0, kTeacherProbs = 1, kTeacherSparse = 2 };

// KL(p || q) of a sparse teacher (kTeacherSparse) and the student's softmax statistic of b = z / T:
//   KL = sum_c p_c log p_c - sum_c p_c (b_c - student.max) + log(student.sum),
// where cross = sum_c p_c (b_c - student.max) = sum_j (p_j - u) (b_j - max) + u sum_c (b_c - max) is summed over
// the k listed classes and, when u > 0, the whole row.
template <typename T>
DHO_HD T sparse_kl_value(SoftmaxStat<T> student, T cross, T neg_entropy) {
  return neg_entropy - cross + std::log(student.sum);
}

// Status of a teacher row, judged from the maximum of a = t / T alone (NaN and +inf propagate into the maximum).
// kTeacherOverflow: t itself is finite (or -inf) but t / T is not, which the maximum cannot tell from a NaN or +inf
// in t; teacher_overflow_status tells them apart once a row is known to be invalid.
enum TeacherRowStatus : int { kTeacherOk = 0, kTeacherNonFinite = 1, kTeacherAllMasked = 2, kTeacherOverflow = 3 };

template <typename T>
DHO_HD int teacher_row_status(T teacher_max) {
  if (teacher_max != teacher_max || teacher_max == std::numeric_limits<T>::infinity()) return kTeacherNonFinite;
  if (teacher_max == neg_inf<T>()) return kTeacherAllMasked;
  return kTeacherOk;
}

// The status of a row that teacher_row_status found kTeacherNonFinite, from its raw teacher logits t[0, C) (the
// input type, no wider than T): kTeacherNonFinite when t has a NaN or +inf, else kTeacherOverflow. Reads the row again, so
// the kernels call it only on that error path.
template <typename T, typename S>
DHO_HD int teacher_overflow_status(const S* t, long long num_classes) {
  for (long long c = 0; c < num_classes; ++c) {
    const T v = static_cast<T>(t[c]);
    if (v != v || v == std::numeric_limits<T>::infinity()) return kTeacherNonFinite;
  }
  return kTeacherOverflow;
}

// The factor h of the label-smoothing sum (cross_entropy_value): the largest power of two with h * C <= 1/2.
// Multiplying by a power of two is exact, and it keeps the sum of C differences of two floats representable.
template <typename T>
DHO_HD T smoothing_scale(long long num_classes) {
  T h = T(0.5);
  for (long long n = 1; n < num_classes; n *= 2) h *= T(0.5);
  return h;
}

// Cross-entropy with label smoothing eps over C classes, from the softmax statistic s = (m, sum_c exp(x_c - m)) of
// the row's logits x, the label's logit x_y and the smoothing sum d = sum_c (h x_c - h x_y), h = smoothing_scale(C):
//   CE = lse - (1 - eps) x_y - (eps / C) sum_c x_c = (m - x_y) + log s + eps (x_y - mean_c x_c)
//      = (m - x_y) + log s - eps / (C h) * d
// Each term is a difference of nearby logits (exact in floating point) or of order log C, as in eager PyTorch's
// log_softmax (x - m - log s): lse - x_y would round lse at the ulp of the logits (8e-4 at 1e5 in float32), and a sum
// of raw logits would do the same to the smoothing term.
template <typename T>
DHO_HD T cross_entropy_value(SoftmaxStat<T> s, T target_logit, T smoothing_sum, T eps, long long num_classes) {
  T ce = (s.max - target_logit) + std::log(s.sum);
  // A label whose logit is -inf has CE +inf, smoothed or not; its smoothing sum is NaN (-inf - -inf).
  if (eps != T(0) && target_logit != neg_inf<T>()) {
    ce -= eps / (T(num_classes) * smoothing_scale<T>(num_classes)) * smoothing_sum;
  }
  return ce;
}

// Each row's weight in the two loss terms (unweighted by ce_loss_weight / kd_loss_weight; the KD term includes T^2).
//   ce_term = sum_{i labelled} ce_row * CE_i,   ce_row = 1 / n_labelled
//   kd_term = sum_i kd_row_i * KL_i,            kd_row_i = T^2 / n_group(i) ("split") or T^2 / N ("mean")
template <typename T>
struct RowWeights {
  T ce;
  T kd;
};

template <typename T>
DHO_HD RowWeights<T> row_weights(bool labelled, long long n_labelled, long long n_rows, bool kd_split,
                                 T temperature) {
  const T t2 = temperature * temperature;
  const long long n_unlabelled = n_rows - n_labelled;
  const T ce = labelled ? T(1) / T(n_labelled) : T(0);
  const long long group = kd_split ? (labelled ? n_labelled : n_unlabelled) : n_rows;
  return {ce, t2 / T(group)};
}

}  // namespace row_math
}  // namespace dho_fast
