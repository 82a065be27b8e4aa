// Included by each kernel_*.cpp after it has chosen CPU_CAPABILITY: instantiates the kernel for every dtype.
#pragma once

#include "dual_head_loss_kernel.h"

namespace dho_fast {
namespace cpu {
namespace CPU_CAPABILITY {

#define DHO_FAST_INSTANTIATE(T) template void dual_head_loss_rows<T>(const RowsIO<T>&, const LossParams&);
DHO_FAST_INSTANTIATE(float)
DHO_FAST_INSTANTIATE(double)
DHO_FAST_INSTANTIATE(c10::BFloat16)
DHO_FAST_INSTANTIATE(c10::Half)
#undef DHO_FAST_INSTANTIATE

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace dho_fast
