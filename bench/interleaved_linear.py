"""fused_linear_dual_head_loss against eager, torch.compile and the bare GEMMs, timed round-robin.

    .venv/bin/python bench/interleaved_linear.py [--rounds 60]

pytest-benchmark times one provider after another, so a change in the machine's speed between providers (frequent
on a shared 2-core machine: the same GEMMs have measured 9 ms and 16 ms minutes apart) lands in the ratios. Here
every round runs each provider once, in turn, so all providers see the same conditions; the medians and their
ratios are printed. Forward + backward, float32, N = 512 (256 labelled), D = 512, C = 1000.
"""

import argparse
import statistics
import time

import torch
from bench_fused_linear import PROVIDERS, make_batch, timed_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    batch = make_batch(512, 512, 1000, requires_grad=True)
    steps = {p: timed_step(p, *batch, backward=True) for p in PROVIDERS}
    times: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    for r in range(args.rounds + 5):
        for provider, step in steps.items():
            start = time.perf_counter()
            step()
            if r >= 5:  # warm-up rounds, which include torch.compile's compilation
                times[provider].append(time.perf_counter() - start)
    medians = {p: statistics.median(t) for p, t in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds, medians:")
    for provider, t in medians.items():
        print(f"  {provider:8s} {t * 1e3:8.3f} ms   fused / {provider}: {medians['fused'] / t:.2f}")


if __name__ == "__main__":
    main()
