// The reusing allocator of gradient_buffers.h.
#include "gradient_buffers.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <string>

namespace dho_fast {
namespace cpu {
namespace {

struct Buffer {
  void* data;
  std::size_t bytes;
};

class GradientBufferAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(std::size_t bytes) override {
    void* data = take(bytes);
    if (data == nullptr) data = c10::alloc_cpu(bytes);
    report(data, static_cast<int64_t>(bytes));
    return {data, new Buffer{data, bytes}, &release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static GradientBufferAllocator& instance() {
    // Never destroyed: a tensor freed during the process's exit still returns its buffer here.
    static auto* allocator = new GradientBufferAllocator();
    return *allocator;
  }

 private:
  // A kept buffer of exactly `bytes`, or nullptr.
  void* take(std::size_t bytes) {
    const std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = idle_.begin(); it != idle_.end(); ++it) {
      if (it->bytes == bytes) {
        void* data = it->data;
        idle_.erase(it);
        return data;
      }
    }
    return nullptr;
  }

  static void release(void* context) {
    const auto* buffer = static_cast<const Buffer*>(context);
    instance().give_back(*buffer);
    delete buffer;
  }

  // Keeps the buffer for reuse, and frees the longest-idle one when more than kIdleBuffers are kept.
  void give_back(const Buffer& buffer) {
    report(buffer.data, -static_cast<int64_t>(buffer.bytes));
    void* evicted = nullptr;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      idle_.push_back(buffer);
      if (idle_.size() > kIdleBuffers) {
        evicted = idle_.front().data;
        idle_.pop_front();
      }
    }
    if (evicted != nullptr) c10::free_cpu(evicted);
  }

  // The profiler's memory record (bench/memory.py's peak) counts a buffer while a tensor holds it, as it counts
  // at::empty's.
  void report(void* data, int64_t delta) {
    const std::size_t live = live_bytes_.fetch_add(static_cast<std::size_t>(delta)) + static_cast<std::size_t>(delta);
    if (c10::memoryProfilingEnabled())
      c10::reportMemoryUsageToProfiler(data, delta, live, live, c10::Device(c10::kCPU));
  }

  std::mutex mutex_;
  std::deque<Buffer> idle_;  // oldest first
  std::atomic<std::size_t> live_bytes_{0};  // held by tensors
};

bool cache_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("DHO_FAST_GRADIENT_CACHE");
    if (value == nullptr) return true;
    const std::string v(value);
    TORCH_CHECK_VALUE(v == "0" || v == "1", "DHO_FAST_GRADIENT_CACHE must be 0 (off) or 1 (on), got \"", v, "\"");
    return v == "1";
  }();
  return enabled;
}

}  // namespace

at::Tensor empty_gradient_like(const at::Tensor& like, at::ScalarType dtype) {
  const std::size_t bytes = static_cast<std::size_t>(like.numel()) * c10::elementSize(dtype);
  if (bytes < kMinPooledBytes || !cache_enabled()) {
    return at::empty(like.sizes(), like.options().dtype(dtype));
  }
  return at::detail::empty_generic(like.sizes(), &GradientBufferAllocator::instance(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, c10::MemoryFormat::Contiguous);
}

}  // namespace cpu
}  // namespace dho_fast
