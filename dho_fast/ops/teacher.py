"""The teacher argument of the loss ops in its three public forms, checked and turned into what every backend reads.

A caller gives exactly one of: ``teacher_logits`` (N, C); ``teacher_probs`` (N, C), the distribution p itself; or a
sparse top-k teacher, ``teacher_topk_indices`` (N, k) int32/int64 with ``teacher_topk_values`` (N, k), the
probabilities p of those classes, and ``teacher_tail``:

- ``"renormalize"``: p is the k values scaled to sum to 1 (every other class has probability 0, as a masked class);
- ``"uniform"``: the k values as they are, and the remaining mass ``1 - sum`` spread evenly over the other ``C - k``
  classes (values summing to more than 1, by up to :data:`TAIL_TOLERANCE` of rounding, are scaled to sum to 1).

The ops' schemas (csrc/dho_fast.cpp) take ``teacher_form`` (validation.TEACHER_FORM_*), the dense
tensor or the sparse probabilities, and for a sparse teacher ``teacher_indices`` (int64) and ``teacher_row_terms``
(N, 2) = ``[u, sum_c p_c log p_c]``: u is the probability of each unlisted class, and the teacher's entropy term is
computed here exactly, once, from the k values, so that no kernel ever builds a dense (N, C) teacher.
"""

from dataclasses import dataclass

import torch

from dho_fast.ops.validation import (
    FLOAT_DTYPES,
    TEACHER_FORM_LOGITS,
    TEACHER_FORM_PROBS,
    TEACHER_FORM_SPARSE,
    _check_like,
    _not_a_tensor,
    _traced,
    accumulate_dtype,
    describe,
    raise_first_broken,
    sparse_index_rules,
)

TEACHER_TAILS = ("renormalize", "uniform")
#: How far above 1 a "uniform" top-k row may sum (float16 values of a distribution round by 2^-11 each).
TAIL_TOLERANCE = 1e-2
_INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class OpTeacher:
    """A teacher as the loss ops take it: ``form`` (a validation.TEACHER_FORM_* value), ``values`` (the (N, C) logits or
    probabilities in the student logits' dtype, or (N, k) sparse probabilities in the accumulation dtype) and, for a
    sparse teacher, ``indices`` (N, k) int64 and ``row_terms`` (N, 2) ``[u, sum_c p_c log p_c]``."""

    form: int
    values: torch.Tensor
    indices: torch.Tensor | None = None
    row_terms: torch.Tensor | None = None

    def op_args(self) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """The schemas' trailing ``(teacher_form, teacher_indices, teacher_row_terms)``."""
        return self.form, self.indices, self.row_terms

    def dense_probs(self, num_classes: int) -> torch.Tensor:
        """The sparse teacher's (N, C) distribution in the accumulation dtype (for the reference backend and tests)."""
        dense = self.row_terms[:, :1].expand(-1, num_classes).clone()
        return dense.scatter_(1, self.indices, self.values)


def op_teacher(
    teacher_logits: torch.Tensor | None,
    teacher_probs: torch.Tensor | None,
    teacher_topk_indices: torch.Tensor | None,
    teacher_topk_values: torch.Tensor | None,
    teacher_tail: str,
    *,
    shape: tuple[int, int],
    ref_name: str,
    ref: torch.Tensor,
) -> OpTeacher:
    """Checks the teacher arguments of a loss of ``shape`` = (N, C) whose student tensor ``ref`` (named
    ``ref_name``) sets the dtype and device, and returns them as the ops take them. A dense teacher's values are
    checked by the kernels as they read them; a sparse one's here (finite, >= 0, indices in [0, C) and not repeated
    within a row, a positive sum for "renormalize"), raising ``ValueError`` naming the first bad row."""
    given = [
        name
        for name, t in (("teacher_logits", teacher_logits), ("teacher_probs", teacher_probs),
                        ("teacher_topk_indices/values", teacher_topk_indices if teacher_topk_indices is not None
                         else teacher_topk_values))
        if t is not None
    ]  # fmt: skip
    if len(given) != 1:
        raise ValueError(
            "give the teacher in exactly one form: teacher_logits, teacher_probs, or teacher_topk_indices with "
            f"teacher_topk_values; got {', '.join(given) if given else 'none'}"
        )
    if teacher_tail not in TEACHER_TAILS:
        raise ValueError(f"teacher_tail must be one of {TEACHER_TAILS}, got {teacher_tail!r}")
    sparse = given[0].startswith("teacher_topk")
    if not sparse and teacher_tail != "renormalize":
        raise ValueError(f"teacher_tail={teacher_tail!r} is for a top-k teacher, but {given[0]} was given")
    if not sparse:
        dense = teacher_logits if teacher_logits is not None else teacher_probs
        _check_like(given[0], dense, ref_name, ref, shape)
        return OpTeacher(TEACHER_FORM_LOGITS if teacher_logits is not None else TEACHER_FORM_PROBS, dense.detach())
    return _sparse_teacher(teacher_topk_indices, teacher_topk_values, teacher_tail, shape, ref)


def _sparse_teacher(
    indices: torch.Tensor | None, values: torch.Tensor | None, tail: str, shape: tuple[int, int], ref: torch.Tensor
) -> OpTeacher:
    n, c = shape
    for name, t in (("teacher_topk_indices", indices), ("teacher_topk_values", values)):
        if t is None:
            raise ValueError(f"a top-k teacher needs both teacher_topk_indices and teacher_topk_values; {name} is None")
        if not isinstance(t, torch.Tensor):
            raise _not_a_tensor(name, t, f"of shape ({n}, k)")
        if t.dim() != 2 or t.shape[0] != n or not 1 <= t.shape[1] <= c or t.device != ref.device:
            raise ValueError(f"{name} must be of shape ({n}, k) with 1 <= k <= {c} on {ref.device}, got {describe(t)}")
    if indices.dtype not in _INDEX_DTYPES:
        raise TypeError(f"teacher_topk_indices must be int32 or int64, got {describe(indices)}")
    if values.dtype not in FLOAT_DTYPES:
        raise TypeError(f"teacher_topk_values must be float32, float64, bfloat16 or float16, got {describe(values)}")
    if values.shape != indices.shape:
        raise ValueError(f"teacher_topk_values must have the shape of teacher_topk_indices {tuple(indices.shape)}, "
                         f"got {describe(values)}")  # fmt: skip
    k = indices.shape[1]
    acc = accumulate_dtype(ref.dtype)
    v = values.detach().to(acc)
    idx = indices.detach().to(torch.int64).contiguous()
    total = v.sum(dim=1)
    if not (_traced(v) or v.is_meta):
        _check_sparse_values(v, idx, total, tail, c)
    if tail == "uniform" and k < c:
        tail_mass = (1 - total).clamp_min(0)
        mass = total + tail_mass
        u = tail_mass / ((c - k) * mass)
    else:
        mass, u = total, torch.zeros_like(total)
    p = (v / mass[:, None]).contiguous()
    neg_entropy = torch.special.xlogy(p, p).sum(dim=1) + (c - k) * torch.special.xlogy(u, u)
    return OpTeacher(TEACHER_FORM_SPARSE, p, idx, torch.stack((u, neg_entropy), dim=1).contiguous())


def _check_sparse_values(v: torch.Tensor, idx: torch.Tensor, total: torch.Tensor, tail: str, c: int) -> None:
    """Raises ValueError for the first row of the first rule it breaks; a valid teacher costs one host sync."""
    checks = [
        ((~(v.isfinite() & (v >= 0))).any(dim=1), "teacher_topk_values row {} has a negative, NaN or inf value"),
        *sparse_index_rules(idx, c, "teacher_topk_indices"),
    ]
    if tail == "renormalize" or idx.shape[1] == c:
        checks.append((total <= 0, "teacher_topk_values row {} sums to 0: the teacher distribution is undefined"))
    else:
        over_one = f"teacher_topk_values row {{}} sums to more than 1 (by over {TAIL_TOLERANCE:g}): with "
        checks.append((total > 1 + TAIL_TOLERANCE, over_one + 'teacher_tail="uniform" they are probabilities'))
    raise_first_broken(checks)
