// Per-row arithmetic of the k-center step (dho_fast::kcenter_update), shared by the CPU kernel (every instruction
// set) and the CUDA kernel, so that both compute every squared distance to the same bits.
//
// Invariant: the squared distance of a point row p to a centre q over C columns is summed in kLanes = 64 lanes:
//   lane l accumulates acc_l = fma(d_c, d_c, acc_l), d_c = p_c - q_c (bfloat16 p_c converted to float32 exactly),
//   over the columns c = l, l + 64, l + 128, ... in increasing order, starting from +0;
//   the 64 lane sums are then added by a halving tree: lane i += lane i + w for w = 32, 16, 8, 4, 2, 1 (i < w);
//   the distance is lane 0.
// Each operation is one IEEE float32 operation rounded to nearest, with subnormals kept: the CPU's vector FMA, or
// std::fma; on the GPU explicit PTX instructions, which neither -use_fast_math's flush to zero nor contraction
// changes. The order decides near ties between points, so it is the same wherever the kernels run: a CPU vector of W
// lanes holds lanes [a W, (a + 1) W) of accumulator a; a GPU row group of 64 / E threads holds E lanes per thread
// (lanes [t E, (t + 1) E) in thread t), and the tree's levels w >= E are shuffles between its threads.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "row_math.h"

namespace dho_fast {
namespace kcenter {

constexpr int kLanes = 64;

DHO_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a - b;
#endif
}

DHO_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a + b;
#endif
}

// a * b + c rounded once.
DHO_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(r) : "f"(a), "f"(b), "f"(c));
  return r;
#else
  return std::fma(a, b, c);
#endif
}

// The halving tree over lanes[0, width) (width a power of two), in place: lane i += lane i + w for w = width / 2,
// ..., 1. Returns lanes[0]. Called with the lanes a vector or a thread holds, after the wider levels.
DHO_HD float tree_sum(float* lanes, int width) {
  for (int w = width / 2; w >= 1; w /= 2) {
    for (int i = 0; i < w; ++i) lanes[i] = add_rn(lanes[i], lanes[i + w]);
  }
  return lanes[0];
}

// The definition of the order above, one column at a time (the kernels compute it by vectors and threads; the C++
// tests compare them with it). S: float or a type that converts to float exactly (c10::BFloat16).
template <typename S>
DHO_HD float sq_distance(const S* p, const float* q, int64_t num_cols) {
  float lanes[kLanes] = {};
  for (int64_t c = 0; c < num_cols; ++c) {
    const float d = sub_rn(static_cast<float>(p[c]), q[c]);
    lanes[c % kLanes] = fma_rn(d, d, lanes[c % kLanes]);
  }
  return tree_sum(lanes, kLanes);
}

// A squared distance the step may use: finite (NaN fails the comparison).
DHO_HD bool finite_distance(float d) {
  return d <= std::numeric_limits<float>::max();
}

// The running minimum of an unpicked point (current >= 0) after a new nearest-centre distance d; a NaN current value
// (never a valid one) stays NaN and is never picked (argmax_key).
DHO_HD float running_min(float current, float d) {
  return d < current ? d : current;
}

// The argmax of a call as one integer, so that a maximum over keys (per thread, per block, atomically across the GPU)
// is the first maximum: the value's float32 bits in the high half (a float >= 0 orders like its bits; -0 is taken as
// +0), ~row in the low half (a lower row wins a tie). 0 is "no candidate": what a picked point (value < 0), a NaN
// value and the empty reduction give. Rows must be below 2^32 - 1 (check_kcenter_inputs).
DHO_HD uint64_t argmax_key(float value, int64_t row) {
  if (!(value >= 0)) return 0;
  uint32_t bits = 0;
  if (value != 0) {
#if defined(__CUDA_ARCH__)
    bits = __float_as_uint(value);
#else
    std::memcpy(&bits, &value, sizeof bits);
#endif
  }
  return (uint64_t(bits) << 32) | uint64_t(~uint32_t(row));
}

DHO_HD int64_t key_row(uint64_t key) {
  return key == 0 ? -1 : int64_t(~uint32_t(key));
}

DHO_HD float key_value(uint64_t key) {
  if (key == 0) return row_math::neg_inf<float>();
  const uint32_t bits = uint32_t(key >> 32);
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
#endif
}

}  // namespace kcenter
}  // namespace dho_fast
