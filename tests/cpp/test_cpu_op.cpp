// The CPU op through the dispatcher, as a C++ user of the library calls it, against a float64 computation with
// ATen ops.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <tuple>

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

int main() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("dho_fast::dual_head_loss", "")
                .typed<Result(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                              double, double, bool, int64_t, double, bool, bool)>();
  at::manual_seed(0);
  const int64_t N = 24, C = 1001;
  const double T = 2.0;
  const at::Tensor ce = at::randn({N, C}) * 4, kd = at::randn({N, C}) * 4, t = at::randn({N, C}) * 4;
  at::Tensor labels = at::randint(0, C, {N}, at::kLong);
  labels.slice(0, 0, N, 3).fill_(-100);

  const auto [loss, ce_term, kd_term, g_ce, g_kd] = op.call(ce, kd, t, labels, T, 0.5, 0.5, true, -100, 0.0, true, true);

  const at::Tensor lab = labels != -100;
  const at::Tensor ce64 = ce.to(at::kDouble).index({lab});
  const double want_ce = at::cross_entropy_loss(ce64, labels.index({lab})).item<double>();
  const at::Tensor log_p = at::log_softmax(t.to(at::kDouble) / T, 1), log_q = at::log_softmax(kd.to(at::kDouble) / T, 1);
  const at::Tensor kl = (log_p.exp() * (log_p - log_q)).sum(1);
  const double want_kd = T * T * (kl.index({lab}).mean() + kl.index({~lab}).mean()).item<double>();

  int failures = 0;
  auto check = [&](const char* what, double got, double want) {
    if (std::abs(got - want) > 1e-5 * (1 + std::abs(want))) {
      std::printf("FAIL %s: got %.9g want %.9g\n", what, got, want);
      ++failures;
    }
  };
  check("ce_term", ce_term.item<double>(), want_ce);
  check("kd_term", kd_term.item<double>(), want_kd);
  check("loss", loss.item<double>(), 0.5 * want_ce + 0.5 * want_kd);
  // Each labelled row's CE gradient sums to 0 (softmax minus one-hot); the KD gradient too (q - p).
  check("sum of ce gradient", g_ce.sum().item<double>(), 0.0);
  check("sum of kd gradient", g_kd.sum().item<double>(), 0.0);
  if (failures) return 1;
  std::printf("cpu op: all checks passed\n");
  return 0;
}
