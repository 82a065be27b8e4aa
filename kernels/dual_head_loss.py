"""Triton launchers of the fused DHO loss: :func:`dual_head_loss` and :func:`dual_head_loss_chunk`.

dho_fast.ops.registry registers them as ``dho_fast::dual_head_loss_triton`` and ``dual_head_loss_chunk_triton``,
with the schemas and semantics of the compiled ops ``dho_fast::dual_head_loss`` and ``dual_head_loss_chunk``
(csrc/dho_fast.cpp). Three launches per call:

1. ``_count_labels_kernel`` (one program): the number of labelled rows, which every row's weight needs before its
   gradient can be written, and the first out-of-range label.
2. ``_loss_rows_kernel`` (one program per row): one pass over column tiles folds the CE head, the KD head and the
   teacher into online softmax statistics (kernels/_row_math.py, float32; float64 for float64 input); a row that
   fits one tile (C <= MAX_TILE) keeps it in registers and writes both gradients without reading it again, a
   wider row is read a second time (mostly from L2) to write them. Rows without a label skip the CE head's reads.
3. ``_reduce_rows_kernel`` (one program): sums the weighted per-row values in a fixed order (deterministic) and
   finds the first invalid teacher row.

Value errors (labels out of range, NaN/+inf teacher entries, teacher rows that are -inf everywhere or overflow when
divided by the temperature) are flagged on the device in a small ``info`` tensor that the launchers return; the
registered op raises them (eagerly that costs one device-to-host copy of four integers, a sync; under torch.compile
they become device asserts).
"""

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import _row_math as rm

#: Widest column tile. A row of at most this many classes is read once; a wider one is read twice.
MAX_TILE = 4096
#: Labels or rows per iteration of the single-program kernels.
_SCAN_BLOCK = 1024


@triton.jit
def _count_labels_kernel(labels_ptr, info_ptr, n, num_classes, ignore_index, BLOCK: tl.constexpr):
    """info[0] = number of labels[0, n) != ignore_index; info[1] = first i whose label is neither ignore_index
    nor in [0, num_classes), n when there is none."""
    count = tl.zeros((), tl.int64)
    first_bad = tl.full((), n, tl.int64)
    for i0 in range(0, n, BLOCK):
        idx = i0 + tl.arange(0, BLOCK)
        y = tl.load(labels_ptr + idx, mask=idx < n, other=ignore_index)
        labelled = y != ignore_index
        count += tl.sum(labelled.to(tl.int64), 0)
        bad = labelled & ((y < 0) | (y >= num_classes))
        first_bad = tl.minimum(first_bad, tl.min(tl.where(bad, idx, n).to(tl.int64), 0))
    tl.store(info_ptr, count)
    tl.store(info_ptr + 1, first_bad)


@triton.jit
def _load_tile(ce_row, kd_row, t_row, ce_bias, kd_bias, cols, num_classes, do_ce, temperature, inv_t,
               ACC: tl.constexpr, HAS_CE_BIAS: tl.constexpr, HAS_KD_BIAS: tl.constexpr,
               TEACHER_FORM: tl.constexpr):  # fmt: skip
    """A column tile of the three rows in ACC, the biases added, -inf outside the row (and for x when the row has no
    CE head); a = teacher / T, b = student / T; bad marks NaN or +inf teacher entries. Teacher probabilities p are
    read as the logits T log(p); a sparse teacher has no dense row: a is b then, and bad 0."""
    inside = cols < num_classes
    x = tl.load(ce_row + cols, mask=inside & do_ce, other=float("-inf")).to(ACC)
    z = tl.load(kd_row + cols, mask=inside, other=float("-inf")).to(ACC)
    if HAS_CE_BIAS:
        x += tl.load(ce_bias + cols, mask=inside, other=0.0).to(ACC)
    if HAS_KD_BIAS:
        z += tl.load(kd_bias + cols, mask=inside, other=0.0).to(ACC)
    b = z * inv_t
    if TEACHER_FORM == rm.TEACHER_SPARSE:
        a, bad = b, tl.zeros((), tl.int32)
    else:
        if TEACHER_FORM == rm.TEACHER_PROBS:
            # p = 0 is a masked class (-inf); a negative or NaN p gives NaN, +inf stays +inf: flagged as bad.
            t = tl.log(tl.load(t_row + cols, mask=inside, other=0.0).to(ACC)) * temperature
        else:
            t = tl.load(t_row + cols, mask=inside, other=float("-inf")).to(ACC)
        a, bad = t * inv_t, tl.max(((t != t) | (t == float("inf"))).to(tl.int32), 0)
    return x, a, b, bad


@triton.jit
def _loss_rows_kernel(
    ce_ptr, ce_row_ptr, kd_ptr, t_ptr, t_idx_ptr, t_terms_ptr, labels_ptr, info_ptr, g_ce_ptr, g_kd_ptr, row_ce_ptr,
    row_kl_ptr, status_ptr, ce_bias_ptr, kd_bias_ptr, num_classes, teacher_width, num_rows, num_labelled, ce_rows,
    ignore_index, temperature, label_smoothing, smoothing_scale, ce_grad_scale, kd_grad_scale,
    ACC: tl.constexpr, CE_ROW: tl.constexpr, COUNT_ON_DEVICE: tl.constexpr, KD_SPLIT: tl.constexpr,
    SMOOTH: tl.constexpr, CE_GRAD: tl.constexpr, KD_GRAD: tl.constexpr, BLOCK_C: tl.constexpr,
    SINGLE_TILE: tl.constexpr, HAS_CE_BIAS: tl.constexpr, HAS_KD_BIAS: tl.constexpr, TEACHER_FORM: tl.constexpr,
):  # fmt: skip
    """Row r of kd/teacher/labels: its weighted CE and KL values, teacher status and gradients.

    CE_ROW: row r's CE logits (and CE gradient) are row ce_row[r] of ce, -1 for none; else row r. num_labelled and
    num_rows describe the whole batch (row weights); COUNT_ON_DEVICE reads num_labelled from info[0] instead.
    HAS_*_BIAS: the (C,) bias is added to every row of ce / kd; the gradients written are times *_grad_scale.
    smoothing_scale: row_math::smoothing_scale of num_classes. TEACHER_FORM (rm.TEACHER_*): t holds rows of
    teacher_width entries, logits or probabilities (C), or a sparse teacher's k probabilities at classes t_idx, with
    t_terms = [u, sum_c p_c log p_c] per row; t_idx and t_terms are read for a sparse teacher only.
    """
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if CE_ROW:
        ce_i = tl.load(ce_row_ptr + row)
    else:
        ce_i = row
    labelled = label != ignore_index
    # A bad label or CE row is reported after the kernel; until then it must not index memory.
    do_ce = labelled & (label >= 0) & (label < num_classes) & (ce_i >= 0) & (ce_i < ce_rows)
    ce_row, kd_row, t_row = ce_ptr + ce_i * num_classes, kd_ptr + row * num_classes, t_ptr + row * teacher_width
    # In ACC: float64 rows must not get eps / C rounded to float32 (the arguments themselves are float32).
    inv_t, eps = 1.0 / temperature, tl.cast(label_smoothing, ACC)

    neg_inf, zero = tl.full((), float("-inf"), ACC), tl.zeros((), ACC)
    m_ce, s_ce, sum_ce = neg_inf, zero, zero
    # The label's logit, read first: the smoothing sum is accumulated relative to it (rm.cross_entropy_value).
    target = tl.load(ce_row + label, mask=do_ce, other=0.0).to(ACC)
    if HAS_CE_BIAS:
        target += tl.load(ce_bias_ptr + label, mask=do_ce, other=0.0).to(ACC)
    h_target = smoothing_scale * target
    ma, sa, mb, sb, cross = neg_inf, zero, neg_inf, zero, zero
    bad = tl.zeros((), tl.int32)
    sum_b = zero  # sparse teacher: sum_c b_c
    cols = tl.arange(0, BLOCK_C)
    # Carried through the loop so that, for a row of one tile, the tile is still in registers for the gradients.
    x = tl.full((BLOCK_C,), float("-inf"), ACC)
    a, b = x, x
    for c0 in range(0, num_classes, BLOCK_C):
        x, a, b, tile_bad = _load_tile(
            ce_row, kd_row, t_row, ce_bias_ptr, kd_bias_ptr, c0 + cols, num_classes, do_ce, temperature, inv_t, ACC,
            HAS_CE_BIAS, HAS_KD_BIAS, TEACHER_FORM,
        )  # fmt: skip
        if do_ce:
            m_ce, s_ce = rm.softmax_update(m_ce, s_ce, x)
            if SMOOTH:
                sum_ce += tl.sum(tl.where(c0 + cols < num_classes, smoothing_scale * x - h_target, 0.0), 0)
        if TEACHER_FORM == rm.TEACHER_SPARSE:
            mb, sb = rm.softmax_update(mb, sb, b)
            sum_b += tl.sum(tl.where(c0 + cols < num_classes, b, 0.0), 0)
        else:
            ma, sa, mb, sb, cross = rm.kl_update(ma, sa, mb, sb, cross, a, b)
            bad = tl.maximum(bad, tile_bad)

    if COUNT_ON_DEVICE:
        n_lab = tl.load(info_ptr)
    else:
        n_lab = tl.full((), num_labelled, tl.int64)
    w_ce, w_kd = rm.row_weights(labelled, n_lab, num_rows, temperature * temperature, KD_SPLIT, ACC)
    ce = rm.cross_entropy_value(m_ce, s_ce, target, sum_ce, eps, num_classes, smoothing_scale, SMOOTH)
    tl.store(row_ce_ptr + row, tl.where(do_ce, w_ce * ce, 0.0))
    if TEACHER_FORM == rm.TEACHER_SPARSE:
        # cross = sum_c p_c (b_c - mb): u at every class, plus p_j - u at the k listed ones, whose KD logits are
        # gathered here, before the gradients may overwrite them. A term of weight 0 is skipped (b_c may be -inf).
        u = tl.load(t_terms_ptr + 2 * row)
        cross = tl.where(u != 0, u * (sum_b - num_classes * mb), 0.0)
        for j0 in range(0, teacher_width, BLOCK_C):
            listed = j0 + cols < teacher_width
            w = tl.load(t_row + j0 + cols, mask=listed, other=0.0) - u
            idx = tl.load(t_idx_ptr + row * teacher_width + j0 + cols, mask=listed, other=0)
            z = tl.load(kd_row + idx, mask=listed, other=0.0).to(ACC)
            if HAS_KD_BIAS:
                z += tl.load(kd_bias_ptr + idx, mask=listed, other=0.0).to(ACC)
            cross += tl.sum(tl.where(listed & (w != 0), w * (z * inv_t - mb), 0.0), 0)
        kl = rm.sparse_kl_value(sb, cross, tl.load(t_terms_ptr + 2 * row + 1))
        status = tl.zeros((), tl.int32)  # a sparse teacher was checked before the launch
        tl.debug_barrier()  # every thread's gather above precedes the gradients written over the logits below
    else:
        kl = rm.kl_value(sa, sb, cross)
        status = rm.teacher_row_status(bad, ma)
    tl.store(row_kl_ptr + row, w_kd * kl)
    tl.store(status_ptr + row, status)

    if CE_GRAD or KD_GRAD:
        # d ce_term / d x = w_ce (softmax(x) - eps / C - (1 - eps) onehot(y)); d kd_term / d z = w_kd (q - p) / T;
        # written times the gradient scales. A sparse teacher's p is u here, corrected at its k classes below.
        w_ce, w_kd = w_ce * ce_grad_scale, w_kd * kd_grad_scale
        ce_base, ce_scale = rm.exp_base(m_ce), w_ce / s_ce
        ce_off, ce_target = w_ce * eps / num_classes, w_ce * (1.0 - eps)
        base_b, q_scale = rm.exp_base(mb), w_kd * inv_t / sb
        if TEACHER_FORM == rm.TEACHER_SPARSE:
            kd_scale = w_kd * inv_t
        else:
            base_a, p_scale = rm.exp_base(ma), w_kd * inv_t / sa
        for c0 in range(0, num_classes, BLOCK_C):
            if not SINGLE_TILE:
                x, a, b, _ = _load_tile(
                    ce_row, kd_row, t_row, ce_bias_ptr, kd_bias_ptr, c0 + cols, num_classes, do_ce, temperature,
                    inv_t, ACC, HAS_CE_BIAS, HAS_KD_BIAS, TEACHER_FORM,
                )  # fmt: skip
            inside = c0 + cols < num_classes
            if CE_GRAD:
                g = tl.exp(x - ce_base) * ce_scale - ce_off - tl.where(c0 + cols == label, ce_target, 0.0)
                g = tl.where(do_ce, g, 0.0).to(g_ce_ptr.dtype.element_ty)
                # Unlabelled rows get a zero CE gradient row, except in the chunk op, where they have no row at all.
                if CE_ROW:
                    tl.store(g_ce_ptr + ce_i * num_classes + c0 + cols, g, mask=inside & do_ce)
                else:
                    tl.store(g_ce_ptr + ce_i * num_classes + c0 + cols, g, mask=inside)
            if KD_GRAD:
                if TEACHER_FORM == rm.TEACHER_SPARSE:
                    g = tl.exp(b - base_b) * q_scale - kd_scale * u
                else:
                    g = tl.exp(b - base_b) * q_scale - tl.exp(a - base_a) * p_scale
                tl.store(g_kd_ptr + row * num_classes + c0 + cols, g.to(g_kd_ptr.dtype.element_ty), mask=inside)
        if KD_GRAD and TEACHER_FORM == rm.TEACHER_SPARSE:
            # (p_j - u) w_kd / T off at the listed classes, from the row just written (by other threads: a barrier).
            tl.debug_barrier()
            for j0 in range(0, teacher_width, BLOCK_C):
                listed = j0 + cols < teacher_width
                w = tl.load(t_row + j0 + cols, mask=listed, other=0.0) - u
                g_j = g_kd_ptr + row * num_classes + tl.load(t_idx_ptr + row * teacher_width + j0 + cols, mask=listed)
                tl.store(g_j, tl.load(g_j, mask=listed) - kd_scale * w, mask=listed)


@triton.jit
def _reduce_rows_kernel(row_ce_ptr, row_kl_ptr, status_ptr, info_ptr, loss_ptr, ce_term_ptr, kd_term_ptr, n,
                        ce_loss_weight, kd_loss_weight, HAS_LOSS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """ce_term, kd_term (and loss) from the weighted row values, summed in float64 in a fixed order;
    info[2] = first row with a bad teacher status (n when none), info[3] = its status."""
    acc_ce = tl.zeros((BLOCK,), tl.float64)
    acc_kl = tl.zeros((BLOCK,), tl.float64)
    first_bad = tl.full((), n, tl.int64)
    for i0 in range(0, n, BLOCK):
        idx = i0 + tl.arange(0, BLOCK)
        inside = idx < n
        acc_ce += tl.load(row_ce_ptr + idx, mask=inside, other=0.0).to(tl.float64)
        acc_kl += tl.load(row_kl_ptr + idx, mask=inside, other=0.0).to(tl.float64)
        status = tl.load(status_ptr + idx, mask=inside, other=0)
        first_bad = tl.minimum(first_bad, tl.min(tl.where(status != 0, idx, n).to(tl.int64), 0))
    ce_term = tl.sum(acc_ce, 0)
    kd_term = tl.sum(acc_kl, 0)
    out_ty = ce_term_ptr.dtype.element_ty
    tl.store(ce_term_ptr, ce_term.to(out_ty))
    tl.store(kd_term_ptr, kd_term.to(out_ty))
    if HAS_LOSS:
        tl.store(loss_ptr, (ce_loss_weight * ce_term + kd_loss_weight * kd_term).to(out_ty))
    tl.store(info_ptr + 2, first_bad)
    tl.store(info_ptr + 3, tl.load(status_ptr + first_bad, mask=first_bad < n, other=0).to(tl.int64))


def tile_config(num_classes: int) -> tuple[int, bool, int]:
    """(BLOCK_C, SINGLE_TILE, num_warps) for rows of num_classes columns: about 8 columns per thread."""
    block = min(max(16, triton.next_power_of_2(num_classes)), MAX_TILE)
    return block, block >= num_classes, max(1, min(16, block // 256))


def _empty_like_grad(x: torch.Tensor, wanted: bool) -> torch.Tensor:
    """The gradient buffer of logits x: in the accumulation dtype (float32 for half x), so that the loss scale the
    backward applies comes before the rounding to x's dtype."""
    if not wanted:
        return x.new_empty((0,))
    acc = torch.promote_types(x.dtype, torch.float32)
    # Tests poison the outputs so that an element a kernel fails to write shows up as NaN.
    if os.environ.get("DHO_FAST_POISON_OUTPUTS"):
        return torch.full_like(x, float("nan"), dtype=acc)
    return torch.empty_like(x, dtype=acc)


def _launch_rows(ce, ce_row, kd, t, t_idx, t_terms, labels, info, g_ce, g_kd, row_ce, row_kl, status, *, num_rows,
                 num_labelled, temperature, kd_split, ignore_index, label_smoothing, ce_grad, kd_grad, teacher_form,
                 ce_bias=None, kd_bias=None, ce_grad_scale=1.0, kd_grad_scale=1.0):  # fmt: skip
    """_loss_rows_kernel over the rows of kd, whose teacher rows are those of t (and of t_idx, t_terms for a sparse
    teacher). ce_row None: row r's CE logits are ce[r]; num_labelled None: the count is read from info[0].
    Unwanted gradients, absent biases, an absent ce_row and the absent t_idx, t_terms of a dense teacher get a
    placeholder pointer (labels)."""
    rows, num_classes = kd.shape
    if rows == 0:
        return
    ce_rows = ce.shape[0]
    if ce_rows == 0:  # an empty tensor may have no valid address; the kernel reads no CE row then
        ce = g_ce = labels
    block, single, warps = tile_config(num_classes)
    sparse = teacher_form == rm.TEACHER_SPARSE
    wrap_triton(_loss_rows_kernel)[(rows,)](
        ce, labels if ce_row is None else ce_row, kd, t, t_idx if sparse else labels, t_terms if sparse else labels,
        labels, info, g_ce if ce_grad else labels, g_kd if kd_grad else labels, row_ce, row_kl, status,
        labels if ce_bias is None else ce_bias, labels if kd_bias is None else kd_bias, num_classes, t.shape[1],
        num_rows, num_labelled or 0, ce_rows, ignore_index, temperature, label_smoothing,
        rm.smoothing_scale(num_classes), ce_grad_scale, kd_grad_scale,
        ACC=tl.float64 if kd.dtype == torch.float64 else tl.float32, CE_ROW=ce_row is not None,
        COUNT_ON_DEVICE=num_labelled is None, KD_SPLIT=kd_split, SMOOTH=label_smoothing != 0, CE_GRAD=ce_grad,
        KD_GRAD=kd_grad, BLOCK_C=block, SINGLE_TILE=single, HAS_CE_BIAS=ce_bias is not None,
        HAS_KD_BIAS=kd_bias is not None, TEACHER_FORM=teacher_form, num_warps=warps,
    )  # fmt: skip


def dual_head_loss(
    ce_logits: torch.Tensor, kd_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
    temperature: float, ce_loss_weight: float, kd_loss_weight: float, kd_split: bool, ignore_index: int,
    label_smoothing: float, ce_grad: bool, kd_grad: bool, ce_grad_scale: float = 1.0, kd_grad_scale: float = 1.0,
    teacher_form: int = 0, teacher_indices: torch.Tensor | None = None, teacher_row_terms: torch.Tensor | None = None,
    *, grad_dtype: torch.dtype,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """(loss, ce_term, kd_term, ce_grad_scale * d ce_term / d ce_logits, kd_grad_scale * d kd_term / d kd_logits,
    info) of (N, C) logits; the arguments as dho_fast::dual_head_loss takes them (validated by the caller), and the
    dtype to return the two gradients in.
    teacher_form (row_math::TeacherForm): teacher_logits holds (N, C) logits (0) or probabilities p, read as the
    logits T log(p) (1), or (2, sparse) (N, k) probabilities in the accumulation dtype at the classes
    teacher_indices (N, k) int64, with teacher_row_terms (N, 2) = [u, sum_c p_c log p_c]: u is the probability of
    each unlisted class (no dense teacher is built). info (4,) int64: the number of labelled rows, the first row with
    a bad label (N if none), the first bad teacher row (N if none; a sparse teacher's rows are never bad) and its
    row_math::TeacherRowStatus; the caller raises the errors. Scalars are float32 in the kernels (exact for the usual
    temperatures); statistics and gradients accumulate in float32, float64 for float64 input. The kernel stores the
    gradients in that accumulation dtype, and they are rounded to ``grad_dtype`` afterwards, one pass: the Triton
    interpreter's float32-to-bfloat16 store truncates instead of rounding to nearest, and the interpreter is where
    these kernels are tested."""
    ce, kd, t, y = ce_logits.contiguous(), kd_logits.contiguous(), teacher_logits.contiguous(), labels.contiguous()
    t_idx, t_terms = (None if x is None else x.contiguous() for x in (teacher_indices, teacher_row_terms))
    n, c = ce.shape
    acc = torch.promote_types(ce.dtype, torch.float32)
    info = torch.empty(4, dtype=torch.int64, device=ce.device)
    row_ce, row_kl = ce.new_empty((n,), dtype=acc), ce.new_empty((n,), dtype=acc)
    status = ce.new_empty((n,), dtype=torch.int32)
    g_ce, g_kd = _empty_like_grad(ce, ce_grad), _empty_like_grad(kd, kd_grad)
    loss, ce_term, kd_term = (ce.new_empty((), dtype=acc) for _ in range(3))

    wrap_triton(_count_labels_kernel)[(1,)](y, info, n, c, ignore_index, BLOCK=_SCAN_BLOCK)
    _launch_rows(
        ce, None, kd, t, t_idx, t_terms, y, info, g_ce, g_kd, row_ce, row_kl, status, num_rows=n, num_labelled=None,
        temperature=temperature, kd_split=kd_split, ignore_index=ignore_index, label_smoothing=label_smoothing,
        ce_grad=ce_grad, kd_grad=kd_grad, teacher_form=teacher_form, ce_grad_scale=ce_grad_scale,
        kd_grad_scale=kd_grad_scale,
    )  # fmt: skip
    wrap_triton(_reduce_rows_kernel)[(1,)](
        row_ce, row_kl, status, info, loss, ce_term, kd_term, n, ce_loss_weight, kd_loss_weight, HAS_LOSS=True,
        BLOCK=_SCAN_BLOCK,
    )  # fmt: skip
    g_ce, g_kd = (g.to(grad_dtype) if wanted else g for g, wanted in ((g_ce, ce_grad), (g_kd, kd_grad)))
    return loss, ce_term, kd_term, g_ce, g_kd, info


def dual_head_loss_chunk(
    ce_logits: torch.Tensor, kd_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, start: int,
    num_labelled: int, temperature: float, kd_split: bool, ignore_index: int, label_smoothing: float, ce_grad: bool,
    kd_grad: bool, ce_bias: torch.Tensor | None = None, kd_bias: torch.Tensor | None = None,
    ce_grad_scale: float = 1.0, kd_grad_scale: float = 1.0, ce_grad_out: torch.Tensor | None = None,
    kd_grad_out: torch.Tensor | None = None, teacher_form: int = 0, teacher_indices: torch.Tensor | None = None,
    teacher_row_terms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(ce_term, kd_term, info) contributions of batch rows [start, start + R) whose KD logits are kd_logits (R, C)
    and whose labelled rows' CE logits are ce_logits (L, C), each plus its (C,) bias when given; writes
    ce_grad_scale * d ce_term / d ce_logits and kd_grad_scale * d kd_term / d kd_logits, when ce_grad / kd_grad,
    into ce_grad_out / kd_grad_out (float32 for half logits), or over the logits when those are None. The row
    weights are those of the whole batch (teacher_logits (N, C), or (N, k) for a sparse teacher, num_labelled); the
    teacher arguments as in :func:`dual_head_loss`, covering the whole batch. info as in :func:`dual_head_loss`, for
    the chunk's rows (the layout is validated by the caller)."""
    rows, c = kd_logits.shape
    n = teacher_logits.shape[0]
    t, t_idx, t_terms = (
        None if x is None else x.contiguous()[start : start + rows]
        for x in (teacher_logits, teacher_indices, teacher_row_terms)
    )
    y = labels.contiguous()[start : start + rows]
    labelled = y != ignore_index
    ce_row = torch.where(labelled, labelled.cumsum(0) - 1, -1)
    acc = torch.promote_types(kd_logits.dtype, torch.float32)
    info = torch.empty(4, dtype=torch.int64, device=kd_logits.device)
    row_ce, row_kl = kd_logits.new_empty((rows,), dtype=acc), kd_logits.new_empty((rows,), dtype=acc)
    status = kd_logits.new_empty((rows,), dtype=torch.int32)
    ce_term, kd_term = kd_logits.new_empty((), dtype=acc), kd_logits.new_empty((), dtype=acc)

    wrap_triton(_count_labels_kernel)[(1,)](y, info, rows, c, ignore_index, BLOCK=_SCAN_BLOCK)
    _launch_rows(
        ce_logits, ce_row, kd_logits, t, t_idx, t_terms, y, info, ce_logits if ce_grad_out is None else ce_grad_out,
        kd_logits if kd_grad_out is None else kd_grad_out, row_ce, row_kl, status, num_rows=n,
        num_labelled=num_labelled, temperature=temperature, kd_split=kd_split, ignore_index=ignore_index,
        label_smoothing=label_smoothing, ce_grad=ce_grad, kd_grad=kd_grad, teacher_form=teacher_form,
        ce_bias=ce_bias, kd_bias=kd_bias, ce_grad_scale=ce_grad_scale, kd_grad_scale=kd_grad_scale,
    )  # fmt: skip
    wrap_triton(_reduce_rows_kernel)[(1,)](
        row_ce, row_kl, status, info, ce_term, ce_term, kd_term, rows, 0.0, 0.0, HAS_LOSS=False, BLOCK=_SCAN_BLOCK
    )
    return ce_term, kd_term, info
