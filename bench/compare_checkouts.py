"""Speed of this checkout against another one (e.g. main before a change), in interleaved rounds.

One worker process per checkout imports its dho_fast (``PYTHONPATH=<checkout>``; each must be built in place, e.g.
``python setup.py build_ext --inplace``). Each round asks every worker, in a shuffled order, to time every case once
(the median of ``--reps`` calls after a warm-up); a case's ratio is the median over rounds of that round's
``other / this`` time, so the machine's drift between rounds cancels. Cases use only the public API both checkouts
have: ``fused_dual_head_loss`` and ``DualHead.loss``, forward + backward, backend "cpu", inputs (and the head's
weights) in ``--dtype`` (float32 or bfloat16; the teacher's logits too).

    .venv/bin/python bench/compare_checkouts.py ../baseline-checkout --rounds 20 [--cold] [--dtype bfloat16]

``--cold`` precedes every timed call with a 64 MiB copy that evicts the inputs from the caches, as the suite's rounds
do (eager and torch.compile run between two fused calls): a change to how the kernel reads memory shows there.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

#: name -> (op, N, C, D): "loss" is fused_dual_head_loss on (N, C) logits, "linear" DualHead(D, C).loss.
CASES = {
    "loss fwd+bwd N=512 C=1000": ("loss", 512, 1000, 0),
    "loss fwd+bwd N=512 C=21843": ("loss", 512, 21843, 0),
    "linear fwd+bwd N=512 D=512 C=1000": ("linear", 512, 1000, 512),
}

WORKER = r"""
import json, sys, time
import torch
import dho_fast

def inputs(op, n, c, d, dtype):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, c, (n,), generator=g)
    labels[n // 2 :] = -100
    teacher = (torch.randn(n, c, generator=g) * 3).to(dtype)
    if op == "loss":
        ce = (torch.randn(n, c, generator=g) * 3).to(dtype).requires_grad_()
        kd = (torch.randn(n, c, generator=g) * 3).to(dtype).requires_grad_()
        return lambda: dho_fast.fused_dual_head_loss(ce, kd, teacher, labels, backend="cpu").backward()
    head = dho_fast.DualHead(d, c).to(dtype)
    features = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    return lambda: head.loss(features, teacher, labels, backend="cpu").backward()

steps = {}
evict_src, evict_dst = torch.ones(8 << 20), torch.empty(8 << 20)
for line in sys.stdin:
    name, op, n, c, d, reps, cold, dtype = json.loads(line)
    if name not in steps:
        steps[name] = inputs(op, n, c, d, getattr(torch, dtype))
        for _ in range(3):
            steps[name]()
    times = []
    for _ in range(reps):
        if cold:
            evict_dst.copy_(evict_src)
        start = time.perf_counter()
        steps[name]()
        times.append(time.perf_counter() - start)
    times.sort()
    print(json.dumps(times[len(times) // 2]), flush=True)
"""


def start_worker(checkout: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd="/"
    )


def time_case(worker: subprocess.Popen, name: str, reps: int, cold: bool, dtype: str) -> float:
    worker.stdin.write(json.dumps([name, *CASES[name], reps, cold, dtype]) + "\n")
    worker.stdin.flush()
    return float(worker.stdout.readline())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path, help="the other checkout (built in place)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5, help="calls per timing; the median is kept")
    parser.add_argument("--cold", action="store_true", help="evict the caches before every timed call")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the inputs' dtype")
    args = parser.parse_args()
    this = Path(__file__).resolve().parents[1]
    workers = {"this": start_worker(this), "other": start_worker(args.other.resolve())}
    ratios: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name in CASES:
            order = list(workers)
            random.shuffle(order)
            times = {who: time_case(workers[who], name, args.reps, args.cold, args.dtype) for who in order}
            ratios[name].append(times["other"] / times["this"])
    for worker in workers.values():
        worker.stdin.close()
        worker.wait()
    caches = "cold caches" if args.cold else "warm caches"
    print(
        f"other / this time ({args.other}, {args.dtype}, {caches}), median over {args.rounds} interleaved rounds"
        " [min, max]:"
    )
    for name, values in ratios.items():
        print(f"  {name:36s} {statistics.median(values):.3f}x  [{min(values):.3f}, {max(values):.3f}]")


if __name__ == "__main__":
    main()
