"""fused_dual_head_loss against eager PyTorch, torch.compile of the same eager code and Liger-Kernel (on a GPU).

    .venv/bin/python -m pytest bench/bench_loss.py --benchmark-only --benchmark-json=build/loss.json
    .venv/bin/python bench/report.py build/loss.json

Cases: every (N, C) of bench/cases.py's LOSS_SHAPES, half the rows labelled, float32 and bf16 logits, two modes:
"forward" (the loss alone, under no_grad) and "forward+backward" (the training step: the loss, then
``loss.backward()`` into the logits).
Providers: ``fused-<backend>`` for each compiled backend of the device, ``eager`` (bench/baselines.py),
``compile`` (torch.compile of it), ``liger`` (GPU, when installed), and two yardsticks:
- ``copy``: a torch copy of the bytes the fused op must at least move (read the three (N, C) inputs, and in
  forward+backward write the two (N, C) gradients: 3 or 5 N C elements of the dtype), timed in the same rounds;
  copy / fused is the share of the machine's copy bandwidth the op reaches, had it moved only those bytes;
- ``forward-only`` (forward+backward mode): the fused forward on logits that require grad, which computes the
  gradients, without the backward; fused / forward-only is what ``loss.backward()`` adds;
- ``float32`` (bf16 cases): the fused op on the same batch in float32, in the same rounds; fused / float32 is how
  the bf16 call compares with the float32 one.
"""

from functools import partial

import pytest
import torch
from baselines import eager_dual_head_loss, liger_dual_head_loss
from cases import DTYPES, LOSS_SHAPES, MODES, fused_backends, rounds_for, shape_id

import dho_fast


def make_batch(n: int, c: int, dtype: torch.dtype, device: torch.device):
    """(ce_logits, kd_logits, teacher_logits, labels): logits of a DHO batch whose second half is unlabelled."""
    g = torch.Generator().manual_seed(0)
    ce = torch.randn(n, c, generator=g).to(device, dtype)
    kd = torch.randn(n, c, generator=g).to(device, dtype)
    teacher = (3 * torch.randn(n, c, generator=g)).to(device, dtype)
    labels = torch.randint(0, c, (n,), generator=g).to(device)
    labels[n // 2 :] = -100
    return ce, kd, teacher, labels


def loss_providers(device: torch.device) -> dict:
    found = {f"fused-{b}": partial(dho_fast.fused_dual_head_loss, backend=b) for b in fused_backends(device)}
    found["eager"] = eager_dual_head_loss
    found["compile"] = torch.compile(eager_dual_head_loss)
    liger = liger_dual_head_loss() if device.type == "cuda" else None
    if liger is not None:
        found["liger"] = liger
    return found


def timed_step(loss, batch, backward: bool):
    """One call on fresh leaf logits (as a training step gets them), with or without its backward."""
    ce0, kd0, teacher, labels = batch

    def step() -> None:
        if not backward:
            with torch.no_grad():
                loss(ce0, kd0, teacher, labels)
            return
        ce, kd = ce0.detach().requires_grad_(), kd0.detach().requires_grad_()
        loss(ce, kd, teacher, labels).backward()

    return step


def forward_only_step(backend: str, batch):
    ce0, kd0, teacher, labels = batch

    def step() -> None:
        ce, kd = ce0.detach().requires_grad_(), kd0.detach().requires_grad_()
        dho_fast.fused_dual_head_loss(ce, kd, teacher, labels, backend=backend)

    return step


def copy_step(elements: int, dtype: torch.dtype, device: torch.device):
    """Copies elements / 2 entries: elements read and written in all."""
    src = torch.ones(elements // 2, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=shape_id)
def test_dual_head_loss(interleaved, device, shape, dtype, mode):
    n, c = shape
    backward = mode == "forward+backward"
    batch = make_batch(n, c, DTYPES[dtype], device)
    steps = {name: timed_step(loss, batch, backward) for name, loss in loss_providers(device).items()}
    steps["copy"] = copy_step((5 if backward else 3) * n * c, DTYPES[dtype], device)
    fused = fused_backends(device)
    if backward and fused:
        steps["forward-only"] = forward_only_step(fused[0], batch)
    if DTYPES[dtype] != torch.float32 and fused:
        float32_batch = [t.float() if t.is_floating_point() else t for t in batch]
        steps["float32"] = timed_step(partial(dho_fast.fused_dual_head_loss, backend=fused[0]), float32_batch, backward)
    case = {"mode": mode, "N": n, "C": c, "dtype": dtype}
    interleaved("dual_head_loss", case, steps, rounds=rounds_for(n * c))
