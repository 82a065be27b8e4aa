"""Argument checks shared by every backend: each error names the argument, the expectation and what was given.

One vocabulary: a bad value, shape or device raises ``ValueError``; a wrong dtype, or an argument of the wrong Python
type (a list for a tensor, a string or bool for a number, a float for an int), ``TypeError``; on every backend (the
C++ ops raise the same types from csrc/op_checks.h). Every float argument must be finite.

The value errors a kernel finds while it reads the data (labels out of range, invalid teacher rows) have one message
each, :func:`label_error` and :func:`teacher_row_error`; the compiled ops raise the same text (tests/test_errors.py
compares them).
"""

import math
import numbers
from collections.abc import Callable

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: row_math::TeacherForm (csrc/row_math.h): how a loss op's teacher argument reads (dho_fast.ops.teacher).
TEACHER_FORM_LOGITS, TEACHER_FORM_PROBS, TEACHER_FORM_SPARSE = 0, 1, 2
KD_REDUCTIONS = ("split", "mean")


# Numbers as Python, NumPy and torch.compile's symbolic tracing pass them.
_REAL_TYPES = (numbers.Real, torch.SymFloat, torch.SymInt)
_INT_TYPES = (numbers.Integral, torch.SymInt)
_INT64_RANGE = (-(2**63), 2**63 - 1)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops accumulate and return statistics and gradients in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def loss_gradient_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype ``dho_fast::dual_head_loss`` returns the gradients of logits of ``dtype`` in (its forward computes
    them in ``accumulate_dtype`` and rounds once): bfloat16 for bfloat16, else ``accumulate_dtype``.

    bfloat16 has float32's exponent range, so the loss scale a backward applies after the rounding cannot underflow
    an entry (a power-of-two scale, GradScaler's, gives the very bits of scaling first), and the usual backward has
    no rounding pass left. float16's range is narrow: its gradients stay float32 until backward has scaled them.
    csrc/saved_gradients.h has the same rule."""
    return torch.bfloat16 if dtype == torch.bfloat16 else accumulate_dtype(dtype)


def describe(t: torch.Tensor) -> str:
    """``float32 of shape (4, 2) on cpu``: a tensor as the error messages name it."""
    return f"{str(t.dtype).removeprefix('torch.')} of shape {tuple(t.shape)} on {t.device}"


def _not_a_tensor(name: str, value: object, want: str) -> TypeError:
    return TypeError(f"{name} must be a tensor {want}, got {type(value).__name__}")


def check_number(name: str, value: object, rule: str, holds: Callable[[float], bool]) -> None:
    """A float argument: a real number (``TypeError`` for a str, a bool, a tensor, None), finite and obeying
    ``rule``, e.g. "> 0" with ``holds = lambda v: v > 0`` (``ValueError`` otherwise, naming the rule and the value)."""
    if isinstance(value, bool) or not isinstance(value, _REAL_TYPES):
        raise TypeError(f"{name} must be a real number {rule}, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and holds(value)):
        raise ValueError(f"{name} must be a finite number {rule}, got {value}")


def check_int(name: str, value: object, rule: str = "", holds: Callable[[int], bool] = lambda v: True) -> None:
    """An int argument: an integer (``TypeError`` for a float such as 1.5, a bool, a str), in int64 and obeying
    ``rule`` (``ValueError`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, _INT_TYPES):
        raise TypeError(f"{name} must be an int{' ' + rule if rule else ''}, got {type(value).__name__} {value!r}")
    if not (_INT64_RANGE[0] <= value <= _INT64_RANGE[1] and holds(value)):
        raise ValueError(f"{name} must be an int64{' ' + rule if rule else ''}, got {value}")


def check_loss_args(
    ce_logits: torch.Tensor,
    kd_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    ce_loss_weight: float,
    kd_loss_weight: float,
    kd_reduction: str,
    ignore_index: int,
    label_smoothing: float,
) -> None:
    """Checks shapes, dtypes, devices and scalar arguments (the teacher's: dho_fast.ops.teacher); values are checked by
    the kernels as they read them."""
    if not isinstance(ce_logits, torch.Tensor):
        raise _not_a_tensor("ce_logits", ce_logits, "of shape (N, C)")
    if ce_logits.dim() != 2 or ce_logits.shape[1] < 1:
        raise ValueError(f"ce_logits must be a tensor of shape (N, C) with C >= 1, got {describe(ce_logits)}")
    _check_float_dtype("ce_logits", ce_logits)
    _check_like("kd_logits", kd_logits, "ce_logits", ce_logits, ce_logits.shape)
    _check_labels(labels, ce_logits.shape[0], ce_logits.device)
    _check_loss_scalars(temperature, ce_loss_weight, kd_loss_weight, kd_reduction, ignore_index, label_smoothing)


def check_linear_loss_args(
    features: torch.Tensor,
    ce_weight: torch.Tensor,
    ce_bias: torch.Tensor | None,
    kd_weight: torch.Tensor,
    kd_bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    kd_logit_scale: float,
    chunk_size: int | None,
    temperature: float,
    ce_loss_weight: float,
    kd_loss_weight: float,
    kd_reduction: str,
    ignore_index: int,
    label_smoothing: float,
) -> None:
    """The checks of :func:`check_loss_args` for the fused linear loss, whose logits are ``features @ weight.T``."""
    if not isinstance(features, torch.Tensor):
        raise _not_a_tensor("features", features, "of shape (N, D)")
    if features.dim() != 2:
        raise ValueError(f"features must be a tensor of shape (N, D), got {describe(features)}")
    _check_float_dtype("features", features)
    n, d = features.shape
    if not isinstance(ce_weight, torch.Tensor):
        raise _not_a_tensor("ce_weight", ce_weight, f"of shape (C, {d})")
    if ce_weight.dim() != 2 or ce_weight.shape[0] < 1:
        raise ValueError(f"ce_weight must be a tensor of shape (C, {d}) with C >= 1, got {describe(ce_weight)}")
    c = ce_weight.shape[0]
    _check_like("ce_weight", ce_weight, "features", features, (c, d))
    _check_like("kd_weight", kd_weight, "features", features, (c, d))
    for name, bias in (("ce_bias", ce_bias), ("kd_bias", kd_bias)):
        if bias is not None:
            _check_like(name, bias, "features", features, (c,))
    _check_labels(labels, n, features.device)
    check_number("kd_logit_scale", kd_logit_scale, "> 0", lambda v: v > 0)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, ">= 1 (or None)", lambda v: v >= 1)
    _check_loss_scalars(temperature, ce_loss_weight, kd_loss_weight, kd_reduction, ignore_index, label_smoothing)


def _check_float_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {describe(t)}")


def _check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, shape: tuple[int, ...]) -> None:
    """``t`` must have the given shape (ValueError), the device (ValueError) and the dtype (TypeError) of ``ref``."""
    if not isinstance(t, torch.Tensor):
        raise _not_a_tensor(name, t, f"of shape {tuple(shape)}")
    want = f"{str(ref.dtype).removeprefix('torch.')} of shape {tuple(shape)} on {ref.device} (as {ref_name})"
    if t.shape != shape or t.device != ref.device:
        raise ValueError(f"{name} must be {want}, got {describe(t)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must be {want}, got {describe(t)}")


def _check_labels(labels: torch.Tensor, n: int, device: torch.device) -> None:
    want = f"labels must be int64 of shape ({n},) on {device}"
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{want}, got {type(labels).__name__}")
    if labels.shape != (n,) or labels.device != device:
        raise ValueError(f"{want}, got {describe(labels)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{want}, got {describe(labels)}")


def _check_loss_scalars(
    temperature: float,
    ce_loss_weight: float,
    kd_loss_weight: float,
    kd_reduction: str,
    ignore_index: int,
    label_smoothing: float,
) -> None:
    check_number("temperature", temperature, "> 0", lambda v: v > 0)
    check_number("ce_loss_weight", ce_loss_weight, ">= 0", lambda v: v >= 0)
    check_number("kd_loss_weight", kd_loss_weight, ">= 0", lambda v: v >= 0)
    if kd_reduction not in KD_REDUCTIONS:
        raise ValueError(f"kd_reduction must be one of {KD_REDUCTIONS}, got {kd_reduction!r}")
    check_int("ignore_index", ignore_index)
    check_number("label_smoothing", label_smoothing, "in [0, 1]", lambda v: 0 <= v <= 1)


def count_labelled(labels: torch.Tensor, num_classes: int, ignore_index: int) -> int:
    """Number of labelled rows; raises if a label is neither ignore_index nor in [0, num_classes)."""
    labelled = labels != ignore_index
    bad = labelled & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(label_error(i, int(labels[i]), num_classes, ignore_index))
    return int(labelled.sum())


def check_teacher_values(teacher_logits: torch.Tensor, temperature: float | None = None) -> None:
    """Teacher logits may be -inf (masked classes) but never NaN or +inf, and no row may be entirely -inf; with a
    temperature, ``teacher_logits / temperature`` in the accumulation dtype (float32, float64 for float64 input) must
    not overflow either. Raises for the first invalid row, as the kernels do."""
    _raise_first_bad_row(_logits_status(teacher_logits, temperature), TEACHER_FORM_LOGITS)


def check_teacher_probs(teacher_probs: torch.Tensor) -> None:
    """Teacher probabilities may be 0 (masked classes) but never negative, NaN or +inf, and no row may be 0
    everywhere: the kernels read them as the logits ``T log(p)``, so that is :func:`check_teacher_values` of
    ``log(p)``. Raises for the first invalid row, as the kernels do."""
    log_p = teacher_probs.to(accumulate_dtype(teacher_probs.dtype)).log()
    _raise_first_bad_row(_logits_status(log_p, None), TEACHER_FORM_PROBS)


def _raise_first_bad_row(status: torch.Tensor, form: int) -> None:
    bad = status.nonzero()
    if len(bad):
        row = int(bad[0, 0])
        raise ValueError(teacher_row_error(row, int(status[row]), form))


def _logits_status(t: torch.Tensor, temperature: float | None) -> torch.Tensor:
    """Each row's TEACHER_* status as the kernels report it."""
    status = torch.where(t.isneginf().all(dim=1), TEACHER_ALL_MASKED, TEACHER_VALID)
    if temperature is not None:
        a = t.to(accumulate_dtype(t.dtype)) / temperature
        status = torch.where((a.isnan() | a.isposinf()).any(dim=1), TEACHER_OVERFLOW, status)
    return torch.where((t.isnan() | t.isposinf()).any(dim=1), TEACHER_NON_FINITE, status)


def label_error(row: int, label: int, num_classes: int, ignore_index: int) -> str:
    """The message for a label that is neither ignore_index nor a class index (the same as the compiled ops')."""
    return (
        f"labels[{row}] = {label} is out of range for {num_classes} classes "
        f"(unlabelled rows must be ignore_index = {ignore_index})"
    )


def teacher_row_error(row: int, status: int, form: int = TEACHER_FORM_LOGITS) -> str:
    """The message for a teacher row of an invalid ``status`` (a TEACHER_* value) and teacher ``form``
    (TEACHER_FORM_LOGITS or TEACHER_FORM_PROBS); the same as the compiled ops'."""
    if form == TEACHER_FORM_PROBS:
        if status == TEACHER_ALL_MASKED:
            return f"teacher_probs row {row} is 0 in every class: the teacher distribution is undefined"
        return f"teacher_probs row {row} contains a negative, NaN or +inf probability"
    if status == TEACHER_ALL_MASKED:
        return f"teacher_logits row {row} is -inf in every class: the teacher distribution is undefined"
    if status == TEACHER_OVERFLOW:
        return (
            f"teacher_logits / temperature overflows float32 (float64 for float64 input) in row {row}: "
            "the teacher logits are finite, but too large for the temperature"
        )
    return f"teacher_logits row {row} contains NaN or +inf (only -inf is allowed, for masked classes)"


#: row_math::TeacherRowStatus (csrc/row_math.h) of a teacher row, as the kernels report it. TEACHER_OVERFLOW: the row
#: is finite (or -inf), but teacher_logits / temperature overflows.
TEACHER_VALID, TEACHER_NON_FINITE, TEACHER_ALL_MASKED, TEACHER_OVERFLOW = 0, 1, 2, 3


def _traced(t: torch.Tensor) -> bool:
    """A tensor allocated by an op is a plain Tensor when it runs eagerly, a fake/functional one when traced."""
    return type(t) is not torch.Tensor


def raise_flagged_values(
    info: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int,
    first_row: int = 0,
    teacher_form: int = TEACHER_FORM_LOGITS,
) -> int | None:
    """Raises the value error a Triton launcher flagged in ``info`` (dho_fast.kernels.dual_head_loss): ``labels`` are
    the rows the kernels saw, rows ``first_row, ...`` of the batch, and ``teacher_form`` the teacher's form. Returns
    the number of labelled rows, None when traced (then the checks become device asserts, which cannot say which row
    failed)."""
    n = labels.shape[0]
    if _traced(info):
        torch._assert_async(info[1] == n, "labels: a label is neither ignore_index nor in [0, num_classes)")
        torch._assert_async(
            info[2] == n,
            "teacher_logits: a row contains NaN or +inf, is -inf in every class, or overflows when divided by the "
            "temperature",
        )
        return None
    num_labelled, bad_label, bad_row, status = info.tolist()  # the one host sync of the op
    if bad_label < n:
        raise ValueError(label_error(first_row + bad_label, int(labels[bad_label]), num_classes, ignore_index))
    if bad_row < n:
        raise ValueError(teacher_row_error(first_row + bad_row, status, teacher_form))
    return num_labelled


def check_chunk_grad_out(
    name: str, grad_out: torch.Tensor | None, logits_name: str, logits: torch.Tensor, wanted: bool
) -> None:
    """dual_head_loss_chunk's gradient buffer of ``logits`` (csrc/dho_fast.cpp; op_checks.h for the compiled op):
    the gradient is written in the accumulation dtype, into ``grad_out`` when given, else over ``logits``, which must
    then be float32 or float64 (half logits need a float32 ``grad_out``)."""
    if not wanted:
        return
    acc = accumulate_dtype(logits.dtype)
    if grad_out is None:
        if logits.dtype != acc:
            raise TypeError(
                f"{name} must be given for {logits.dtype} {logits_name}: their gradient is written in {acc}"
            )
        return
    if grad_out.dtype != acc:
        raise TypeError(f"{name} must be {acc} (the accumulation dtype of {logits_name}), got {grad_out.dtype}")
    if grad_out.shape != logits.shape or grad_out.device != logits.device or not grad_out.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous, of the shape of {logits_name} {tuple(logits.shape)} on {logits.device}, "
            f"got shape {tuple(grad_out.shape)} on {grad_out.device}"
        )


def check_chunk_layout(
    ce: torch.Tensor,
    kd: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    start: int,
    ce_bias: torch.Tensor | None,
    kd_bias: torch.Tensor | None,
    teacher_form: int = TEACHER_FORM_LOGITS,
) -> None:
    """The layout dual_head_loss_chunk requires (csrc/dho_fast.cpp, checked for the compiled op by op_checks.h): the
    teacher ``t`` covers the batch's N rows ((N, C), or (N, k) for a sparse one); everything else is of kd's dtype."""
    n = t.shape[0]
    c = kd.shape[1] if teacher_form == TEACHER_FORM_SPARSE and kd.dim() == 2 else t.shape[1]
    if kd.dim() != 2 or kd.shape[1] != c or not 0 <= start <= start + kd.shape[0] <= n:
        raise ValueError(
            f"kd_logits must be rows [start, start + R) of the batch's (N, C) = {(n, c)} logits, "
            f"got shape {tuple(kd.shape)} at start {start}"
        )
    if ce.dim() != 2 or ce.shape[1] != c:
        raise ValueError(f"ce_logits must have shape (L, {c}), got {tuple(ce.shape)}")
    dense = () if teacher_form == TEACHER_FORM_SPARSE else (("teacher_logits", t),)
    for name, x in (("ce_logits", ce), *dense):
        if x.dtype != kd.dtype:
            raise TypeError(f"{name} must be {kd.dtype} (as kd_logits), got {x.dtype}")
    for name, x in (("ce_logits", ce), ("kd_logits", kd)):
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {x.stride()}")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    for name, bias in (("ce_bias", ce_bias), ("kd_bias", kd_bias)):
        if bias is None:
            continue
        if bias.dtype != kd.dtype:
            raise TypeError(f"{name} must be {kd.dtype} (as kd_logits), got {bias.dtype}")
        if bias.shape != (c,) or bias.device != kd.device or not bias.is_contiguous():
            raise ValueError(f"{name} must be contiguous of shape ({c},) on {kd.device}, got {describe(bias)}")


def check_chunk_labelled(ce_rows: int, chunk_labelled: int, num_labelled: int) -> None:
    """The chunk's labelled rows, counted by the kernel: one row of ce_logits each, no more than the batch's."""
    if ce_rows != chunk_labelled or chunk_labelled > num_labelled:
        raise ValueError(
            f"ce_logits must have one row per labelled row of the chunk ({chunk_labelled}, at most "
            f"num_labelled = {num_labelled}), got {ce_rows}"
        )


def check_kcenter_args(points: torch.Tensor, centres: torch.Tensor, min_sq_dist: torch.Tensor) -> None:
    """The arguments of :func:`dho_fast.ops.kcenter.kcenter_update`: points (N, C) float32/bfloat16, centres (K, C)
    float32 with K >= 1, min_sq_dist (N,) float32, all contiguous and on one device."""
    if not isinstance(points, torch.Tensor):
        raise _not_a_tensor("points", points, "of shape (N, C)")
    if points.dim() != 2:
        raise ValueError(f"points must be of shape (N, C), got {describe(points)}")
    if points.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"points must be float32 or bfloat16, got {describe(points)}")
    n, c = points.shape
    if not isinstance(centres, torch.Tensor):
        raise _not_a_tensor("centres", centres, f"of shape (K, {c})")
    if centres.dim() != 2 or centres.shape[0] < 1 or centres.shape[1] != c or centres.device != points.device:
        raise ValueError(f"centres must be float32 of shape (K >= 1, {c}) on {points.device}, got {describe(centres)}")
    if centres.dtype != torch.float32:
        raise TypeError(f"centres must be float32 of shape (K, {c}), got {describe(centres)}")
    if not isinstance(min_sq_dist, torch.Tensor):
        raise _not_a_tensor("min_sq_dist", min_sq_dist, f"of shape ({n},)")
    if min_sq_dist.shape != (n,) or min_sq_dist.device != points.device:
        want = f"float32 of shape ({n},) on {points.device}"
        raise ValueError(f"min_sq_dist must be {want}, got {describe(min_sq_dist)}")
    if min_sq_dist.dtype != torch.float32:
        raise TypeError(f"min_sq_dist must be float32 of shape ({n},), got {describe(min_sq_dist)}")
    for name, t in (("points", points), ("centres", centres), ("min_sq_dist", min_sq_dist)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")
    # Backends would disagree on a NaN minimum (a maximum to torch.max, skipped by the kernels): refuse it, at the
    # cost of one read of N floats beside the N x C of the points. Meta and traced tensors have no values to check,
    # and under torch.compile the check would be a data-dependent branch.
    if min_sq_dist.device.type != "meta" and not _traced(min_sq_dist) and not torch.compiler.is_compiling():
        bad = min_sq_dist.isnan().nonzero()
        if bad.numel():
            raise ValueError(f"min_sq_dist must not hold NaN (+inf, a distance, or < 0 for a picked point), got NaN "
                             f"at row {int(bad[0])}")  # fmt: skip


def kcenter_row_error(row: int) -> str:
    """The message of a k-center step that met a squared distance that is not finite at ``points`` row ``row``."""
    return (
        f"points row {row}: its squared distance to a centre is not finite (NaN or inf in the row or in a centre, "
        "or an overflow)"
    )


def raise_flagged_kcenter_row(bad_row: torch.Tensor) -> None:
    """Raises :func:`kcenter_row_error` for the first bad row a Triton launcher flagged (dho_fast.kernels.kcenter):
    ``bad_row`` a 0-dim int64, -1 when every squared distance was finite. Traced, the check becomes a device assert,
    which cannot say which row failed."""
    if _traced(bad_row):
        torch._assert_async(bad_row < 0, "points: a row's squared distance to a centre is not finite")
        return
    row = int(bad_row)  # the one host sync of the op
    if row >= 0:
        raise ValueError(kcenter_row_error(row))


def check_sparse_op_teacher(
    teacher: torch.Tensor,
    indices: torch.Tensor | None,
    row_terms: torch.Tensor | None,
    num_classes: int,
    ref: torch.Tensor,
    rows: slice,
) -> None:
    """A Triton loss op's sparse teacher (the compiled ops check the same in op_checks.h, check_teacher and
    check_sparse_indices): (N, k) probabilities and (N, 2) row terms in the accumulation dtype of ``ref`` (the
    student logits), int64 indices (N, k), all contiguous on ``ref``'s device; the indices of the ``rows`` the
    kernel reads in [0, C) and none repeated within a row (the kernels index with them). Traced, the value check
    becomes a device assert."""
    if indices is None or row_terms is None:
        raise ValueError("a sparse teacher needs teacher_indices and teacher_row_terms")
    n, acc = teacher.shape[0], accumulate_dtype(ref.dtype)
    if teacher.dim() != 2 or not 1 <= teacher.shape[1] <= num_classes:
        raise ValueError(
            f"teacher_topk_values must have shape (N, k) with 1 <= k <= {num_classes}, got {describe(teacher)}"
        )
    if teacher.dtype != acc or row_terms.dtype != acc or indices.dtype != torch.int64:
        raise TypeError(
            f"a sparse teacher's values and teacher_row_terms must be {acc} and teacher_indices int64, got "
            f"{teacher.dtype}, {row_terms.dtype} and {indices.dtype}"
        )
    if indices.shape != teacher.shape or row_terms.shape != (n, 2):
        raise ValueError(f"teacher_indices must be {tuple(teacher.shape)} and teacher_row_terms ({n}, 2), got "
                         f"{tuple(indices.shape)} and {tuple(row_terms.shape)}")  # fmt: skip
    for name, t in (("teacher_topk_values", teacher), ("teacher_indices", indices), ("teacher_row_terms", row_terms)):
        if t.device != ref.device or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous on {ref.device}, got {describe(t)}")
    read = indices[rows]
    rules = sparse_index_rules(read, num_classes, "teacher_indices")
    if _traced(read):
        broken = torch.stack([bad for bad, _ in rules]).any()
        torch._assert_async(~broken, "teacher_indices: a class outside [0, C) or repeated in a row")
        return
    raise_first_broken(rules, first_row=rows.start or 0)


def sparse_index_rules(indices: torch.Tensor, num_classes: int, name: str) -> list[tuple[torch.Tensor, str]]:
    """The rules a sparse teacher's (N, k) class indices keep, as (N,) masks of the rows that break them, each with
    its message (``{}`` for the row): in [0, C), and none repeated within a row."""
    return [
        (
            ((indices < 0) | (indices >= num_classes)).any(dim=1),
            f"{name} row {{}} has a class outside [0, {num_classes})",
        ),
        ((indices.sort(dim=1).values.diff(dim=1) == 0).any(dim=1), f"{name} row {{}} repeats a class"),
    ]


def raise_first_broken(rules: list[tuple[torch.Tensor, str]], first_row: int = 0) -> None:
    """ValueError for the first row (numbered from ``first_row``) of the first of ``rules`` (masks of the rows that
    break each, with its message) broken; one host sync when none is."""
    if not bool(torch.stack([bad for bad, _ in rules]).any()):
        return
    for bad, message in rules:
        rows = bad.nonzero()
        if len(rows):
            raise ValueError(message.format(first_row + int(rows[0, 0])))
