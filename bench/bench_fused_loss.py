"""fused_dual_head_loss against eager PyTorch and torch.compile of the same eager code.

    .venv/bin/python -m pytest bench/bench_fused_loss.py --benchmark-only --benchmark-json=bench/results/loss.json
    .venv/bin/python bench/report.py bench/results/loss.json

Shapes are ImageNet-like batches: N = 512 rows of which 256 labelled, C = 1000 (ImageNet-1k) and 21843 (-21k).
"""

import pytest
import torch
from eager import eager_dual_head_loss

import dho_fast

SHAPES = [(512, 1000), (512, 21843)]
PROVIDERS = ["fused", "eager", "compile"]


def make_batch(n: int, c: int, requires_grad: bool):
    g = torch.Generator().manual_seed(0)
    ce = torch.randn(n, c, generator=g).requires_grad_(requires_grad)
    kd = torch.randn(n, c, generator=g).requires_grad_(requires_grad)
    teacher = 3 * torch.randn(n, c, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    labels[n // 2 :] = -100
    return ce, kd, teacher, labels


def loss_fn(provider: str):
    if provider == "fused":
        return lambda *a: dho_fast.fused_dual_head_loss(*a, backend="cpu")
    if provider == "compile":
        return torch.compile(eager_dual_head_loss)
    return eager_dual_head_loss


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-C{s[1]}")
def test_dual_head_loss(record, shape, mode, provider):
    bench = record(f"dual_head_loss {mode} N={shape[0]} C={shape[1]} float32", provider=provider, mode=mode)
    backward = mode == "forward+backward"
    ce, kd, teacher, labels = make_batch(*shape, requires_grad=backward)
    fn = loss_fn(provider)

    def step():
        if backward:
            ce.grad = kd.grad = None
            fn(ce, kd, teacher, labels).backward()
        else:
            with torch.no_grad():
                fn(ce, kd, teacher, labels)

    rounds = 30 if shape[1] <= 1000 else 8
    bench.pedantic(step, rounds=rounds, warmup_rounds=3, iterations=1)
