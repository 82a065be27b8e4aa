"""Triton versions of the online row statistics of csrc/row_math.h, updated one column tile at a time.

Same definitions as the header: a softmax statistic is ``(max, sum exp(x - max))``; the KL statistic of a teacher
row ``a = t / T`` and a student row ``b = z / T`` keeps both statistics and
``cross = sum_c exp(a_c - max_a) * ((a_c - max_a) - (b_c - max_b))``, so ``KL = cross / sum_a - log(sum_a) +
log(sum_b)`` never subtracts two large logsumexps. Columns outside the row are -inf in every input tile.
"""

import triton
import triton.language as tl

#: row_math::TeacherForm: the teacher as (N, C) logits, as (N, C) probabilities, or sparse (k classes per row).
TEACHER_LOGITS, TEACHER_PROBS, TEACHER_SPARSE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def exp_base(m):
    """The maximum to subtract before exp: 0 for an empty piece (max -inf), so exp(-inf - base) is 0, not NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def softmax_update(m, s, x):
    """Folds a tile x into the softmax statistic (m, s) (row_math::softmax_merge)."""
    m_new = tl.maximum(m, tl.max(x, 0))
    base = exp_base(m_new)
    return m_new, s * tl.exp(m - base) + tl.sum(tl.exp(x - base), 0)


@triton.jit
def kl_update(ma, sa, mb, sb, cross, a, b):
    """Folds teacher tile a and student tile b into the KL statistic (row_math::kl_rebase and kl_merge)."""
    ma_new = tl.maximum(ma, tl.max(a, 0))
    mb_new = tl.maximum(mb, tl.max(b, 0))
    base_a = exp_base(ma_new)
    rescale_a = tl.exp(ma - base_a)
    # Rebase the running cross term to the new maxima; an empty teacher piece has none (and -inf maxima), nor has one
    # whose mass vanishes at the new maximum (rescale_a = 0, where shift may overflow: 0 * inf is NaN).
    shift = (ma_new - ma) - (mb_new - mb)
    cross = tl.where((sa != 0) & (rescale_a != 0), rescale_a * (cross - sa * shift), 0.0)
    da = a - base_a
    ea = tl.exp(da)
    # Masked teacher classes (ea = 0) contribute exactly 0, also where the student is -inf there.
    cross += tl.sum(tl.where(ea > 0, ea * (da - (b - mb_new)), 0.0), 0)
    sa = sa * rescale_a + tl.sum(ea, 0)
    base_b = exp_base(mb_new)
    sb = sb * tl.exp(mb - base_b) + tl.sum(tl.exp(b - base_b), 0)
    return ma_new, sa, mb_new, sb, cross


@triton.jit
def kl_value(sa, sb, cross):
    return cross / sa - tl.log(sa) + tl.log(sb)


@triton.jit
def sparse_kl_value(sb, cross, neg_entropy):
    """row_math::sparse_kl_value: KL of a sparse teacher; cross = sum_c p_c (b_c - max_b), sb = sum_c exp(b_c - max_b)
    (the student statistic)."""
    return neg_entropy - cross + tl.log(sb)


@triton.jit
def teacher_row_status(bad, ma):
    """row_math::TeacherRowStatus from the raw row's flag (bad != 0: NaN or +inf in t) and the maximum ma of t / T:
    1 for NaN or +inf in t, 3 for a finite t whose t / T overflows, 2 for a row that is -inf everywhere."""
    overflow = (ma != ma) | (ma == float("inf"))
    return tl.where(bad != 0, 1, tl.where(overflow, 3, tl.where(ma == float("-inf"), 2, 0)))


def smoothing_scale(num_classes: int) -> float:
    """row_math::smoothing_scale: the largest power of two h with h * num_classes <= 1/2 (exact in float32)."""
    return 0.5 ** ((num_classes - 1).bit_length() + 1)


@triton.jit
def cross_entropy_value(m, s, target, smoothing_sum, eps, num_classes, h, SMOOTH: tl.constexpr):
    """row_math::cross_entropy_value: CE = (m - x_y) + log s - eps / (C h) * sum_c (h x_c - h x_y), every term
    relative to the row maximum m or the label's logit x_y (s = sum_c exp(x_c - m))."""
    ce = (m - target) + tl.log(s)
    if SMOOTH:
        # A label whose logit is -inf has CE +inf; its smoothing sum is NaN (-inf - -inf).
        ce = tl.where(target == float("-inf"), ce, ce - eps / (num_classes * h) * smoothing_sum)
    return ce


@triton.jit
def row_weights(labelled, num_labelled, num_rows, t2, KD_SPLIT: tl.constexpr, ACC: tl.constexpr):
    """Weights of a row in ce_term and kd_term (row_math::row_weights): 1 / n_labelled and T^2 / n_group."""
    n_lab = num_labelled.to(ACC)
    n_all = tl.full((), num_rows, ACC)
    w_ce = tl.where(labelled, 1.0 / n_lab, 0.0)
    if KD_SPLIT:
        group = tl.where(labelled, n_lab, n_all - n_lab)
    else:
        group = n_all
    return w_ce, t2 / group
