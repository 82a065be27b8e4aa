"""The fused loss with the teacher in each of its three forms (dho_fast.ops.teacher), forward + backward, on the CPU.

    .venv/bin/python bench/interleaved_teacher_forms.py [--rounds 30] [--shapes 512x1000 512x21843] [--k 5 10]

Providers, each run once per round in an order shuffled per round; a ratio is the median over rounds of that round's
ratio (bench/interleaved.py): ``logits`` (the dense teacher logits), ``probs`` (the same distribution as
``teacher_probs``), ``top<k>`` (its top-k with the uniform tail, for each ``--k``; the arguments' checks and the
teacher's entropy term are part of every call) and ``eager`` (bench/baselines.py on the logits). Each step is one
``fused_dual_head_loss(...).backward()`` on fresh leaf logits, float32, half the rows labelled. The top-k teacher's
row pass reads two (N, C) inputs instead of three.
"""

import argparse
import random
from functools import partial

import torch
from baselines import eager_dual_head_loss
from bench_loss import make_batch
from conftest import machine
from interleaved import median_ratio, run_round

import dho_fast


def _step(loss, ce0: torch.Tensor, kd0: torch.Tensor, labels: torch.Tensor):
    def step() -> None:
        ce, kd = ce0.detach().requires_grad_(), kd0.detach().requires_grad_()
        loss(ce, kd, labels).backward()

    return step


def providers(n: int, c: int, ks: list[int]) -> dict:
    ce, kd, teacher, labels = make_batch(n, c, torch.float32, torch.device("cpu"))
    probs = torch.softmax(teacher / 2.0, dim=1)
    fused = partial(dho_fast.fused_dual_head_loss, backend="cpu")
    steps = {
        "logits": _step(lambda a, b, y: fused(a, b, teacher, y), ce, kd, labels),
        "probs": _step(lambda a, b, y: fused(a, b, None, y, teacher_probs=probs), ce, kd, labels),
        "eager": _step(lambda a, b, y: eager_dual_head_loss(a, b, teacher, y), ce, kd, labels),
    }
    for k in ks:
        values, indices = probs.topk(k, dim=1)
        steps[f"top{k}"] = _step(
            lambda a, b, y, i=indices, v=values: fused(
                a, b, None, y, teacher_topk_indices=i, teacher_topk_values=v, teacher_tail="uniform"
            ),
            ce, kd, labels,
        )  # fmt: skip
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--shapes", nargs="+", default=["512x1000", "512x21843"], help="NxC")
    parser.add_argument("--k", nargs="+", type=int, default=[5, 10])
    args = parser.parse_args()
    print(f"{machine(torch.device('cpu'))}; {args.rounds} interleaved rounds, median of per-round ratios")
    for shape in args.shapes:
        n, c = (int(x) for x in shape.split("x"))
        steps = providers(n, c, args.k)
        times: dict[str, list[float]] = {name: [] for name in steps}
        rng = random.Random(0)
        for _ in range(3):  # warm-up rounds, not recorded
            run_round(steps, {name: [] for name in steps}, rng)
        for _ in range(args.rounds):
            run_round(steps, times, rng)
        ratios = [f"logits / {p} {median_ratio(times, 'logits', p):.2f}" for p in steps if p not in ("logits", "eager")]
        ratios += [f"eager / {p} {median_ratio(times, 'eager', p):.2f}" for p in steps if p != "eager"]
        print(f"N = {n}, C = {c}, float32, fwd+bwd: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
