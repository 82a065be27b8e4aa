"""Training throughput: images per second of the trainer's whole DHO step with the fused loss against the eager loss,
and the share of a step the heads and loss take.

    .venv/bin/python -m pytest bench/bench_train_step.py --benchmark-only --benchmark-json=build/train.json
    .venv/bin/python bench/report.py build/train.json     # add --bench-device cuda to pytest on a GPU

The step is the trainer's: the student's forward, the loss of both heads, backward and AdamW's update, on a batch of
64 labelled and 64 unlabelled 28 x 28 grey images (the demo's CNN student, width 32) with teacher logits over C
classes, float32. Providers: ``fused`` is ``Student.forward`` (the heads through fused_linear_dual_head_loss),
``eager`` the same student's ``logits`` and bench/baselines.py's loss; ``fused-loss`` / ``eager-loss`` are the heads
and the loss alone, forward and backward, on the step's features, timed in the same rounds, so that a loss's share
of its step is the median over rounds of (loss alone / whole step).
"""

import copy

import pytest
import torch
from baselines import eager_dual_head_loss

from dho_fast.train.students import build_student

LOSS_ARGS = dict(temperature=2.0, ce_loss_weight=0.5, kd_loss_weight=0.5, ignore_index=-100)
BATCH = 128


def train_steps(num_classes: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    fused_student, _ = build_student("cnn", num_classes, "dho", in_channels=1, cnn_width=32, device=device)
    students = {"fused": fused_student, "eager": copy.deepcopy(fused_student)}
    optimizers = {name: torch.optim.AdamW(s.parameters()) for name, s in students.items()}
    images = torch.randn(BATCH, 1, 28, 28, device=device)
    teacher = 3 * torch.randn(BATCH, num_classes, device=device)
    labels = torch.randint(0, num_classes, (BATCH,), device=device)
    labels[BATCH // 2 :] = -100
    with torch.no_grad():
        features = fused_student.backbone(images).float()

    def loss(name: str, x: torch.Tensor) -> torch.Tensor:
        student = students[name]
        if name == "fused":
            return student.head.loss(x, teacher, labels, **LOSS_ARGS)
        weights = LOSS_ARGS["ce_loss_weight"], LOSS_ARGS["kd_loss_weight"]
        return eager_dual_head_loss(*student.head(x), teacher, labels, LOSS_ARGS["temperature"], *weights)

    def whole_step(name: str):
        student, optimizer = students[name], optimizers[name]

        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            if name == "fused":
                step_loss = student(images, teacher, labels, **LOSS_ARGS)[0]
            else:
                step_loss = loss(name, student.backbone(images).float())
            step_loss.backward()
            optimizer.step()

        return run

    def loss_alone(name: str):
        return lambda: loss(name, features.detach().requires_grad_()).backward()

    return {"fused": whole_step("fused"), "eager": whole_step("eager"), "fused-loss": loss_alone("fused"),
            "eager-loss": loss_alone("eager")}  # fmt: skip


@pytest.mark.parametrize("num_classes", (10, 200, 1000), ids=lambda c: f"C{c}")
def test_train_step(interleaved, device, num_classes):
    case = {"mode": "train step", "N": BATCH, "C": num_classes, "dtype": "float32"}
    interleaved("train_step", case, train_steps(num_classes, device), rounds=30)
