// The CPU loss kernel's (N, C) gradient buffers, reused from call to call.
//
// A training step's logit gradients are new (N, C) tensors every call. glibc serves buffers this large with mmap and
// unmaps them when they are freed, so each call page-faults and the kernel zeroes fresh pages before the loss writes
// a byte: at N = 512, C = 1000 float32 on a 2-core VM, about 1300 faults per call, three quarters of a fused
// forward+backward run alone in a loop. These buffers come from an allocator that keeps the last kIdleBuffers freed
// ones and hands one of the same size out again, so a step's gradients land in pages an earlier step faulted in.
// It holds at most kIdleBuffers freed buffers (a step's two gradients, twice over), memory the steps used a moment
// before; buffers under kMinPooledBytes come from at::empty as before, as malloc's heap keeps those anyway.
// DHO_FAST_GRADIENT_CACHE=0 (read once per process) turns it off; 1, or unset, leaves it on.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>

namespace dho_fast {
namespace cpu {

constexpr std::size_t kMinPooledBytes = 128 * 1024;
constexpr std::size_t kIdleBuffers = 4;

// An uninitialised contiguous CPU tensor of like's sizes and `dtype`, as at::empty_like would give.
at::Tensor empty_gradient_like(const at::Tensor& like, at::ScalarType dtype);

}  // namespace cpu
}  // namespace dho_fast
