"""The loss ops' teacher in its three forms (dho_fast.ops.teacher): probabilities and sparse top-k against the float64
oracle of the same distribution, on every backend, for fused_dual_head_loss and fused_linear_dual_head_loss; and the
errors of a bad teacher of each form.

The oracle (tests/helpers.py) takes teacher logits: a distribution p reaches it as ``T log p`` in float64 (``log 0 =
-inf``, a masked class), built here from the top-k arguments independently of dho_fast's own densification.
"""

import math
import re

import pytest
import torch
from helpers import LOSS_BACKENDS, LOSS_KW, backend_params, check_loss, make_inputs

import dho_fast
from dho_fast import kernels

T = LOSS_KW["temperature"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# Narrow and wide rows: one CPU column block (512) and several, one Triton tile (4096) and the two-pass path.
SHAPES = [(6, 7), (9, 1100), pytest.param((3, 4500), marks=pytest.mark.skipif(kernels.interpreted(), reason="slow"))]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setenv("DHO_FAST_POISON_OUTPUTS", "1")


def dense_from_topk(indices: torch.Tensor, values: torch.Tensor, tail: str, c: int) -> torch.Tensor:
    """The (N, C) float64 distribution a top-k teacher stands for, row by row as the docs define it."""
    rows = []
    for idx, val in zip(indices.tolist(), values.double().tolist(), strict=True):
        k, total = len(idx), math.fsum(val)
        rest = max(1.0 - total, 0.0) if tail == "uniform" and k < c else 0.0
        row = [rest / ((c - k) * (total + rest)) if rest else 0.0] * c
        for i, v in zip(idx, val, strict=True):
            row[i] = v / (total + rest)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def oracle_logits(p: torch.Tensor) -> torch.Tensor:
    """Teacher logits whose softmax at temperature T is ``p`` (float64)."""
    return T * p.double().log()


def topk_teacher(n: int, c: int, k: int, tail: str, device: str, masked: bool = False):
    """Random top-k arguments: distinct classes per row, values of a distribution (for "uniform", summing below 1);
    ``masked`` sets some listed values to 0."""
    indices = torch.rand(n, c).argsort(dim=1)[:, :k]
    values = torch.rand(n, k) + 0.05
    values = values / values.sum(1, keepdim=True) * (0.8 if tail == "uniform" and k < c else 1.0)
    if masked and k > 1:
        values[:, 0] = 0.0
    return indices.to(device), values.to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
def test_probs_teacher(backend_device, shape, dtype):
    backend, device = backend_device
    ce, kd, t, labels = make_inputs(*shape, dtype, masked_fraction=0.2, device=device)
    p = torch.softmax(t.double() / T, dim=1).to(dtype)  # masked classes: p = 0
    p[0] *= 3.0  # rows need not sum to 1: each is normalised
    check_loss(backend, (ce, kd, oracle_logits(p / p.double().sum(1, keepdim=True)), labels), dtype,
               teacher=dict(teacher_probs=p))  # fmt: skip


@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
@pytest.mark.parametrize("k", [1, 5, "C"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
def test_topk_teacher(backend_device, shape, dtype, k, tail):
    backend, device = backend_device
    n, c = shape
    k = c if k == "C" else min(k, c)
    ce, kd, _, labels = make_inputs(n, c, dtype, device=device)
    indices, values = topk_teacher(n, c, k, tail, device, masked=True)
    p = dense_from_topk(indices.cpu(), values.cpu(), tail, c).to(device)
    teacher = dict(teacher_topk_indices=indices, teacher_topk_values=values, teacher_tail=tail)
    check_loss(backend, (ce, kd, oracle_logits(p), labels), dtype, teacher=teacher)


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
def test_topk_int32_half_values_and_mean_reduction(backend_device):
    """int32 indices and float16 values are accepted (a store's layout); the "mean" reduction and label smoothing
    go through the same rows."""
    backend, device = backend_device
    ce, kd, _, labels = make_inputs(8, 40, device=device)
    indices, values = topk_teacher(8, 40, 10, "uniform", device)
    values = values.half()
    p = dense_from_topk(indices.cpu(), values.cpu(), "uniform", 40).to(device)
    teacher = dict(teacher_topk_indices=indices.int(), teacher_topk_values=values, teacher_tail="uniform")
    check_loss(backend, (ce, kd, oracle_logits(p), labels), torch.float32, teacher=teacher, kd_reduction="mean",
               label_smoothing=0.1)  # fmt: skip


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
def test_forms_agree_on_one_distribution(backend_device):
    """Logits, their softmax and the full top-k (k = C) of it give the same loss and gradients."""
    backend, device = backend_device
    ce, kd, t, labels = make_inputs(5, 30, torch.float64, device=device)
    p = torch.softmax(t / T, dim=1)
    indices = torch.arange(30, device=device).repeat(5, 1).flip(1)
    forms = [dict(teacher_logits=t), dict(teacher_probs=p),
             dict(teacher_topk_indices=indices, teacher_topk_values=p.gather(1, indices))]  # fmt: skip
    results = []
    for form in forms:
        kd_leaf = kd.clone().requires_grad_()
        logits = form.pop("teacher_logits", None)
        loss = dho_fast.fused_dual_head_loss(ce, kd_leaf, logits, labels, **form, backend=backend)
        loss.backward()
        results.append((loss.detach(), kd_leaf.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-10, atol=1e-14)


LINEAR_BACKENDS = backend_params("cpu", "reference", "cuda", "triton-cuda")


@pytest.mark.parametrize("c", [50, 1100])
@pytest.mark.parametrize("form", ["probs", "topk-renormalize", "topk-uniform"])
@pytest.mark.parametrize("backend_device", LINEAR_BACKENDS)
def test_linear_loss_teacher_forms(backend_device, form, c):
    """The fused linear op in chunks (chunk_size 3 of 10 rows, each chunk's gradients written over its logits)
    against the eager loss of the materialised logits, for the loss and every gradient; C = 1100 spans several of
    the CPU kernel's column blocks."""
    backend, device = backend_device
    n, d = 10, 6
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, dtype=torch.float64, generator=gen).to(device)
    w_ce, w_kd = (torch.randn(c, d, dtype=torch.float64, generator=gen).to(device) for _ in range(2))
    b_ce, b_kd = (torch.randn(c, dtype=torch.float64, generator=gen).to(device) for _ in range(2))
    labels = torch.randint(0, c, (n,), generator=gen).to(device)
    labels[::2] = -100
    if form == "probs":
        teacher = dict(teacher_probs=torch.softmax(torch.randn(n, c, dtype=torch.float64, generator=gen), 1).to(device))
    else:
        tail = form.removeprefix("topk-")
        indices, values = topk_teacher(n, c, 5, tail, device)
        teacher = dict(teacher_topk_indices=indices, teacher_topk_values=values.double(), teacher_tail=tail)
    params = [t.clone().requires_grad_() for t in (x, w_ce, b_ce, w_kd, b_kd)]
    loss = dho_fast.fused_linear_dual_head_loss(*params, None, labels, **teacher, chunk_size=3, backend=backend)
    grads = torch.autograd.grad(loss, params)
    leaves = [t.clone().requires_grad_() for t in (x, w_ce, b_ce, w_kd, b_kd)]
    z_ce = leaves[0] @ leaves[1].T + leaves[2]
    z_kd = leaves[0] @ leaves[3].T + leaves[4]
    want = dho_fast.fused_dual_head_loss(z_ce, z_kd, None, labels, **teacher, backend="reference")
    want_grads = torch.autograd.grad(want, leaves)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


# The errors of a bad teacher: raised before any kernel for the top-k form (checked in Python), by the kernels as
# they read a probability row, with the same text on every backend.
def _topk(n=4, c=6):
    indices = torch.tensor([[0, 1], [2, 3], [4, 5], [1, 0]])[:n]
    return indices, torch.full((n, 2), 0.4)


TOPK_ERRORS = {
    "repeated class": (lambda i, v: i.__setitem__((2, 1), 4), "renormalize", "teacher_topk_indices row 2 repeats"),
    "class out of range": (lambda i, v: i.__setitem__((1, 0), 6), "renormalize", "row 1 has a class outside [0, 6)"),
    "negative class": (lambda i, v: i.__setitem__((3, 1), -1), "renormalize", "row 3 has a class outside [0, 6)"),
    "negative value": (lambda i, v: v.__setitem__((1, 1), -0.1), "renormalize", "row 1 has a negative, NaN or inf"),
    "NaN value": (lambda i, v: v.__setitem__((0, 0), math.nan), "uniform", "row 0 has a negative, NaN or inf"),
    "zero row": (lambda i, v: v.__setitem__(3, 0.0), "renormalize", "row 3 sums to 0"),
    "over one": (lambda i, v: v.__setitem__(2, 0.6), "uniform", "row 2 sums to more than 1"),
}


@pytest.mark.parametrize("case", list(TOPK_ERRORS))
@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
def test_topk_errors(backend_device, case):
    backend, device = backend_device
    ce, kd, _, labels = make_inputs(4, 6, device=device)
    indices, values = _topk()
    spoil, tail, message = TOPK_ERRORS[case]
    spoil(indices, values)
    with pytest.raises(ValueError, match=re.escape(message)):
        dho_fast.fused_dual_head_loss(
            ce, kd, None, labels, teacher_topk_indices=indices.to(device), teacher_topk_values=values.to(device),
            teacher_tail=tail, backend=backend,
        )  # fmt: skip


PROBS_ERRORS = {
    "negative": ((2, 3), -0.5, "teacher_probs row 2 contains a negative, NaN or +inf probability"),
    "NaN": ((1, 0), math.nan, "teacher_probs row 1 contains a negative, NaN or +inf probability"),
    "+inf": ((0, 4), math.inf, "teacher_probs row 0 contains a negative, NaN or +inf probability"),
    "zero row": (3, 0.0, "teacher_probs row 3 is 0 in every class: the teacher distribution is undefined"),
}


@pytest.mark.parametrize("case", list(PROBS_ERRORS))
@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
def test_probs_errors(backend_device, case):
    backend, device = backend_device
    ce, kd, t, labels = make_inputs(4, 6, device=device)
    p = torch.softmax(t, dim=1)
    where, value, message = PROBS_ERRORS[case]
    p[where] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        dho_fast.fused_dual_head_loss(ce, kd, None, labels, teacher_probs=p, backend=backend)


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
def test_uniform_tail_over_one_by_rounding_is_scaled_to_one(backend_device):
    """float16 values of a distribution may sum to a little over 1: "uniform" then has no mass left to spread and is
    the "renormalize" teacher."""
    backend, device = backend_device
    ce, kd, _, labels = make_inputs(6, 20, device=device)
    indices, values = topk_teacher(6, 20, 4, "renormalize", device)
    values = values * 1.004
    losses = [
        dho_fast.fused_dual_head_loss(ce, kd, None, labels, teacher_topk_indices=indices, teacher_topk_values=values,
                                      teacher_tail=tail, backend=backend)
        for tail in ("uniform", "renormalize")
    ]  # fmt: skip
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-7)


def test_exactly_one_form_and_argument_types():
    ce, kd, t, labels = make_inputs(4, 6)
    p = torch.softmax(t, dim=1)
    indices, values = _topk()
    with pytest.raises(ValueError, match="exactly one form.*got none"):
        dho_fast.fused_dual_head_loss(ce, kd, None, labels)
    with pytest.raises(ValueError, match="exactly one form.*got teacher_logits, teacher_probs"):
        dho_fast.fused_dual_head_loss(ce, kd, t, labels, teacher_probs=p)
    with pytest.raises(ValueError, match="needs both.*teacher_topk_values is None"):
        dho_fast.fused_dual_head_loss(ce, kd, None, labels, teacher_topk_indices=indices)
    with pytest.raises(ValueError, match="teacher_tail must be one of"):
        dho_fast.fused_dual_head_loss(ce, kd, None, labels, teacher_topk_indices=indices, teacher_topk_values=values,
                                      teacher_tail="spread")  # fmt: skip
    with pytest.raises(ValueError, match="teacher_tail='uniform' is for a top-k teacher"):
        dho_fast.fused_dual_head_loss(ce, kd, t, labels, teacher_tail="uniform")
    with pytest.raises(TypeError, match="teacher_topk_indices must be int32 or int64"):
        dho_fast.fused_dual_head_loss(ce, kd, None, labels, teacher_topk_indices=indices.float(),
                                      teacher_topk_values=values)  # fmt: skip
    with pytest.raises(ValueError, match=r"teacher_topk_values must be of shape \(4, k\) with 1 <= k <= 6"):
        dho_fast.fused_dual_head_loss(ce, kd, None, labels, teacher_topk_indices=indices,
                                      teacher_topk_values=values[:3])  # fmt: skip
    with pytest.raises(TypeError, match="teacher_probs must be float32"):
        dho_fast.fused_dual_head_loss(ce, kd, None, labels, teacher_probs=p.double())


@pytest.mark.parametrize("backend_device", backend_params("cpu", "triton", "cuda", "triton-cuda"))
def test_ops_check_sparse_indices(backend_device):
    """A direct caller of the ops gets the index checks too (the kernels index rows with them): the whole-batch op
    and the chunk op, which checks the rows it reads."""
    backend, device = backend_device
    suffix = "_triton" if backend == "triton" else ""
    loss_op = getattr(torch.ops.dho_fast, "dual_head_loss" + suffix)
    chunk_op = getattr(torch.ops.dho_fast, "dual_head_loss_chunk" + suffix)
    ce, kd, _, labels = make_inputs(4, 6, device=device)
    labels[:] = -100
    indices, values = (t.to(device) for t in _topk())
    terms = torch.zeros(4, 2, device=device)
    indices[2, 1] = indices[2, 0]
    with pytest.raises(ValueError, match="teacher_indices row 2 repeats a class"):
        loss_op(ce, kd, values, labels, 2.0, 0.5, 0.5, True, -100, 0.0, False, False, 1.0, 1.0, 2, indices, terms)
    with pytest.raises(ValueError, match="teacher_indices row 2 repeats a class"):
        chunk_op(ce[:0], kd[2:].clone(), values, labels, 2, 0, 2.0, True, -100, 0.0, False, False, None, None, 1.0,
                 1.0, None, None, 2, indices, terms)  # fmt: skip
    chunk_op(ce[:0], kd[:2].clone(), values, labels, 0, 0, 2.0, True, -100, 0.0, False, False, None, None, 1.0, 1.0,
             None, None, 2, indices, terms)  # rows 0-1 are valid  # fmt: skip
    indices[2, 1] = 9
    with pytest.raises(ValueError, match=r"teacher_indices row 2 has a class outside \[0, 6\)"):
        loss_op(ce, kd, values, labels, 2.0, 0.5, 0.5, True, -100, 0.0, False, False, 1.0, 1.0, 2, indices, terms)
