#include "kernel_isa.h"

#include "kernel_dispatch.h"

namespace dho_fast {
namespace cpu {

std::string kernel_isa_name() {
  switch (select_isa()) {
    case Isa::Avx512:
      return "avx512";
    case Isa::Avx2:
      return "avx2";
    default:
      return "default";
  }
}

}  // namespace cpu
}  // namespace dho_fast
