"""How close fused_dual_head_loss's forward is to this machine's memory bandwidth, in interleaved rounds.

    .venv/bin/python bench/interleaved_loss_bandwidth.py [--rounds 40]

The forward that computes the gradients (the logits require grad, as in training) makes one pass over the rows: it
reads three (N, C) inputs (ce, kd and teacher logits) and writes two (the gradients), 5 N C elements. Its achieved
bandwidth is those bytes over its time; the machine's is a torch copy that moves the same bytes (reads and writes
2.5 N C elements each), timed in the same rounds (bench/interleaved.py). float32 and bfloat16 inputs (bf16 reads
half the bytes; its gradients are float32).
"""

import argparse
import statistics

import torch
from interleaved import interleaved_times, median_ratio

import dho_fast

SHAPES = ((512, 1000), (4096, 1000), (512, 21843), (4096, 21843))
WARMUP_ROUNDS = 3


def _fused_forward(n: int, c: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    ce, kd, teacher = (torch.randn(n, c, generator=g).to(dtype) for _ in range(3))
    labels = torch.randint(0, c, (n,), generator=g)
    labels[n // 2 :] = -100

    def step() -> None:
        dho_fast.fused_dual_head_loss(
            ce.detach().requires_grad_(), kd.detach().requires_grad_(), teacher, labels, backend="cpu"
        )

    read = 3 * n * c * ce.element_size()
    written = 2 * n * c * 4  # float32 gradients (the accumulation dtype) for float32 and bf16 logits
    return step, read + written


def _copy(num_bytes: int):
    # Half the bytes read, half written, in float32.
    source = torch.randn(num_bytes // 8)
    target = torch.empty_like(source)
    return lambda: target.copy_(source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print("  N     C      dtype     fused GB/s   copy GB/s   fused / copy   bf16 time / float32 time")
    for n, c in SHAPES:
        steps, moved = {}, {}
        for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
            steps[name], moved[name] = _fused_forward(n, c, dtype)
            steps[f"copy-{name}"] = _copy(moved[name])
        times = interleaved_times(steps, args.rounds, WARMUP_ROUNDS)
        for name in ("float32", "bfloat16"):
            fused_rate = moved[name] / statistics.median(times[name]) / 1e9
            copy_rate = moved[name] / statistics.median(times[f"copy-{name}"]) / 1e9
            bandwidth_share = median_ratio(times, f"copy-{name}", name)
            speed = f"{median_ratio(times, 'bfloat16', 'float32'):.2f}" if name == "bfloat16" else ""
            print(f"  {n:<5} {c:<6} {name:9s} {fused_rate:9.1f} {copy_rate:11.1f} {bandwidth_share:12.2f}   {speed}")


if __name__ == "__main__":
    main()
