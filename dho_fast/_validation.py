"""Argument checks shared by every backend: each error names the argument, the expectation and what was given."""

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
KD_REDUCTIONS = ("split", "mean")


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} of shape {tuple(t.shape)} on {t.device}"


def check_loss_args(
    ce_logits: torch.Tensor,
    kd_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    ce_weight: float,
    kd_weight: float,
    kd_reduction: str,
    label_smoothing: float,
) -> None:
    """Checks shapes, dtypes, devices and scalar arguments; values are checked by the kernels as they read them."""
    if not isinstance(ce_logits, torch.Tensor) or ce_logits.dim() != 2 or ce_logits.shape[1] < 1:
        got = _describe(ce_logits) if isinstance(ce_logits, torch.Tensor) else type(ce_logits).__name__
        raise ValueError(f"ce_logits must be a tensor of shape (N, C) with C >= 1, got {got}")
    if ce_logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"ce_logits must be float32, float64, bfloat16 or float16, got {_describe(ce_logits)}")
    for name, t in (("kd_logits", kd_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.shape != ce_logits.shape or t.dtype != ce_logits.dtype or t.device != ce_logits.device:
            raise ValueError(f"{name} must match ce_logits ({_describe(ce_logits)}), got {_describe(t)}")
    if (
        not isinstance(labels, torch.Tensor)
        or labels.dtype != torch.int64
        or labels.shape != (ce_logits.shape[0],)
        or labels.device != ce_logits.device
    ):
        got = _describe(labels) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(
            f"labels must be int64 of shape ({ce_logits.shape[0]},) on {ce_logits.device}, got {got}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    for name, value in (("ce_weight", ce_weight), ("kd_weight", kd_weight)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if kd_reduction not in KD_REDUCTIONS:
        raise ValueError(f"kd_reduction must be one of {KD_REDUCTIONS}, got {kd_reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")


def count_labelled(labels: torch.Tensor, num_classes: int, ignore_index: int) -> int:
    """Number of labelled rows; raises if a label is neither ignore_index nor in [0, num_classes)."""
    labelled = labels != ignore_index
    bad = labelled & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels[{i}] = {int(labels[i])} is out of range for {num_classes} classes "
            f"(unlabelled rows must be ignore_index = {ignore_index})"
        )
    return int(labelled.sum())


def check_teacher_values(teacher_logits: torch.Tensor) -> None:
    """Teacher logits may be -inf (masked classes) but never NaN or +inf, and no row may be entirely -inf."""
    bad = teacher_logits.isnan() | teacher_logits.isposinf()
    if bool(bad.any()):
        i = int(bad.any(dim=1).nonzero()[0, 0])
        raise ValueError(f"teacher_logits row {i} contains NaN or +inf (only -inf is allowed, for masked classes)")
    all_masked = teacher_logits.isneginf().all(dim=1)
    if bool(all_masked.any()):
        i = int(all_masked.nonzero()[0, 0])
        raise ValueError(f"teacher_logits row {i} is -inf in every class: the teacher distribution is undefined")
