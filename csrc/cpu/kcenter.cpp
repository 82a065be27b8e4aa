// CPU implementation of dho_fast::kcenter_update: checks, the run-time choice of the vectorised kernel, the result.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "../kcenter_row.h"
#include "../op_checks.h"
#include "kernel_dispatch.h"

namespace dho_fast {
namespace cpu {
namespace {

template <typename scalar_t>
KcenterResult run(const at::Tensor& points, const at::Tensor& centres, at::Tensor& min_sq_dist) {
  return run_kcenter(KcenterIO<scalar_t>{.points = points.const_data_ptr<scalar_t>(),
                                         .centres = centres.const_data_ptr<float>(),
                                         .min_sq_dist = min_sq_dist.mutable_data_ptr<float>(),
                                         .rows = points.size(0),
                                         .cols = points.size(1),
                                         .num_centres = centres.size(0)});
}

std::tuple<at::Tensor, at::Tensor> kcenter_update_cpu(const at::Tensor& points, const at::Tensor& centres,
                                                      at::Tensor& min_sq_dist) {
  check_kcenter_inputs(points, centres, min_sq_dist);
  const KcenterResult r = points.scalar_type() == at::kFloat ? run<float>(points, centres, min_sq_dist)
                                                             : run<c10::BFloat16>(points, centres, min_sq_dist);
  check_kcenter_row(r.bad_row);
  return {at::scalar_tensor(kcenter::key_row(r.key), points.options().dtype(at::kLong)),
          at::scalar_tensor(kcenter::key_value(r.key), points.options().dtype(at::kFloat))};
}

}  // namespace
}  // namespace cpu
}  // namespace dho_fast

TORCH_LIBRARY_IMPL(dho_fast, CPU, m) {
  m.impl("kcenter_update", &dho_fast::cpu::kcenter_update_cpu);
}
