// CUDA implementation of dho_fast::kcenter_update (schema: csrc/dho_fast.cpp).
//
// Two launches and one device-to-host copy per call:
//   kcenter_rows_kernel: a grid-stride loop over the rows, one group of G = 64 / E threads per row (E: the elements of
//     a 16-byte load, 4 float32 or 8 bfloat16), thread t holding lanes [t E, (t + 1) E) of the 64 of
//     csrc/kcenter_row.h, so that its sums have the bits of the CPU kernel's; the running minimum is updated in place,
//     each block's largest argmax key (kcenter::argmax_key: value bits high, ~row low, so the maximum is the first
//     maximum) goes to words[0] and each non-finite row to words[1], both by atomicMax;
//   kcenter_result_kernel (one thread): words[0] as the (index, value) tensors.
// The host then reads words[1] (the op's one synchronisation) and raises for the first bad row.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../kcenter_row.h"
#include "../op_checks.h"

namespace dho_fast {
namespace cuda {
namespace {

namespace kc = kcenter;

// Elements of one 16-byte load, and threads per row.
template <typename scalar_t>
constexpr int kElems = 16 / static_cast<int>(sizeof(scalar_t));
template <typename scalar_t>
constexpr int kGroup = kc::kLanes / kElems<scalar_t>;
// Centres per pass over a row: 32 accumulators per thread. K = 1 (a greedy pick's one new centre) has its own
// instantiation with one.
template <typename scalar_t>
constexpr int kCentreBlock = 32 / kElems<scalar_t>;
constexpr int kThreads = 256;
// Resident blocks per SM the grid is sized for: 2048 threads, the most an SM holds.
constexpr int kBlocksPerSm = 2048 / kThreads;

template <typename scalar_t>
struct KcenterArgs {
  const scalar_t* points;  // (rows, cols)
  const float* centres;    // (num_centres, cols)
  float* min_sq_dist;      // (rows,), updated in place
  int64_t rows, cols, num_centres;
  // words[0]: the largest argmax key (0: no candidate); words[1]: the largest rows - i over the rows i whose squared
  // distance is not finite (0: none), so that rows - words[1] is the first of them.
  unsigned long long* words;
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// The 16-byte word w as float32 elements: 4 float32, or 8 bfloat16 (the high half of a float32, little-endian).
template <typename scalar_t>
__device__ __forceinline__ void unpack(const uint4 w, float* x) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      x[i] = __uint_as_float(words[i]);
    } else {
      x[2 * i] = __uint_as_float(words[i] << 16);
      x[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  }
}

// Columns [c, c + E) of a row in float32, 0 past its end (adding fma(0, 0, acc) = acc, as the column's absence in
// kcenter::sq_distance): 16-byte loads where the row is 16-byte aligned and the columns are whole, else one element at
// a time.
template <typename scalar_t, int E>
__device__ __forceinline__ void load_cols(const scalar_t* row, int64_t c, int64_t C, bool vec, float (&x)[E]) {
  constexpr int kPer = kElems<scalar_t>;
  static_assert(E % kPer == 0, "whole 16-byte words");
  if (vec && c + E <= C) {
#pragma unroll
    for (int v = 0; v < E / kPer; ++v) {
      unpack<scalar_t>(__ldg(reinterpret_cast<const uint4*>(row + c) + v), x + v * kPer);
    }
  } else {
#pragma unroll
    for (int j = 0; j < E; ++j) x[j] = c + j < C ? static_cast<float>(row[c + j]) : 0.f;
  }
}

// KB: centres per pass over a row (1, or kCentreBlock).
template <typename scalar_t, int KB>
__global__ void __launch_bounds__(kThreads) kcenter_rows_kernel(const KcenterArgs<scalar_t> a) {
  constexpr int E = kElems<scalar_t>, G = kGroup<scalar_t>;
  static_assert(32 % G == 0, "a row group lies in one warp");
  const int t = int(threadIdx.x % G);
  const unsigned warp_lane = threadIdx.x % 32;
  // The group's threads, which alone take part in its shuffles: other groups of the warp may be at another row.
  const unsigned group_mask = (G == 32 ? 0xffffffffu : (1u << G) - 1u) << (warp_lane / G * G);
  const int64_t C = a.cols, K = a.num_centres;
  const bool centres_vec = aligned16(a.centres) && C % kElems<float> == 0;
  const int64_t groups = int64_t(gridDim.x) * (kThreads / G);
  uint64_t key = 0;
  for (int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / G; i < a.rows; i += groups) {
    const float current = a.min_sq_dist[i];
    if (current < 0) continue;  // a picked point: its row is not read (the whole group skips it)
    const scalar_t* p = a.points + i * C;
    const bool p_vec = aligned16(p);
    float nearest = std::numeric_limits<float>::infinity();
    bool finite = true;
    for (int64_t k0 = 0; k0 < K; k0 += KB) {
      const int nb = int(KB < K - k0 ? KB : K - k0);
      float acc[KB][E] = {};
      // Unrolled for one centre, so that each thread has several 16-byte loads of its row in flight.
#pragma unroll(KB == 1 ? 4 : 1)
      for (int64_t c = int64_t(t) * E; c < C; c += kc::kLanes) {
        float x[E];
        load_cols<scalar_t, E>(p, c, C, p_vec, x);
#pragma unroll
        for (int b = 0; b < KB; ++b) {
          if (b < nb) {
            float y[E];
            load_cols<float, E>(a.centres + (k0 + b) * C, c, C, centres_vec, y);
#pragma unroll
            for (int u = 0; u < E; ++u) {
              const float d = kc::sub_rn(x[u], y[u]);
              acc[b][u] = kc::fma_rn(d, d, acc[b][u]);
            }
          }
        }
      }
      // The halving tree's levels w >= E: lane l += lane l + w is thread t's slot += thread (t + w / E)'s.
#pragma unroll
      for (int offset = G / 2; offset >= 1; offset /= 2) {
#pragma unroll
        for (int b = 0; b < KB; ++b) {
#pragma unroll
          for (int u = 0; u < E; ++u) {
            acc[b][u] = kc::add_rn(acc[b][u], __shfl_down_sync(group_mask, acc[b][u], offset, G));
          }
        }
      }
      // Thread 0 of the group now holds lanes [0, E) of the tree; its last levels are within the thread.
#pragma unroll
      for (int b = 0; b < KB; ++b) {
        if (b < nb) {
          const float d = kc::tree_sum(acc[b], E);
          finite = finite && kc::finite_distance(d);
          nearest = fminf(nearest, d);
        }
      }
    }
    if (t == 0) {
      if (!finite) {
        atomicMax(a.words + 1, static_cast<unsigned long long>(a.rows - i));
      } else {
        const float updated = kc::running_min(current, nearest);
        a.min_sq_dist[i] = updated;
        const uint64_t k = kc::argmax_key(updated, i);
        key = k > key ? k : key;
      }
    }
  }
  __shared__ uint64_t warp_keys[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset >= 1; offset /= 2) {
    const uint64_t other = __shfl_xor_sync(0xffffffffu, key, offset);
    key = other > key ? other : key;
  }
  if (warp_lane == 0) warp_keys[threadIdx.x / 32] = key;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) key = warp_keys[w] > key ? warp_keys[w] : key;
    if (key != 0) atomicMax(a.words, static_cast<unsigned long long>(key));
  }
}

__global__ void kcenter_result_kernel(const unsigned long long* words, int64_t* index, float* value) {
  *index = kc::key_row(words[0]);
  *value = kc::key_value(words[0]);
}

template <typename scalar_t>
void launch_rows(const KcenterArgs<scalar_t>& a, cudaStream_t stream) {
  constexpr int rows_per_block = kThreads / kGroup<scalar_t>;
  const int64_t wanted = (a.rows + rows_per_block - 1) / rows_per_block;
  const int64_t resident = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * kBlocksPerSm;
  const unsigned blocks = unsigned(std::min(wanted, resident));
  if (a.num_centres == 1) {
    kcenter_rows_kernel<scalar_t, 1><<<blocks, kThreads, 0, stream>>>(a);
  } else {
    kcenter_rows_kernel<scalar_t, kCentreBlock<scalar_t>><<<blocks, kThreads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> kcenter_update_cuda(const at::Tensor& points, const at::Tensor& centres,
                                                       at::Tensor& min_sq_dist) {
  check_kcenter_inputs(points, centres, min_sq_dist);
  const c10::cuda::CUDAGuard guard(points.device());
  const int64_t N = points.size(0);
  const at::Tensor words = at::zeros({2}, points.options().dtype(at::kLong));
  auto* words_ptr = reinterpret_cast<unsigned long long*>(words.mutable_data_ptr<int64_t>());
  at::Tensor index = at::empty({}, points.options().dtype(at::kLong));
  at::Tensor value = at::empty({}, points.options().dtype(at::kFloat));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (N > 0) {
    auto launch = [&](auto tag) {
      using scalar_t = decltype(tag);
      launch_rows(KcenterArgs<scalar_t>{.points = points.const_data_ptr<scalar_t>(),
                                        .centres = centres.const_data_ptr<float>(),
                                        .min_sq_dist = min_sq_dist.mutable_data_ptr<float>(),
                                        .rows = N,
                                        .cols = points.size(1),
                                        .num_centres = centres.size(0),
                                        .words = words_ptr},
                  stream);
    };
    if (points.scalar_type() == at::kFloat) {
      launch(float{});
    } else {
      launch(c10::BFloat16{});
    }
  }
  kcenter_result_kernel<<<1, 1, 0, stream>>>(words_ptr, index.mutable_data_ptr<int64_t>(),
                                             value.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t bad = words[1].item<int64_t>();
  check_kcenter_row(bad == 0 ? -1 : N - bad);
  return {index, value};
}

}  // namespace
}  // namespace cuda
}  // namespace dho_fast

TORCH_LIBRARY_IMPL(dho_fast, CUDA, m) {
  m.impl("kcenter_update", &dho_fast::cuda::kcenter_update_cuda);
}
