// What the per-instruction-set k-center kernels export to the op implementation (kcenter.cpp, through
// kernel_dispatch.h's choice of instruction set).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace dho_fast {
namespace cpu {

// One kcenter_update call: points (rows, cols) of scalar_t, centres (num_centres, cols) and min_sq_dist (rows,)
// float32, all contiguous.
template <typename scalar_t>
struct KcenterIO {
  const scalar_t* points;
  const float* centres;
  float* min_sq_dist;  // updated in place
  int64_t rows, cols, num_centres;
};

// key: the kcenter::argmax_key of the first maximum (0: no candidate); bad_row: the first row whose squared distance
// to a centre is not finite (-1: none; rows after a bad one may be left unread).
struct KcenterResult {
  uint64_t key;
  int64_t bad_row;
};

#define DHO_FAST_DECLARE_KCENTER(NS)                                \
  namespace NS {                                                    \
  template <typename scalar_t>                                      \
  KcenterResult kcenter_rows(const KcenterIO<scalar_t>& io);        \
  }

DHO_FAST_DECLARE_KCENTER(DEFAULT)
DHO_FAST_DECLARE_KCENTER(AVX2)
DHO_FAST_DECLARE_KCENTER(AVX512)
#undef DHO_FAST_DECLARE_KCENTER

}  // namespace cpu
}  // namespace dho_fast
