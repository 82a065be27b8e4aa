// The CPU op through the dispatcher, as a C++ user of the library calls it, against a float64 computation with
// ATen ops (METHOD.md's loss): its terms, both gradients element by element, and the exception type of a bad label
// (c10::ValueError, Python's ValueError) and of a wrong dtype (c10::TypeError, Python's TypeError), also from the
// fused linear op.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

namespace {

using at::Tensor;
using Result = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

constexpr int64_t kIgnore = -100;
// float32's unit roundoff. The kernel's exp is within 20 ulp, and x - max rounds to a relative error of 1 ulp of
// the logit spread, which the exp turns into an absolute error of the exponent: a few dozen ulp of each probability
// at the spreads below.
constexpr double kUlp = std::numeric_limits<float>::epsilon() / 2;
constexpr double kUlps = 128;

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::printf("FAIL %s\n", what.c_str());
    ++failures;
  }
}

void expect_near(double got, double want, const char* what) {
  const bool ok = std::abs(got - want) <= kUlps * kUlp * std::abs(want);
  expect(ok, std::string(what) + ": got " + std::to_string(got) + ", want " + std::to_string(want));
}

// got (float32) against want (float64) element by element: |got - want| <= kUlps ulp of `scale`, the magnitude of
// the terms that want is the difference of (softmax and one-hot, q and p), so a gradient that is a small difference of
// large probabilities is not held to a precision float32 cannot give it, and the bound does not grow with the logits.
void expect_close(const Tensor& got, const Tensor& want, const Tensor& scale, const char* what) {
  const Tensor excess = (got.to(at::kDouble) - want).abs() - kUlps * kUlp * scale;
  const int64_t bad = (excess > 0).sum().item<int64_t>();
  if (bad) {
    const int64_t i = excess.argmax().item<int64_t>();
    std::printf("FAIL %s: %lld elements beyond %g ulp, worst at flat index %lld: got %.9g want %.9g\n", what,
                static_cast<long long>(bad), kUlps, static_cast<long long>(i),
                got.flatten()[i].item<double>(), want.flatten()[i].item<double>());
    ++failures;
  }
}

template <typename Error>
void expect_throws(const char* what, const std::string& message, auto&& call) {
  try {
    call();
    expect(false, std::string(what) + ": no exception");
  } catch (const Error& e) {
    const std::string text = e.what_without_backtrace();
    expect(text.find(message) != std::string::npos, std::string(what) + ": message \"" + text + "\"");
  } catch (const c10::Error& e) {
    expect(false, std::string(what) + ": wrong exception type, message \"" + e.what_without_backtrace() + "\"");
  }
}

}  // namespace

int main() {
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("dho_fast::dual_head_loss", "")
                      .typed<Result(const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, double, double,
                                    bool, int64_t, double, bool, bool, double, double, int64_t,
                                    const std::optional<Tensor>&, const std::optional<Tensor>&)>();
  at::manual_seed(0);
  const int64_t N = 24, C = 1001;
  const double T = 2.0, w_ce = 0.3, w_kd = 0.7;
  const Tensor ce = at::randn({N, C}) * 4, kd = at::randn({N, C}) * 4, t = at::randn({N, C}) * 4;
  Tensor labels = at::randint(0, C, {N}, at::kLong);
  labels.slice(0, 0, N, 3).fill_(kIgnore);

  const auto [loss, ce_term, kd_term, g_ce, g_kd] =
      op.call(ce, kd, t, labels, T, w_ce, w_kd, /*kd_split=*/true, kIgnore, 0.0, true, true,
              /*ce_grad_scale=*/w_ce, /*kd_grad_scale=*/w_kd, /*teacher_form=*/0, std::nullopt, std::nullopt);

  // float64 reference: ce_term = mean over the labelled rows of CE,
  // kd_term = T^2 (mean over labelled rows of KL(p || q) + mean over unlabelled rows of KL(p || q)),
  // p = softmax(t / T), q = softmax(kd / T).
  const Tensor lab = labels != kIgnore;
  const Tensor n_lab = lab.sum().to(at::kDouble), n_unl = (~lab).sum().to(at::kDouble);
  const Tensor safe_labels = labels.clamp_min(0);
  const Tensor softmax_ce = at::softmax(ce.to(at::kDouble), 1);
  const Tensor onehot = at::one_hot(safe_labels, C).to(at::kDouble) * lab.unsqueeze(1);
  const Tensor log_p = at::log_softmax(t.to(at::kDouble) / T, 1), log_q = at::log_softmax(kd.to(at::kDouble) / T, 1);
  const Tensor p = log_p.exp(), q = log_q.exp();
  const Tensor ce_rows = -(at::log_softmax(ce.to(at::kDouble), 1).gather(1, safe_labels.unsqueeze(1)).squeeze(1));
  const double want_ce = (ce_rows * lab).sum().item<double>() / n_lab.item<double>();
  const Tensor kl = (p * (log_p - log_q)).sum(1);
  const double want_kd = T * T * (kl.index({lab}).mean() + kl.index({~lab}).mean()).item<double>();

  expect_near(ce_term.item<double>(), want_ce, "ce_term");
  expect_near(kd_term.item<double>(), want_kd, "kd_term");
  expect_near(loss.item<double>(), w_ce * want_ce + w_kd * want_kd, "loss");

  // The gradients written are the grad scales (here the loss weights) times
  // d ce_term / d ce_logits = (softmax - onehot) / n_labelled on labelled rows, 0 on the others.
  const Tensor ce_row_weight = w_ce * lab.to(at::kDouble).unsqueeze(1) / n_lab;
  expect_close(g_ce, (softmax_ce - onehot) * ce_row_weight, (softmax_ce + onehot) * ce_row_weight, "ce gradient");
  expect((g_ce.index({~lab}) == 0).all().item<bool>(), "ce gradient of unlabelled rows is not exactly 0");
  // d kd_term / d kd_logits = T^2 / n_group * (q - p) / T, n_group the row's group (labelled or unlabelled).
  const Tensor kd_row_weight = (w_kd * T * at::where(lab, 1.0 / n_lab, 1.0 / n_unl)).unsqueeze(1);
  expect_close(g_kd, (q - p) * kd_row_weight, (q + p) * kd_row_weight, "kd gradient");

  // A sparse teacher (teacher_form 2): p_j on k = 5 classes per row, u on the others, [u, sum p log p] per row;
  // the same kd_term and KD gradient as the dense distribution it stands for.
  const int64_t top_k = 5;
  const Tensor top = std::get<1>(at::rand({N, C}).topk(top_k, 1));
  const Tensor p_top = at::softmax(at::randn({N, top_k}), 1) * 0.9;  // the listed mass; 0.1 spread over the rest
  const Tensor u = at::full({N}, 0.1 / double(C - top_k));
  const Tensor dense = u.unsqueeze(1).expand({N, C}).clone().scatter_(1, top, p_top).to(at::kDouble);
  const Tensor neg_entropy = (dense * dense.log()).sum(1).to(at::kFloat);
  const auto sparse = op.call(ce, kd, p_top, labels, T, w_ce, w_kd, true, kIgnore, 0.0, false, true, 1.0, w_kd, 2,
                              top, at::stack({u, neg_entropy}, 1));
  const Tensor sparse_kl = (dense * (dense.log() - log_q)).sum(1);
  expect_near(std::get<2>(sparse).item<double>(),
              T * T * (sparse_kl.index({lab}).mean() + sparse_kl.index({~lab}).mean()).item<double>(),
              "sparse kd_term");
  expect_close(std::get<4>(sparse), (q - dense) * kd_row_weight, (q + dense) * kd_row_weight, "sparse kd gradient");

  auto call = [&](const Tensor& c, const Tensor& k, const Tensor& y) {
    op.call(c, k, t, y, T, w_ce, w_kd, true, kIgnore, 0.0, false, false, 1.0, 1.0, 0, std::nullopt, std::nullopt);
  };
  Tensor bad_labels = labels.clone();
  bad_labels[1] = C;
  expect_throws<c10::ValueError>(
      "label out of range",
      "labels[1] = 1001 is out of range for 1001 classes (unlabelled rows must be ignore_index = -100)",
      [&] { call(ce, kd, bad_labels); });
  expect_throws<c10::TypeError>("float64 kd_logits", "kd_logits must have the dtype of ce_logits",
                                [&] { call(ce, kd.to(at::kDouble), labels); });
  expect_throws<c10::TypeError>("int32 labels", "labels must be int64",
                                [&] { call(ce, kd, labels.to(at::kInt)); });

  // The fused linear op checks its arguments through the same functions.
  const auto linear = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("dho_fast::fused_linear_dual_head_loss", "")
                          .typed<std::tuple<Tensor, Tensor, Tensor>(
                              const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
                              const std::optional<Tensor>&, const Tensor&, const Tensor&, bool, double, int64_t,
                              double, double, double, bool, int64_t, double, int64_t, const std::optional<Tensor>&,
                              const std::optional<Tensor>&)>();
  const Tensor features = at::randn({N, 8}), weight = at::randn({C, 8});
  auto call_linear = [&](const Tensor& kd_weight) {
    linear.call(features, weight, std::nullopt, kd_weight, std::nullopt, t, labels, false, 1.0, 8, T, w_ce, w_kd,
                true, kIgnore, 0.0, 0, std::nullopt, std::nullopt);
  };
  expect_throws<c10::ValueError>("kd_weight of the wrong shape",
                                 "kd_weight must have shape (C, D) = (1001, 8) as ce_weight, got [1001, 7]",
                                 [&] { call_linear(at::randn({C, 7})); });
  expect_throws<c10::TypeError>("float64 kd_weight", "kd_weight must have the dtype of features",
                                [&] { call_linear(weight.to(at::kDouble)); });

  if (failures) return 1;
  std::printf("cpu op: all checks passed\n");
  return 0;
}
