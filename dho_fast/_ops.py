"""Loads the compiled extension and gives its ops what torch.compile and autograd need: fake and autograd kernels.

The compiled op returns the gradients of both loss terms from the forward pass (grad-in-forward), so backward
only scales them by the incoming gradients.
"""

import torch

try:
    from dho_fast import _C  # noqa: F401  (importing registers the ops)

    EXTENSION_ERROR: Exception | None = None
except ImportError as error:  # a source checkout that was never built
    EXTENSION_ERROR = error


def has_extension() -> bool:
    return EXTENSION_ERROR is None


def has_cuda_kernels() -> bool:
    """Whether the extension was built with its CUDA kernels."""
    return has_extension() and torch._C._dispatch_has_kernel_for_dispatch_key("dho_fast::dual_head_loss", "CUDA")


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dual_head_loss_fake(
    ce_logits, kd_logits, teacher_logits, labels, temperature, ce_weight, kd_weight, kd_split, ignore_index,
    label_smoothing, ce_grad, kd_grad,
):  # fmt: skip
    scalar = ce_logits.new_empty((), dtype=_accumulate_dtype(ce_logits.dtype))
    grad_ce = torch.empty_like(ce_logits) if ce_grad else ce_logits.new_empty((0,))
    grad_kd = torch.empty_like(kd_logits) if kd_grad else kd_logits.new_empty((0,))
    return scalar, scalar.clone(), scalar.clone(), grad_ce, grad_kd


def dual_head_loss_chunk_fake(
    ce_logits, kd_logits, teacher_logits, labels, start, num_labelled, temperature, kd_split, ignore_index,
    label_smoothing, ce_grad, kd_grad, ce_bias=None, kd_bias=None, ce_grad_scale=1.0, kd_grad_scale=1.0,
):  # fmt: skip
    scalar = kd_logits.new_empty((), dtype=_accumulate_dtype(kd_logits.dtype))
    return scalar, scalar.clone()


def fused_linear_dual_head_loss_fake(features, *_args):
    scalar = features.new_empty((), dtype=_accumulate_dtype(features.dtype))
    return scalar, scalar.clone(), scalar.clone()


def fused_linear_dual_head_loss_with_grads_fake(
    features, ce_weight, ce_bias, kd_weight, kd_bias, teacher_logits, labels, kd_cosine, kd_logit_scale, chunk_size,
    temperature, ce_loss_weight, kd_loss_weight, kd_split, ignore_index, label_smoothing, grad_features,
    grad_ce_head, grad_kd_head,
):  # fmt: skip
    scalar = features.new_empty((), dtype=_accumulate_dtype(features.dtype))

    def grad(t: torch.Tensor | None, wanted: bool) -> torch.Tensor:
        return features.new_empty(t.shape, dtype=t.dtype) if wanted and t is not None else features.new_empty((0,))

    return (
        scalar, scalar.clone(), scalar.clone(), grad(features, grad_features), grad(features, grad_features),
        grad(ce_weight, grad_ce_head), grad(ce_bias, grad_ce_head), grad(kd_weight, grad_kd_head),
        grad(kd_bias, grad_kd_head),
    )  # fmt: skip


def _setup_context(ctx, inputs, output) -> None:
    ctx.ce_weight, ctx.kd_weight = inputs[5], inputs[6]
    ctx.save_for_backward(output[3], output[4])
    # The returned gradients are results, not functions of the inputs to differentiate; and the loss terms a caller
    # ignores should not be backpropagated as materialised zeros.
    ctx.mark_non_differentiable(output[3], output[4])
    ctx.set_materialize_grads(False)


def _scaled(grad_term: torch.Tensor, weight: float, grad_loss, grad_of_term, name: str) -> torch.Tensor:
    if grad_term.dim() != 2:  # the (0,) placeholder of a gradient the forward was told not to compute
        raise RuntimeError(f"the gradient of {name} was not computed in the forward pass (its grad flag was False)")
    scale = 0.0
    if grad_loss is not None:
        scale = grad_loss * weight
    if grad_of_term is not None:
        scale = scale + grad_of_term
    return grad_term * scale


def _backward(ctx, grad_loss, grad_ce_term, grad_kd_term, _grad_ce_out, _grad_kd_out):
    grad_ce, grad_kd = ctx.saved_tensors
    d_ce = _scaled(grad_ce, ctx.ce_weight, grad_loss, grad_ce_term, "ce_logits") if ctx.needs_input_grad[0] else None
    d_kd = _scaled(grad_kd, ctx.kd_weight, grad_loss, grad_kd_term, "kd_logits") if ctx.needs_input_grad[1] else None
    return (d_ce, d_kd) + (None,) * 10


def register_loss_autograd(op_name: str) -> None:
    """Gives an op with dual_head_loss's schema (any backend's, e.g. the Triton op) its grad-in-forward autograd."""
    torch.library.register_autograd(op_name, _backward, setup_context=_setup_context)


if has_extension():
    torch.library.register_fake("dho_fast::dual_head_loss")(dual_head_loss_fake)
    register_loss_autograd("dho_fast::dual_head_loss")
    # The chunk op is a building block of fused_linear_dual_head_loss, which has the autograd formula; it has none.
    torch.library.register_fake("dho_fast::dual_head_loss_chunk")(dual_head_loss_chunk_fake)
    # fused_linear_dual_head_loss's autograd kernel is C++ (csrc/fused_linear_dual_head_loss.cpp): its fixed cost
    # is paid every training step.
    torch.library.register_fake("dho_fast::fused_linear_dual_head_loss")(fused_linear_dual_head_loss_fake)
    torch.library.register_fake("dho_fast::fused_linear_dual_head_loss_with_grads")(
        fused_linear_dual_head_loss_with_grads_fake
    )
