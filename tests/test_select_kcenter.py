"""PCoreSet, coreset and their greedy k-center driver against a brute force that recomputes every distance each pick.

The brute force is the reference's O(B |U| (|L| + B) C) loop in float64: every step, each unpicked pool point's
squared distance to every centre, the first maximum (lowest index) of their minima. On grid inputs (multiples of
1/4, and means that are multiples of 1/256) every float32 distance the op computes is exact, so the picks must be
equal, ties and duplicates included. On continuous inputs float32 and float64 can order two near-equal distances
differently, so each of our picks must be a float64 maximum up to float32's rounding of a squared distance.
"""

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from trainer_fixtures import free_port

from dho_fast.select import coreset, greedy_kcenter, pcoreset
from dho_fast.select.kcenter import KCenterStats, prune_slack
from dho_fast.select.pool_mean import binned_column_sums, mean_of_bins

# The auto backend warns that only the reference backend runs kcenter_update here, until the compiled ones land.
pytestmark = pytest.mark.filterwarnings("ignore:dho_fast. kcenter_update has no compiled kernel")


def sq_dists(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(N, K) float64 squared distances, written out (torch.cdist would round through a matrix product)."""
    return (points.double()[:, None, :] - centres.double()[None, :, :]).square().sum(dim=2)


def first_max(values: torch.Tensor) -> int:
    return int((values == values.max()).nonzero()[0])


def brute_force(pool: torch.Tensor, labelled: torch.Tensor, budget: int) -> list[int]:
    """The recompute-everything greedy; an empty labelled set starts from the point farthest from the float32 mean."""
    pool = pool.double()
    centres = [row for row in labelled.double()]
    picked: list[int] = []
    if not centres and budget:
        mean = pool.mean(dim=0).float().double()
        picked.append(first_max(sq_dists(pool, mean[None])[:, 0]))
        centres.append(pool[picked[0]])
    while len(picked) < budget:
        d = sq_dists(pool, torch.stack(centres)).min(dim=1).values
        d[picked] = -1.0
        picked.append(first_max(d))
        centres.append(pool[picked[-1]])
    return picked


def assert_greedy(picks: torch.Tensor, pool: torch.Tensor, labelled: torch.Tensor, rtol: float = 1e-5) -> None:
    """Each pick, following our own earlier picks, is a float64 maximum of the minimum squared distances up to
    ``rtol`` (float32 squared distances of a few columns are within ~1e-6 relative)."""
    assert len(set(picks.tolist())) == picks.numel()
    pool = pool.double()
    centres = [row for row in labelled.double()]
    for step, pick in enumerate(picks.tolist()):
        if not centres:
            d = sq_dists(pool, pool.mean(dim=0, keepdim=True))[:, 0]
        else:
            d = sq_dists(pool, torch.stack(centres)).min(dim=1).values
        d[picks[:step]] = -1.0
        assert d[pick] >= d.max() * (1 - rtol), f"pick {step}: {pick} at {float(d[pick])}, best {float(d.max())}"
        centres.append(pool[pick])


def grid(n: int, c: int, levels: int = 5) -> torch.Tensor:
    """(n, c) float32 multiples of 1/4 in [0, (levels - 1) / 4]: exact in float32 and bfloat16, many duplicates."""
    return torch.randint(0, levels, (n, c)).float() / 4


@pytest.mark.parametrize(
    "n, c, num_labelled, budget, chunk_rows",
    [
        (40, 3, 4, 12, None),
        (40, 3, 4, 40, 7),  # budget = pool size, chunks that do not divide the pool
        (25, 2, 1, 25, 1),  # 2 columns of 5 levels: 25 rows hold many duplicates
        (64, 5, 0, 20, 9),  # empty labelled set: the mean of 64 grid rows is exact in float32
        (64, 1, 0, 64, None),
        (30, 4, 70, 10, 4),  # more labelled centres than pool points
        (1, 3, 2, 1, None),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pcoreset_matches_brute_force_on_grid(n, c, num_labelled, budget, chunk_rows, dtype):
    pool, labelled = grid(n, c), grid(num_labelled, c)
    picks = pcoreset(pool.to(dtype), labelled.to(dtype), budget, chunk_rows=chunk_rows)
    assert picks.dtype == torch.int64 and picks.shape == (budget,)
    assert picks.tolist() == brute_force(pool, labelled, budget)


def test_many_labelled_centres_span_several_blocks():
    """C = 2048 columns: a block holds 32 labelled centres, so 100 take four op calls per chunk."""
    pool, labelled = grid(30, 2048), grid(100, 2048)
    assert pcoreset(pool, labelled, 8, chunk_rows=7).tolist() == brute_force(pool, labelled, 8)


def test_ties_go_to_the_lowest_index():
    pool = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    # From the centre (0, 0): rows 1-4 are at distance 1, row 1 first; then rows 3 and 4 (1) beat row 2 (a duplicate
    # of row 1, 0), row 3 first; then rows 0, 2 and 4 are all at 0, picked in index order.
    assert pcoreset(pool, pool[:1], 5).tolist() == [1, 3, 0, 2, 4]
    assert pcoreset(pool, pool[:1], 5, chunk_rows=2).tolist() == [1, 3, 0, 2, 4]
    same = torch.ones(6, 3)
    assert pcoreset(same, same[:1], 6).tolist() == list(range(6))
    assert pcoreset(same, same[:0], 6, chunk_rows=4).tolist() == list(range(6))


def test_empty_labelled_set_starts_farthest_from_the_mean():
    pool = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    # Mean (1, 1): row 3 is farthest (8); then from (3, 3) alone, row 0 (18) beats rows 1 and 2 (13).
    assert pcoreset(pool, pool[:0], 3).tolist() == [3, 0, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_labelled", [0, 5])
def test_pcoreset_is_greedy_on_probabilities(dtype, num_labelled):
    pool = torch.softmax(3 * torch.randn(200, 10), dim=1).to(dtype)
    labelled = torch.softmax(3 * torch.randn(num_labelled, 10), dim=1).to(dtype)
    picks = pcoreset(pool, labelled, 30, chunk_rows=37)
    assert_greedy(picks, pool, labelled)
    assert torch.equal(picks, pcoreset(pool, labelled, 30))  # chunks change nothing


def confident_blends(n: int, c: int, classes: torch.Tensor | None = None) -> torch.Tensor:
    """(n, c) softmax rows of noise plus 6 on one class each (random, or ``classes``): clusters by class."""
    logits = torch.randn(n, c)
    logits[torch.arange(n), torch.randint(c, (n,)) if classes is None else classes] += 6.0
    return torch.softmax(logits, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [None, 97])
def test_pruning_reads_fewer_rows_and_picks_the_same(dtype, chunk_rows):
    """One labelled point per class and a budget of 6 per class: the triangle-inequality test must skip rows, and the
    picks must be those of the unpruned greedy, bit for bit, near ties included (continuous inputs)."""
    pool = confident_blends(2000, 10).to(dtype)
    labelled = confident_blends(10, 10, torch.arange(10)).to(dtype)
    pruned, dense = KCenterStats(), KCenterStats()
    picks = greedy_kcenter(pool, labelled, 60, chunk_rows=chunk_rows, stats=pruned)
    unpruned = greedy_kcenter(pool, labelled, 60, chunk_rows=chunk_rows, prune=False, stats=dense)
    assert torch.equal(picks, unpruned)
    assert_greedy(picks, pool, labelled)
    assert pruned.passes == 10 + 59 and dense.passes == 1 + 59  # labelled centres one by one when pruning
    assert pruned.rows_read < 0.5 * pruned.passes * 2000, pruned
    assert dense.rows_read == dense.passes * 2000
    # Fewer than 4 picks per labelled centre: the blocked passes without pruning.
    few = KCenterStats()
    assert torch.equal(greedy_kcenter(pool, labelled, 39, chunk_rows=chunk_rows, stats=few), picks[:39])
    assert few.passes == 1 + 38


def test_pruning_slack_covers_rounding_and_turns_off_when_float32_is_too_coarse():
    assert 4 < prune_slack(1000) < 4 * (1 + 1e-3)
    assert prune_slack(10**6) is None  # 2 (C + 3) 2^-24 >= 1%: no pruning, the dense passes
    pool, labelled = grid(30, 5), grid(3, 5)
    stats = KCenterStats()
    assert coreset(pool + 1, labelled + 1, 10).tolist() == coreset(pool + 1, labelled + 1, 10, prune=False).tolist()
    greedy_kcenter(pool, labelled, 10, prune=False, stats=stats)
    assert stats.passes == 1 + 9


def test_budget_zero_and_pool_size():
    pool = torch.rand(6, 3)
    empty = pcoreset(pool, pool[:2], 0)
    assert empty.dtype == torch.int64 and empty.shape == (0,)
    assert sorted(pcoreset(pool, pool[:2], 6).tolist()) == list(range(6))
    assert sorted(pcoreset(pool, pool[:0], 6).tolist()) == list(range(6))


def memmap_tensor(path, values: torch.Tensor) -> torch.Tensor:
    """``values`` written to a file and read back as a tensor over np.memmap (bfloat16 through an int16 view)."""
    if values.dtype == torch.bfloat16:
        raw = values.view(torch.int16).numpy()
    else:
        raw = values.numpy()
    mm = np.memmap(path, dtype=raw.dtype, mode="w+", shape=raw.shape)
    mm[:] = raw
    mm.flush()
    tensor = torch.from_numpy(np.memmap(path, dtype=raw.dtype, mode="r+", shape=raw.shape))
    return tensor.view(torch.bfloat16) if values.dtype == torch.bfloat16 else tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_labelled", [0, 3])
def test_memory_mapped_pool_in_chunks(tmp_path, dtype, num_labelled):
    pool, labelled = grid(64, 6), grid(num_labelled, 6)
    mapped = memmap_tensor(tmp_path / "pool.bin", pool.to(dtype))
    picks = pcoreset(mapped, labelled.to(dtype), 24, chunk_rows=10)
    assert picks.tolist() == brute_force(pool, labelled, 24)
    assert torch.equal(mapped.float(), pool)  # read, never written


def test_coreset_on_axis_vectors_matches_cosine_brute_force():
    """Positive multiples of +-e_k normalise exactly to +-e_k: cosines are -1, 0 or 1 and every distance is exact."""
    d = 4
    axes = torch.cat([torch.eye(d), -torch.eye(d)])
    which = torch.randint(0, 2 * d, (30,))
    pool = axes[which] * torch.rand(30, 1).add(0.5)
    labelled = axes[torch.randint(0, 2 * d, (2,))] * 3
    picks = coreset(pool, labelled, 12, chunk_rows=8)
    # Brute force in the reference's own terms: 1 - cos to the nearest centre, first maximum.
    unit = torch.nn.functional.normalize(pool.double(), dim=1)
    centres = list(torch.nn.functional.normalize(labelled.double(), dim=1))
    want = []
    for _ in range(12):
        dist_ = (1 - unit @ torch.stack(centres).T).min(dim=1).values
        dist_[want] = -1.0
        want.append(first_max(dist_))
        centres.append(unit[want[-1]])
    assert picks.tolist() == want


@pytest.mark.parametrize("num_labelled", [0, 4])
def test_coreset_is_greedy_in_cosine_distance(num_labelled):
    features = torch.randn(150, 16) * torch.rand(150, 1).mul(5)  # lengths must not matter
    labelled = torch.randn(num_labelled, 16)
    picks = coreset(features, labelled, 20, chunk_rows=33)
    unit = torch.nn.functional.normalize(features.double(), dim=1)
    assert_greedy(picks, unit, torch.nn.functional.normalize(labelled.double(), dim=1), rtol=1e-5)
    assert torch.equal(picks, coreset(features * 7, labelled * 0.5, 20))


def test_pool_mean_does_not_depend_on_order_or_chunks():
    # Values over many binades, so a plain float64 sum would depend on the order.
    pool = torch.randn(1000, 7) * torch.exp2(torch.randint(-40, 40, (1000, 7)).float())
    bins = binned_column_sums(pool, 1000)
    perm = torch.randperm(1000)
    split = binned_column_sums(pool[perm[:613]], 17) + binned_column_sums(pool[perm[613:]], 5)
    assert torch.equal(bins, split)
    # Against each column's exactly rounded sum (math.fsum): within float32's rounding of the mean.
    want = torch.tensor([math.fsum(col) / 1000 for col in pool.double().T.tolist()], dtype=torch.float64)
    torch.testing.assert_close(mean_of_bins(bins, 1000)[0].double(), want, rtol=2**-24, atol=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(pool=torch.rand(5, 3).double()), TypeError, "pool_probs must be"),
        (dict(pool=[[0.5, 0.5]]), TypeError, "pool_probs must be"),
        (dict(pool=torch.rand(5)), ValueError, "pool_probs must be"),
        (dict(labelled=torch.rand(2, 4)), ValueError, "labelled_probs must be"),
        (dict(labelled=torch.rand(2, 3).half()), TypeError, "labelled_probs must be"),
        (dict(pool=torch.rand(3, 5).T), ValueError, "pool_probs must be contiguous"),
        (dict(budget=6), ValueError, "budget must be"),
        (dict(budget=-1), ValueError, "budget must be"),
        (dict(budget=2.0), TypeError, "budget must be an int"),
        (dict(budget=True), TypeError, "budget must be an int"),
        (dict(chunk_rows=0), ValueError, "chunk_rows must be"),
        (dict(group="world"), TypeError, "group must be"),
    ],
)
def test_argument_errors(kwargs, error, match):
    args = dict(pool=torch.rand(5, 3), labelled=torch.rand(2, 3), budget=2)
    args.update(kwargs)
    extra = {k: args.pop(k) for k in ("chunk_rows", "group") if k in args}
    with pytest.raises(error, match=match):
        pcoreset(args["pool"], args["labelled"], args["budget"], **extra)


@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_bad_values_name_the_first_bad_row(chunk_rows):
    pool = torch.rand(10, 3)
    pool[7, 1], pool[4, 0] = float("inf"), float("nan")
    with pytest.raises(ValueError, match="pool_probs row 4 has a value that is not finite"):
        pcoreset(pool, pool[:0], 2, chunk_rows=chunk_rows)
    labelled = torch.rand(3, 3)
    labelled[2, 2] = float("-inf")
    with pytest.raises(ValueError, match="labelled_probs row 2"):
        pcoreset(torch.rand(10, 3), labelled, 2)
    huge = torch.rand(10, 3)
    huge[5] = 1e19  # finite, but its squared distances overflow float32
    with pytest.raises(ValueError, match="pool_probs row 5 .* magnitude below"):
        pcoreset(huge, huge[:1], 2)
    with pytest.raises(ValueError, match="pool_features row 4"):
        coreset(pool, pool[:0], 1)
    with pytest.raises(ValueError, match="pool_features row 2"):
        coreset(pool[5:], pool[:0], 1)


def test_progress_lines(capsys):
    pcoreset(torch.rand(50, 3), torch.rand(1, 3), 40, progress=True)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 20 and lines[-1].startswith("pcoreset: 40/40 (100%)")
    greedy_kcenter(torch.rand(5, 3), torch.rand(1, 3), 3)
    assert capsys.readouterr().err == ""


def _rank(rank: int, world_size: int, port: int, inputs: str, cuts: list[int], out: str) -> None:
    """One gloo rank: its contiguous shard of each case's pool, the whole labelled set, picks saved per rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = []
        for case in torch.load(inputs):
            shard = case["pool"][cuts[rank] : cuts[rank + 1]].contiguous()
            select = coreset if case["strategy"] == "coreset" else pcoreset
            results.append(select(shard, case["labelled"], case["budget"], chunk_rows=case["chunk_rows"],
                                  group=dist.group.WORLD))  # fmt: skip
        # Rank 1's shard of the wrong dtype: both ranks raise (none waits in a collective for ever).
        shard = torch.rand(5, 3, dtype=torch.float64 if rank == 1 else torch.float32)
        try:
            pcoreset(shard, torch.rand(1, 3), 2, group=dist.group.WORLD)
        except (TypeError, ValueError) as error:
            results.append(f"{type(error).__name__}: {error}")
        torch.save(results, f"{out}.{rank}")
        dist.barrier()  # a rank that closes its gloo connections while its peer still reads them aborts the peer
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two gloo processes
def test_two_gloo_ranks_pick_what_one_process_picks(tmp_path):
    n = 90
    cases = [
        dict(strategy="pcoreset", pool=torch.softmax(3 * torch.randn(n, 8), 1), labelled=torch.rand(0, 8)),
        dict(strategy="pcoreset", pool=torch.softmax(3 * torch.randn(n, 8), 1).bfloat16(), labelled=torch.rand(3, 8)),
        dict(strategy="pcoreset", pool=grid(n, 2), labelled=grid(2, 2)),  # duplicates and ties across the cut
        dict(strategy="coreset", pool=torch.randn(n, 6), labelled=torch.randn(2, 6)),
    ]
    for case, budget, chunk_rows in zip(cases, (n, 30, 40, 25), (None, 11, 7, 13), strict=True):
        case.update(budget=budget, chunk_rows=chunk_rows)
    torch.save(cases, tmp_path / "cases.pt")
    out = str(tmp_path / "picks")
    cuts = [0, 53, n]
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path / "cases.pt"), cuts, out), nprocs=2)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    assert ranks[0][-1] == "ValueError: the arguments of ranks [1] of group are invalid (each of them raised why)"
    assert ranks[1][-1].startswith("TypeError: pool_probs must be a tensor")
    for i, case in enumerate(cases):
        select = coreset if case["strategy"] == "coreset" else pcoreset
        single = select(case["pool"], case["labelled"], case["budget"])
        assert torch.equal(ranks[0][i], single) and torch.equal(ranks[1][i], single), f"case {i}"
