// What the autograd kernels of the grad-in-forward loss ops share (csrc/dual_head_loss_autograd.cpp,
// csrc/fused_linear_dual_head_loss.cpp): their forward writes each loss term's gradient times a scale, and their
// backward multiplies it by what is left of the chain rule, or hands it on as it is.
#pragma once

#include <ATen/ATen.h>
#include <ATen/TensorSubclassLikeUtils.h>

namespace dho_fast {

// The dtype dual_head_loss's forward writes the logits' gradients in (dho_fast/ops/validation.py's
// loss_gradient_dtype is the same rule): bfloat16 for bfloat16 logits, float32 for float16 and float32 ones, float64
// for float64. bfloat16 has float32's exponent range, so a loss scale applied by backward after the rounding cannot
// underflow an entry (and a power-of-two scale such as GradScaler's gives the same bits as scaling first), while
// the usual backward then has no rounding pass left; float16's range is too narrow for that: its gradients stay float32
// until backward has scaled them, and are rounded then.
inline at::ScalarType loss_gradient_dtype(at::ScalarType logits) {
  return logits == at::kBFloat16 || logits == at::kDouble ? logits : at::kFloat;
}

// The scale a forward writes a term's gradient with: the term's loss weight, so that the saved gradient is the loss's
// own and the usual loss.backward() has nothing left to multiply; 1 for a weight of 0, where it would lose the term's
// own gradient (backward through ce_term or kd_term). dho_fast/ops/registry.py's saved_gradient_scale is the same rule.
inline double gradient_scale(double loss_weight) { return loss_weight != 0.0 ? loss_weight : 1.0; }

// The factor backward applies to a gradient saved as saved_scale * d term / d x: d loss / d term / saved_scale, with
// d loss / d term = grad_loss * loss_weight + grad_term. It is grad_loss itself (no arithmetic) in the usual backward
// of the loss alone. Undefined: no gradient reaches the term.
inline at::Tensor term_factor(const at::Tensor& grad_loss, const at::Tensor& grad_term, double loss_weight,
                              double saved_scale) {
  at::Tensor factor;
  if (grad_loss.defined()) factor = loss_weight == saved_scale ? grad_loss : grad_loss * (loss_weight / saved_scale);
  if (grad_term.defined()) factor = factor.defined() ? factor + grad_term / saved_scale : grad_term / saved_scale;
  return factor;
}

// A saved gradient times its factor. Backward never overwrites a saved gradient: that would be safe only if the graph
// were freed after this backward and no transform traced it, and no public API tells whether the graph is retained
// (retain_graph=True) or a transform is running. So:
//  - a factor of exactly 1 (the usual loss.backward()) returns the saved gradient itself: no pass, no allocation.
//    Autograd never writes into a gradient it receives, and AccumulateGrad stores a copy in .grad while the saved
//    variable still refers to the buffer (a retained graph), so in-place updates of .grad (optimizer steps,
//    zero_grad, clipping) cannot change what a later backward returns; once the graph is freed, .grad takes the
//    buffer itself. torch.autograd.grad returns the buffer itself, but a write into it bumps its version and a later
//    backward then raises.
//  - any other factor multiplies out of place, into a new tensor.
// The factor's value is read only from a tensor that is no tracer's: a fake, functional or Python-subclass tensor, or
// any tensor under a dispatch mode (at::isTensorSubclassLike), has no value to read, or one that a traced graph must
// not bake in; such a factor is always multiplied. On CUDA the read is a device synchronisation, which costs only the
// seed gradient's wait: the ops' forward has already synchronised to report bad labels or teacher rows.
inline at::Tensor times_factor(const at::Tensor& grad, const at::Tensor& factor) {
  const bool one = !at::isTensorSubclassLike(factor) && factor.item<double>() == 1.0;
  return one ? grad : grad * factor;
}

}  // namespace dho_fast
