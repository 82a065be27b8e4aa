// The k-center step's summation order (csrc/kcenter_row.h) where the Python tests cannot see it:
//   - the CPU op, through the dispatcher, in each instruction-set build (ATEN_CPU_CAPABILITY), computes the running
//     minimum to the bits of kcenter::sq_distance, the order's column-at-a-time definition, and returns its first
//     maximum;
//   - the CUDA kernel's thread layout (csrc/cuda/kcenter.cu: 64 / E threads per row, thread t holding lanes
//     [t E, (t + 1) E), shuffles down by 32 / E, ..., 1, then the thread's own lanes), run here on the CPU, gives the
//     same bits;
//   - argmax keys order as (value descending, row ascending), with -0 as +0 and no key for a negative or NaN value.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "kcenter_row.h"

namespace {

namespace kc = dho_fast::kcenter;
using at::Tensor;

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::printf("FAIL %s\n", what.c_str());
    ++failures;
  }
}

uint32_t bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

// The CUDA kernel's sums for one row and one centre, with E lanes per thread, on the CPU.
template <typename S, int E>
float gpu_layout_distance(const S* p, const float* q, int64_t C) {
  constexpr int G = kc::kLanes / E;
  float acc[G][E] = {};
  for (int t = 0; t < G; ++t) {
    for (int64_t c = int64_t(t) * E; c < C; c += kc::kLanes) {
      for (int u = 0; u < E; ++u) {
        const float x = c + u < C ? static_cast<float>(p[c + u]) : 0.f;
        const float y = c + u < C ? q[c + u] : 0.f;
        const float d = kc::sub_rn(x, y);
        acc[t][u] = kc::fma_rn(d, d, acc[t][u]);
      }
    }
  }
  // __shfl_down_sync(offset): thread t reads thread t + offset's value as it was before the step (its own past G).
  for (int offset = G / 2; offset >= 1; offset /= 2) {
    float before[G][E];
    std::memcpy(before, acc, sizeof acc);
    for (int t = 0; t < G; ++t) {
      for (int u = 0; u < E; ++u) acc[t][u] = kc::add_rn(before[t][u], before[t + offset < G ? t + offset : t][u]);
    }
  }
  return kc::tree_sum(acc[0], E);
}

// Random rows of a few magnitudes (probabilities, and larger spreads), with duplicates of a centre.
Tensor random_points(int64_t N, int64_t C, at::ScalarType dtype, const Tensor& centre) {
  Tensor p = at::rand({N, C}) * at::pow(10.0, at::randint(-3, 3, {N, 1}).to(at::kFloat));
  p[0].copy_(centre);
  p[N - 1].copy_(centre);
  return p.to(dtype);
}

void check_case(int64_t N, int64_t C, int64_t K, at::ScalarType dtype) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dho_fast::kcenter_update", "")
                             .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, Tensor&)>();
  const Tensor centres = at::rand({K, C});
  const Tensor points = random_points(N, C, dtype, centres[0]);
  Tensor start = at::full({N}, std::numeric_limits<float>::infinity());
  start.slice(0, 1, N, 5).fill_(-1.0);  // picked points
  const Tensor p32 = points.to(at::kFloat);

  // The definition: the running minimum from kcenter::sq_distance over the converted rows, and its first maximum.
  std::vector<float> want(N);
  int64_t want_index = -1;
  float want_value = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < N; ++i) {
    want[i] = start[i].item<float>();
    if (want[i] < 0) continue;
    for (int64_t k = 0; k < K; ++k) {
      const float d = kc::sq_distance(p32[i].const_data_ptr<float>(), centres[k].const_data_ptr<float>(), C);
      want[i] = kc::running_min(want[i], d);
      if (k == 0) {
        const float gpu = dtype == at::kFloat
                              ? gpu_layout_distance<float, 4>(points[i].const_data_ptr<float>(),
                                                              centres[k].const_data_ptr<float>(), C)
                              : gpu_layout_distance<c10::BFloat16, 8>(points[i].const_data_ptr<c10::BFloat16>(),
                                                                      centres[k].const_data_ptr<float>(), C);
        expect(bits(gpu) == bits(d), "GPU layout != sq_distance at C = " + std::to_string(C) + ", row " +
                                         std::to_string(i) + ": " + std::to_string(gpu) + " vs " + std::to_string(d));
      }
    }
    if (want[i] > want_value) {
      want_value = want[i];
      want_index = i;
    }
  }

  for (const char* isa : {"default", "avx2", "avx512"}) {
    setenv("ATEN_CPU_CAPABILITY", isa, 1);
    Tensor got = start.clone();
    const auto [index, value] = op.call(points, centres, got);
    const std::string where = std::string(isa) + " " + c10::toString(dtype) + " N = " + std::to_string(N) +
                              ", C = " + std::to_string(C) + ", K = " + std::to_string(K);
    int64_t mismatches = 0;
    for (int64_t i = 0; i < N; ++i) mismatches += bits(got[i].item<float>()) != bits(want[i]);
    expect(mismatches == 0, where + ": " + std::to_string(mismatches) + " entries differ from sq_distance's bits");
    expect(index.item<int64_t>() == want_index && bits(value.item<float>()) == bits(want_value),
           where + ": argmax (" + std::to_string(index.item<int64_t>()) + ", " + std::to_string(value.item<float>()) +
               ") want (" + std::to_string(want_index) + ", " + std::to_string(want_value) + ")");
  }
  unsetenv("ATEN_CPU_CAPABILITY");
}

void check_keys() {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  expect(kc::argmax_key(2.f, 5) > kc::argmax_key(1.f, 0), "a larger value has the larger key");
  expect(kc::argmax_key(1.f, 3) > kc::argmax_key(1.f, 4), "on a tie the lower row has the larger key");
  expect(kc::argmax_key(-0.f, 7) == kc::argmax_key(0.f, 7), "-0 is +0");
  expect(kc::argmax_key(0.f, 0) > 0, "a zero value is a candidate");
  expect(kc::argmax_key(-1.f, 0) == 0 && kc::argmax_key(nan, 0) == 0, "no key for a picked point or NaN");
  expect(kc::argmax_key(inf, 0) > kc::argmax_key(std::numeric_limits<float>::max(), 0), "inf is the largest");
  const int64_t last = int64_t(UINT32_MAX) - 1;
  const uint64_t key = kc::argmax_key(3.5f, last);
  expect(kc::key_row(key) == last && kc::key_value(key) == 3.5f, "a key gives back its row and value");
  expect(kc::key_row(0) == -1 && kc::key_value(0) == -inf, "no candidate is (-1, -inf)");
}

}  // namespace

int main() {
  at::manual_seed(0);
  check_keys();
  for (const auto dtype : {at::kFloat, at::kBFloat16}) {
    for (const int64_t C : {1, 3, 63, 64, 65, 200, 997}) {
      for (const int64_t K : {1, 5}) check_case(40, C, K, dtype);
    }
  }
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
