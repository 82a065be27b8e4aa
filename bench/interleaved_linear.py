"""fused_linear_dual_head_loss against eager, torch.compile and the bare GEMMs, timed round-robin.

    .venv/bin/python bench/interleaved_linear.py [--rounds 100]

Interleaved rounds (bench/interleaved.py). Forward + backward, float32, N = 512 (256 labelled), D = 512, C = 1000.
"""

import argparse
import statistics

import torch
from bench_fused_linear import PROVIDERS, make_batch, timed_step
from interleaved import interleaved_times, median_ratio

WARMUP_ROUNDS = 5  # include torch.compile's compilation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    batch = make_batch(512, 512, 1000, requires_grad=True)
    steps = {p: timed_step(p, *batch, backward=True) for p in PROVIDERS}
    times = interleaved_times(steps, args.rounds, WARMUP_ROUNDS)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"  {'provider':8s} {'median':>10s}   median over rounds of fused / provider")
    for provider, t in times.items():
        print(f"  {provider:8s} {statistics.median(t) * 1e3:7.3f} ms   {median_ratio(times, 'fused', provider):.3f}")


if __name__ == "__main__":
    main()
