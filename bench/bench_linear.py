"""fused_linear_dual_head_loss (``DualHead.loss``) against two eager nn.Linear + the eager loss, torch.compile of
that, and the bare GEMMs the fused op cannot avoid.

    .venv/bin/python -m pytest bench/bench_linear.py --benchmark-only --benchmark-json=build/linear.json
    .venv/bin/python bench/report.py build/linear.json

Cases: the (N, C) of bench/cases.py with D = 512 features (768 for C = 21843, a ViT-B head), half the rows labelled,
float32 and bf16 (features, heads and teacher in that dtype), modes "forward" (under no_grad) and
"forward+backward" (gradients of the features and both heads). Providers: ``fused-<backend>`` per compiled backend
of the device, ``eager`` (the same DualHead's two nn.Linear and bench/baselines.py's loss), ``compile``
(torch.compile of that) and the yardstick ``gemms``: both heads' logits (the CE head over the labelled rows only)
and, with backward, d features and d weights of both heads, timed alone. Liger-Kernel has no fused linear loss of
this form (its fused linear distillation losses take a teacher head, not teacher logits), so it is not a provider.
Peak memory (bench/memory.py) is where the fused op differs most: it never holds the (N, C) logits.
"""

from functools import partial

import pytest
import torch
from baselines import eager_dual_head_loss
from cases import DTYPES, MODES, SHAPES, fused_backends, rounds_for, shape_id

import dho_fast


def feature_dim(num_classes: int) -> int:
    return 768 if num_classes > 1000 else 512


def make_batch(n: int, d: int, c: int, dtype: torch.dtype, device: torch.device):
    """(features, head, teacher_logits, labels): half the rows labelled."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    head = dho_fast.DualHead(d, c).to(device, dtype)
    features = torch.randn(n, d, generator=g).to(device, dtype)
    teacher = (3 * torch.randn(n, c, generator=g)).to(device, dtype)
    labels = torch.randint(0, c, (n,), generator=g).to(device)
    labels[n // 2 :] = -100
    return features, head, teacher, labels


def fused_step(features, head, teacher, labels, backend: str):
    return head.loss(features, teacher, labels, backend=backend)


def eager_step(features, head, teacher, labels):
    return eager_dual_head_loss(head.ce_head(features), head.kd_head(features), teacher, labels)


def gemm_step(features, head, labels, backward: bool):
    """The fused op's matmuls on stand-in logit gradients (their values do not change a GEMM's time)."""
    x = features.detach()
    labelled = x[labels != -100]
    w_ce, w_kd = head.ce_head.weight.detach(), head.kd_head.weight.detach()

    def step() -> None:
        z_ce = torch.mm(labelled, w_ce.t())
        z_kd = torch.mm(x, w_kd.t())
        if backward:
            torch.mm(z_ce, w_ce)
            torch.mm(z_kd, w_kd)
            torch.mm(z_ce.t(), labelled)
            torch.mm(z_kd.t(), x)

    return step


def timed_step(loss, features, head, teacher, labels, backward: bool):
    params = list(head.parameters())

    def step() -> None:
        if not backward:
            with torch.no_grad():
                loss(features, head, teacher, labels)
            return
        for p in params:
            p.grad = None
        x = features.detach().requires_grad_()
        loss(x, head, teacher, labels).backward()

    return step


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_fused_linear(interleaved, device, shape, dtype, mode):
    n, c = shape
    d = feature_dim(c)
    backward = mode == "forward+backward"
    features, head, teacher, labels = make_batch(n, d, c, DTYPES[dtype], device)
    losses = {f"fused-{b}": partial(fused_step, backend=b) for b in fused_backends(device)}
    losses.update(eager=eager_step, compile=torch.compile(eager_step))
    steps = {name: timed_step(loss, features, head, teacher, labels, backward) for name, loss in losses.items()}
    steps["gemms"] = gemm_step(features, head, labels, backward)
    case = {"mode": mode, "N": n, "D": d, "C": c, "dtype": dtype}
    # Without AVX512-BF16 or AMX, ATen's CPU bf16 GEMM is a scalar loop: eager's step at C = 21843 takes most of a
    # minute there, so that case gets few rounds.
    crawl = device.type == "cpu" and dtype == "bf16" and c > 1000
    rounds, warmup = (3, 1) if crawl else (rounds_for(n * c), 3)
    interleaved("fused_linear_dual_head_loss", case, steps, rounds=rounds, warmup_rounds=warmup)
