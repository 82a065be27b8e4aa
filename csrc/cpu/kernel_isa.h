// The instruction set whose build of the CPU kernels runs on this machine, by name, for benchmarks and logs.
#pragma once

#include <string>

namespace dho_fast {
namespace cpu {

// "avx512", "avx2" or "default": what select_isa() (kernel_dispatch.h) picks here, ATEN_CPU_CAPABILITY included.
std::string kernel_isa_name();

}  // namespace cpu
}  // namespace dho_fast
