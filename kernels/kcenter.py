"""Triton launcher of the k-center step, registered by dho_fast.ops.registry as ``dho_fast::kcenter_update_triton``
(the contract is dho_fast.ops.kcenter.kcenter_update's).

``min_sq_dist[i] = min(min_sq_dist[i], min_k sum_c (points[i, c] - centres[k, c])^2)`` for entries >= 0, then the
first maximum of the result; the rows of picked points (entries < 0) are not read. Two launches:

1. ``_rows_kernel`` (one program per block of BLOCK_N rows): for each chunk of BLOCK_K centres, loops over the
   columns in tiles, loads a (BLOCK_N, BLOCK_C) tile of points once and takes its float32 squared differences to
   all BLOCK_K centres of the chunk at once (a (BLOCK_N, BLOCK_K, BLOCK_C) tile); then lowers the rows' running
   minima, writes them back and records the block's first maximum and its first row with a non-finite distance.
   The full column tiles are loaded without a column mask and the partial one last: a mask that ends inside a
   16-column group (C = 1000) would make every load of the row scalar, where the full tiles' loads are vectorised.
2. ``_reduce_kernel`` (one program): the blocks' results to the global first maximum, its row, and the first bad row.

Why this tiling: the hot path is one new centre per pick (K = 1), where BLOCK_K = 1 and the whole tile is rows x
columns, so each element of ``points`` is read from memory exactly once per call: the step is bound by that read.
The first call of a selection has K = |L| centres; a program then reads its own BLOCK_N rows once per chunk of
BLOCK_K = 8 centres, shortly after the previous chunk read them (from cache, mostly), instead of one centre per pass.
Every row is reduced in the same order whatever its block, so duplicate rows get bit-identical distances and the
lowest index wins their tie, as the contract wants.

A non-finite squared distance (NaN or inf in a row or a centre, or an overflow) is flagged, not raised: the launcher
returns the first such row (-1 when none) and the registered op raises the error; such a row's ``min_sq_dist`` entry
is left as it was.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

#: Elements of the (rows, centres, columns) tile a program holds: 32 float32 per thread of its 4 warps.
_TILE = 4096
#: Centres per chunk: more would shrink the column tile below a useful width.
_MAX_CENTRES = 8
#: Fewest rows per program: with 8 centres, the column tile is then 4096 / (16 * 8) = 32 columns wide.
_MIN_ROWS = 16
#: Per-block results folded per iteration by the reduction kernel.
REDUCE_BLOCK = 1024


@triton.jit
def _add_tile(sq_dist, point_tile, centre_tile, point_mask, centre_mask):
    """sq_dist (BLOCK_N, BLOCK_K) plus the column tile's squared differences; masked elements are 0 in both, so they
    add exactly 0, and bf16 points are widened exactly."""
    x = tl.load(point_tile, mask=point_mask, other=0.0).to(tl.float32)
    y = tl.load(centre_tile, mask=centre_mask, other=0.0)
    diff = x - y
    return sq_dist + tl.sum(diff * diff, 2)


@triton.jit
def _rows_kernel(points_ptr, centres_ptr, dist_ptr, best_ptr, best_row_ptr, bad_row_ptr, num_rows, num_cols,
                 num_centres, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                 ROW_ALIGN: tl.constexpr):  # fmt: skip
    """Rows [pid BLOCK_N, (pid + 1) BLOCK_N): their updated min_sq_dist (bad and picked rows unchanged); best[pid] =
    the largest updated entry >= 0 (-inf if none), best_row[pid] its first row (-1 if none), bad_row[pid] the first
    unpicked row whose squared distance to a centre is not finite (num_rows if none). ROW_ALIGN: a power of two
    dividing num_cols."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < num_rows
    current = tl.load(dist_ptr + rows, mask=in_rows, other=-1.0)
    # A picked point (entry < 0) is neither read nor written, as in the compiled kernels: masked loads of its row
    # fetch nothing, and whatever the row holds (NaN included) is no error.
    live = in_rows & ~(current < 0)
    bad = tl.zeros((BLOCK_N,), tl.int32)
    ks = tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_C)[None, None, :]
    # The alignment of each row lets the full tiles' loads be vectorised when C is not a multiple of 16 (C = 1000).
    point_rows = points_ptr + tl.multiple_of(rows * num_cols, ROW_ALIGN)[:, None, None]
    point_mask = live[:, None, None]
    # Full column tiles need no column mask (which would keep their loads scalar); the partial one comes last, so
    # every row sums its columns in the same order.
    full_cols = num_cols - num_cols % BLOCK_C
    for k0 in range(0, num_centres, BLOCK_K):
        in_centres = (k0 + ks < num_centres)[None, :]
        centre_mask = in_centres[:, :, None]
        centre_rows = centres_ptr + tl.multiple_of((k0 + ks).to(tl.int64) * num_cols, ROW_ALIGN)[None, :, None]
        sq_dist = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for c0 in range(0, full_cols, BLOCK_C):
            sq_dist = _add_tile(sq_dist, point_rows + c0 + cols, centre_rows + c0 + cols, point_mask, centre_mask)
        if full_cols < num_cols:
            in_cols = full_cols + cols < num_cols
            sq_dist = _add_tile(sq_dist, point_rows + full_cols + cols, centre_rows + full_cols + cols,
                                point_mask & in_cols, centre_mask & in_cols)  # fmt: skip
        # Flagged before the minimum, which may drop a NaN.
        not_finite = ~(sq_dist < float("inf")) & in_centres & live[:, None]
        bad = tl.maximum(bad, tl.max(not_finite.to(tl.int32), 1))
        nearest = tl.min(tl.where(in_centres, sq_dist, float("inf")), 1)
        current = tl.minimum(current, nearest)
    good = live & (bad == 0)
    tl.store(dist_ptr + rows, current, mask=good)
    candidate = tl.where(good & (current >= 0), current, float("-inf"))
    best, pos = tl.max(candidate, 0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(best_ptr + pid, best)
    tl.store(best_row_ptr + pid, tl.where(best == float("-inf"), -1, pid.to(tl.int64) * BLOCK_N + pos))
    tl.store(bad_row_ptr + pid, tl.min(tl.where(in_rows & (bad != 0), rows, num_rows), 0))


@triton.jit
def _reduce_kernel(best_ptr, best_row_ptr, bad_row_ptr, index_ptr, value_ptr, first_bad_ptr, num_blocks, num_rows,
                   BLOCK: tl.constexpr):  # fmt: skip
    """index, value = the first maximum of the blocks' best (-1, -inf if none); first_bad = the first bad row (-1 if
    none)."""
    value = tl.full((), float("-inf"), tl.float32)
    index = tl.full((), -1, tl.int64)
    first_bad = tl.full((), num_rows, tl.int64)
    for b0 in range(0, num_blocks, BLOCK):
        blocks = b0 + tl.arange(0, BLOCK)
        inside = blocks < num_blocks
        best = tl.load(best_ptr + blocks, mask=inside, other=float("-inf"))
        best_row = tl.load(best_row_ptr + blocks, mask=inside, other=-1)
        tile_best = tl.max(best, 0)
        # Blocks hold ascending rows, so the lowest row among those at the maximum is the first maximum.
        tile_row = tl.min(tl.where(best == tile_best, best_row, num_rows), 0)
        # Strictly greater: on a tie the earlier iteration's (lower) row stays.
        better = tile_best > value
        value = tl.where(better, tile_best, value)
        index = tl.where(better, tile_row, index)
        bad_row = tl.load(bad_row_ptr + blocks, mask=inside, other=num_rows)
        first_bad = tl.minimum(first_bad, tl.min(bad_row, 0))
    tl.store(index_ptr, index)
    tl.store(value_ptr, value)
    tl.store(first_bad_ptr, tl.where(first_bad == num_rows, -1, first_bad))


def tile_config(num_cols: int, num_centres: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_C) of a call with points of ``num_cols`` columns and ``num_centres`` centres: a tile
    of :data:`_TILE` elements, as wide in columns as the row (at most 256 for one centre) and the centres allow."""
    block_k = min(triton.next_power_of_2(num_centres), _MAX_CENTRES)
    block_c = min(max(16, triton.next_power_of_2(num_cols)), _TILE // (_MIN_ROWS * block_k))
    return _TILE // (block_k * block_c), block_k, block_c


def kcenter_update(
    points: torch.Tensor, centres: torch.Tensor, min_sq_dist: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One k-center step on (N, C) float32/bfloat16 ``points``, (K, C) float32 ``centres`` and (N,) float32
    ``min_sq_dist`` (updated in place), all contiguous on one device (validated by the caller).

    Returns 0-dim tensors ``(index int64, value float32, bad_row int64)``: the first maximum of the updated
    ``min_sq_dist`` over entries >= 0 and its value, ``(-1, -inf)`` when there is none (N = 0 or every point picked);
    ``bad_row`` the first row whose squared distance to a centre is not finite, -1 when none (the caller raises).
    """
    (n, c), k = points.shape, centres.shape[0]
    if n == 0:
        none = torch.full((), -1, dtype=torch.int64, device=points.device)
        return none, torch.full((), float("-inf"), dtype=torch.float32, device=points.device), none.clone()
    index = points.new_empty((), dtype=torch.int64)
    value = points.new_empty((), dtype=torch.float32)
    bad_row = points.new_empty((), dtype=torch.int64)
    block_n, block_k, block_c = tile_config(c, k)
    if c == 0:  # no column is read, and an empty tensor may have no valid address
        points = centres = min_sq_dist
    num_blocks = triton.cdiv(n, block_n)
    best = points.new_empty((num_blocks,), dtype=torch.float32)
    best_row = points.new_empty((num_blocks,), dtype=torch.int64)
    block_bad = points.new_empty((num_blocks,), dtype=torch.int64)
    wrap_triton(_rows_kernel)[(num_blocks,)](
        points, centres, min_sq_dist, best, best_row, block_bad, n, c, k, BLOCK_N=block_n,
        BLOCK_K=block_k, BLOCK_C=block_c, ROW_ALIGN=min(c & -c or 16, 16), num_warps=4,
    )  # fmt: skip
    wrap_triton(_reduce_kernel)[(1,)](
        best, best_row, block_bad, index, value, bad_row, num_blocks, n, BLOCK=REDUCE_BLOCK, num_warps=4
    )
    return index, value, bad_row
