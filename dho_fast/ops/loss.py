"""The public fused loss: argument checks, the backend from the table, and the optional loss terms."""

import torch

from dho_fast.ops import backends
from dho_fast.ops.teacher import op_teacher
from dho_fast.ops.validation import check_loss_args


def autocast_active(device: torch.device) -> bool:
    """Whether torch.autocast is on for ``device``: only CPU and CUDA tensors, the ones the kernels run on, ever are
    (meta tensors, for shape functions, never). Not ``torch.amp.is_autocast_available``: torch 2.11's dynamo cannot
    trace it, so ``torch.compile(fullgraph=True)`` of the loss would fail there."""
    return device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)


def fused_dual_head_loss(
    ce_logits: torch.Tensor,
    kd_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    teacher_probs: torch.Tensor | None = None,
    teacher_topk_indices: torch.Tensor | None = None,
    teacher_topk_values: torch.Tensor | None = None,
    teacher_tail: str = "renormalize",
    temperature: float = 2.0,
    ce_loss_weight: float = 0.5,
    kd_loss_weight: float = 0.5,
    kd_reduction: str = "split",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    return_terms: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DHO loss of both heads, and its gradients, in one fused pass.

    Args:
        ce_logits: (N, C) logits of the CE head; float32, float64, bfloat16 or float16.
        kd_logits: (N, C) logits of the KD head; same dtype and device as ``ce_logits``.
        teacher_logits: (N, C) teacher logits, same dtype and device; ``-inf`` marks a masked class, NaN or
            ``+inf`` is an error, and so is a row that is ``-inf`` everywhere. The teacher is a constant target: it
            is detached, so it gets no gradient on any backend even when it requires grad. None when the teacher
            comes in one of the two other forms (exactly one form per call; dho_fast.ops.teacher):
        labels: (N,) int64 class indices in ``[0, C)``; ``ignore_index`` marks unlabelled rows.
        teacher_probs: (N, C) the teacher distribution p itself (e.g. cached at temperature T), same dtype and device
            as the logits; each row is scaled to sum to 1; 0 masks a class; a negative, NaN or +inf entry, or a row
            of zeros, is an error. The kernels read it as the logits ``T log p`` (one log per entry).
        teacher_topk_indices, teacher_topk_values: a sparse teacher, (N, k) int32/int64 class indices (in ``[0, C)``,
            none repeated within a row) and (N, k) their probabilities (any float dtype, finite, >= 0), 1 <= k <= C.
            The KL's teacher entropy is computed exactly from the k values, and no dense (N, C) teacher is built.
        teacher_tail: the rest of a top-k row: "renormalize" (p is the k values scaled to sum to 1, 0 elsewhere) or
            "uniform" (the remaining mass ``1 - sum`` spread evenly over the other ``C - k`` classes).
        temperature: T > 0 of the KD term. Every float argument must be a finite real number (``TypeError`` for a
            string or bool, ``ValueError`` for NaN, inf or out of range).
        ce_loss_weight, kd_loss_weight: the loss weights w_ce, w_kd >= 0.
        kd_reduction: "split" (METHOD.md: labelled and unlabelled means summed; an empty group adds 0) or "mean".
        ignore_index: the label of unlabelled rows, an int (a float such as 1.5 is a ``TypeError``).
        label_smoothing: eps in [0, 1] of the CE head's targets ``(1 - eps) onehot(y) + eps / C``.
        return_terms: also return ``ce_term`` and ``kd_term`` (for logging, from the same pass).
        backend: "auto", "cpu", "cuda", "triton" or "reference"; None reads ``$DHO_FAST_BACKEND`` (default
            "auto": the compiled kernel of the tensors' device; on CUDA without compiled CUDA kernels, Triton; see
            dho_fast.ops.backends).

    Returns:
        ``loss = w_ce * ce_term + w_kd * kd_term``, a float32 scalar (float64 for float64 input), with
        ``ce_term = mean_{i labelled} CE(ce_logits_i, y_i)`` (0 when no row is labelled) and
        ``kd_term = T^2 * (mean_{labelled} KL_i + mean_{unlabelled} KL_i)`` ("split") or ``T^2 * mean_i KL_i``,
        ``KL_i = sum_c p_c (log p_c - log q_c)``, ``p = softmax(teacher_logits / T)`` (or the distribution given),
        ``q = softmax(kd / T)``.
        With ``return_terms`` the tuple ``(loss, ce_term, kd_term)``; all three are differentiable.

    Gradients with respect to ``ce_logits`` and ``kd_logits`` are computed during the forward pass when autograd needs
    them, in float32 (float64 for float64 input), already times the loss weights. A plain ``loss.backward()`` (incoming
    gradient exactly 1) hands them on as they are, without a pass or a copy, for float32/float64 logits; otherwise
    backward scales them by the incoming gradient and rounds them to the logits' dtype once, so that under a loss
    scale (``(loss * 65536).backward()``) half-precision logits get eager PyTorch's float32-then-rounded gradient
    rather than entries that underflowed before the scale. Backward has no graph
    of itself: ``create_graph=True`` (a gradient penalty, double backward) raises ``RuntimeError`` on every backend but
    "reference". Statistics accumulate in float32 (float64 for float64 input). NaN or inf in the student logits is not
    an error: it propagates to the loss, so mixed-precision loss scaling can skip the step. Bad shapes or values raise
    ``ValueError``, wrong dtypes or non-tensor arguments ``TypeError``, on every backend. Meta tensors give meta
    results (the compiled ops' shape functions).

    Under ``torch.autocast`` the logits and a dense teacher are first cast to their common dtype (float32 when the
    teacher is float32 and the heads' logits are half), as autocast does for PyTorch's own losses.
    """
    teacher_kwargs = dict(
        teacher_probs=teacher_probs, teacher_topk_indices=teacher_topk_indices,
        teacher_topk_values=teacher_topk_values, teacher_tail=teacher_tail,
    )  # fmt: skip
    dense = [t for t in (teacher_logits, teacher_probs) if t is not None]
    logits = (ce_logits, kd_logits, *dense)
    if all(isinstance(t, torch.Tensor) for t in logits) and autocast_active(ce_logits.device):
        dtype = torch.promote_types(ce_logits.dtype, kd_logits.dtype)
        for t in dense:
            dtype = torch.promote_types(dtype, t.dtype)
        if teacher_logits is not None:
            teacher_logits = teacher_logits.to(dtype)
        if teacher_probs is not None:
            teacher_kwargs["teacher_probs"] = teacher_probs.to(dtype)
        with torch.autocast(ce_logits.device.type, enabled=False):
            return fused_dual_head_loss(
                ce_logits.to(dtype), kd_logits.to(dtype), teacher_logits, labels, **teacher_kwargs,
                temperature=temperature, ce_loss_weight=ce_loss_weight, kd_loss_weight=kd_loss_weight,
                kd_reduction=kd_reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                return_terms=return_terms, backend=backend,
            )  # fmt: skip
    check_loss_args(
        ce_logits, kd_logits, labels, temperature=temperature, ce_loss_weight=ce_loss_weight,
        kd_loss_weight=kd_loss_weight, kd_reduction=kd_reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )  # fmt: skip
    teacher = op_teacher(teacher_logits, **teacher_kwargs, shape=tuple(ce_logits.shape), ref_name="ce_logits",
                         ref=ce_logits)  # fmt: skip
    name = backends.resolve("dual_head_loss", backend, ce_logits.device)
    result = backends.run(
        "dual_head_loss", name, ce_logits, kd_logits, teacher.values, labels, float(temperature),
        float(ce_loss_weight), float(kd_loss_weight), kd_reduction == "split", int(ignore_index),
        float(label_smoothing), *teacher.op_args(),
    )  # fmt: skip
    return tuple(result) if return_terms else result[0]
