// The GPU kernels' per-row arithmetic (csrc/row_fold.h), run on the CPU with their column-to-thread split and
// merge order (csrc/cuda/dual_head_loss.cu): a warp per row (lane l holds vectors l, l + 32, ... and the lanes
// merge as a butterfly) and a block per row (threads hold steps of consecutive columns; warps merge, then warp 0
// merges the warps). Loss values, teacher status and every gradient are compared with a direct long double
// computation on random and adversarial rows.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "row_fold.h"

namespace rm = dho_fast::row_math;
using Stat = rm::RowStat<float>;

static int failures = 0;

static void expect_near(double got, double want, double tol, const char* what, int c = -1) {
  if (!(std::fabs(got - want) <= tol * (1.0 + std::fabs(want)))) {
    std::printf("FAIL %s (column %d): got %.9g want %.9g\n", what, c, got, want);
    ++failures;
  }
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kT = 2.0f, kInvT = 1.0f / kT;

struct Case {
  std::vector<float> ce, kd, t;
  int label;  // -1: no CE head (unlabelled row)
  float eps;
};

struct Result {
  rm::RowValues<float> values;
  std::vector<float> g_ce, g_kd;
};

static bool same_bits(const Stat& x, const Stat& y) {
  // NaN payloads and signs of zero may differ between lanes; everything else must be identical.
  const float fx[] = {x.ce.max, x.ce.sum, x.kl.teacher.max, x.kl.teacher.sum, x.kl.student.max, x.kl.student.sum,
                      x.kl.cross, x.ce_sum};
  const float fy[] = {y.ce.max, y.ce.sum, y.kl.teacher.max, y.kl.teacher.sum, y.kl.student.max, y.kl.student.sum,
                      y.kl.cross, y.ce_sum};
  for (int i = 0; i < 8; ++i)
    if (!(fx[i] == fy[i] || (std::isnan(fx[i]) && std::isnan(fy[i])))) return false;
  return true;
}

// Statistic and gradients from the merged statistic, as the kernels' epilogue computes them.
static Result finish(const Case& c, const Stat& s) {
  const long long C = (long long)c.kd.size();
  const bool do_ce = c.label >= 0;
  const auto w = rm::row_weights<float>(do_ce, 3, 8, true, kT);
  const float target = do_ce ? c.ce[c.label] : 0.0f;
  Result r{rm::row_values(s, target, c.eps, C, do_ce), std::vector<float>(C), std::vector<float>(C)};
  // The kernels refine an invalid status from the raw teacher row.
  if (r.values.status == rm::kTeacherNonFinite) r.values.status = rm::teacher_overflow_status<float>(c.t.data(), C);
  const auto g = rm::grad_scales(s, w, c.eps, C, kInvT);
  for (long long j = 0; j < C; ++j) {
    r.g_ce[j] = do_ce ? rm::ce_grad(c.ce[j], j == c.label, g) : 0.0f;
    r.g_kd[j] = rm::kd_grad(c.t[j] * kInvT, c.kd[j] * kInvT, g);
  }
  return r;
}

// A lane or thread's columns as the kernels load them: -inf outside the row, bit j of valid for column j inside.
template <int E>
static Stat fold_columns(const Case& c, const long long* cols, Stat s = rm::row_empty<float>()) {
  const long long C = (long long)c.kd.size();
  const bool do_ce = c.label >= 0;
  float x[E], a[E], b[E];
  uint32_t valid = 0;
  for (int j = 0; j < E; ++j) {
    const bool inside = cols[j] < C;
    x[j] = inside && do_ce ? c.ce[cols[j]] : kNegInf;
    a[j] = inside ? c.t[cols[j]] * kInvT : kNegInf;
    b[j] = inside ? c.kd[cols[j]] * kInvT : kNegInf;
    if (inside) valid |= 1u << j;
  }
  const float target = do_ce ? c.ce[c.label] : 0.0f;
  return rm::row_fold(s, x, a, b, valid, target, rm::smoothing_scale<float>(C), do_ce);
}

// Butterfly over 32 lanes; every lane must end with the same statistic.
static Stat butterfly(std::vector<Stat> lanes) {
  for (int mask = 16; mask > 0; mask >>= 1) {
    std::vector<Stat> next(32);
    for (int l = 0; l < 32; ++l) next[l] = rm::row_merge(lanes[l], lanes[l ^ mask]);
    lanes = next;
  }
  for (int l = 1; l < 32; ++l)
    if (!same_bits(lanes[l], lanes[0])) {
      std::printf("FAIL lanes disagree after the butterfly (lane %d)\n", l);
      ++failures;
    }
  return lanes[0];
}

// warp_rows_kernel: lane l holds the V-column vectors l, l + 32, ..., K of them.
template <int V, int K>
static Stat warp_row(const Case& c) {
  std::vector<Stat> lanes(32);
  for (int l = 0; l < 32; ++l) {
    long long cols[K * V];
    for (int k = 0; k < K; ++k)
      for (int j = 0; j < V; ++j) cols[k * V + j] = (long long)(l + 32 * k) * V + j;
    lanes[l] = fold_columns<K * V>(c, cols);
  }
  return butterfly(lanes);
}

// block_rows_kernel: thread t folds steps of E columns at t * E, t * E + threads * E, ...
template <int E>
static Stat block_row(const Case& c, int threads) {
  const long long C = (long long)c.kd.size();
  std::vector<Stat> thread_stats(threads, rm::row_empty<float>());
  for (int t = 0; t < threads; ++t)
    for (long long col = (long long)t * E; col < C; col += (long long)threads * E) {
      long long cols[E];
      for (int j = 0; j < E; ++j) cols[j] = col + j;
      thread_stats[t] = fold_columns<E>(c, cols, thread_stats[t]);
    }
  std::vector<Stat> warps(32, rm::row_empty<float>());
  for (int w = 0; w < threads / 32; ++w)
    warps[w] = butterfly(std::vector<Stat>(thread_stats.begin() + 32 * w, thread_stats.begin() + 32 * (w + 1)));
  return butterfly(warps);
}

// Direct long double computation of the same quantities.
static void check_against_direct(const Case& c, const Result& r, const char* what) {
  const size_t C = c.kd.size();
  const bool do_ce = c.label >= 0;
  const auto w = rm::row_weights<double>(do_ce, 3, 8, true, kT);
  // log softmax with the maximum subtracted first: m + log s would lose log s at 3e38 even in long double.
  auto log_softmax = [](const std::vector<long double>& v) {
    long double m = -INFINITY, s = 0;
    for (auto x : v) m = std::max(m, x);
    for (auto x : v) s += std::exp(x - m);
    std::vector<long double> out(v.size());
    for (size_t j = 0; j < v.size(); ++j) out[j] = (v[j] - m) - std::log(s);
    return out;
  };
  std::vector<long double> x(C), a(C), b(C);
  for (size_t j = 0; j < C; ++j) {
    x[j] = c.ce[j];
    a[j] = (long double)(c.t[j] * kInvT);
    b[j] = (long double)(c.kd[j] * kInvT);
  }
  const std::vector<long double> lp = log_softmax(a), lq = log_softmax(b), lx = log_softmax(x);
  // float32 rounding of logits relative to their maxima: the absolute error grows with the spread of a row (its
  // finite logits' distance to the maximum), not with a constant added to it.
  long double spread = 1, kl = 0;
  for (size_t j = 0; j < C; ++j) {
    if (std::isfinite((double)lp[j])) spread = std::max(spread, -lp[j]);
    if (std::isfinite((double)lq[j])) spread = std::max(spread, -lq[j]);
    if (std::isfinite((double)a[j])) kl += std::exp(lp[j]) * (lp[j] - lq[j]);
  }
  const double tol = 4e-6 * (double)spread;
  expect_near(r.values.kl, (double)kl, tol, what);
  if (r.values.status != rm::kTeacherOk) {
    std::printf("FAIL %s: status %d for a valid teacher row\n", what, r.values.status);
    ++failures;
  }
  const long double eps = c.eps;  // (1 - eps) in float would round at the ulp of the logits times 2^-24
  if (do_ce) {
    // CE = -sum_c target_c log softmax_c, held to its terms' size whatever constant the row is shifted by.
    long double ce = 0, terms = 0;
    for (size_t j = 0; j < C; ++j) {
      ce -= (((long long)j == c.label ? 1 - eps : 0) + eps / C) * lx[j];
      terms += eps / C * std::fabs(lx[j] - lx[c.label]);
    }
    terms -= lx[c.label];
    expect_near(r.values.ce, (double)ce, 4e-6 * (double)((1 + terms) / (1 + std::fabs(ce))), what);
  }
  for (size_t j = 0; j < C; ++j) {
    const long double p = std::isfinite((double)a[j]) ? std::exp(lp[j]) : 0, q = std::exp(lq[j]);
    expect_near(r.g_kd[j], (double)(w.kd / kT * (q - p)), 2e-6, what, (int)j);
    const long double gce = do_ce ? w.ce * (std::exp(lx[j]) - eps / C - ((long long)j == c.label ? 1 - eps : 0)) : 0;
    expect_near(r.g_ce[j], (double)gce, 2e-6, what, (int)j);
  }
}

static void check_case(const Case& c, const char* what) {
  const int C = (int)c.kd.size();
  if (C <= 1024) {
    check_against_direct(c, finish(c, warp_row<4, 8>(c)), what);  // float: 16-byte vectors of 4
    check_against_direct(c, finish(c, warp_row<8, 4>(c)), what);  // bfloat16 / half: vectors of 8
  }
  for (int threads : {128, 1024}) check_against_direct(c, finish(c, block_row<8>(c, threads)), what);
}

static Case random_case(std::mt19937& gen, int C, float scale, int label, float eps) {
  std::normal_distribution<float> normal;
  Case c{std::vector<float>(C), std::vector<float>(C), std::vector<float>(C), label, eps};
  for (int j = 0; j < C; ++j) {
    c.ce[j] = scale * normal(gen);
    c.kd[j] = scale * normal(gen);
    c.t[j] = scale * normal(gen);
  }
  return c;
}

static int status_of(const Case& c) {
  return finish(c, warp_row<4, 8>(c)).values.status;
}

int main() {
  std::mt19937 gen(7);
  for (int C : {1, 3, 31, 32, 33, 129, 997, 1024, 1500, 21843})
    for (float scale : {1e-3f, 3.0f, 1e4f})
      for (float eps : {0.0f, 0.1f}) {
        check_case(random_case(gen, C, scale, C / 2, eps), "random row");
        check_case(random_case(gen, C, scale, -1, eps), "random unlabelled row");
      }

  Case masked = random_case(gen, 997, 3.0f, 996, 0.1f);
  for (int j = 0; j < 997; j += 3) masked.t[j] = kNegInf;  // masked teacher classes, the student's too
  for (int j = 0; j < 997; j += 6) masked.kd[j] = kNegInf;
  check_case(masked, "masked teacher classes");

  Case one = random_case(gen, 700, 1.0f, 5, 0.0f);  // all -inf but one: p is one-hot
  for (int j = 0; j < 700; ++j) one.t[j] = j == 333 ? 2.5f : kNegInf;
  check_case(one, "one finite teacher entry");

  Case equal{std::vector<float>(513, 7.25f), std::vector<float>(513, 7.25f), std::vector<float>(513, 7.25f), 0, 0.2f};
  check_case(equal, "all equal");

  Case spread = random_case(gen, 64, 1.0f, 1, 0.0f);  // 1e4 spreads: naive exp overflows
  spread.t[0] = 1e4f;
  spread.t[1] = -1e4f;
  spread.kd[2] = 1e4f;
  spread.ce[3] = -1e4f;
  spread.ce[1] = 1e4f;
  check_case(spread, "1e4 spread");

  // A constant added to a row changes no loss: the values stay as accurate as at 0 (the CE term rounded lse - x_y
  // at the ulp of the logits before row_math computed it relative to the row's maximum).
  for (float shift : {1e4f, 1e5f, 1e6f, 1e7f})
    for (float eps : {0.0f, 0.1f})
      for (int label : {-1, 0, 499}) {
        Case shifted = random_case(gen, 1000, 3.0f, label, eps);
        for (auto* v : {&shifted.ce, &shifted.kd, &shifted.t})
          for (float& x : *v) x += shift;
        check_case(shifted, "shifted row");
      }
  // Near float32's maximum: constant rows (CE = log C, KL = 0), and rows of +-3e38 with the label on a +3e38 entry,
  // where x_c - x_y alone (-6e38) would overflow the smoothing sum.
  for (float eps : {0.0f, 0.1f}) {
    Case constant{std::vector<float>(700, 3e38f), std::vector<float>(700, 3e38f), std::vector<float>(700, 3e38f), 3,
                  eps};
    check_case(constant, "constant 3e38 row");
    Case signs = random_case(gen, 700, 1.0f, 3, eps);
    for (int j = 0; j < 700; ++j) {
      signs.ce[j] = j % 3 == 1 ? -3e38f : 3e38f;
      signs.kd[j] = signs.t[j] = j % 5 == 2 ? -3e38f : 3e38f;
    }
    check_case(signs, "+-3e38 row");
  }

  // Invalid teacher rows surface in the status, whichever lane holds the bad column.
  for (int col : {0, 31, 32, 700, 999}) {
    Case bad = random_case(gen, 1000, 1.0f, 3, 0.0f);
    bad.t[col] = std::nanf("");
    if (status_of(bad) != rm::kTeacherNonFinite) {
      std::printf("FAIL NaN teacher entry at column %d not reported\n", col);
      ++failures;
    }
    bad.t[col] = std::numeric_limits<float>::infinity();
    if (status_of(bad) != rm::kTeacherNonFinite) {
      std::printf("FAIL +inf teacher entry at column %d not reported\n", col);
      ++failures;
    }
  }
  Case all_masked = random_case(gen, 40, 1.0f, 3, 0.0f);
  for (float& v : all_masked.t) v = kNegInf;
  if (status_of(all_masked) != rm::kTeacherAllMasked) {
    std::printf("FAIL all -inf teacher row not reported\n");
    ++failures;
  }

  if (failures) {
    std::printf("%d row-fold checks failed\n", failures);
    return 1;
  }
  std::printf("row fold: all checks passed\n");
  return 0;
}
