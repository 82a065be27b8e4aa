"""Triton launchers of DHO's inference blend, registered by dho_fast.ops.registry as
``dho_fast::dual_head_predict_triton`` and ``dho_fast::blend_search_triton``.

``p = alpha * softmax(ce) + (1 - alpha) * softmax(kd / beta)`` (dho_fast.dual_head_predict). The search reads each
row of the logits once into a softmax statistic per head and beta, then scores every (alpha, beta) pair of the grid
on the row's tiles; rows are spread over a bounded number of programs, each adding its hit counts to the table once.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import _row_math as rm
from .dual_head_loss import MAX_TILE, tile_config

# Programs of the search: enough to fill a large GPU; each adds its counts to the (A, B) table once.
_SEARCH_PROGRAMS = 2048


@triton.jit
def _load_pair(ce_row, kd_row, cols, num_classes, ACC: tl.constexpr):
    inside = cols < num_classes
    x = tl.load(ce_row + cols, mask=inside, other=float("-inf")).to(ACC)
    z = tl.load(kd_row + cols, mask=inside, other=float("-inf")).to(ACC)
    return x, z


@triton.jit
def _predict_kernel(ce_ptr, kd_ptr, out_ptr, num_classes, alpha, beta, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
                    SINGLE_TILE: tl.constexpr):  # fmt: skip
    """Row r of p; a row that fits one tile is read once (kept in registers through the loop), a wider one twice."""
    row = tl.program_id(0).to(tl.int64)
    ce_row, kd_row, out_row = ce_ptr + row * num_classes, kd_ptr + row * num_classes, out_ptr + row * num_classes
    cols = tl.arange(0, BLOCK_C)
    m_ce, s_ce = tl.full((), float("-inf"), ACC), tl.zeros((), ACC)
    m_kd, s_kd = m_ce, s_ce
    x = tl.full((BLOCK_C,), float("-inf"), ACC)
    z = x
    for c0 in range(0, num_classes, BLOCK_C):
        x, z = _load_pair(ce_row, kd_row, c0 + cols, num_classes, ACC)
        m_ce, s_ce = rm.softmax_update(m_ce, s_ce, x)
        m_kd, s_kd = rm.softmax_update(m_kd, s_kd, z / beta)
    f_ce, f_kd = alpha / s_ce, (1.0 - alpha) / s_kd
    base_ce, base_kd = rm.exp_base(m_ce), rm.exp_base(m_kd)
    for c0 in range(0, num_classes, BLOCK_C):
        if not SINGLE_TILE:
            x, z = _load_pair(ce_row, kd_row, c0 + cols, num_classes, ACC)
        p = tl.exp(x - base_ce) * f_ce + tl.exp(z / beta - base_kd) * f_kd
        tl.store(out_row + c0 + cols, p.to(out_ptr.dtype.element_ty), mask=c0 + cols < num_classes)


@triton.jit
def _search_kernel(ce_ptr, kd_ptr, labels_ptr, alphas_ptr, betas_ptr, correct_ptr, num_rows, num_classes,
                   num_alphas, num_betas, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_A: tl.constexpr,
                   BLOCK_B: tl.constexpr):  # fmt: skip
    """correct[a, b] += number of this program's rows whose blend argmax (first maximum) is the label."""
    a_idx = tl.arange(0, BLOCK_A)
    b_idx = tl.arange(0, BLOCK_B)
    # Padded betas are 1 so their (unused) statistics stay finite.
    betas = tl.load(betas_ptr + b_idx, mask=b_idx < num_betas, other=1.0).to(ACC)
    cols = tl.arange(0, BLOCK_C)
    counts = tl.zeros((BLOCK_A, BLOCK_B), tl.int32)
    for row in range(tl.program_id(0), num_rows, tl.num_programs(0)):
        ce_row = ce_ptr + tl.cast(row, tl.int64) * num_classes
        kd_row = kd_ptr + tl.cast(row, tl.int64) * num_classes
        label = tl.load(labels_ptr + row)
        m_ce, s_ce = tl.full((), float("-inf"), ACC), tl.zeros((), ACC)
        m_kd = tl.full((BLOCK_B,), float("-inf"), ACC)
        s_kd = tl.zeros((BLOCK_B,), ACC)
        for c0 in range(0, num_classes, BLOCK_C):
            x, z = _load_pair(ce_row, kd_row, c0 + cols, num_classes, ACC)
            m_ce, s_ce = rm.softmax_update(m_ce, s_ce, x)
            zb = z[None, :] / betas[:, None]
            m_new = tl.maximum(m_kd, tl.max(zb, 1))
            base = rm.exp_base(m_new)
            s_kd = s_kd * tl.exp(m_kd - base) + tl.sum(tl.exp(zb - base[:, None]), 1)
            m_kd = m_new
        base_ce, base_kd = rm.exp_base(m_ce), rm.exp_base(m_kd)

        best = tl.full((BLOCK_A, BLOCK_B), float("-inf"), ACC)
        best_col = tl.zeros((BLOCK_A, BLOCK_B), tl.int32)
        for c0 in range(0, num_classes, BLOCK_C):
            x, z = _load_pair(ce_row, kd_row, c0 + cols, num_classes, ACC)
            p_ce = tl.exp(x - base_ce) / s_ce
            p_kd = tl.exp(z[None, :] / betas[:, None] - base_kd[:, None]) / s_kd[:, None]
            inside = (c0 + cols < num_classes)[None, :]
            for a in range(0, num_alphas):
                alpha = tl.load(alphas_ptr + a).to(ACC)
                blend = tl.where(inside, alpha * p_ce[None, :] + (1.0 - alpha) * p_kd, float("-inf"))
                tile_best, tile_col = tl.max(blend, 1, return_indices=True, return_indices_tie_break_left=True)
                # Strictly greater: on a tie the earlier tile's column stays, as argmax's first maximum.
                better = (a_idx[:, None] == a) & (tile_best[None, :] > best)
                best = tl.where(better, tile_best[None, :], best)
                best_col = tl.where(better, c0 + tile_col[None, :], best_col)
        counts += (best_col == label).to(tl.int32)
    valid = (a_idx[:, None] < num_alphas) & (b_idx[None, :] < num_betas)
    tl.atomic_add(correct_ptr + a_idx[:, None] * num_betas + b_idx[None, :], counts, mask=valid)


def dual_head_predict(ce_logits: torch.Tensor, kd_logits: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``alpha * softmax(ce_logits) + (1 - alpha) * softmax(kd_logits / beta)`` of (N, C) logits, as float32
    (float64 for float64 input); arguments as validated by dho_fast.ops.blend."""
    ce, kd = ce_logits.contiguous(), kd_logits.contiguous()
    n, c = ce.shape
    acc = torch.promote_types(ce.dtype, torch.float32)
    out = ce.new_empty((n, c), dtype=acc)
    if n:
        block, single, warps = tile_config(c)
        acc_tl = tl.float64 if acc == torch.float64 else tl.float32
        wrap_triton(_predict_kernel)[(n,)](
            ce, kd, out, c, alpha, beta, ACC=acc_tl, BLOCK_C=block, SINGLE_TILE=single, num_warps=warps
        )
    return out


def blend_search(
    ce_logits: torch.Tensor, kd_logits: torch.Tensor, labels: torch.Tensor, alphas: torch.Tensor, betas: torch.Tensor
) -> torch.Tensor:
    """(A, B) int64 counts of rows whose ``dual_head_predict(ce, kd, alphas[a], betas[b]).argmax(1)`` equals the
    label; ``alphas`` (A,), ``betas`` (B,) in the logits' accumulation dtype; labels in [0, C) (checked by
    dho_fast.ops.blend)."""
    ce, kd, y = ce_logits.contiguous(), kd_logits.contiguous(), labels.contiguous()
    n, c = ce.shape
    num_alphas, num_betas = alphas.shape[0], betas.shape[0]
    correct = torch.zeros((num_alphas, num_betas), dtype=torch.int32, device=ce.device)
    if n:
        # A row is scored on (B, BLOCK_C) tiles per alpha: narrower tiles than the loss kernels' keep it in registers.
        block = min(max(16, triton.next_power_of_2(c)), MAX_TILE // 8)
        wrap_triton(_search_kernel)[(min(n, _SEARCH_PROGRAMS),)](
            ce, kd, y, alphas.contiguous(), betas.contiguous(), correct, n, c, num_alphas, num_betas,
            ACC=tl.float64 if alphas.dtype == torch.float64 else tl.float32, BLOCK_C=block,
            BLOCK_A=max(2, triton.next_power_of_2(num_alphas)), BLOCK_B=max(2, triton.next_power_of_2(num_betas)),
            num_warps=4,
        )  # fmt: skip
    return correct.to(torch.int64)
