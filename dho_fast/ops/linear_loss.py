"""The public fused linear dual-head loss: both heads' GEMMs and the DHO loss without materialising the logits."""

import torch

from dho_fast.ops import backends
from dho_fast.ops.loss import autocast_active
from dho_fast.ops.teacher import op_teacher
from dho_fast.ops.validation import check_linear_loss_args

# Chunk rows: at least this many, so the GEMMs stay efficient on small D ...
_MIN_CHUNK_ROWS = 128
# ... and at most D (a chunk's logits then cost about what the weight gradients cost anyway) or this many logits
# per head, so vocabulary-sized C keeps the chunk's buffers to tens of MB.
_MAX_CHUNK_LOGITS = 1 << 24


def default_chunk_size(num_rows: int, num_classes: int, in_features: int) -> int:
    """Rows per chunk: ``min(N, max(128, min(D, 2^24 // C)))``."""
    return max(1, min(num_rows, max(_MIN_CHUNK_ROWS, min(in_features, _MAX_CHUNK_LOGITS // num_classes))))


def fused_linear_dual_head_loss(
    features: torch.Tensor,
    ce_weight: torch.Tensor,
    ce_bias: torch.Tensor | None,
    kd_weight: torch.Tensor,
    kd_bias: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    teacher_probs: torch.Tensor | None = None,
    teacher_topk_indices: torch.Tensor | None = None,
    teacher_topk_values: torch.Tensor | None = None,
    teacher_tail: str = "renormalize",
    kd_cosine: bool = False,
    kd_logit_scale: float = 1.0,
    chunk_size: int | None = None,
    temperature: float = 2.0,
    ce_loss_weight: float = 0.5,
    kd_loss_weight: float = 0.5,
    kd_reduction: str = "split",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    return_terms: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DHO loss of two linear heads over shared features, computed in row chunks without the (N, C) logits.

    The heads' logits are ``z_ce = features @ ce_weight.T + ce_bias`` and
    ``z_kd = kd_logit_scale * (g(features) @ kd_weight.T + kd_bias)``, ``g = normalize`` (rows divided by their L2
    norm, as ``F.normalize``) when ``kd_cosine`` else the identity; the loss is
    :func:`dho_fast.fused_dual_head_loss` of ``(z_ce, z_kd, teacher_logits, labels)``.

    Args:
        features: (N, D) float32, float64, bfloat16 or float16.
        ce_weight, kd_weight: (C, D) head weights; ce_bias, kd_bias: (C,) or None. Same dtype and device as
            ``features``.
        teacher_logits: (N, C), same dtype and device; ``-inf`` masks a class. Detached: it gets no gradient on any
            backend. None when the teacher comes as ``teacher_probs`` or top-k (exactly one form per call).
        labels: (N,) int64 in ``[0, C)``, ``ignore_index`` for unlabelled rows.
        teacher_probs, teacher_topk_indices, teacher_topk_values, teacher_tail: the teacher's other forms, as in
            :func:`dho_fast.fused_dual_head_loss` (a dense one of the features' dtype and device).
        kd_cosine: the KD head sees the L2-normalised features (METHOD.md's CLIP-student head); the gradient flows
            through the normalisation.
        kd_logit_scale: s > 0 multiplying the KD head's logits (100 in the CLIP-student recipe).
        chunk_size: rows per chunk; None picks :func:`default_chunk_size`. Extra memory is O(chunk_size * C).
        temperature, kd_reduction, ignore_index, label_smoothing, return_terms, backend: as in
            :func:`dho_fast.fused_dual_head_loss`. Backend "reference" materialises the logits (eager PyTorch,
            :func:`dho_fast.reference.dual_head_logits`); the others run the chunked op, whose per-chunk step is
            the kernel of the device (CPU: compiled; CUDA: compiled, or Triton's in a build without CUDA kernels).
        ce_loss_weight, kd_loss_weight: the loss weights w_ce, w_kd >= 0, as in ``fused_dual_head_loss``.

    Returns:
        ``loss = w_ce * ce_term + w_kd * kd_term`` as a float32 scalar (float64 for float64 input), or
        ``(loss, ce_term, kd_term)`` with ``return_terms``; all differentiable.

    Gradients for ``features``, both weights and both biases are computed during the forward pass, chunk by chunk
    (``d features = dZ_ce W_ce + dZ_kd W_kd``, ``d W += dZ^T features``), when autograd needs them; backward only
    scales them. For half inputs they are all kept in float32 (the chunks' logit gradients ``dZ``, and the gradient
    GEMMs on float32 copies of the weights and of each chunk's features) and rounded to the inputs' dtype once, in
    backward, after the incoming gradient (a loss scale) has been applied: as accurate as eager AMP's. Backward has
    no graph of itself: ``create_graph=True`` (a gradient penalty, double backward) raises ``RuntimeError`` on every
    backend but "reference".

    Under ``torch.autocast`` every floating input is first cast to the autocast dtype, as autocast does for
    ``nn.Linear``; the gradients flow back through the casts to the parameters' own dtype.
    """
    teacher_kwargs = dict(
        teacher_probs=teacher_probs, teacher_topk_indices=teacher_topk_indices,
        teacher_topk_values=teacher_topk_values, teacher_tail=teacher_tail,
    )  # fmt: skip
    floating = (features, ce_weight, kd_weight)
    if all(isinstance(t, torch.Tensor) for t in floating) and autocast_active(features.device):
        # As autocast treats nn.Linear: the GEMMs run in the autocast dtype (the loss still accumulates in float32).
        dtype = torch.get_autocast_dtype(features.device.type)
        cast = [t.to(dtype) if t is not None else None for t in (features, ce_weight, ce_bias, kd_weight, kd_bias)]
        if isinstance(teacher_logits, torch.Tensor):
            teacher_logits = teacher_logits.to(dtype)
        if isinstance(teacher_probs, torch.Tensor):
            teacher_kwargs["teacher_probs"] = teacher_probs.to(dtype)
        with torch.autocast(features.device.type, enabled=False):
            return fused_linear_dual_head_loss(
                *cast, teacher_logits, labels, **teacher_kwargs, kd_cosine=kd_cosine, kd_logit_scale=kd_logit_scale,
                chunk_size=chunk_size, temperature=temperature, ce_loss_weight=ce_loss_weight,
                kd_loss_weight=kd_loss_weight, kd_reduction=kd_reduction, ignore_index=ignore_index,
                label_smoothing=label_smoothing, return_terms=return_terms, backend=backend,
            )  # fmt: skip
    check_linear_loss_args(
        features, ce_weight, ce_bias, kd_weight, kd_bias, labels, kd_logit_scale=kd_logit_scale,
        chunk_size=chunk_size, temperature=temperature, ce_loss_weight=ce_loss_weight, kd_loss_weight=kd_loss_weight,
        kd_reduction=kd_reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
    )  # fmt: skip
    n, d = features.shape
    teacher = op_teacher(teacher_logits, **teacher_kwargs, shape=(n, ce_weight.shape[0]), ref_name="features",
                         ref=features)  # fmt: skip
    name = backends.resolve("fused_linear_dual_head_loss", backend, features.device)
    loss, ce_term, kd_term = backends.run(
        "fused_linear_dual_head_loss", name, features, ce_weight, ce_bias, kd_weight, kd_bias, teacher.values, labels,
        bool(kd_cosine), float(kd_logit_scale), chunk_size or default_chunk_size(n, ce_weight.shape[0], d),
        float(temperature), float(ce_loss_weight), float(kd_loss_weight), kd_reduction == "split", int(ignore_index),
        float(label_smoothing), *teacher.op_args(),
    )  # fmt: skip
    return (loss, ce_term, kd_term) if return_terms else loss
