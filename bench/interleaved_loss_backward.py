"""What loss.backward() adds to fused_dual_head_loss's forward, timed round-robin against eager and torch.compile.

    .venv/bin/python bench/interleaved_loss_backward.py [--rounds 60]

Providers, each on fresh leaf logits every call (float32, N = 512 of which 256 labelled):
- ``fused-forward``: the forward alone, computing its gradients (the logits require grad), no backward;
- ``fused``: forward + ``loss.backward()`` (the incoming gradient is 1: the forward's gradients are handed on);
- ``fused-grad2``: forward + ``loss.backward(2)`` (a scaled loss: the backward scales the gradients, one pass);
- ``eager`` / ``compile``: forward + backward of the same loss in eager PyTorch and torch.compile of it.
Every round runs each provider once in a shuffled order and a ratio is the median over rounds of that round's ratio
(bench/interleaved.py says why). Goals (issue 14): fused / fused-forward at most 1.25.
"""

import argparse
import statistics

import torch
from bench_fused_loss import make_batch
from eager import eager_dual_head_loss
from interleaved import interleaved_times, median_ratio

import dho_fast

PROVIDERS = ("fused-forward", "fused", "fused-grad2", "eager", "compile")
SHAPES = ((512, 1000), (512, 21843))
WARMUP_ROUNDS = 3  # include torch.compile's compilation


def _step(provider: str, batch):
    ce0, kd0, teacher, labels = batch
    compiled = torch.compile(eager_dual_head_loss)

    def fused(ce, kd):
        return dho_fast.fused_dual_head_loss(ce, kd, teacher, labels, backend="cpu")

    def step() -> None:
        ce, kd = ce0.detach().requires_grad_(), kd0.detach().requires_grad_()
        if provider == "fused-forward":
            fused(ce, kd)
        elif provider == "fused":
            fused(ce, kd).backward()
        elif provider == "fused-grad2":
            fused(ce, kd).backward(torch.tensor(2.0))
        else:
            (compiled if provider == "compile" else eager_dual_head_loss)(ce, kd, teacher, labels).backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds, float32")
    for n, c in SHAPES:
        steps = {p: _step(p, make_batch(n, c, requires_grad=False)) for p in PROVIDERS}
        times = interleaved_times(steps, args.rounds, WARMUP_ROUNDS)
        medians = ", ".join(f"{p} {statistics.median(t) * 1e3:.2f} ms" for p, t in times.items())
        print(f"N = {n}, C = {c}: medians {medians}")
        print(
            f"  fused / fused-forward {median_ratio(times, 'fused', 'fused-forward'):.3f}   "
            f"fused-grad2 / fused-forward {median_ratio(times, 'fused-grad2', 'fused-forward'):.3f}   "
            f"eager / fused {median_ratio(times, 'eager', 'fused'):.2f}x   "
            f"compile / fused {median_ratio(times, 'compile', 'fused'):.2f}x"
        )


if __name__ == "__main__":
    main()
