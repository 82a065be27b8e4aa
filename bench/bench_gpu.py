"""The fused DHO loss on a GPU: every provider at the ImageNet shapes, as time and as achieved memory bandwidth.

    .venv/bin/python bench/bench_gpu.py --json bench/results/gpu.json      # prints a markdown table

Providers: "fused-cuda" (backend="cuda", csrc/cuda), "fused-triton" (backend="triton", kernels/), "eager"
(bench/eager.py), "compile" (torch.compile of the eager code) and "liger" (Liger-Kernel's fused cross-entropy and
KL-divergence losses around PyTorch's log_softmax, when liger_kernel is installed). Modes: "forward+backward" (the
training step: the loss and both logit gradients) and "forward" (the loss alone, under no_grad).

Bandwidth: the bytes a fused kernel must move, over the median time. forward+backward: read the CE, KD and teacher
logits once and write both gradients once, 5 N C elements; forward: read the three, 3 N C. It is set against the
device's measured copy bandwidth (a device-to-device copy of 1 GiB, counted as read + write). Times are CUDA-event
medians with L2 flushed before each repetition. bench/GPU.md has the same figures on paper for an H100.

Written and checked on machines without a GPU: it has not been run yet.
"""

import argparse
import json
import platform
import statistics

import torch
from eager import eager_dual_head_loss

import dho_fast
from dho_fast import kernels
from dho_fast.ops import extension

SHAPES = [(512, 1000), (512, 21843), (8192, 1000), (8192, 21843)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MODES = ["forward+backward", "forward"]


def liger_loss():
    """The DHO loss from Liger-Kernel's fused CE and KL losses (None when liger_kernel is not installed)."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
    except ImportError:
        return None
    ce_loss, kl_loss = LigerCrossEntropyLoss(), LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def loss(ce_logits, kd_logits, teacher_logits, labels, temperature=2.0):
        labelled = labels != -100
        log_q = torch.log_softmax(kd_logits.float() / temperature, dim=1)
        log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=1)
        kd = kl_loss(log_q[labelled], log_p[labelled]) + kl_loss(log_q[~labelled], log_p[~labelled])
        return 0.5 * ce_loss(ce_logits[labelled], labels[labelled]) + 0.5 * temperature**2 * kd

    return loss


def providers() -> dict:
    found = {}
    if extension.has_cuda_kernels():
        found["fused-cuda"] = lambda *a: dho_fast.fused_dual_head_loss(*a, backend="cuda")
    if kernels.has_triton():
        found["fused-triton"] = lambda *a: dho_fast.fused_dual_head_loss(*a, backend="triton")
    found["eager"] = eager_dual_head_loss
    found["compile"] = torch.compile(eager_dual_head_loss)
    liger = liger_loss()
    if liger is not None:
        found["liger"] = liger
    return found


def median_ms(fn, reps: int = 50, warmup: int = 5) -> float:
    """Median CUDA-event time of fn, with L2 flushed (a 256 MiB write) before each repetition."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB, read + write, in GB/s."""
    src = torch.empty(1 << 30, dtype=torch.int8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_ms(lambda: dst.copy_(src), reps=20) / 1e6


def batch(n: int, c: int, dtype: torch.dtype, requires_grad: bool):
    """Half the rows labelled, as in a DHO batch of labelled and unlabelled images."""
    g = torch.Generator(device="cuda").manual_seed(0)
    ce = torch.randn(n, c, device="cuda", generator=g).to(dtype).requires_grad_(requires_grad)
    kd = torch.randn(n, c, device="cuda", generator=g).to(dtype).requires_grad_(requires_grad)
    teacher = (3 * torch.randn(n, c, device="cuda", generator=g)).to(dtype)
    labels = torch.randint(0, c, (n,), device="cuda", generator=g)
    labels[n // 2 :] = -100
    return ce, kd, teacher, labels


def step_fn(loss_fn, inputs, mode: str):
    ce, kd, teacher, labels = inputs
    if mode == "forward":

        def forward():
            with torch.no_grad():
                loss_fn(ce, kd, teacher, labels)

        return forward

    def forward_backward():
        ce.grad = kd.grad = None
        loss_fn(ce, kd, teacher, labels).backward()

    return forward_backward


def run(shapes, dtypes, modes) -> dict:
    copy_gbs = copy_bandwidth_gbs()
    rows = []
    for n, c in shapes:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for mode in modes:
                inputs = batch(n, c, dtype, requires_grad=mode != "forward")
                moved = (5 if mode != "forward" else 3) * n * c * dtype.itemsize
                for name, loss_fn in providers().items():
                    torch._dynamo.reset()
                    try:
                        ms = median_ms(step_fn(loss_fn, inputs, mode))
                    except torch.OutOfMemoryError:
                        ms = float("nan")
                    torch.cuda.empty_cache()
                    gbs = moved / ms / 1e6
                    rows.append(dict(n=n, c=c, dtype=dtype_name, mode=mode, provider=name, ms=ms, bytes=moved,
                                     gbs=gbs, of_copy=gbs / copy_gbs, floor_ms=moved / copy_gbs / 1e6))  # fmt: skip
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, machine=platform.node(),
                copy_gbs=copy_gbs, results=rows)  # fmt: skip


def table(report: dict) -> str:
    lines = [
        f"{report['device']}, torch {report['torch']}: measured copy bandwidth {report['copy_gbs']:.0f} GB/s",
        "",
        "| N | C | dtype | mode | provider | median ms | floor ms | GB/s | of copy bandwidth |",
        "|---:|---:|---|---|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['n']} | {r['c']} | {r['dtype']} | {r['mode']} | {r['provider']} | {r['ms']:.3f} | "
            f"{r['floor_ms']:.3f} | {r['gbs']:.0f} | {100 * r['of_copy']:.0f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--small", action="store_true", help="only N = 512 (a quick look)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU")
    shapes = [s for s in SHAPES if not args.small or s[0] == 512]
    report = run(shapes, args.dtypes, args.modes)
    print(table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
