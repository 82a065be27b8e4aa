"""Everything that makes dho_fast's kernels torch ops, in one place: fake (meta) implementations of the compiled ops,
autograd formulas, and the Triton launchers of dho_fast.kernels registered with ``torch.library.triton_op``.

The loss ops return the gradients of both loss terms from the forward pass (grad-in-forward), so their backward only
scales them by the incoming gradients. The gradients are computed in the accumulation dtype and returned in
``validation.loss_gradient_dtype``: bfloat16 for bfloat16 logits (rounded once, in the forward's row pass), float32
for float16 ones, which the backward scales before it rounds them, so that a loss scale (GradScaler's 65536) keeps
small entries from underflowing float16's narrow range; the fused linear op's are always in the accumulation dtype.
That backward is not itself differentiable: asked for a graph of it
(``create_graph=True``, the only time autograd runs a backward in grad mode) it raises rather than return a gradient
whose own gradient misses the loss's second-order term. The compiled ops' autograd kernels are C++
(csrc/dual_head_loss_autograd.cpp, csrc/fused_linear_dual_head_loss.cpp): their fixed cost is paid every training
step; the Triton op's is here. Importing this module registers everything; dho_fast.ops.backends, which every op
goes through, imports it.
"""

import torch
from torch._subclasses.fake_tensor import is_fake

from dho_fast import kernels
from dho_fast.ops.extension import has_cuda_kernels, has_extension
from dho_fast.ops.validation import (
    TEACHER_FORM_SPARSE,
    accumulate_dtype,
    check_chunk_grad_out,
    check_chunk_labelled,
    check_chunk_layout,
    check_sparse_op_teacher,
    loss_gradient_dtype,
    raise_flagged_kcenter_row,
    raise_flagged_values,
)

LOSS_SCHEMA = (
    "(Tensor ce_logits, Tensor kd_logits, Tensor teacher_logits, Tensor labels, float temperature, "
    "float ce_loss_weight, float kd_loss_weight, bool kd_split, int ignore_index, float label_smoothing, "
    "bool ce_grad, bool kd_grad, float ce_grad_scale=1.0, float kd_grad_scale=1.0, int teacher_form=0, "
    "Tensor? teacher_indices=None, Tensor? teacher_row_terms=None) -> (Tensor loss, Tensor ce_term, Tensor kd_term, "
    "Tensor ce_grad_out, Tensor kd_grad_out)"
)
CHUNK_SCHEMA = (
    "(Tensor(a!) ce_logits, Tensor(b!) kd_logits, Tensor teacher_logits, Tensor labels, int start, int num_labelled, "
    "float temperature, bool kd_split, int ignore_index, float label_smoothing, bool ce_grad, bool kd_grad, "
    "Tensor? ce_bias=None, Tensor? kd_bias=None, float ce_grad_scale=1.0, float kd_grad_scale=1.0, "
    "Tensor(c!)? ce_grad_out=None, Tensor(d!)? kd_grad_out=None, int teacher_form=0, Tensor? teacher_indices=None, "
    "Tensor? teacher_row_terms=None) -> (Tensor ce_term, Tensor kd_term)"
)


def dual_head_loss_fake(
    ce_logits, kd_logits, teacher_logits, labels, temperature, ce_loss_weight, kd_loss_weight, kd_split, ignore_index,
    label_smoothing, ce_grad, kd_grad, ce_grad_scale=1.0, kd_grad_scale=1.0, teacher_form=0, teacher_indices=None,
    teacher_row_terms=None,
):  # fmt: skip
    scalar = ce_logits.new_empty((), dtype=accumulate_dtype(ce_logits.dtype))
    grad_dtype = loss_gradient_dtype(ce_logits.dtype)
    grad_ce = torch.empty_like(ce_logits, dtype=grad_dtype) if ce_grad else ce_logits.new_empty((0,))
    grad_kd = torch.empty_like(kd_logits, dtype=grad_dtype) if kd_grad else kd_logits.new_empty((0,))
    return scalar, scalar.clone(), scalar.clone(), grad_ce, grad_kd


def dual_head_loss_chunk_fake(
    ce_logits, kd_logits, teacher_logits, labels, start, num_labelled, temperature, kd_split, ignore_index,
    label_smoothing, ce_grad, kd_grad, ce_bias=None, kd_bias=None, ce_grad_scale=1.0, kd_grad_scale=1.0,
    ce_grad_out=None, kd_grad_out=None, teacher_form=0, teacher_indices=None, teacher_row_terms=None,
):  # fmt: skip
    scalar = kd_logits.new_empty((), dtype=accumulate_dtype(kd_logits.dtype))
    return scalar, scalar.clone()


def fused_linear_dual_head_loss_fake(features, *_args):
    scalar = features.new_empty((), dtype=accumulate_dtype(features.dtype))
    return scalar, scalar.clone(), scalar.clone()


def fused_linear_dual_head_loss_with_grads_fake(
    features, ce_weight, ce_bias, kd_weight, kd_bias, teacher_logits, labels, kd_cosine, kd_logit_scale, chunk_size,
    temperature, ce_loss_weight, kd_loss_weight, kd_split, ignore_index, label_smoothing, grad_features,
    grad_ce_head, grad_kd_head, teacher_form=0, teacher_indices=None, teacher_row_terms=None,
):  # fmt: skip
    acc = accumulate_dtype(features.dtype)
    scalar = features.new_empty((), dtype=acc)

    def grad(t: torch.Tensor | None, wanted: bool) -> torch.Tensor:
        return features.new_empty(t.shape, dtype=acc) if wanted and t is not None else features.new_empty((0,))

    return (
        scalar, scalar.clone(), scalar.clone(), grad(features, grad_features), grad(features, grad_features),
        grad(ce_weight, grad_ce_head), grad(ce_bias, grad_ce_head), grad(kd_weight, grad_kd_head),
        grad(kd_bias, grad_kd_head),
    )  # fmt: skip


def kcenter_update_fake(points, centres, min_sq_dist):
    # The index and value of the first maximum; min_sq_dist is updated in place (the schema declares it).
    return points.new_empty((), dtype=torch.int64), points.new_empty((), dtype=torch.float32)


#: What a backward asked for a graph of itself says; {op} names the op.
DOUBLE_BACKWARD_MESSAGE = (
    "{op} has no double backward: its backward scales gradients the forward computed, so a graph of it "
    '(create_graph=True, e.g. a gradient penalty) would miss the loss\'s second-order term; use backend="reference" '
    "(pure PyTorch), whose double backward is correct"
)


def saved_gradient_scale(loss_weight: float) -> float:
    """The factor the loss ops' forward writes a term's logit gradient with (their ``*_grad_scale`` argument): the
    term's loss weight, so that the saved gradient is the loss's own and a plain ``loss.backward()`` hands it on
    unchanged; 1 for a weight of 0, where it would lose the term's gradient that ``ce_term.backward()`` needs."""
    return loss_weight if loss_weight != 0 else 1.0


def _setup_context(ctx, inputs, output) -> None:
    ctx.ce_loss_weight, ctx.kd_loss_weight = inputs[5], inputs[6]
    ctx.ce_grad_scale, ctx.kd_grad_scale = inputs[12], inputs[13]
    ctx.ce_dtype, ctx.kd_dtype = inputs[0].dtype, inputs[1].dtype
    ctx.save_for_backward(output[3], output[4])
    # The returned gradients are results, not functions of the inputs to differentiate; and the loss terms a caller
    # ignores should not be backpropagated as materialised zeros.
    ctx.mark_non_differentiable(output[3], output[4])
    ctx.set_materialize_grads(False)


def _is_one(grad: torch.Tensor | None) -> bool:
    """Whether the incoming gradient of the loss is exactly 1 (plain ``loss.backward()``): one scalar read, a device
    sync on CUDA. False, without reading it, for a gradient without a value: while torch.compile traces the backward,
    and for meta or fake tensors."""
    if grad is None or grad.is_meta or torch.compiler.is_compiling() or is_fake(grad):
        return False
    return bool(grad == 1)


def _scaled(
    saved: torch.Tensor, weight: float, saved_scale: float, grad_loss, grad_of_term, name: str, dtype: torch.dtype
) -> torch.Tensor | None:
    """The gradient of the logits, ``(grad_loss * weight + grad_of_term) * d term / d logits``, from ``saved`` =
    ``saved_scale * d term / d logits`` (``loss_gradient_dtype``), rounded once to ``dtype``; None when no gradient
    reaches the term (only the other term is backpropagated), as PyTorch's own graph leaves such logits.
    The compiled ops' C++ backward (csrc/saved_gradients.h) follows the same rules.

    When the factor is exactly 1 (``grad_loss`` is 1, no gradient of the term itself, ``saved_scale`` the weight),
    ``saved`` itself is returned when no rounding is due (no pass over it and no allocation), else only rounded.
    That is safe: a backward without ``retain_graph`` frees ``saved`` before the next node runs (a leaf's ``.grad``
    then takes it over), and with ``retain_graph`` autograd copies a gradient it must keep before accumulating into
    it; an in-place change of it by other code is caught by autograd's version check, never read silently. Every
    other case scales out of place: a backward cannot see ``retain_graph``, so it never writes ``saved`` in place.
    """
    if grad_loss is None and grad_of_term is None:
        return None
    if saved.dim() != 2:  # the (0,) placeholder of a gradient the forward was told not to compute
        raise RuntimeError(f"the gradient of {name} was not computed in the forward pass (its grad flag was False)")
    if grad_of_term is None and weight == saved_scale and _is_one(grad_loss):
        # A factor of exactly 1: ``saved`` itself, except for float16 logits (their one rounding, one pass).
        return saved if saved.dtype == dtype else saved.to(dtype)
    scale = 0.0 if grad_loss is None else grad_loss * (weight / saved_scale)
    if grad_of_term is not None:
        scale = scale + grad_of_term * (1.0 / saved_scale)
    # A no-op but for float16 logits: their one rounding, after the scale.
    return (saved * scale).to(dtype)


def _backward(ctx, grad_loss, grad_ce_term, grad_kd_term, _grad_ce_out, _grad_kd_out):
    if torch.is_grad_enabled():
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE.format(op="dho_fast.fused_dual_head_loss"))
    grad_ce, grad_kd = ctx.saved_tensors
    d_ce = d_kd = None
    if ctx.needs_input_grad[0]:
        d_ce = _scaled(
            grad_ce, ctx.ce_loss_weight, ctx.ce_grad_scale, grad_loss, grad_ce_term, "ce_logits", ctx.ce_dtype
        )
    if ctx.needs_input_grad[1]:
        d_kd = _scaled(
            grad_kd, ctx.kd_loss_weight, ctx.kd_grad_scale, grad_loss, grad_kd_term, "kd_logits", ctx.kd_dtype
        )
    return (d_ce, d_kd) + (None,) * 15


def _register_compiled_ops() -> None:
    # dual_head_loss's autograd kernel is C++ (csrc/dual_head_loss_autograd.cpp), like the fused linear op's.
    torch.library.register_fake("dho_fast::dual_head_loss")(dual_head_loss_fake)
    # The chunk op is a building block of fused_linear_dual_head_loss, which has the autograd formula; it has none.
    torch.library.register_fake("dho_fast::dual_head_loss_chunk")(dual_head_loss_chunk_fake)
    torch.library.register_fake("dho_fast::fused_linear_dual_head_loss")(fused_linear_dual_head_loss_fake)
    torch.library.register_fake("dho_fast::fused_linear_dual_head_loss_with_grads")(
        fused_linear_dual_head_loss_with_grads_fake
    )
    # The k-center step has no gradient: it selects points.
    torch.library.register_fake("dho_fast::kcenter_update")(kcenter_update_fake)


def _register_triton_ops() -> None:
    from torch.library import triton_op

    from dho_fast.kernels import blend as triton_blend
    from dho_fast.kernels import dual_head_loss as triton_loss
    from dho_fast.kernels import kcenter as triton_kcenter

    @triton_op("dho_fast::dual_head_loss_triton", mutates_args=(), schema=LOSS_SCHEMA)
    def dual_head_loss_triton(
        ce_logits: torch.Tensor, kd_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
        temperature: float, ce_loss_weight: float, kd_loss_weight: float, kd_split: bool, ignore_index: int,
        label_smoothing: float, ce_grad: bool, kd_grad: bool, ce_grad_scale: float = 1.0, kd_grad_scale: float = 1.0,
        teacher_form: int = 0, teacher_indices: torch.Tensor | None = None,
        teacher_row_terms: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        if teacher_form == TEACHER_FORM_SPARSE:
            check_sparse_op_teacher(teacher_logits, teacher_indices, teacher_row_terms, ce_logits.shape[1], ce_logits,
                                    slice(None))  # fmt: skip
        *result, info = triton_loss.dual_head_loss(
            ce_logits, kd_logits, teacher_logits, labels, temperature, ce_loss_weight, kd_loss_weight, kd_split,
            ignore_index, label_smoothing, ce_grad, kd_grad, ce_grad_scale, kd_grad_scale, teacher_form,
            teacher_indices, teacher_row_terms, grad_dtype=loss_gradient_dtype(ce_logits.dtype),
        )  # fmt: skip
        raise_flagged_values(info, labels, ce_logits.shape[1], ignore_index, teacher_form=teacher_form)
        return tuple(result)

    torch.library.register_autograd("dho_fast::dual_head_loss_triton", _backward, setup_context=_setup_context)

    @triton_op(
        "dho_fast::dual_head_loss_chunk_triton",
        mutates_args={"ce_logits", "kd_logits", "ce_grad_out", "kd_grad_out"},
        schema=CHUNK_SCHEMA,
    )
    def dual_head_loss_chunk_triton(
        ce_logits: torch.Tensor, kd_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
        start: int, num_labelled: int, temperature: float, kd_split: bool, ignore_index: int, label_smoothing: float,
        ce_grad: bool, kd_grad: bool, ce_bias: torch.Tensor | None = None, kd_bias: torch.Tensor | None = None,
        ce_grad_scale: float = 1.0, kd_grad_scale: float = 1.0, ce_grad_out: torch.Tensor | None = None,
        kd_grad_out: torch.Tensor | None = None, teacher_form: int = 0, teacher_indices: torch.Tensor | None = None,
        teacher_row_terms: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        check_chunk_layout(ce_logits, kd_logits, teacher_logits, labels, start, ce_bias, kd_bias, teacher_form)
        if teacher_form == TEACHER_FORM_SPARSE:
            check_sparse_op_teacher(teacher_logits, teacher_indices, teacher_row_terms, kd_logits.shape[1], kd_logits,
                                    slice(start, start + kd_logits.shape[0]))  # fmt: skip
        check_chunk_grad_out("ce_grad_out", ce_grad_out, "ce_logits", ce_logits, ce_grad)
        check_chunk_grad_out("kd_grad_out", kd_grad_out, "kd_logits", kd_logits, kd_grad)
        ce_term, kd_term, info = triton_loss.dual_head_loss_chunk(
            ce_logits, kd_logits, teacher_logits, labels, start, num_labelled, temperature, kd_split, ignore_index,
            label_smoothing, ce_grad, kd_grad, ce_bias, kd_bias, ce_grad_scale, kd_grad_scale, ce_grad_out,
            kd_grad_out, teacher_form, teacher_indices, teacher_row_terms,
        )  # fmt: skip
        rows = labels[start : start + kd_logits.shape[0]]
        chunk_labelled = raise_flagged_values(
            info, rows, kd_logits.shape[1], ignore_index, first_row=start, teacher_form=teacher_form
        )
        if chunk_labelled is not None:
            check_chunk_labelled(ce_logits.shape[0], chunk_labelled, num_labelled)
        return ce_term, kd_term

    if has_extension() and not has_cuda_kernels():
        # Without compiled CUDA kernels, the chunk op of fused_linear_dual_head_loss runs in Triton on CUDA tensors.
        torch.library.impl("dho_fast::dual_head_loss_chunk", "CUDA")(dual_head_loss_chunk_triton)

    triton_op("dho_fast::dual_head_predict_triton", mutates_args=())(triton_blend.dual_head_predict)
    triton_op("dho_fast::blend_search_triton", mutates_args=())(triton_blend.blend_search)

    @triton_op("dho_fast::kcenter_update_triton", mutates_args={"min_sq_dist"})
    def kcenter_update_triton(
        points: torch.Tensor, centres: torch.Tensor, min_sq_dist: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        index, value, bad_row = triton_kcenter.kcenter_update(points, centres, min_sq_dist)
        raise_flagged_kcenter_row(bad_row)
        return index, value


if has_extension():
    _register_compiled_ops()
if kernels.has_triton():
    _register_triton_ops()
