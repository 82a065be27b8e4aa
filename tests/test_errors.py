"""Malformed arguments raise an error that names the argument, for every backend."""

import math

import pytest
import torch
from helpers import make_inputs

import dho_fast

BACKENDS = ["cpu", "reference"]


def call(backend, ce, kd, teacher, labels, **kwargs):
    return dho_fast.fused_dual_head_loss(ce, kd, teacher, labels, backend=backend, **kwargs)


@pytest.fixture
def inputs():
    return make_inputs(4, 5, labelled="all")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "position, bad, name",
    [
        (0, torch.randn(4), "ce_logits"),
        (0, torch.randn(4, 0), "ce_logits"),
        (0, torch.randint(0, 3, (4, 5)), "ce_logits"),
        (1, torch.randn(4, 6), "kd_logits"),
        (1, torch.randn(4, 5, dtype=torch.float64), "kd_logits"),
        (2, torch.randn(3, 5), "teacher_logits"),
        (2, torch.randn(4, 5).half(), "teacher_logits"),
        (2, torch.randn(4, 5, device="meta"), "teacher_logits"),
        (3, torch.zeros(4, dtype=torch.int32), "labels"),
        (3, torch.zeros(4, 1, dtype=torch.int64), "labels"),
        (3, torch.zeros(5, dtype=torch.int64), "labels"),
        (3, torch.zeros(4).float(), "labels"),
    ],
)
def test_malformed_tensor(backend, inputs, position, bad, name):
    args = list(inputs)
    args[position] = bad
    with pytest.raises((ValueError, RuntimeError), match=name):
        call(backend, *args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label", [5, 100, -1, -101])
def test_label_out_of_range(backend, inputs, label):
    ce, kd, teacher, labels = inputs
    labels[2] = label
    with pytest.raises((ValueError, RuntimeError), match=r"labels\[2\]"):
        call(backend, ce, kd, teacher, labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(backend, inputs):
    ce, kd, teacher, labels = inputs
    labels[1] = -1
    call(backend, ce, kd, teacher, labels, ignore_index=-1)
    with pytest.raises((ValueError, RuntimeError), match=r"labels\[1\]"):
        call(backend, ce, kd, teacher, labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_teacher(backend, inputs, value):
    ce, kd, teacher, labels = inputs
    teacher[3, 1] = value
    with pytest.raises((ValueError, RuntimeError), match="teacher_logits row 3"):
        call(backend, ce, kd, teacher, labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_row_all_masked(backend, inputs):
    ce, kd, teacher, labels = inputs
    teacher[2] = -math.inf
    with pytest.raises((ValueError, RuntimeError), match="teacher_logits row 2"):
        call(backend, ce, kd, teacher, labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(ce_loss_weight=-0.1), "ce_loss_weight"),
        (dict(kd_loss_weight=-1.0), "kd_loss_weight"),
        (dict(kd_reduction="sum"), "kd_reduction"),
        (dict(label_smoothing=1.5), "label_smoothing"),
    ],
)
def test_bad_scalar_argument(backend, inputs, kwargs, name):
    with pytest.raises(ValueError, match=name):
        call(backend, *inputs, **kwargs)


def test_cpu_backend_rejects_other_devices(inputs):
    meta = [t.to("meta") for t in inputs]
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        call("cpu", *meta)


def test_compiled_op_checks_its_own_inputs(inputs):
    # Direct callers of torch.ops.dho_fast.* bypass the Python checks; the kernel must still refuse bad input.
    ce, kd, teacher, labels = inputs
    with pytest.raises(RuntimeError, match="kd_logits"):
        torch.ops.dho_fast.dual_head_loss(ce, kd[:, :3], teacher, labels, 2.0, 0.5, 0.5, True, -100, 0.0, False, False)
    with pytest.raises(RuntimeError, match="temperature"):
        torch.ops.dho_fast.dual_head_loss(ce, kd, teacher, labels, 0.0, 0.5, 0.5, True, -100, 0.0, False, False)


@pytest.mark.parametrize("head", ["ce", "kd"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_student_non_finite_logits_propagate(head, value):
    # Not an error: mixed-precision loss scaling (GradScaler) looks for inf/NaN in the gradients to skip the step.
    # C = 40 puts the bad logit inside a vector of the CPU kernel's exp, which maps NaN to a finite value.
    ce, kd, teacher, labels = make_inputs(3, 40, labelled="all")
    (ce if head == "ce" else kd)[1, 20] = value
    ce.requires_grad_()
    kd.requires_grad_()
    loss = call("cpu", ce, kd, teacher, labels)
    loss.backward()
    assert torch.isnan(loss)
    grad = ce.grad if head == "ce" else kd.grad
    assert not grad[1].isfinite().any()
    assert grad[[0, 2]].isfinite().all()
