"""The shared per-row math (csrc/row_math.h), through the CPU kernel, against the reference on rows built to break
an online softmax: a teacher that is -inf in all classes but one, rows of equal logits, 1e4 spreads (a naive exp
overflows), the maximum arriving in the last block (every earlier block is rescaled), classes masked in the
teacher where the student is -inf too, and labels at both ends of the row.

The GPU kernels fold columns with csrc/row_fold.h on top of the same header; tests/cpp/test_row_fold.cpp runs
that arithmetic on the CPU in the GPU's thread layout.
"""

import pytest
import torch
from helpers import IGNORE, LOSS_TOLERANCES, assert_backend_matches_reference

KW = dict(temperature=2.0, ce_loss_weight=0.5, kd_loss_weight=0.5, label_smoothing=0.1)
NEG_INF = float("-inf")


def adversarial_batch(c: int, dtype: torch.dtype):
    """(ce, kd, teacher, labels): one adversarial row per kind, plus a plain random row."""
    g = torch.Generator().manual_seed(c)
    rows = []
    one_hot = torch.full((c,), NEG_INF)
    one_hot[-1] = 2.5
    rows.append((torch.randn(c, generator=g), torch.randn(c, generator=g), one_hot))  # all -inf but one
    rows.append((torch.full((c,), 7.25), torch.full((c,), 7.25), torch.full((c,), 7.25)))  # all equal
    spread = 1e4 * torch.randn(3, c, generator=g)
    rows.append(tuple(spread))  # 1e4 spreads
    rising = torch.linspace(-50.0, 50.0, c)
    rows.append((rising, rising.flip(0), rising))  # the maximum in the last block
    masked = torch.randn(3, c, generator=g)
    masked[2, ::2] = NEG_INF
    masked[1, ::4] = NEG_INF  # the student is -inf on half of the teacher's masked classes
    if c > 1:
        rows.append(tuple(masked))
    peak = torch.full((3, c), -1e4)
    peak[:, c // 2] = 1e4
    rows.append(tuple(peak))  # one entry 2e4 above the rest
    rows.append(tuple(torch.randn(3, c, generator=g)))
    ce, kd, teacher = (torch.stack([r[i] for r in rows]).to(dtype) for i in range(3))
    labels = torch.arange(len(rows)) % 2 * (c - 1)  # labels at column 0 and column C - 1
    return ce, kd, teacher, labels


def loss_tolerance(batch, dtype: torch.dtype) -> dict:
    """The loss terms to the rounding of the logits themselves: with label smoothing, CE = lse - (1 - eps) x_y -
    eps mean(x) cancels to about 4 ulp of the largest logit (at 1e4, ~1e-3 in float32), in any backend."""
    finite = torch.cat([t[t.isfinite()].abs().flatten() for t in batch[:3]])
    atol = 4 * torch.finfo(dtype).eps * max(1.0, float(finite.max()))
    return dict(rtol=LOSS_TOLERANCES[dtype]["rtol"], atol=max(atol, LOSS_TOLERANCES[dtype]["atol"]))


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("c", [1, 2, 511, 1031])
def test_cpu_kernel_matches_reference_on_adversarial_rows(c, dtype, capability, monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
    batch = adversarial_batch(c, dtype)
    assert_backend_matches_reference("cpu", batch, dtype, loss_tolerance(batch, dtype), **KW)


@pytest.mark.parametrize("c", [2, 1031])
def test_unlabelled_adversarial_rows(c):
    ce, kd, teacher, labels = adversarial_batch(c, torch.float32)
    labels[::3] = IGNORE
    batch = (ce, kd, teacher, labels)
    assert_backend_matches_reference("cpu", batch, torch.float32, loss_tolerance(batch, torch.float32), **KW)
