// Unit tests of csrc/row_math.h: the online statistics, merged in any order and any grouping, must agree with a
// direct two-pass computation in long double, including on adversarial rows.
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "row_math.h"

namespace rm = dho_fast::row_math;

static int failures = 0;

#define EXPECT_NEAR(got, want, tol, what)                                                              \
  do {                                                                                                 \
    const double g_ = (got), w_ = (want);                                                              \
    if (!(std::fabs(g_ - w_) <= (tol) * (1.0 + std::fabs(w_)))) {                                       \
      std::printf("FAIL %s:%d %s: got %.17g want %.17g\n", __FILE__, __LINE__, (what), g_, w_);        \
      ++failures;                                                                                      \
    }                                                                                                  \
  } while (0)

#define EXPECT_TRUE(cond, what)                                              \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::printf("FAIL %s:%d %s\n", __FILE__, __LINE__, (what));            \
      ++failures;                                                            \
    }                                                                        \
  } while (0)

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

long double direct_lse(const std::vector<float>& x) {
  long double m = -INFINITY;
  for (float v : x) m = std::max<long double>(m, v);
  long double s = 0;
  for (float v : x) s += std::exp((long double)v - m);
  return m + std::log(s);
}

long double direct_kl(const std::vector<float>& a, const std::vector<float>& b) {
  const long double la = direct_lse(a), lb = direct_lse(b);
  long double kl = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] == kNegInf) continue;
    const long double lp = a[i] - la;
    kl += std::exp(lp) * (lp - (b[i] - lb));
  }
  return kl;
}

// Reduces [lo, hi) as a balanced tree of merges, the way warp shuffles and blocks combine partial statistics.
rm::KlStat<float> tree_kl(const std::vector<float>& a, const std::vector<float>& b, size_t lo, size_t hi) {
  if (hi - lo == 1) return rm::kl_push(rm::kl_empty<float>(), a[lo], b[lo]);
  const size_t mid = (lo + hi) / 2;
  return rm::kl_merge(tree_kl(a, b, lo, mid), tree_kl(a, b, mid, hi));
}

void check_row(const std::vector<float>& a, const std::vector<float>& b, const char* what) {
  rm::KlStat<float> forward = rm::kl_empty<float>(), backward = rm::kl_empty<float>();
  rm::SoftmaxStat<float> s = rm::softmax_empty<float>();
  for (size_t i = 0; i < a.size(); ++i) {
    forward = rm::kl_push(forward, a[i], b[i]);
    s = rm::softmax_push(s, b[i]);
  }
  for (size_t i = a.size(); i-- > 0;) backward = rm::kl_push(backward, a[i], b[i]);
  const rm::KlStat<float> tree = tree_kl(a, b, 0, a.size());
  const long double want = direct_kl(a, b);
  // Absolute tolerance scaled by the logits' magnitude: float32 rounding of a - max and b - max.
  long double mag = 1;
  for (size_t i = 0; i < a.size(); ++i) mag = std::max<long double>(mag, std::fabs((long double)b[i]));
  const double tol = 2e-6 * (double)mag;
  EXPECT_NEAR(rm::kl_value(forward), want, tol, what);
  EXPECT_NEAR(rm::kl_value(backward), want, tol, what);
  EXPECT_NEAR(rm::kl_value(tree), want, tol, what);
  EXPECT_NEAR(rm::logsumexp(s), direct_lse(b), 1e-6, what);
  EXPECT_NEAR(rm::logsumexp(forward.teacher), direct_lse(a), 1e-6, what);
}

int main() {
  std::mt19937 gen(1234);
  std::normal_distribution<float> normal;

  for (int n : {1, 2, 3, 31, 1000}) {
    for (float scale : {1e-3f, 1.0f, 50.0f, 1e4f}) {
      std::vector<float> a(n), b(n);
      for (int i = 0; i < n; ++i) {
        a[i] = scale * normal(gen);
        b[i] = scale * normal(gen);
      }
      check_row(a, b, "random row");
      for (int i = 0; i < n; i += 2) a[i] = kNegInf;  // masked teacher classes
      if (n > 1) check_row(a, b, "half-masked row");
    }
  }

  // All -inf but one: p is one-hot, KL = -log q_k.
  std::vector<float> a(97, kNegInf), b(97);
  for (int i = 0; i < 97; ++i) b[i] = 0.1f * i;
  a[40] = 3.0f;
  check_row(a, b, "one finite teacher entry");
  a[0] = 5.0f;  // and the first element finite, the rest -inf: exercises rescaling from the first piece
  check_row(a, b, "two finite teacher entries");

  // All equal: uniform distributions, KL = 0 exactly in exact arithmetic.
  std::vector<float> eq(512, 7.25f);
  check_row(eq, eq, "all equal");

  // 1e4 spreads: naive exp overflows.
  std::vector<float> big_a{1e4f, -1e4f, 0.0f, 9999.0f}, big_b{-1e4f, 1e4f, 5e3f, 0.0f};
  check_row(big_a, big_b, "1e4 spread");

  // Pieces whose maxima are more than float's maximum apart (rows of +-3e38 at T = 1): the lower piece's teacher mass
  // vanishes and adds nothing, instead of 0 * inf = NaN. Teacher and student agree, so KL = 0.
  std::vector<float> far(8, -3e38f);
  for (int i = 5; i < 8; ++i) far[i] = 3e38f;
  const auto low = tree_kl(far, far, 0, 5), high = tree_kl(far, far, 5, 8);
  EXPECT_TRUE(rm::kl_value(rm::kl_merge(low, high)) == 0.0f, "pieces more than float's maximum apart");
  EXPECT_TRUE(rm::kl_value(rm::kl_merge(high, low)) == 0.0f, "the same, merged the other way");

  // Merging empty pieces never makes NaN.
  const auto empty = rm::kl_merge(rm::kl_empty<float>(), rm::kl_empty<float>());
  EXPECT_TRUE(empty.teacher.sum == 0 && empty.cross == 0 && !std::isnan(empty.cross), "empty merge");
  const auto masked_only = rm::kl_push(rm::kl_empty<float>(), kNegInf, 1.0f);
  const auto merged = rm::kl_merge(masked_only, rm::kl_push(rm::kl_empty<float>(), 2.0f, 1.0f));
  EXPECT_NEAR(rm::kl_value(merged), direct_kl({kNegInf, 2.0f}, {1.0f, 1.0f}), 1e-6, "masked then finite");

  // Teacher status from the row maximum.
  EXPECT_TRUE(rm::teacher_row_status(std::nanf("")) == rm::kTeacherNonFinite, "NaN teacher");
  EXPECT_TRUE(rm::teacher_row_status(std::numeric_limits<float>::infinity()) == rm::kTeacherNonFinite, "+inf");
  EXPECT_TRUE(rm::teacher_row_status(kNegInf) == rm::kTeacherAllMasked, "all -inf");
  EXPECT_TRUE(rm::teacher_row_status(0.0f) == rm::kTeacherOk, "finite");
  // An invalid row's status from its raw logits: NaN or +inf in t itself, or a finite t whose t / T overflowed.
  const float finite_row[] = {3e38f, kNegInf, -1.0f}, inf_row[] = {3e38f, INFINITY, 1.0f};
  const float nan_row[] = {1.0f, std::nanf(""), 2.0f};
  EXPECT_TRUE(rm::teacher_overflow_status<float>(finite_row, 3) == rm::kTeacherOverflow, "overflowing t / T");
  EXPECT_TRUE(rm::teacher_overflow_status<float>(inf_row, 3) == rm::kTeacherNonFinite, "+inf in t");
  EXPECT_TRUE(rm::teacher_overflow_status<float>(nan_row, 3) == rm::kTeacherNonFinite, "NaN in t");
  EXPECT_TRUE(std::isnan(rm::nan_max(1.0f, std::nanf(""))) && std::isnan(rm::nan_max(std::nanf(""), 1.0f)),
              "nan_max propagates NaN from either side");

  // Cross-entropy with label smoothing against its definition, -sum_c target_c log softmax_c in long double, from
  // float statistics: at 0, shifted by up to 1e7 (where lse - x_y rounds lse at the ulp of the logits: 1 at 1e7), and
  // near float's maximum (where x_c - x_y overflows without the smoothing scale h). The tolerance is an ulp of the
  // CE's terms, whatever the shift.
  for (float shift : {0.0f, 1e4f, 1e5f, 1e6f, 1e7f, 3e38f}) {
    for (float eps : {0.0f, 0.2f}) {
      std::vector<float> z{1.0f, -2.0f, 0.5f, 3.0f, 3.0f};
      if (shift == 3e38f) {
        z = {3e38f, -3e38f, 3e38f, -1e38f, 3e38f};
      } else {
        for (float& v : z) v += shift;
      }
      const int y = 2, C = int(z.size());
      const float h = rm::smoothing_scale<float>(C);
      rm::SoftmaxStat<float> s = rm::softmax_empty<float>();
      float d = 0;
      for (float v : z) {
        s = rm::softmax_push(s, v);
        d += h * v - h * z[y];
      }
      // log softmax with the maximum subtracted first: m + log s loses log s at 3e38, even in long double.
      long double m = -INFINITY, sum_exp = 0;
      for (float v : z) m = std::max<long double>(m, v);
      for (float v : z) sum_exp += std::exp(v - m);
      auto log_p = [&](int c) { return ((long double)z[c] - m) - std::log(sum_exp); };
      long double want = 0, terms = -log_p(y);
      for (int c = 0; c < C; ++c) {
        want -= ((c == y ? 1 - (long double)eps : 0) + (long double)eps / C) * log_p(c);
        terms += (long double)eps / C * std::fabs((long double)z[c] - z[y]);
      }
      const double got = rm::cross_entropy_value(s, z[y], d, eps, C);
      EXPECT_NEAR(got, (double)want, 1e-6 * (double)(terms / (1 + std::fabs(want))), "cross-entropy of a shifted row");
    }
  }
  EXPECT_TRUE(rm::smoothing_scale<float>(1) == 0.5f && rm::smoothing_scale<float>(4) == 0.125f &&
                  rm::smoothing_scale<float>(5) == 0.0625f && rm::smoothing_scale<double>(1000) == 1.0 / 2048,
              "smoothing scale: the largest power of two h with h C <= 1/2");
  // A label whose logit is -inf: CE = +inf, smoothed or not (its smoothing sum is NaN).
  const rm::SoftmaxStat<float> one{1.0f, 1.0f};
  EXPECT_TRUE(rm::cross_entropy_value(one, kNegInf, std::nanf(""), 0.1f, 2) == INFINITY, "-inf label logit");

  // Row weights: split means per group, mean over all rows; the KD weight carries T^2.
  const auto lab = rm::row_weights<double>(true, 4, 10, true, 2.0);
  const auto unl = rm::row_weights<double>(false, 4, 10, true, 2.0);
  const auto all = rm::row_weights<double>(false, 4, 10, false, 2.0);
  EXPECT_NEAR(lab.ce, 0.25, 0, "ce weight");
  EXPECT_NEAR(lab.kd, 1.0, 0, "split labelled");
  EXPECT_NEAR(unl.kd, 4.0 / 6.0, 1e-15, "split unlabelled");
  EXPECT_NEAR(unl.ce, 0.0, 0, "no ce on unlabelled");
  EXPECT_NEAR(all.kd, 0.4, 1e-15, "mean");

  if (failures) {
    std::printf("%d row-math checks failed\n", failures);
    return 1;
  }
  std::printf("row math: all checks passed\n");
  return 0;
}
