"""The greedy k-center driver of PCoreSet and coreset, over :func:`dho_fast.ops.kcenter_update`.

Every pool point keeps its squared distance to the nearest centre (``min_sq_dist``, +inf at the start). The labelled
centres lower it in blocks of :func:`centre_block_rows` rows, one op call per block; then each pick marks its point
(``min_sq_dist = -1``: never returned again, so ``budget`` may be the pool size) and one op call with that point as
the only centre lowers every distance and returns the next pick: one pass over the pool per pick, the reference's
recompute-everything greedy (O(B |U| (|L| + B) C)) in O(B |U| C) with the same picks. Ties go to the lowest pool
index (the op's first maximum; chunks and ranks are combined keeping the lowest global index).

Chunks (``chunk_rows``): each op call reads a block of rows and its slice of ``min_sq_dist``, so a memory-mapped
pool (``torch.from_numpy(np.memmap(...))``) is read piece by piece and its (value, index) results are combined.

Exact pruning (``prune``, on by default): a point whose nearest centre so far is ``a`` cannot be moved by a new
centre ``n`` when ``||a - n|| >= 2 ||p - a||`` (the triangle inequality: ``||p - n|| >= ||a - n|| - ||p - a||``), so
its row is not read. The test runs on ``min_sq_dist`` and the squared distances between centres (one small op call
on the centres per pick), with a slack that covers float32's rounding of both sums (:func:`prune_slack`): a pruned
point's computed distance could not have been below its minimum, so the picks are the unpruned picks, bit for bit.
For the op's pass the pruned points are marked picked, so it skips their rows where they lie (a gather of the
others would cost more than it saves), then their minima are put back. With pruning the labelled centres go
through one at a time (the test needs each point's nearest centre), so pruning runs only when the budget is at least
:data:`PRUNE_PICKS_PER_CENTRE` times the labelled set; confident students' blends, which cluster by class, then
leave few rows to read (bench/interleaved_kcenter.py measures it).

Ranks (``group``): each rank passes its own contiguous shard of the pool, the shards in rank order making the global
index order, and the same labelled centres. Each pick every rank proposes its farthest point with its row (one
all_gather of ``C + 2`` float64 values), and every rank takes the same winner: the picks are identical on every rank
and to one process over the concatenated pool. Collectives run on the pool's device (gloo: CPU, NCCL: CUDA).
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dho_fast.ops import kcenter_update
from dho_fast.ops.validation import check_int
from dho_fast.select.checks import check_budget, check_matrix, default_chunk_rows, describe, first_bad_row
from dho_fast.select.pool_mean import binned_column_sums, mean_of_bins
from dho_fast.select.progress import Progress

POINT_DTYPES = (torch.float32, torch.bfloat16)
#: float32 elements of a block of labelled centres (one op call per block): 256 KiB, about what a core's L2 holds.
CENTRE_BLOCK_ELEMENTS = 1 << 16
#: Pruning runs when the budget is at least this many times the labelled centres (below, their one-at-a-time passes
#: cost more than pruning saves the picks).
PRUNE_PICKS_PER_CENTRE = 4
#: Smallest running minimum pruning may skip (below, float32's rounding of the squares is no longer relative).
PRUNE_MIN_SQ_DIST = 2.0**-100


def centre_block_rows(cols: int) -> int:
    """Labelled centres per op call for ``cols`` columns: :data:`CENTRE_BLOCK_ELEMENTS` float32 values, >= 1 row."""
    return max(1, CENTRE_BLOCK_ELEMENTS // max(cols, 1))


def magnitude_limit(cols: int) -> float:
    """Values below this magnitude keep every squared distance of ``cols`` columns finite in float32:
    ``cols * (2 limit)^2`` is at most half of float32's maximum (checked up front, so no rank fails mid-pick)."""
    return math.sqrt(torch.finfo(torch.float32).max / (8 * max(cols, 1)))


def prune_slack(cols: int) -> float | None:
    """The factor ``s`` of the pruning test ``D >= s * m`` in float32 (``D``: a new centre's computed squared distance
    to a point's nearest centre, ``m``: the point's computed minimum), None when float32 is too coarse for ``cols``
    columns.

    A float32 sum of ``cols`` rounded squares of rounded differences is within a relative ``g = 2 (cols + 3) u``
    (``u = 2^-24``) of the exact squared distance. The triangle inequality then leaves the new computed distance at
    least ``m`` when ``sqrt(D / (1 + g)) >= sqrt(m / (1 - g)) (1 + sqrt((1 + g) / (1 - g)))``; squared, that is
    ``s = (1 + g) (1 + sqrt((1 + g) / (1 - g)))^2 / (1 - g)``, about ``4 (1 + 2 g)``, times ``1 + 2^-20`` for the
    float32 rounding of ``s`` and of the product ``s * m``.
    """
    g = 2 * (cols + 3) * 2.0**-24
    if g >= 0.01:
        return None
    return (1 + g) * (1 + math.sqrt((1 + g) / (1 - g))) ** 2 / (1 - g) * (1 + 2.0**-20)


@dataclass
class KCenterStats:
    """What a selection read: ``rows_read`` pool rows in ``passes`` op passes (one per centre, or per block of
    labelled centres without pruning); ``rows_read / (passes * N)`` is the fraction pruning left to read."""

    rows_read: int = 0
    passes: int = 0


@dataclass
class _Shard:
    """This process's rows of the pool, their running minimum squared distances and the op's chunks; with pruning,
    each point's nearest centre (-1 before it has one) and every centre so far."""

    points: torch.Tensor
    min_sq_dist: torch.Tensor
    chunk_rows: int
    backend: str | None
    stats: KCenterStats
    slack: float | None = None
    nearest: torch.Tensor | None = None
    centres: torch.Tensor | None = None
    num_centres: int = 0

    def update(self, centre_blocks: list[torch.Tensor]) -> tuple[float, int]:
        """Lowers ``min_sq_dist`` by every block of centres (each chunk read once, all blocks applied to it) and
        returns ``(value, local index)`` of the first largest remaining distance, ``(-inf, -1)`` when none is left."""
        best_value, best_index = -math.inf, -1
        for start in range(0, self.points.shape[0], self.chunk_rows):
            block = self.points[start : start + self.chunk_rows]
            dist_block = self.min_sq_dist[start : start + self.chunk_rows]
            for centres in centre_blocks:
                index, value = kcenter_update(block, centres, dist_block, backend=self.backend)
            value = float(value)
            if value > best_value:  # strictly: an equal value of a later chunk has a larger index
                best_value, best_index = value, start + int(index)
        self.stats.rows_read += self.points.shape[0]
        self.stats.passes += len(centre_blocks)
        return best_value, best_index

    def update_pruned(self, centre: torch.Tensor) -> tuple[float, int]:
        """:meth:`update` with the one (1, C) float32 ``centre``, reading only the rows it might move: the others
        are marked picked (-1) for the op's pass, which then skips their rows where they lie (no gather), and get
        their minima back after it."""
        k = self.num_centres
        dist = self.min_sq_dist
        pruned = torch.zeros_like(dist, dtype=torch.bool)
        if k:
            to_centres = torch.full((k,), math.inf, dtype=torch.float32, device=dist.device)
            kcenter_update(self.centres[:k], centre, to_centres, backend=self.backend)
            # Minima below 2^-100 are not pruned: there the squares' underflow breaks the relative rounding bound.
            pruned = (self.nearest >= 0) & (dist >= PRUNE_MIN_SQ_DIST)
            pruned &= to_centres[self.nearest.clamp(min=0)] >= self.slack * dist
        self.centres[k] = centre[0]
        self.num_centres += 1
        before = dist.clone()
        dist[pruned] = -1.0
        for start in range(0, dist.numel(), self.chunk_rows):
            span = slice(start, start + self.chunk_rows)
            kcenter_update(self.points[span], centre, dist[span], backend=self.backend)
        self.nearest[(dist < before) & ~pruned] = k
        dist[pruned] = before[pruned]
        self.stats.passes += 1
        self.stats.rows_read += int(((before >= 0) & ~pruned).sum())
        value, index = dist.max(dim=0) if dist.numel() else (torch.tensor(-1.0), torch.tensor(-1))
        return (float(value), int(index)) if value >= 0 else (-math.inf, -1)

    def add(self, centre: torch.Tensor) -> tuple[float, int]:
        """The distances lowered by one new (1, C) float32 centre: ``(value, local index)`` of the next pick."""
        return self.update([centre]) if self.slack is None else self.update_pruned(centre)

    def row(self, index: int) -> torch.Tensor:
        """(1, C) float32 copy of row ``index`` (bfloat16 converts exactly): the next centre."""
        return self.points[index : index + 1].to(torch.float32, copy=True)


class _Ranks:
    """The process group of a sharded pool (a single process when ``group`` is None): the global layout and the
    collectives that keep every rank's picks the same."""

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device) -> None:
        self.group, self.device = group, device
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world_size = dist.get_world_size(group) if group is not None else 1

    def gather_ints(self, values: list[int]) -> torch.Tensor:
        """(world_size, len(values)) int64 CPU table of every rank's ``values``, in rank order."""
        mine = torch.tensor(values, dtype=torch.int64, device=self.device)
        if self.group is None:
            return mine.unsqueeze(0).cpu()
        table = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(table, mine, group=self.group)
        return torch.stack(table).cpu()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            dist.all_reduce(t, group=self.group)
        return t

    def winner(self, value: float, index: int, shard: _Shard, offset: int) -> tuple[int, torch.Tensor]:
        """The global index of the first largest of every rank's ``(value, local index)`` and its (1, C) row."""
        if self.group is None:
            return index, shard.row(index)
        mine = torch.zeros(shard.points.shape[1] + 2, dtype=torch.float64, device=self.device)
        mine[0], mine[1] = value, offset + index
        if index >= 0:
            mine[2:] = shard.row(index)[0]
        table = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(table, mine, group=self.group)
        # Each rank proposes its first maximum and shards follow the global order: the lowest rank wins a tie.
        best = max(range(self.world_size), key=lambda r: (float(table[r][0]), -r))
        return int(table[best][1]), table[best][2:].to(torch.float32).unsqueeze(0)


def _check_inputs(points: torch.Tensor, centres: torch.Tensor, names: tuple[str, str]) -> None:
    check_matrix(names[0], points, POINT_DTYPES)
    check_matrix(names[1], centres, POINT_DTYPES, cols=points.shape[1])
    if points.shape[1] < 1:
        raise ValueError(f"{names[0]} must have at least one column, got {describe(points)}")
    if not points.is_contiguous():
        raise ValueError(f"{names[0]} must be contiguous (rows one after another), got strides {points.stride()}")


def _check_layout(table: torch.Tensor, names: tuple[str, str]) -> None:
    """Every rank must agree on the columns, the budget and the labelled set (the same on every rank)."""
    for column, what in ((1, f"columns of {names[0]}"), (2, "budget"), (3, f"rows of {names[1]}")):
        if len(set(table[:, column].tolist())) > 1:
            raise ValueError(f"the ranks of group disagree on the {what}: {table[:, column].tolist()}")


def _check_values(
    points: torch.Tensor, centres: torch.Tensor, ranks: _Ranks, offset: int, names: tuple[str, str]
) -> None:
    """Finite values of a magnitude that keeps squared distances finite (:func:`magnitude_limit`), every rank raising
    the same error, for the first bad row of the whole pool."""
    limit = magnitude_limit(centres.shape[1])
    local = first_bad_row(points, limit=limit)
    bad = ranks.gather_ints([-1 if local is None else offset + local])[:, 0]
    bad = bad[bad >= 0]
    rule = f"finite and of magnitude below {limit:.3g} (the squared distances of its columns must not overflow)"
    if bad.numel():
        raise ValueError(f"{names[0]} row {int(bad.min())} has a value that is not {rule}")
    row = first_bad_row(centres, limit=limit)
    if row is not None:
        raise ValueError(f"{names[1]} row {row} has a value that is not {rule}")


def greedy_kcenter(
    points: torch.Tensor,
    centres: torch.Tensor,
    budget: int,
    *,
    chunk_rows: int | None = None,
    group: dist.ProcessGroup | None = None,
    backend: str | None = None,
    progress: bool = False,
    prune: bool = True,
    stats: KCenterStats | None = None,
    names: tuple[str, str] = ("points", "centres"),
    desc: str = "k-center",
) -> torch.Tensor:
    """``budget`` greedy k-center picks from ``points``, farthest (Euclidean) from ``centres`` and the earlier picks.

    Args:
        points: (N, C) float32 or bfloat16, contiguous, on any device (memory-mapped is fine): the pool, or this
            rank's shard of it. Distances are float32 (:func:`dho_fast.ops.kcenter_update`).
        centres: (L, C) float32 or bfloat16, L >= 0, the same on every rank: the starting centres (e.g. the labelled
            set). With L = 0 the first pick is the pool point farthest from the pool's column mean (a float32 mean
            of the float64 sums of :mod:`dho_fast.select.pool_mean`, which do not depend on chunks or ranks).
        budget: number of picks, in ``[0, total pool size]``.
        chunk_rows: pool rows per op call (None: the whole pool or shard in one call).
        group: a torch.distributed process group whose ranks each hold a shard; None is one process holding the
            whole pool, even when torch.distributed is initialised (ranks that all hold the whole pool then pick
            the same points independently).
        backend: the op's backend (None: ``$DHO_FAST_BACKEND``, else "auto").
        progress: a line on stderr every 5% of the picks (on the group's first rank).
        prune: skip the rows a new centre provably cannot move (module docs) when ``budget`` is at least
            :data:`PRUNE_PICKS_PER_CENTRE` times the labelled centres; the picks are the same either way.
        stats: filled with the rows this process read (:class:`KCenterStats`), e.g. for a benchmark.
        names: the names of ``points`` and ``centres`` in error messages.

    Returns:
        (budget,) int64 CPU global pool indices in pick order, distinct, identical on every rank.

    Errors: a NaN, an inf or a value too large for float32 squared distances (:func:`magnitude_limit`) is a
    ``ValueError`` naming the first bad row of the whole pool, raised on every rank.
    """
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    # A rank with bad arguments must not leave the others waiting in a collective: every rank learns of it.
    try:
        _check_inputs(points, centres, names)
        if chunk_rows is not None:
            check_int("chunk_rows", chunk_rows, ">= 1 (or None)", lambda v: v >= 1)
        check_int("budget", budget)
        error = None
    except (TypeError, ValueError) as raised:
        error = raised
    device = points.device if isinstance(points, torch.Tensor) else torch.device("cpu")
    ranks = _Ranks(group, device)
    layout = [-1, -1, -1, -1] if error else [points.shape[0], points.shape[1], budget, centres.shape[0]]
    table = ranks.gather_ints([int(error is not None), *layout])
    if error is not None:
        raise error
    bad_ranks = table[:, 0].nonzero().squeeze(1).tolist()
    if bad_ranks:
        raise ValueError(f"the arguments of ranks {bad_ranks} of group are invalid (each of them raised why)")
    table = table[:, 1:]
    _check_layout(table, names)
    n, c = points.shape
    total, offset = int(table[:, 0].sum()), int(table[: ranks.rank, 0].sum())
    check_budget(budget, total)
    min_sq_dist = torch.full((n,), math.inf, dtype=torch.float32, device=points.device)
    shard = _Shard(points, min_sq_dist, chunk_rows or max(n, 1), backend, stats or KCenterStats())
    _check_values(points, centres, ranks, offset, names)
    if budget == 0:
        return torch.empty(0, dtype=torch.int64)
    # Pruning needs the labelled centres one at a time (one pass each, most of it pruned), where the unpruned driver
    # applies them in blocks (one pass for all): it pays when the picks outnumber the labelled centres
    # (bench/interleaved_kcenter.py: 1.4x faster at |L| = 100, budget 1000; 1.2x slower at |L| = budget = 1000).
    shard.slack = prune_slack(c) if prune and PRUNE_PICKS_PER_CENTRE * centres.shape[0] <= budget else None
    if shard.slack is not None:
        shard.nearest = torch.full((n,), -1, dtype=torch.int64, device=points.device)
        shard.centres = torch.empty(centres.shape[0] + budget, c, dtype=torch.float32, device=points.device)

    as_centres = centres.to(points.device, torch.float32).contiguous()  # the op's centres: float32, contiguous
    if centres.shape[0] and shard.slack is None:
        rows = centre_block_rows(c)
        blocks = [as_centres[i : i + rows] for i in range(0, centres.shape[0], rows)]
        pick, row = ranks.winner(*shard.update(blocks), shard, offset)
    elif centres.shape[0]:
        for i in range(centres.shape[0]):
            found = shard.add(as_centres[i : i + 1])
        pick, row = ranks.winner(*found, shard, offset)
    else:
        bins = ranks.sum_(binned_column_sums(points, chunk_rows or default_chunk_rows(c)))
        pick, row = ranks.winner(*shard.update([mean_of_bins(bins, total)]), shard, offset)
        shard.min_sq_dist.fill_(math.inf)  # the mean only chose the first pick; it is no centre

    picks = []
    bar = Progress(desc, budget, progress and ranks.rank == 0)
    while True:
        picks.append(pick)
        bar.update(len(picks))
        if 0 <= pick - offset < n:
            shard.min_sq_dist[pick - offset] = -1.0
        if len(picks) == budget:
            return torch.tensor(picks, dtype=torch.int64)
        pick, row = ranks.winner(*shard.add(row), shard, offset)
