"""PCoreSet's greedy k-center selection against the reference code's form and an eager running-minimum loop.

    .venv/bin/python bench/interleaved_kcenter.py [--rounds 3] [--pool 100000] [--classes 1000] [--budget 1000]

The case of issue 11: a pool of 100,000 probability vectors over C = 1000 classes, 100 labelled centres, budget
1000, float32, on the CPU. Three providers, each run once per round in an order shuffled per round; a ratio is the
median over rounds of that round's ratio (a shared machine's speed drifts between minutes, not within a round):

- ``fused``: :func:`dho_fast.select.pcoreset` (its driver, :func:`~dho_fast.select.greedy_kcenter`, which also
  counts the rows it read), the whole budget, with its exact pruning; ``fused-dense`` the same without pruning: one
  pass over the pool per pick;
- ``eager``: a running minimum in eager PyTorch (``torch.cdist`` from the newest centre to the pool,
  ``torch.minimum``, ``argmax``), timed for ``--eager-budget`` picks and extrapolated linearly to the budget: every
  pick of it does the same work;
- ``reference``: the reference code's form, which recomputes the distances from every remaining pool point to every
  centre at every pick (``torch.cdist`` over blocks of 1000 points, as the PCoreSet code does), timed for
  ``--reference-budget`` picks and extrapolated by its cost model: pick j compares |U| points with |L| + j centres,
  so the budget costs ``sum_j (|L| + j) / sum_{j < b} (|L| + j)`` times the timed picks.

The pool: each point is the softmax of ``1.5 * randn(C)`` plus 8 on one random class (a top probability near 0.5, a
confident student's blend); ``--flat`` draws flat Dirichlet(1) points instead, where no two points are much closer
than others and the fused selection's exact pruning has least to skip. ``--one-per-class`` makes the labelled set one
confident point of each class (|L| = C), the start of ActiveKD's rounds, where pruning skips most rows.

Also reported: the bytes of pool rows the fused selection read per second, against this machine's copy bandwidth
(``torch.Tensor.copy_`` of the pool: bytes read + written per second), measured in the same rounds.
"""

import argparse
import platform
import random
import statistics
import time

import torch

from dho_fast.select import KCenterStats, greedy_kcenter


def make_probs(
    rows: int, classes: int, generator: torch.Generator, flat: bool, labels: torch.Tensor | None = None
) -> torch.Tensor:
    if flat:
        return torch.distributions.Dirichlet(torch.ones(classes)).sample((rows,))
    logits = 1.5 * torch.randn(rows, classes, generator=generator)
    if labels is None:
        labels = torch.randint(classes, (rows,), generator=generator)
    logits[torch.arange(rows), labels] += 8.0
    return torch.softmax(logits, dim=1)


def eager_running_minimum(pool: torch.Tensor, labelled: torch.Tensor, budget: int) -> torch.Tensor:
    min_dist = torch.cdist(pool, labelled).amin(dim=1)
    picks = []
    for _ in range(budget):
        pick = int(min_dist.argmax())
        picks.append(pick)
        min_dist = torch.minimum(min_dist, torch.cdist(pool, pool[pick : pick + 1]).squeeze(1))
        min_dist[pick] = -1.0
    return torch.tensor(picks)


def reference_form(pool: torch.Tensor, labelled: torch.Tensor, budget: int, block: int = 1000) -> torch.Tensor:
    centres = labelled.clone()
    remaining = list(range(pool.shape[0]))
    picks = []
    for _ in range(budget):
        min_dist = torch.cat(
            [torch.cdist(pool[remaining[i : i + block]], centres).amin(dim=1) for i in range(0, len(remaining), block)]
        )
        pick = remaining[int(min_dist.argmax())]
        picks.append(pick)
        centres = torch.cat([centres, pool[pick : pick + 1]])
        remaining.remove(pick)
    return torch.tensor(picks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pool", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--labelled", type=int, default=100)
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--eager-budget", type=int, default=100)
    parser.add_argument("--reference-budget", type=int, default=4)
    parser.add_argument("--flat", action="store_true", help="flat Dirichlet points instead of confident blends")
    parser.add_argument("--one-per-class", action="store_true", help="|L| = C labelled points, one of each class")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    pool = make_probs(args.pool, args.classes, generator, args.flat)
    if args.one_per_class:
        args.labelled = args.classes
    labels = torch.arange(args.classes) if args.one_per_class else None
    labelled = make_probs(args.labelled, args.classes, generator, args.flat, labels)
    copy_target = torch.empty_like(pool)

    # The picks of the three agree where they overlap (the same greedy; float32 sums may break a near tie apart).
    stats = KCenterStats()
    fused_picks = greedy_kcenter(pool, labelled, args.budget, stats=stats)
    agree = bool((reference_form(pool, labelled, 2) == fused_picks[:2]).all())
    agree &= bool((eager_running_minimum(pool, labelled, 10) == fused_picks[:10]).all())

    b, lab = args.budget, args.labelled
    reference_scale = sum(lab + j for j in range(b)) / sum(lab + j for j in range(args.reference_budget))
    providers = {
        "fused": (lambda: greedy_kcenter(pool, labelled, b), 1.0),
        "fused-dense": (lambda: greedy_kcenter(pool, labelled, b, prune=False), 1.0),
        "eager": (lambda: eager_running_minimum(pool, labelled, args.eager_budget), b / args.eager_budget),
        "reference": (lambda: reference_form(pool, labelled, args.reference_budget), reference_scale),
        "copy": (lambda: copy_target.copy_(pool), 1.0),
    }
    times: dict[str, list[float]] = {name: [] for name in providers}
    order = list(providers)
    shuffle = random.Random(0).shuffle
    for _ in range(args.rounds):
        shuffle(order)
        for name in order:
            run, scale = providers[name]
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * scale)

    rows_read = stats.rows_read
    pool_bytes = pool.numel() * pool.element_size()
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, ATen CPU capability {torch.backends.cpu.get_cpu_capability()}; "
        f"pool {args.pool} x {args.classes} float32 ({'flat' if args.flat else 'confident'}), {lab} labelled, "
        f"budget {b}, {args.rounds} rounds; picks agree with eager and reference: {agree}"
    )
    print(f"  {'provider':10s} {'median s':>9s}   median over rounds of provider / fused")
    for name, t in times.items():
        if name == "copy":
            continue
        ratio = statistics.median(p / f for p, f in zip(t, times["fused"], strict=True))
        print(f"  {name:10s} {statistics.median(t):9.2f}   {ratio:.1f}x")
    fused_rate = statistics.median(rows_read * args.classes * 4 / f for f in times["fused"])
    copy_rate = statistics.median(2 * pool_bytes / c for c in times["copy"])
    print(
        f"  fused read {rows_read} pool rows ({rows_read / (args.pool * stats.passes):.1%} of a pass per centre): "
        f"{fused_rate / 1e9:.1f} GB/s of rows read; copy bandwidth {copy_rate / 1e9:.1f} GB/s (read + write)"
    )


if __name__ == "__main__":
    main()
