// Included by each kernel_*.cpp after it has chosen CPU_CAPABILITY: instantiates the kernels for every dtype.
#pragma once

#include "dual_head_loss_kernel.h"
#include "kcenter_kernel.h"

namespace dho_fast {
namespace cpu {
namespace CPU_CAPABILITY {

#define DHO_FAST_INSTANTIATE(T, G) \
  template void dual_head_loss_rows<T, G>(const RowsIO<T, G>&, const LossParams&);
DHO_FAST_INSTANTIATE(float, float)
DHO_FAST_INSTANTIATE(double, double)
DHO_FAST_INSTANTIATE(c10::BFloat16, float)  // the chunk op
DHO_FAST_INSTANTIATE(c10::BFloat16, c10::BFloat16)
DHO_FAST_INSTANTIATE(c10::Half, float)
#undef DHO_FAST_INSTANTIATE

template KcenterResult kcenter_rows<float>(const KcenterIO<float>&);
template KcenterResult kcenter_rows<c10::BFloat16>(const KcenterIO<c10::BFloat16>&);

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace dho_fast
