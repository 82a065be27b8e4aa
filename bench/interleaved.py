"""Interleaved rounds, the timing method of every ratio quoted from bench/: each round runs every provider once, in an
order shuffled per round (so that no provider always follows the one that disturbs the caches and the allocator
most), and a ratio is the median over rounds of that round's ratio, whose two timings ran within milliseconds of each
other. pytest-benchmark times one provider after another, so a change in a shared machine's speed between providers
lands in its ratios: the same GEMMs have measured 9 ms and 16 ms minutes apart here."""

import random
import statistics
import time
from collections.abc import Callable


def interleaved_times(
    steps: dict[str, Callable[[], object]], rounds: int, warmup_rounds: int
) -> dict[str, list[float]]:
    """Seconds of each provider's ``steps[name]()`` in each of ``rounds`` rounds, after ``warmup_rounds`` untimed
    ones (torch.compile compiles in its first calls); the shuffles are seeded, so runs are comparable."""
    order = list(steps)
    shuffle = random.Random(0).shuffle
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(warmup_rounds + rounds):
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            steps[name]()
            if r >= warmup_rounds:
                times[name].append(time.perf_counter() - start)
    return times


def median_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """The median over rounds of ``numerator``'s time / ``denominator``'s time in the same round."""
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator], strict=True))
