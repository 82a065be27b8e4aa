"""Images per second of the trainer's whole DHO step with the fused loss against the eager loss, and the share of a
step the loss takes, in interleaved rounds (bench/interleaved.py).

    .venv/bin/python bench/interleaved_train_step.py [--rounds 30] [--device cpu|cuda]

The step is the trainer's: the student's forward, the loss of both heads, backward and AdamW's update, on a batch
of 64 labelled and 64 unlabelled 28 x 28 grey images (the demo's CNN student, width 32) with teacher logits over C
classes. "fused" is `Student.forward` (the heads through fused_linear_dual_head_loss); "eager" is the same student's
`logits` and the loss of bench/eager.py. The loss alone is the heads and the loss, forward and backward, on the
step's features; its share is the median over rounds of (loss alone / whole step) in the same round.
"""

import argparse
import copy
import statistics

import torch
from eager import eager_dual_head_loss
from interleaved import interleaved_times, median_ratio

from dho_fast.train.students import build_student

LOSS_ARGS = dict(temperature=2.0, ce_loss_weight=0.5, kd_loss_weight=0.5, ignore_index=-100)
BATCH = 128
WARMUP_ROUNDS = 3


def _providers(num_classes: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    fused_student, _ = build_student("cnn", num_classes, "dho", in_channels=1, cnn_width=32, device=device)
    eager_student = copy.deepcopy(fused_student)
    optimizers = {
        name: torch.optim.AdamW(s.parameters()) for name, s in (("fused", fused_student), ("eager", eager_student))
    }
    images = torch.randn(BATCH, 1, 28, 28, device=device)
    teacher = 3 * torch.randn(BATCH, num_classes, device=device)
    labels = torch.randint(0, num_classes, (BATCH,), device=device)
    labels[BATCH // 2 :] = -100
    with torch.no_grad():
        features = fused_student.backbone(images).float()

    def eager_loss(student, x):
        ce, kd = student.head(x)
        weights = LOSS_ARGS["ce_loss_weight"], LOSS_ARGS["kd_loss_weight"]
        return eager_dual_head_loss(ce, kd, teacher, labels, LOSS_ARGS["temperature"], *weights)

    def step(name: str):
        student, optimizer = (
            (fused_student, optimizers["fused"]) if name == "fused" else (eager_student, optimizers["eager"])
        )

        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            if name == "fused":
                loss = student(images, teacher, labels, **LOSS_ARGS)[0]
            else:
                loss = eager_loss(student, student.backbone(images).float())
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()

        return run

    def loss_alone(name: str):
        student = fused_student if name == "fused" else eager_student

        def run() -> None:
            x = features.detach().requires_grad_()
            if name == "fused":
                loss = student.head.loss(x, teacher, labels, **LOSS_ARGS)
            else:
                loss = eager_loss(student, x)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()

        return run

    return {"fused": step("fused"), "eager": step("eager"), "fused-loss": loss_alone("fused"),
            "eager-loss": loss_alone("eager")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds, device {device}")
    for num_classes in (10, 1000):
        times = interleaved_times(_providers(num_classes, device), args.rounds, WARMUP_ROUNDS)
        rate = {name: BATCH / statistics.median(times[name]) for name in ("fused", "eager")}
        print(
            f"C = {num_classes}: images/s fused {rate['fused']:.0f}, eager {rate['eager']:.0f}; "
            f"step eager / fused {median_ratio(times, 'eager', 'fused'):.2f}x; "
            f"loss share of the step: fused {median_ratio(times, 'fused-loss', 'fused'):.1%}, "
            f"eager {median_ratio(times, 'eager-loss', 'eager'):.1%}"
        )


if __name__ == "__main__":
    main()
