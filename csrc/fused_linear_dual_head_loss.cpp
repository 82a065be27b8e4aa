// dho_fast::fused_linear_dual_head_loss, for every device: row chunks of both heads' GEMMs (ATen) around
// dho_fast::dual_head_loss_chunk, which the dispatcher sends to the tensors' device's kernel. Only one chunk's logits
// exist at a time. The gradients are computed in the forward pass (grad-in-forward) and the autograd kernel below
// only scales them. It is C++ rather than Python because the op's fixed cost is part of every training step.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

namespace dho_fast {
namespace {

using at::Tensor;
using Outputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// eps of F.normalize: the cosine KD head sees x / max(|x|, eps).
constexpr double kNormEps = 1e-12;

// dual_head_loss_chunk through the dispatcher: the kernel of the logits' device.
std::tuple<Tensor, Tensor> loss_chunk(Tensor& ce_logits, Tensor& kd_logits, const Tensor& teacher, const Tensor& labels,
                                      int64_t start, int64_t num_labelled, double temperature, bool kd_split,
                                      int64_t ignore_index, double label_smoothing, bool ce_grad, bool kd_grad) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dho_fast::dual_head_loss_chunk", "")
                             .typed<std::tuple<Tensor, Tensor>(Tensor&, Tensor&, const Tensor&, const Tensor&, int64_t,
                                                               int64_t, double, bool, int64_t, double, bool, bool)>();
  return op.call(ce_logits, kd_logits, teacher, labels, start, num_labelled, temperature, kd_split, ignore_index,
                 label_smoothing, ce_grad, kd_grad);
}

// scale * (x @ weight.T + bias): a fresh contiguous tensor the chunk kernel may overwrite.
Tensor head_logits(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, double scale) {
  if (!bias) {
    Tensor z = at::mm(x, weight.t());
    return scale == 1.0 ? z : z.mul_(scale);
  }
  return at::addmm(*bias, x, weight.t(), scale, scale);
}

// grad_weight = beta * grad_weight + scale * dz^T x and grad_bias = beta * grad_bias + scale * sum_rows dz, with
// beta = 0 for the first chunk (the accumulators start uninitialised); in the accumulators' float32 for half inputs.
void accumulate(Tensor& grad_weight, Tensor& grad_bias, const Tensor& dz, const Tensor& x, double scale, bool first) {
  const Tensor dz_acc = dz.to(grad_weight.scalar_type());
  grad_weight.addmm_(dz_acc.t(), x.to(grad_weight.scalar_type()), first ? 0.0 : 1.0, scale);
  if (!grad_bias.defined()) return;
  const Tensor column_sum = dz_acc.sum(0);
  if (first) {
    at::mul_out(grad_bias, column_sum, scale);
  } else {
    grad_bias.add_(column_sum, scale);
  }
}

// d/dx of scale * (x / max(|x|, eps)) given g = d/d(that) / scale: scale * (g - u (u . g)) / |x|, or scale * g / eps
// where the clamp is active (the norm is then a constant). In float32 for half inputs: the tangential part can be
// much smaller than g.
Tensor normalize_backward(const Tensor& grad, const Tensor& x_unit, const Tensor& norm, double scale) {
  const Tensor g = grad.to(norm.scalar_type()), u = x_unit.to(norm.scalar_type());
  const Tensor radial = at::where(norm > kNormEps, (u * g).sum(1, /*keepdim=*/true), 0.0);
  return ((g - u * radial) * (scale / norm.clamp_min(kNormEps))).to(grad.scalar_type());
}

Outputs fused_linear_forward(const Tensor& features, const Tensor& ce_weight, const std::optional<Tensor>& ce_bias,
                             const Tensor& kd_weight, const std::optional<Tensor>& kd_bias,
                             const Tensor& teacher_logits, const Tensor& labels, bool kd_cosine,
                             double kd_logit_scale, int64_t chunk_size, double temperature, double ce_loss_weight,
                             double kd_loss_weight, bool kd_split, int64_t ignore_index, double label_smoothing,
                             bool grad_features, bool grad_ce_head, bool grad_kd_head) {
  TORCH_CHECK(features.dim() == 2 && ce_weight.dim() == 2 && ce_weight.size(1) == features.size(1),
              "features must be (N, D) and ce_weight (C, D), got ", features.sizes(), " and ", ce_weight.sizes());
  TORCH_CHECK(chunk_size >= 1, "chunk_size must be >= 1, got ", chunk_size);
  const int64_t N = features.size(0), D = features.size(1), C = ce_weight.size(0);
  const auto acc = features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor x = features.contiguous(), teacher = teacher_logits.contiguous(), y = labels.contiguous();
  Tensor kd_x = x, norm;
  if (kd_cosine) {
    norm = at::linalg_vector_norm(x.to(acc), 2, at::IntArrayRef{1}, /*keepdim=*/true);
    kd_x = (x / norm.clamp_min(kNormEps)).to(x.scalar_type());
  }

  // Unweighted gradients of ce_term and kd_term; undefined: not asked for (or no bias).
  Tensor d_x_ce, d_x_kd, d_w_ce, d_b_ce, d_w_kd, d_b_kd;
  if (grad_features) {
    d_x_ce = at::zeros({N, D}, x.options());  // unlabelled rows get no CE gradient
    d_x_kd = at::empty({N, D}, x.options());
  }
  const auto acc_options = x.options().dtype(acc);
  // The first chunk overwrites an accumulator; only a batch without rows (no chunk) leaves it at zero.
  auto accumulator = [&](at::IntArrayRef shape) {
    return N ? at::empty(shape, acc_options) : at::zeros(shape, acc_options);
  };
  if (grad_ce_head) {
    d_w_ce = accumulator({C, D});
    if (ce_bias) d_b_ce = accumulator({C});
  }
  if (grad_kd_head) {
    d_w_kd = accumulator({C, D});
    if (kd_bias) d_b_kd = accumulator({C});
  }

  // Batch indices of the labelled rows, and where each chunk's begin in that list: one host sync for all chunks.
  const Tensor labelled_rows = (y != ignore_index).nonzero().squeeze(1);
  const int64_t num_chunks = (N + chunk_size - 1) / chunk_size;
  const Tensor chunk_starts = at::arange(0, num_chunks + 1, y.options()).mul_(chunk_size).clamp_max_(N);
  const Tensor bounds = at::searchsorted(labelled_rows, chunk_starts).to(at::kCPU);
  const int64_t* b = bounds.const_data_ptr<int64_t>();

  Tensor ce_term = at::zeros({}, acc_options), kd_term = at::zeros({}, acc_options);
  for (int64_t k = 0; k < num_chunks; ++k) {
    const int64_t start = k * chunk_size, stop = std::min(start + chunk_size, N);
    const Tensor rows = labelled_rows.slice(0, b[k], b[k + 1]);
    const Tensor x_ce = x.index_select(0, rows), x_kd = kd_x.slice(0, start, stop);
    Tensor z_ce = head_logits(x_ce, ce_weight, ce_bias, 1.0);
    Tensor z_kd = head_logits(x_kd, kd_weight, kd_bias, kd_logit_scale);
    const auto [ce_sum, kd_sum] =
        loss_chunk(z_ce, z_kd, teacher, y, start, labelled_rows.size(0), temperature, kd_split, ignore_index,
                   label_smoothing, grad_features || grad_ce_head, grad_features || grad_kd_head);
    ce_term.add_(ce_sum);
    kd_term.add_(kd_sum);
    // z_ce and z_kd now hold d ce_term / d z_ce and d kd_term / d z_kd.
    if (grad_features) {
      d_x_ce.index_copy_(0, rows, at::mm(z_ce, ce_weight));
      Tensor d_x_kd_rows = d_x_kd.slice(0, start, stop);
      at::mm_out(d_x_kd_rows, z_kd, kd_weight);
    }
    if (grad_ce_head) accumulate(d_w_ce, d_b_ce, z_ce, x_ce, 1.0, k == 0);
    if (grad_kd_head) accumulate(d_w_kd, d_b_kd, z_kd, x_kd, kd_logit_scale, k == 0);
  }
  if (grad_features && kd_cosine) {
    d_x_kd = normalize_backward(d_x_kd, kd_x, norm, kd_logit_scale);
  } else if (grad_features && kd_logit_scale != 1.0) {
    d_x_kd.mul_(kd_logit_scale);
  }

  // A gradient not asked for is returned as a (0,) placeholder; weight gradients in their weights' dtype.
  auto out = [&](const Tensor& grad, const Tensor& like) {
    return grad.defined() ? grad.to(like.scalar_type()) : at::empty({0}, x.options());
  };
  Tensor loss = ce_term * ce_loss_weight + kd_term * kd_loss_weight;
  return {loss,
          ce_term,
          kd_term,
          out(d_x_ce, x),
          out(d_x_kd, x),
          out(d_w_ce, ce_weight),
          out(d_b_ce, ce_weight),
          out(d_w_kd, kd_weight),
          out(d_b_kd, kd_weight)};
}

using Terms = std::tuple<Tensor, Tensor, Tensor>;

// The op when autograd is not involved (below it, or under inference_mode): no gradients.
Terms fused_linear_no_grad(const Tensor& features, const Tensor& ce_weight, const std::optional<Tensor>& ce_bias,
                           const Tensor& kd_weight, const std::optional<Tensor>& kd_bias, const Tensor& teacher_logits,
                           const Tensor& labels, bool kd_cosine, double kd_logit_scale, int64_t chunk_size,
                           double temperature, double ce_loss_weight, double kd_loss_weight, bool kd_split,
                           int64_t ignore_index, double label_smoothing) {
  const auto r = fused_linear_forward(features, ce_weight, ce_bias, kd_weight, kd_bias, teacher_logits, labels,
                                      kd_cosine, kd_logit_scale, chunk_size, temperature, ce_loss_weight,
                                      kd_loss_weight, kd_split, ignore_index, label_smoothing, false, false, false);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

// fused_linear_dual_head_loss_with_grads below autograd, through the dispatcher: under torch.compile's tracing this
// reaches its fake implementation.
Outputs with_grads_below_autograd(const Tensor& features, const Tensor& ce_weight, const std::optional<Tensor>& ce_bias,
                                  const Tensor& kd_weight, const std::optional<Tensor>& kd_bias,
                                  const Tensor& teacher_logits, const Tensor& labels, bool kd_cosine,
                                  double kd_logit_scale, int64_t chunk_size, double temperature, double ce_loss_weight,
                                  double kd_loss_weight, bool kd_split, int64_t ignore_index, double label_smoothing,
                                  bool grad_features, bool grad_ce_head, bool grad_kd_head) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dho_fast::fused_linear_dual_head_loss_with_grads", "")
                             .typed<Outputs(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
                                            const std::optional<Tensor>&, const Tensor&, const Tensor&, bool, double,
                                            int64_t, double, double, double, bool, int64_t, double, bool, bool, bool)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(features, ce_weight, ce_bias, kd_weight, kd_bias, teacher_logits, labels, kd_cosine, kd_logit_scale,
                 chunk_size, temperature, ce_loss_weight, kd_loss_weight, kd_split, ignore_index, label_smoothing,
                 grad_features, grad_ce_head, grad_kd_head);
}

// The gradients come from the forward; backward scales them by d loss / d term = grad_loss * loss weight + grad_term.
class FusedLinearFunction : public torch::autograd::Function<FusedLinearFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const Tensor& features, const Tensor& ce_weight,
      const std::optional<Tensor>& ce_bias, const Tensor& kd_weight, const std::optional<Tensor>& kd_bias,
      const Tensor& teacher_logits, const Tensor& labels, bool kd_cosine, double kd_logit_scale, int64_t chunk_size,
      double temperature, double ce_loss_weight, double kd_loss_weight, bool kd_split, int64_t ignore_index,
      double label_smoothing, bool grad_features, bool grad_ce_head, bool grad_kd_head) {
    const auto [loss, ce_term, kd_term, d_x_ce, d_x_kd, d_w_ce, d_b_ce, d_w_kd, d_b_kd] = with_grads_below_autograd(
        features, ce_weight, ce_bias, kd_weight, kd_bias, teacher_logits, labels, kd_cosine, kd_logit_scale,
        chunk_size, temperature, ce_loss_weight, kd_loss_weight, kd_split, ignore_index, label_smoothing,
        grad_features, grad_ce_head, grad_kd_head);
    ctx->save_for_backward({d_x_ce, d_x_kd, d_w_ce, d_b_ce, d_w_kd, d_b_kd});
    // A loss term the caller ignores must not be backpropagated as materialised zeros.
    ctx->set_materialize_grads(false);
    ctx->saved_data["ce_loss_weight"] = ce_loss_weight;
    ctx->saved_data["kd_loss_weight"] = kd_loss_weight;
    ctx->saved_data["has_ce_bias"] = ce_bias.has_value();
    ctx->saved_data["has_kd_bias"] = kd_bias.has_value();
    return {loss, ce_term, kd_term};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    // The saved gradients are seen by nothing but this backward. Unless the graph is kept for another one they are
    // freed after it, so they are scaled in place: fresh buffers of their size would cost memory and page faults
    // on first touch, more than the multiplication itself. A tracer (torch.compile's AOTAutograd, on fake or
    // functional tensors) must see a functional backward and gets the out-of-place one.
    const bool traced = c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::Python) ||
                        saved[0].key_set().has_any(
                            c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
    const bool in_place = !traced && !torch::autograd::get_current_graph_task_keep_graph();
    const Tensor& grad_loss = grad_outputs[0];
    // Undefined: no gradient reaches that term.
    auto term_scale = [&](double loss_weight, const Tensor& grad_term) {
      if (!grad_loss.defined()) return grad_term;
      const Tensor from_loss = grad_loss * loss_weight;
      return grad_term.defined() ? from_loss + grad_term : from_loss;
    };
    const Tensor s_ce = term_scale(ctx->saved_data["ce_loss_weight"].toDouble(), grad_outputs[1]);
    const Tensor s_kd = term_scale(ctx->saved_data["kd_loss_weight"].toDouble(), grad_outputs[2]);
    // needs_input_grad counts the tensor inputs only: an absent bias has no entry.
    const bool present[5] = {true, true, ctx->saved_data["has_ce_bias"].toBool(), true,
                             ctx->saved_data["has_kd_bias"].toBool()};
    auto scaled = [&](size_t input, const Tensor& term_grad, const Tensor& scale) -> Tensor {
      const size_t tensor_index = std::count(present, present + input, true);
      if (!present[input] || !ctx->needs_input_grad(tensor_index) || !scale.defined()) return Tensor();
      return in_place ? term_grad.mul_(scale) : term_grad * scale;
    };
    Tensor d_features = scaled(0, saved[0], s_ce);
    if (d_features.defined() && s_kd.defined()) {
      d_features.addcmul_(saved[1], s_kd);
    } else if (s_kd.defined()) {
      d_features = scaled(0, saved[1], s_kd);
    }
    torch::autograd::variable_list grads(19);
    grads[0] = d_features;
    grads[1] = scaled(1, saved[2], s_ce);
    grads[2] = scaled(2, saved[3], s_ce);
    grads[3] = scaled(3, saved[4], s_kd);
    grads[4] = scaled(4, saved[5], s_kd);
    return grads;
  }
};

Terms fused_linear_autograd(const Tensor& features, const Tensor& ce_weight, const std::optional<Tensor>& ce_bias,
                            const Tensor& kd_weight, const std::optional<Tensor>& kd_bias, const Tensor& teacher_logits,
                            const Tensor& labels, bool kd_cosine, double kd_logit_scale, int64_t chunk_size,
                            double temperature, double ce_loss_weight, double kd_loss_weight, bool kd_split,
                            int64_t ignore_index, double label_smoothing) {
  const bool grad_on = at::GradMode::is_enabled();
  auto wants = [&](const Tensor& t) { return grad_on && t.requires_grad(); };
  auto wants_bias = [&](const std::optional<Tensor>& t) { return t && wants(*t); };
  const bool grad_features = wants(features), grad_ce_head = wants(ce_weight) || wants_bias(ce_bias),
             grad_kd_head = wants(kd_weight) || wants_bias(kd_bias);
  if (!grad_features && !grad_ce_head && !grad_kd_head) {
    const auto r = with_grads_below_autograd(features, ce_weight, ce_bias, kd_weight, kd_bias, teacher_logits, labels,
                                             kd_cosine, kd_logit_scale, chunk_size, temperature, ce_loss_weight,
                                             kd_loss_weight, kd_split, ignore_index, label_smoothing, false, false,
                                             false);
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
  }
  const auto r = FusedLinearFunction::apply(features, ce_weight, ce_bias, kd_weight, kd_bias, teacher_logits, labels,
                                            kd_cosine, kd_logit_scale, chunk_size, temperature, ce_loss_weight,
                                            kd_loss_weight, kd_split, ignore_index, label_smoothing, grad_features,
                                            grad_ce_head, grad_kd_head);
  return {r[0], r[1], r[2]};
}

}  // namespace
}  // namespace dho_fast

TORCH_LIBRARY_IMPL(dho_fast, CompositeExplicitAutograd, m) {
  m.impl("fused_linear_dual_head_loss", &dho_fast::fused_linear_no_grad);
  m.impl("fused_linear_dual_head_loss_with_grads", &dho_fast::fused_linear_forward);
}

TORCH_LIBRARY_IMPL(dho_fast, Autograd, m) {
  m.impl("fused_linear_dual_head_loss", &dho_fast::fused_linear_autograd);
}
