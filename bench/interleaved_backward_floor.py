"""What ``loss.backward()`` adds to the fused loss at a small shape, against autograd's own cost, in interleaved rounds.

The fused forward computes the logits' gradients, so its backward only hands them to the two leaves; whatever it
still costs is autograd's fixed cost per backward (Python's ``torch.autograd.backward``, the engine, one
AccumulateGrad per leaf). Each round times, in a shuffled order, the median of ``--reps`` calls of:

- ``fused``: ``fused_dual_head_loss`` on fresh (N, C) leaf logits, and ``fused+backward``: the same, then backward;
- ``sum``: ``x.sum()`` of one fresh (N, C) leaf, and ``sum+backward``: the same, then backward: a one-node graph, the
  cheapest backward there is.

Prints each variant's median time, and per graph what backward adds (the median over rounds of the round's
difference) and forward+backward / forward (the median of per-round ratios).

``python bench/interleaved_backward_floor.py [--n 128] [--c 200] [--rounds 40] [--reps 50] [--threads 2]``
"""

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
from interleaved import median_ratio

import dho_fast

IGNORE = -100


def _median_call(step: Callable[[], None], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--c", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, args.c, (args.n,), generator=g)
    labels[args.n // 2 :] = IGNORE
    teacher, ce0, kd0 = (3 * torch.randn(args.n, args.c, generator=g) for _ in range(3))

    def fused(backward: bool) -> None:
        ce, kd = ce0.detach().requires_grad_(), kd0.detach().requires_grad_()
        loss = dho_fast.fused_dual_head_loss(ce, kd, teacher, labels, backend="cpu")
        if backward:
            loss.backward()

    def one_sum(backward: bool) -> None:
        total = ce0.detach().requires_grad_().sum()
        if backward:
            total.backward()

    steps = {
        name + suffix: (lambda f=f, b=b: f(b))
        for name, f in (("fused", fused), ("sum", one_sum))
        for suffix, b in (("", False), ("+backward", True))
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm-up
        _median_call(step, args.reps)
    rng = random.Random(0)
    for _ in range(args.rounds):
        for name in rng.sample(list(steps), len(steps)):
            times[name].append(_median_call(steps[name], args.reps))
    print(
        f"N {args.n}, C {args.c}, float32, CPU threads {args.threads}, ISA {torch.backends.cpu.get_cpu_capability()}, "
        f"rounds {args.rounds} of {args.reps} calls"
    )
    for name, t in times.items():
        print(f"  {name}: {statistics.median(t) * 1e6:.1f} us")
    for graph in ("fused", "sum"):
        forward, both = times[graph], times[graph + "+backward"]
        added = statistics.median(b - f for f, b in zip(forward, both, strict=True))
        ratio = median_ratio(times, graph + "+backward", graph)
        print(f"{graph}: backward adds {added * 1e6:.1f} us; forward+backward / forward {ratio:.2f}")


if __name__ == "__main__":
    main()
