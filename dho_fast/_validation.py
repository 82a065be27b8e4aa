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
        _check_like(name, t, "ce_logits", ce_logits, ce_logits.shape)
    _check_labels(labels, ce_logits.shape[0], ce_logits.device)
    weights = (("ce_weight", ce_weight), ("kd_weight", kd_weight))
    _check_loss_scalars(temperature, weights, kd_reduction, label_smoothing)


def check_linear_loss_args(
    features: torch.Tensor,
    ce_weight: torch.Tensor,
    ce_bias: torch.Tensor | None,
    kd_weight: torch.Tensor,
    kd_bias: torch.Tensor | None,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    kd_logit_scale: float,
    chunk_size: int | None,
    temperature: float,
    ce_loss_weight: float,
    kd_loss_weight: float,
    kd_reduction: str,
    label_smoothing: float,
) -> None:
    """The checks of :func:`check_loss_args` for the fused linear loss, whose logits are ``features @ weight.T``."""
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        got = _describe(features) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be a tensor of shape (N, D), got {got}")
    if features.dtype not in FLOAT_DTYPES:
        raise ValueError(f"features must be float32, float64, bfloat16 or float16, got {_describe(features)}")
    n, d = features.shape
    if not isinstance(ce_weight, torch.Tensor) or ce_weight.dim() != 2 or ce_weight.shape[0] < 1:
        got = _describe(ce_weight) if isinstance(ce_weight, torch.Tensor) else type(ce_weight).__name__
        raise ValueError(f"ce_weight must be a tensor of shape (C, {d}) with C >= 1, got {got}")
    c = ce_weight.shape[0]
    _check_like("ce_weight", ce_weight, "features", features, (c, d))
    _check_like("kd_weight", kd_weight, "features", features, (c, d))
    for name, bias in (("ce_bias", ce_bias), ("kd_bias", kd_bias)):
        if bias is not None:
            _check_like(name, bias, "features", features, (c,))
    _check_like("teacher_logits", teacher_logits, "features", features, (n, c))
    _check_labels(labels, n, features.device)
    if not kd_logit_scale > 0:
        raise ValueError(f"kd_logit_scale must be > 0, got {kd_logit_scale}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    weights = (("ce_loss_weight", ce_loss_weight), ("kd_loss_weight", kd_loss_weight))
    _check_loss_scalars(temperature, weights, kd_reduction, label_smoothing)


def _check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, shape: tuple[int, ...]) -> None:
    """``t`` must have the given shape and the dtype and device of ``ref``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.shape != shape or t.dtype != ref.dtype or t.device != ref.device:
        want = f"{str(ref.dtype).removeprefix('torch.')} of shape {tuple(shape)} on {ref.device} (as {ref_name})"
        raise ValueError(f"{name} must be {want}, got {_describe(t)}")


def _check_labels(labels: torch.Tensor, n: int, device: torch.device) -> None:
    if (
        not isinstance(labels, torch.Tensor)
        or labels.dtype != torch.int64
        or labels.shape != (n,)
        or labels.device != device
    ):
        got = _describe(labels) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be int64 of shape ({n},) on {device}, got {got}")


def _check_loss_scalars(
    temperature: float, weights: tuple[tuple[str, float], ...], kd_reduction: str, label_smoothing: float
) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    for name, value in weights:
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
        raise ValueError(label_error(i, int(labels[i]), num_classes, ignore_index))
    return int(labelled.sum())


def check_teacher_values(teacher_logits: torch.Tensor) -> None:
    """Teacher logits may be -inf (masked classes) but never NaN or +inf, and no row may be entirely -inf."""
    bad = teacher_logits.isnan() | teacher_logits.isposinf()
    if bool(bad.any()):
        raise ValueError(teacher_row_error(int(bad.any(dim=1).nonzero()[0, 0]), all_masked=False))
    all_masked = teacher_logits.isneginf().all(dim=1)
    if bool(all_masked.any()):
        raise ValueError(teacher_row_error(int(all_masked.nonzero()[0, 0]), all_masked=True))


def label_error(row: int, label: int, num_classes: int, ignore_index: int) -> str:
    """The message for a label that is neither ignore_index nor a class index (the same as the compiled ops')."""
    return (
        f"labels[{row}] = {label} is out of range for {num_classes} classes "
        f"(unlabelled rows must be ignore_index = {ignore_index})"
    )


def teacher_row_error(row: int, *, all_masked: bool) -> str:
    """The message for an invalid teacher row (the same as the compiled ops')."""
    if all_masked:
        return f"teacher_logits row {row} is -inf in every class: the teacher distribution is undefined"
    return f"teacher_logits row {row} contains NaN or +inf (only -inf is allowed, for masked classes)"
