// dho_fast::fused_linear_dual_head_loss, for every device: row chunks of both heads' GEMMs (ATen) around
// dho_fast::dual_head_loss_chunk, which the dispatcher sends to the tensors' device's kernel. Only one chunk's logits
// exist at a time. The gradients are computed in the forward pass (grad-in-forward) and the autograd kernel below
// only scales them, or returns them as they are in the usual loss.backward(). For half inputs every gradient is kept
// in float32 (the chunks' logit gradients, the gradient GEMMs, d features, the head gradients) and rounded to the
// inputs' dtype once, in backward, after the loss scale of mixed-precision training has been applied: rounded in
// the forward, the small entries of a gradient underflow before that scale can lift them. It is C++ rather than
// Python because the op's fixed cost is part of every training step.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "fused_linear_dual_head_loss.h"
#include "op_checks.h"
#include "saved_gradients.h"

namespace dho_fast {
namespace {

using at::Tensor;
using Outputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// eps of F.normalize: the cosine KD head sees x / max(|x|, eps).
constexpr double kNormEps = 1e-12;

// dual_head_loss_chunk through the dispatcher (the kernel of the logits' device) on one chunk's logits, with the op's
// loss settings and teacher from `a` (the teacher and labels contiguous).
std::tuple<Tensor, Tensor> loss_chunk(const LinearLossArgs& a, Tensor& ce_logits, Tensor& kd_logits,
                                      const Tensor& teacher, const Tensor& labels, int64_t start, int64_t num_labelled,
                                      bool ce_grad, bool kd_grad, const std::optional<Tensor>& ce_bias,
                                      const std::optional<Tensor>& kd_bias, double ce_grad_scale, double kd_grad_scale,
                                      const std::optional<Tensor>& ce_grad_out,
                                      const std::optional<Tensor>& kd_grad_out) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dho_fast::dual_head_loss_chunk", "")
          .typed<std::tuple<Tensor, Tensor>(Tensor&, Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, double,
                                            bool, int64_t, double, bool, bool, const std::optional<Tensor>&,
                                            const std::optional<Tensor>&, double, double,
                                            const std::optional<Tensor>&, const std::optional<Tensor>&, int64_t,
                                            const std::optional<Tensor>&, const std::optional<Tensor>&)>();
  return op.call(ce_logits, kd_logits, teacher, labels, start, num_labelled, a.temperature, a.kd_split,
                 a.ignore_index, a.label_smoothing, ce_grad, kd_grad, ce_bias, kd_bias, ce_grad_scale, kd_grad_scale,
                 ce_grad_out, kd_grad_out, a.teacher_form, a.teacher_indices, a.teacher_row_terms);
}

// One chunk of rows [start, stop) and its labelled rows: entries [first, last) of the batch's labelled-row list.
// When those are consecutive batch rows (a batch of labelled then unlabelled samples, the usual layout) they are
// rows [first_row, first_row + last - first), which the chunk reads and writes as slices instead of gathering them.
struct Chunk {
  int64_t start, stop, first, last;
  bool consecutive;
  int64_t first_row;
};

// The chunks, and the batch's labelled rows in order, from the labels on the host (one copy of them; on CUDA the
// chunk op itself still synchronises once per chunk to report bad values).
std::vector<Chunk> plan_chunks(const Tensor& labels, int64_t ignore_index, int64_t chunk_size,
                               std::vector<int64_t>& labelled) {
  const Tensor y = labels.to(at::kCPU);
  const int64_t N = y.size(0);
  const int64_t* label = y.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    if (label[i] != ignore_index) labelled.push_back(i);
  }
  std::vector<Chunk> chunks;
  int64_t first = 0;
  for (int64_t start = 0; start < N; start += chunk_size) {
    const int64_t stop = std::min(start + chunk_size, N);
    int64_t last = first;
    while (last < static_cast<int64_t>(labelled.size()) && labelled[last] < stop) ++last;
    const bool none = last == first;
    const bool consecutive = none || labelled[last - 1] - labelled[first] == last - first - 1;
    chunks.push_back({start, stop, first, last, consecutive, none ? start : labelled[first]});
    first = last;
  }
  return chunks;
}

// out = scale * a @ b, the scale applied by the GEMM. out's previous contents are ignored (beta = 0).
void scaled_mm_out(Tensor out, const Tensor& a, const Tensor& b, double scale) {
  if (scale == 1.0) {
    at::mm_out(out, a, b);
  } else {
    at::addmm_out(out, out, a, b, /*beta=*/0.0, scale);
  }
}

// grad_weight = beta * grad_weight + scale * dz^T x and grad_bias = beta * grad_bias + scale * sum_rows dz, with
// beta = 0 for the first chunk (the accumulators start uninitialised). dz and the accumulators are in the
// accumulation dtype; x is upcast to it for half inputs.
void accumulate(Tensor& grad_weight, Tensor& grad_bias, const Tensor& dz, const Tensor& x, double scale, bool first) {
  grad_weight.addmm_(dz.t(), x.to(grad_weight.scalar_type()), first ? 0.0 : 1.0, scale);
  if (!grad_bias.defined()) return;
  if (!first) {
    grad_bias.add_(dz.sum(0), scale);
    return;
  }
  at::sum_out(grad_bias, dz, 0);
  if (scale != 1.0) grad_bias.mul_(scale);
}

// d/dx of scale * (x / max(|x|, eps)) given g = d/d(that) / scale: scale * (g - u (u . g)) / |x|, or scale * g / eps
// where the clamp is active (the norm is then a constant). Row-wise, so it applies to any chunk of rows. grad and the
// result are in the accumulation dtype (the tangential part can be much smaller than g), x_unit is upcast to it.
Tensor normalize_backward(const Tensor& grad, const Tensor& x_unit, const Tensor& norm, double scale) {
  const Tensor u = x_unit.to(norm.scalar_type());
  const Tensor radial = at::where(norm > kNormEps, (u * grad).sum(1, /*keepdim=*/true), 0.0);
  return (grad - u * radial) * (scale / norm.clamp_min(kNormEps));
}

// The op's forward: the loss terms and, as a.grad_* ask, the gradients described at the op's _with_grads schema.
Outputs fused_linear_forward(const LinearLossArgs& a) {
  check_linear_loss_inputs(a);
  const int64_t N = a.features.size(0), D = a.features.size(1), C = a.ce_weight.size(0);
  const auto acc = a.features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor x = a.features.contiguous(), teacher = a.teacher_logits.contiguous(), y = a.labels.contiguous();
  Tensor kd_x = x, norm;
  if (a.kd_cosine) {
    norm = at::linalg_vector_norm(x.to(acc), 2, at::IntArrayRef{1}, /*keepdim=*/true);
    kd_x = (x / norm.clamp_min(kNormEps)).to(x.scalar_type());
  }
  const double ce_scale = gradient_scale(a.ce_loss_weight), kd_scale = gradient_scale(a.kd_loss_weight);
  // The biases are added by the chunk kernel, which reads the logits anyway, rather than by the GEMMs; the KD head's
  // as kd_logit_scale * kd_bias, since the KD logits are kd_logit_scale * (x @ kd_weight.T + kd_bias).
  std::optional<Tensor> ce_bias_c, kd_bias_c;
  if (a.ce_bias) ce_bias_c = a.ce_bias->contiguous();
  if (a.kd_bias) kd_bias_c = a.kd_logit_scale == 1.0 ? a.kd_bias->contiguous() : *a.kd_bias * a.kd_logit_scale;

  std::vector<int64_t> labelled;
  const std::vector<Chunk> chunks = plan_chunks(y, a.ignore_index, a.chunk_size, labelled);
  const int64_t num_labelled = static_cast<int64_t>(labelled.size());
  // Every chunk's logits of both heads, overwritten by their gradients, live in one workspace allocated once.
  int64_t max_ce_rows = 0;
  for (const Chunk& c : chunks) max_ce_rows = std::max(max_ce_rows, c.last - c.first);
  const int64_t max_rows = std::min(a.chunk_size, N);
  const Tensor workspace = at::empty({max_ce_rows + max_rows, C}, x.options());
  // The logits' gradients in the accumulation dtype: over the logits for float32 and float64 inputs, in a float32
  // workspace of the same layout for half ones (which the gradient GEMMs below then run in, on float32 weights).
  const bool ce_grad = a.grad_features || a.grad_ce_head, kd_grad = a.grad_features || a.grad_kd_head;
  const bool half_grads = x.scalar_type() != acc && (ce_grad || kd_grad);
  const auto acc_options = x.options().dtype(acc);
  const Tensor grad_workspace = half_grads ? at::empty({max_ce_rows + max_rows, C}, acc_options) : workspace;
  Tensor ce_weight, kd_weight;  // for d features only; the weights themselves unless half
  if (a.grad_features) {
    ce_weight = a.ce_weight.to(acc);
    kd_weight = a.kd_weight.to(acc);
  }

  // Gradients of ce_scale * ce_term and kd_scale * kd_term, in the accumulation dtype; undefined: not asked for (or
  // no bias).
  Tensor d_x_ce, d_x_kd, d_w_ce, d_b_ce, d_w_kd, d_b_kd;
  if (a.grad_features) {
    d_x_ce = at::empty({N, D}, acc_options);
    d_x_kd = at::empty({N, D}, acc_options);
  }
  // The first chunk overwrites an accumulator; only a batch without rows (no chunk) leaves it at zero.
  auto accumulator = [&](at::IntArrayRef shape) {
    return N ? at::empty(shape, acc_options) : at::zeros(shape, acc_options);
  };
  if (a.grad_ce_head) {
    d_w_ce = accumulator({C, D});
    if (a.ce_bias) d_b_ce = accumulator({C});
  }
  if (a.grad_kd_head) {
    d_w_kd = accumulator({C, D});
    if (a.kd_bias) d_b_kd = accumulator({C});
  }

  // The labelled rows' indices on the device, for the chunks that gather them.
  Tensor labelled_rows;
  if (std::any_of(chunks.begin(), chunks.end(), [](const Chunk& c) { return !c.consecutive; })) {
    labelled_rows = at::tensor(labelled, y.options().device(at::kCPU)).to(y.device());
  }

  Tensor ce_term = at::zeros({}, acc_options), kd_term = at::zeros({}, acc_options);
  for (const Chunk& c : chunks) {
    const int64_t num_ce = c.last - c.first;
    Tensor rows, x_ce;
    if (c.consecutive) {
      x_ce = x.slice(0, c.first_row, c.first_row + num_ce);
    } else {
      rows = labelled_rows.slice(0, c.first, c.last);
      x_ce = x.index_select(0, rows);
    }
    const Tensor x_kd = kd_x.slice(0, c.start, c.stop);
    Tensor z_ce = workspace.narrow(0, 0, num_ce), z_kd = workspace.narrow(0, max_ce_rows, c.stop - c.start);
    scaled_mm_out(z_ce, x_ce, a.ce_weight.t(), 1.0);
    scaled_mm_out(z_kd, x_kd, a.kd_weight.t(), a.kd_logit_scale);
    const Tensor g_ce = grad_workspace.narrow(0, 0, num_ce);
    const Tensor g_kd = grad_workspace.narrow(0, max_ce_rows, c.stop - c.start);
    std::optional<Tensor> ce_grad_out, kd_grad_out;
    if (half_grads) {
      ce_grad_out = g_ce;
      kd_grad_out = g_kd;
    }
    const auto [ce_sum, kd_sum] =
        loss_chunk(a, z_ce, z_kd, teacher, y, c.start, num_labelled, ce_grad, kd_grad, ce_bias_c, kd_bias_c, ce_scale,
                   kd_scale, ce_grad_out, kd_grad_out);
    ce_term.add_(ce_sum);
    kd_term.add_(kd_sum);
    // g_ce and g_kd now hold ce_scale * d ce_term / d z_ce and kd_scale * d kd_term / d z_kd.
    if (a.grad_features) {
      // Unlabelled rows get no CE gradient.
      if (c.consecutive) {
        scaled_mm_out(d_x_ce.slice(0, c.first_row, c.first_row + num_ce), g_ce, ce_weight, 1.0);
        d_x_ce.slice(0, c.start, c.first_row).zero_();
        d_x_ce.slice(0, c.first_row + num_ce, c.stop).zero_();
      } else {
        d_x_ce.slice(0, c.start, c.stop).zero_();
        d_x_ce.index_add_(0, rows, at::mm(g_ce, ce_weight));
      }
      const Tensor d_x_kd_rows = d_x_kd.slice(0, c.start, c.stop);
      if (a.kd_cosine) {
        d_x_kd_rows.copy_(
            normalize_backward(at::mm(g_kd, kd_weight), x_kd, norm.slice(0, c.start, c.stop), a.kd_logit_scale));
      } else {
        scaled_mm_out(d_x_kd_rows, g_kd, kd_weight, a.kd_logit_scale);
      }
    }
    const bool first = c.start == 0;
    if (a.grad_ce_head) accumulate(d_w_ce, d_b_ce, g_ce, x_ce, 1.0, first);
    if (a.grad_kd_head) accumulate(d_w_kd, d_b_kd, g_kd, x_kd, a.kd_logit_scale, first);
  }

  // A gradient not asked for is returned as a (0,) placeholder.
  auto out = [&](const Tensor& grad) { return grad.defined() ? grad : at::empty({0}, x.options()); };
  Tensor loss = ce_term * a.ce_loss_weight + kd_term * a.kd_loss_weight;
  return {loss, ce_term, kd_term, out(d_x_ce), out(d_x_kd), out(d_w_ce), out(d_b_ce), out(d_w_kd), out(d_b_kd)};
}

using Terms = std::tuple<Tensor, Tensor, Tensor>;

// The op when autograd is not involved (below it, or under inference_mode): no gradients.
Terms fused_linear_no_grad(const LinearLossArgs& a) {
  const auto r = fused_linear_forward(a);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

// fused_linear_dual_head_loss_with_grads below autograd, through the dispatcher: under torch.compile's tracing this
// reaches its fake implementation.
Outputs with_grads_below_autograd(const LinearLossArgs& a) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dho_fast::fused_linear_dual_head_loss_with_grads", "")
          .typed<Outputs(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
                         const std::optional<Tensor>&, const Tensor&, const Tensor&, bool, double, int64_t, double,
                         double, double, bool, int64_t, double, bool, bool, bool, int64_t,
                         const std::optional<Tensor>&, const std::optional<Tensor>&)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(a.features, a.ce_weight, a.ce_bias, a.kd_weight, a.kd_bias, a.teacher_logits, a.labels, a.kd_cosine,
                 a.kd_logit_scale, a.chunk_size, a.temperature, a.ce_loss_weight, a.kd_loss_weight, a.kd_split,
                 a.ignore_index, a.label_smoothing, a.grad_features, a.grad_ce_head, a.grad_kd_head, a.teacher_form,
                 a.teacher_indices, a.teacher_row_terms);
}

// The gradients come from the forward; backward scales them by d loss / d term = grad_loss * loss weight + grad_term.
class FusedLinearFunction : public torch::autograd::Function<FusedLinearFunction> {
 public:
  // The differentiable inputs are passed apart from `a`, which holds them too, because apply() links into the graph
  // the tensors among its own arguments.
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& /*features*/,
                                                const Tensor& /*ce_weight*/, const std::optional<Tensor>& /*ce_bias*/,
                                                const Tensor& /*kd_weight*/, const std::optional<Tensor>& /*kd_bias*/,
                                                const LinearLossArgs& a) {
    const auto [loss, ce_term, kd_term, d_x_ce, d_x_kd, d_w_ce, d_b_ce, d_w_kd, d_b_kd] = with_grads_below_autograd(a);
    ctx->save_for_backward({d_x_ce, d_x_kd, d_w_ce, d_b_ce, d_w_kd, d_b_kd});
    // A loss term the caller ignores must not be backpropagated as materialised zeros.
    ctx->set_materialize_grads(false);
    ctx->saved_data["ce_loss_weight"] = a.ce_loss_weight;
    ctx->saved_data["kd_loss_weight"] = a.kd_loss_weight;
    ctx->saved_data["has_ce_bias"] = a.ce_bias.has_value();
    ctx->saved_data["has_kd_bias"] = a.kd_bias.has_value();
    ctx->saved_data["dtype"] = a.features.scalar_type();
    return {loss, ce_term, kd_term};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    // Autograd runs a backward in grad mode exactly when a graph of it is wanted (create_graph=True). The saved
    // gradients are constants to it, so that graph would miss the loss's second-order term: refuse.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "dho_fast.fused_linear_dual_head_loss has no double backward: its backward scales gradients the "
                "forward computed, so a graph of it (create_graph=True, e.g. a gradient penalty) would miss the "
                "loss's second-order term; use backend=\"reference\" (pure PyTorch), whose double backward is "
                "correct");
    const auto saved = ctx->get_saved_variables();
    // The saved gradients are in the accumulation dtype; each is rounded to the inputs' dtype once, after scaling (a
    // no-op for float32 and float64 inputs).
    const auto dtype = ctx->saved_data["dtype"].toScalarType();
    const Tensor& grad_loss = grad_outputs[0];
    const double ce_weight = ctx->saved_data["ce_loss_weight"].toDouble();
    const double kd_weight = ctx->saved_data["kd_loss_weight"].toDouble();
    const Tensor f_ce = term_factor(grad_loss, grad_outputs[1], ce_weight, gradient_scale(ce_weight));
    const Tensor f_kd = term_factor(grad_loss, grad_outputs[2], kd_weight, gradient_scale(kd_weight));
    // needs_input_grad counts the tensor inputs only: an absent bias has no entry.
    const bool present[5] = {true, true, ctx->saved_data["has_ce_bias"].toBool(), true,
                             ctx->saved_data["has_kd_bias"].toBool()};
    auto wanted = [&](size_t input) {
      return present[input] && ctx->needs_input_grad(std::count(present, present + input, true));
    };
    auto scaled = [&](size_t input, const Tensor& grad, const Tensor& factor) -> Tensor {
      return wanted(input) && factor.defined() ? times_factor(grad, factor).to(dtype) : Tensor();
    };
    // d features = f_ce * d_x_ce + f_kd * d_x_kd, with one factor for both in the usual case.
    Tensor d_features;
    if (wanted(0) && f_ce.defined() && f_kd.defined()) {
      d_features = f_ce.is_same(f_kd) ? times_factor(saved[0] + saved[1], f_ce) : saved[0] * f_ce + saved[1] * f_kd;
      d_features = d_features.to(dtype);
    } else {
      d_features = f_ce.defined() ? scaled(0, saved[0], f_ce) : scaled(0, saved[1], f_kd);
    }
    // One gradient per argument of forward: the five differentiable inputs, then none for the arguments' struct.
    return {d_features,
            scaled(1, saved[2], f_ce),
            scaled(2, saved[3], f_ce),
            scaled(3, saved[4], f_kd),
            scaled(4, saved[5], f_kd),
            Tensor()};
  }
};

Terms fused_linear_autograd(const LinearLossArgs& op_args) {
  const bool grad_on = at::GradMode::is_enabled();
  auto wants = [&](const Tensor& t) { return grad_on && t.requires_grad(); };
  auto wants_bias = [&](const std::optional<Tensor>& t) { return t && wants(*t); };
  LinearLossArgs a = op_args;
  a.grad_features = wants(a.features);
  a.grad_ce_head = wants(a.ce_weight) || wants_bias(a.ce_bias);
  a.grad_kd_head = wants(a.kd_weight) || wants_bias(a.kd_bias);
  if (!a.grad_features && !a.grad_ce_head && !a.grad_kd_head) {
    const auto r = with_grads_below_autograd(a);
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
  }
  const auto r = FusedLinearFunction::apply(a.features, a.ce_weight, a.ce_bias, a.kd_weight, a.kd_bias, a);
  return {r[0], r[1], r[2]};
}

// The dispatcher's entry points: each builds the arguments' struct from its op's arguments.

// fused_linear_dual_head_loss's kernels, `run` being the one of the dispatch key.
template <Terms (*run)(const LinearLossArgs&)>
Terms fused_linear_entry(const Tensor& features, const Tensor& ce_weight, const std::optional<Tensor>& ce_bias,
                         const Tensor& kd_weight, const std::optional<Tensor>& kd_bias, const Tensor& teacher_logits,
                         const Tensor& labels, bool kd_cosine, double kd_logit_scale, int64_t chunk_size,
                         double temperature, double ce_loss_weight, double kd_loss_weight, bool kd_split,
                         int64_t ignore_index, double label_smoothing, int64_t teacher_form,
                         const std::optional<Tensor>& teacher_indices,
                         const std::optional<Tensor>& teacher_row_terms) {
  return run({.features = features,
              .ce_weight = ce_weight,
              .ce_bias = ce_bias,
              .kd_weight = kd_weight,
              .kd_bias = kd_bias,
              .teacher_logits = teacher_logits,
              .labels = labels,
              .kd_cosine = kd_cosine,
              .kd_logit_scale = kd_logit_scale,
              .chunk_size = chunk_size,
              .temperature = temperature,
              .ce_loss_weight = ce_loss_weight,
              .kd_loss_weight = kd_loss_weight,
              .kd_split = kd_split,
              .ignore_index = ignore_index,
              .label_smoothing = label_smoothing,
              .teacher_form = teacher_form,
              .teacher_indices = teacher_indices,
              .teacher_row_terms = teacher_row_terms});
}

// fused_linear_dual_head_loss_with_grads's kernel.
Outputs fused_linear_with_grads_entry(const Tensor& features, const Tensor& ce_weight,
                                      const std::optional<Tensor>& ce_bias, const Tensor& kd_weight,
                                      const std::optional<Tensor>& kd_bias, const Tensor& teacher_logits,
                                      const Tensor& labels, bool kd_cosine, double kd_logit_scale, int64_t chunk_size,
                                      double temperature, double ce_loss_weight, double kd_loss_weight, bool kd_split,
                                      int64_t ignore_index, double label_smoothing, bool grad_features,
                                      bool grad_ce_head, bool grad_kd_head, int64_t teacher_form,
                                      const std::optional<Tensor>& teacher_indices,
                                      const std::optional<Tensor>& teacher_row_terms) {
  return fused_linear_forward({.features = features,
                               .ce_weight = ce_weight,
                               .ce_bias = ce_bias,
                               .kd_weight = kd_weight,
                               .kd_bias = kd_bias,
                               .teacher_logits = teacher_logits,
                               .labels = labels,
                               .kd_cosine = kd_cosine,
                               .kd_logit_scale = kd_logit_scale,
                               .chunk_size = chunk_size,
                               .temperature = temperature,
                               .ce_loss_weight = ce_loss_weight,
                               .kd_loss_weight = kd_loss_weight,
                               .kd_split = kd_split,
                               .ignore_index = ignore_index,
                               .label_smoothing = label_smoothing,
                               .grad_features = grad_features,
                               .grad_ce_head = grad_ce_head,
                               .grad_kd_head = grad_kd_head,
                               .teacher_form = teacher_form,
                               .teacher_indices = teacher_indices,
                               .teacher_row_terms = teacher_row_terms});
}

}  // namespace
}  // namespace dho_fast

TORCH_LIBRARY_IMPL(dho_fast, CompositeExplicitAutograd, m) {
  m.impl("fused_linear_dual_head_loss", &dho_fast::fused_linear_entry<&dho_fast::fused_linear_no_grad>);
  m.impl("fused_linear_dual_head_loss_with_grads", &dho_fast::fused_linear_with_grads_entry);
}

TORCH_LIBRARY_IMPL(dho_fast, Autograd, m) {
  m.impl("fused_linear_dual_head_loss", &dho_fast::fused_linear_entry<&dho_fast::fused_linear_autograd>);
}
