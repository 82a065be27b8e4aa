"""The inference-side ops: dual_head_predict (the blend of both heads) and search_alpha_beta (every (alpha, beta) pair
of the grid on a validation set), against the eager code users write and torch.compile of it.

    .venv/bin/python -m pytest bench/bench_blend.py --benchmark-only --benchmark-json=build/blend.json
    .venv/bin/python bench/report.py build/blend.json

Cases: the (N, C) of bench/cases.py, float32 and bf16 logits, mode "forward" (neither op has a backward in use).
Providers: ``fused-<backend>`` for each backend of the ops on the device ("reference" is their chunked eager
implementation and the one that runs on a CPU; "triton" on a GPU); ``eager``: the blend formula as written, and for
the search a loop over the default grid's 21 x 7 pairs computing each blend's accuracy;
``compile``: torch.compile of the blend (for the search, of one pair's accuracy, alpha and beta passed as
tensors so that one graph serves every pair).
"""

from functools import partial

import pytest
import torch
from cases import DTYPES, SHAPES, rounds_for, shape_id

import dho_fast
from dho_fast import kernels
from dho_fast.ops import DEFAULT_ALPHAS, DEFAULT_BETAS


def blend_backends(device: torch.device) -> list[str]:
    return (["triton"] if device.type == "cuda" and kernels.has_triton() else []) + ["reference"]


def make_logits(n: int, c: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator().manual_seed(0)
    ce = (2 * torch.randn(n, c, generator=g)).to(device, dtype)
    kd = (2 * torch.randn(n, c, generator=g)).to(device, dtype)
    labels = torch.randint(0, c, (n,), generator=g).to(device)
    return ce, kd, labels


def eager_blend(ce: torch.Tensor, kd: torch.Tensor, alpha, beta) -> torch.Tensor:
    return alpha * torch.softmax(ce.float(), dim=1) + (1 - alpha) * torch.softmax(kd.float() / beta, dim=1)


def pair_correct(ce, kd, labels, alpha, beta) -> torch.Tensor:
    return (eager_blend(ce, kd, alpha, beta).argmax(1) == labels).sum()


def search_loop(pair):
    """Accuracy of every grid pair, one blend at a time; alpha and beta as 0-dim tensors."""
    alphas = [torch.tensor(a) for a in DEFAULT_ALPHAS]
    betas = [torch.tensor(b) for b in DEFAULT_BETAS]

    def search(ce, kd, labels) -> torch.Tensor:
        return torch.stack([torch.stack([pair(ce, kd, labels, a, b) for b in betas]) for a in alphas])

    return search


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_dual_head_predict(interleaved, device, shape, dtype):
    n, c = shape
    ce, kd, _ = make_logits(n, c, DTYPES[dtype], device)
    compiled = torch.compile(eager_blend)
    alpha, beta = torch.tensor(0.4, device=device), torch.tensor(1.5, device=device)
    steps = {
        f"fused-{b}": partial(dho_fast.dual_head_predict, ce, kd, 0.4, 1.5, backend=b) for b in blend_backends(device)
    }
    steps["eager"] = lambda: eager_blend(ce, kd, 0.4, 1.5)
    steps["compile"] = lambda: compiled(ce, kd, alpha, beta)
    case = {"mode": "forward", "N": n, "C": c, "dtype": dtype}
    interleaved("dual_head_predict", case, steps, rounds=rounds_for(n * c))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_search_alpha_beta(interleaved, device, shape, dtype):
    n, c = shape
    ce, kd, labels = make_logits(n, c, DTYPES[dtype], device)
    eager, compiled = search_loop(pair_correct), search_loop(torch.compile(pair_correct))
    steps = {
        f"fused-{b}": partial(dho_fast.search_alpha_beta, ce, kd, labels, backend=b) for b in blend_backends(device)
    }
    steps["eager"] = lambda: eager(ce, kd, labels)
    steps["compile"] = lambda: compiled(ce, kd, labels)
    case = {"mode": "forward", "N": n, "C": c, "dtype": dtype}
    interleaved("search_alpha_beta", case, steps, rounds=max(3, rounds_for(n * c) // 4), warmup_rounds=1)
