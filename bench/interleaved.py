"""Interleaved rounds, the timing method of every ratio quoted from bench/: each round runs every provider once, in an
order shuffled per round (so that no provider always follows the one that disturbs the caches and the allocator
most), and a ratio is the median over rounds of that round's ratio, whose two timings ran within milliseconds of each
other. Timing one provider's repetitions after another's lets a change in a shared machine's speed between providers
land in their ratios: the same GEMMs have measured 9 ms and 16 ms minutes apart here."""

import random
import statistics
import time
from collections.abc import Callable


def run_round(
    steps: dict[str, Callable[[], object]],
    times: dict[str, list[float]],
    rng: random.Random,
    sync: Callable[[], None] = lambda: None,
) -> None:
    """Runs every ``steps[name]()`` once in an order drawn from ``rng`` and appends its seconds to ``times[name]``.
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after each step, so a GPU's queued work is counted
    with the step that queued it."""
    order = list(steps)
    rng.shuffle(order)
    for name in order:
        sync()
        start = time.perf_counter()
        steps[name]()
        sync()
        times[name].append(time.perf_counter() - start)


def median_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """The median over rounds of ``numerator``'s time / ``denominator``'s time in the same round."""
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator], strict=True))
