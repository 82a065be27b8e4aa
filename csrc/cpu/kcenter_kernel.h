// The CPU kernel of kcenter_update, compiled once per instruction set (kernel_*.cpp, as dual_head_loss_kernel.h):
// rows in parallel, each read from memory once: its squared distances to the centres in csrc/kcenter_row.h's order
// (to the bits the CUDA kernel computes), its running minimum updated in place, and each thread's first maximum as an
// argmax key, the keys' maximum the call's.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../kcenter_row.h"
#include "kcenter_kernel_api.h"

namespace dho_fast {
namespace cpu {
namespace CPU_CAPABILITY {

namespace kc = kcenter;
using KVec = at::vec::Vectorized<float>;

// One centre's kLanes lanes take kVectors vectors (4 for AVX-512, 8 for AVX2 and the portable build). A block of
// centres keeps its accumulators in 16 vector registers, half of AVX-512's (all of AVX2's, where the compiler spills
// some), so that a row's block is loaded once for all of them.
constexpr int kVectors = kc::kLanes / KVec::size();
constexpr int kCentreBlock = std::max(1, 16 / kVectors);
static_assert(kc::kLanes % KVec::size() == 0, "a lane set is whole vectors");

// a * b + c rounded once, per lane: the FMA instruction where the build has one. ATen's portable fmadd is an unfused
// a * b + c, which would change the sums' bits, so the portable build calls std::fma per lane.
inline KVec fma_rn(KVec a, KVec b, KVec c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return at::vec::fmadd(a, b, c);
#else
  float x[KVec::size()], y[KVec::size()], z[KVec::size()];
  a.store(x);
  b.store(y);
  c.store(z);
  for (int i = 0; i < KVec::size(); ++i) x[i] = std::fma(x[i], y[i], z[i]);
  return KVec::loadu(x);
#endif
}

// The squared distances of row p to the NB centres q + b C (b < NB) over C columns, into d[0, NB). Accumulator a of
// a centre holds lanes [a W, (a + 1) W) (W = KVec::size()); a column past the row's end is loaded as 0 in both rows,
// so its term fma(0, 0, acc) = acc changes nothing, as its absence in kcenter::sq_distance.
template <int NB>
inline void block_distances(const float* p, const float* q, int64_t C, float* d) {
  constexpr int W = KVec::size();
  KVec acc[NB][kVectors];
  for (auto& centre : acc) std::fill(centre, centre + kVectors, KVec(0.f));
  auto step = [&](int a, const KVec x, auto load_centre) {
    for (int b = 0; b < NB; ++b) {
      const KVec diff = x - load_centre(q + b * C);
      acc[b][a] = fma_rn(diff, diff, acc[b][a]);
    }
  };
  int64_t c = 0;
  for (; c + kc::kLanes <= C; c += kc::kLanes) {
    for (int a = 0; a < kVectors; ++a) {
      const int64_t at = c + a * W;
      step(a, KVec::loadu(p + at), [at](const float* centre) { return KVec::loadu(centre + at); });
    }
  }
  for (int a = 0; a < kVectors && c + a * W < C; ++a) {
    const int64_t at = c + a * W, n = std::min<int64_t>(W, C - at);
    step(a, KVec::loadu(p + at, n), [at, n](const float* centre) { return KVec::loadu(centre + at, n); });
  }
  // The halving tree: its levels w >= W add whole accumulators (vector j += vector j + w / W), the rest lanes.
  for (int b = 0; b < NB; ++b) {
    for (int n = kVectors / 2; n >= 1; n /= 2) {
      for (int j = 0; j < n; ++j) acc[b][j] = acc[b][j] + acc[b][j + n];
    }
    float lanes[W];
    acc[b][0].store(lanes);
    d[b] = kc::tree_sum(lanes, W);
  }
}

// block_distances for nb <= NB centres, nb known at run time (the last block of centres).
template <int NB = kCentreBlock>
inline void distances(int nb, const float* p, const float* q, int64_t C, float* d) {
  if (nb == NB) return block_distances<NB>(p, q, C, d);
  if constexpr (NB > 1) distances<NB - 1>(nb, p, q, C, d);
}

template <typename scalar_t>
KcenterResult kcenter_rows(const KcenterIO<scalar_t>& io) {
  constexpr bool convert = !std::is_same_v<scalar_t, float>;
  const int64_t C = io.cols, K = io.num_centres;
  // Chunks of at least 32K elements, so that a thread's start-up cost is small against its rows.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  auto chunk = [&](int64_t begin, int64_t end, KcenterResult result) {
    std::vector<float> row(convert ? C : 0);  // a bfloat16 row in float32, converted exactly
    float d[kCentreBlock];
    for (int64_t i = begin; i < end; ++i) {
      const float current = io.min_sq_dist[i];
      if (current < 0) continue;  // a picked point: its row is not read
      const float* p;
      if constexpr (convert) {
        at::vec::convert(io.points + i * C, row.data(), C);
        p = row.data();
      } else {
        p = io.points + i * C;
      }
      // A row stays in L1 while the centres' blocks after the first read it again.
      float nearest = std::numeric_limits<float>::infinity();
      bool finite = true;
      for (int64_t k = 0; k < K; k += kCentreBlock) {
        const int nb = int(std::min<int64_t>(kCentreBlock, K - k));
        distances(nb, p, io.centres + k * C, C, d);
        for (int b = 0; b < nb; ++b) {
          finite = finite && kc::finite_distance(d[b]);
          nearest = std::min(nearest, d[b]);
        }
      }
      if (!finite) {
        result.bad_row = i;  // the chunk's first; the call raises, so its later rows need not be read
        break;
      }
      const float updated = kc::running_min(current, nearest);
      io.min_sq_dist[i] = updated;
      result.key = std::max(result.key, kc::argmax_key(updated, i));
    }
    return result;
  };
  // Chunks are contiguous row ranges, so the lowest bad row over chunks is the first one.
  auto combine = [](KcenterResult x, KcenterResult y) {
    const int64_t bad = x.bad_row < 0 ? y.bad_row : (y.bad_row < 0 ? x.bad_row : std::min(x.bad_row, y.bad_row));
    return KcenterResult{std::max(x.key, y.key), bad};
  };
  return at::parallel_reduce(0, io.rows, grain, KcenterResult{0, -1}, chunk, combine);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace dho_fast
