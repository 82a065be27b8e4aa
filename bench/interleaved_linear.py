"""fused_linear_dual_head_loss against eager, torch.compile and the bare GEMMs, timed round-robin.

    .venv/bin/python bench/interleaved_linear.py [--rounds 100]

pytest-benchmark times one provider after another, so a change in the machine's speed between providers (frequent
on a shared 2-core machine: the same GEMMs have measured 9 ms and 16 ms minutes apart) lands in the ratios. Here
every round runs each provider once, in an order shuffled per round (so that no provider always follows the one that
disturbs the caches and the allocator most), and each ratio is the median over rounds of that round's ratio: the
two steps of a pair ran within milliseconds of each other. Forward + backward, float32, N = 512 (256 labelled),
D = 512, C = 1000.
"""

import argparse
import random
import statistics
import time

import torch
from bench_fused_linear import PROVIDERS, make_batch, timed_step

WARMUP_ROUNDS = 5  # include torch.compile's compilation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    batch = make_batch(512, 512, 1000, requires_grad=True)
    steps = {p: timed_step(p, *batch, backward=True) for p in PROVIDERS}
    order = list(PROVIDERS)
    shuffle = random.Random(0).shuffle
    times: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    for r in range(WARMUP_ROUNDS + args.rounds):
        shuffle(order)
        for provider in order:
            start = time.perf_counter()
            steps[provider]()
            if r >= WARMUP_ROUNDS:
                times[provider].append(time.perf_counter() - start)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"  {'provider':8s} {'median':>10s}   median over rounds of fused / provider")
    for provider, t in times.items():
        ratio = statistics.median(f / p for f, p in zip(times["fused"], t, strict=True))
        print(f"  {provider:8s} {statistics.median(t) * 1e3:7.3f} ms   {ratio:.3f}")


if __name__ == "__main__":
    main()
