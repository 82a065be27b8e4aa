"""Malformed arguments raise one exception type per kind of mistake on every backend, with a message naming the
argument: ``ValueError`` for a bad value, shape or device, ``TypeError`` for a bad dtype.

The value errors a kernel finds while it reads the data (labels out of range, teacher rows with NaN / +inf or -inf
everywhere) have one message each (dho_fast.ops.validation), which every backend must raise word for word.
"""

import math

import pytest
import torch
from helpers import IGNORE, backend_params, make_inputs

import dho_fast
from dho_fast.ops.validation import label_error, teacher_row_error

LOSS_BACKENDS = backend_params("cpu", "reference", "triton", "cuda", "triton-cuda")
LINEAR_BACKENDS = backend_params("cpu", "reference", "cuda", "triton-cuda")
CHUNK_BACKENDS = backend_params("cpu", "triton", "cuda", "triton-cuda")
BLEND_BACKENDS = backend_params("reference", "triton", "triton-cuda")
CHUNK_OPS = {"cpu": "dual_head_loss_chunk", "cuda": "dual_head_loss_chunk", "triton": "dual_head_loss_chunk_triton"}


def call(backend, ce, kd, teacher, labels, **kwargs):
    return dho_fast.fused_dual_head_loss(ce, kd, teacher, labels, backend=backend, **kwargs)


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
@pytest.mark.parametrize(
    "position, bad, error, name",
    [
        (0, lambda d: torch.randn(4, device=d), ValueError, "ce_logits"),
        (0, lambda d: torch.randn(4, 0, device=d), ValueError, "ce_logits"),
        (0, lambda d: torch.randint(0, 3, (4, 5), device=d), TypeError, "ce_logits"),
        (1, lambda d: torch.randn(4, 6, device=d), ValueError, "kd_logits"),
        (1, lambda d: torch.randn(4, 5, dtype=torch.float64, device=d), TypeError, "kd_logits"),
        (2, lambda d: torch.randn(3, 5, device=d), ValueError, "teacher_logits"),
        (2, lambda d: torch.randn(4, 5, device=d).half(), TypeError, "teacher_logits"),
        (2, lambda d: torch.randn(4, 5, device="meta"), ValueError, "teacher_logits"),
        (3, lambda d: torch.zeros(4, dtype=torch.int32, device=d), TypeError, "labels"),
        (3, lambda d: torch.zeros(4, 1, dtype=torch.int64, device=d), ValueError, "labels"),
        (3, lambda d: torch.zeros(5, dtype=torch.int64, device=d), ValueError, "labels"),
        (3, lambda d: torch.zeros(4, device=d), TypeError, "labels"),
        (3, lambda d: [0, 1, 2, 3], ValueError, "labels"),
    ],
)
def test_malformed_tensor(backend_device, position, bad, error, name):
    backend, device = backend_device
    args = list(make_inputs(4, 5, labelled="all", device=device))
    args[position] = bad(device)
    with pytest.raises(error, match=name) as info:
        call(backend, *args)
    assert type(info.value) is error


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(ce_loss_weight=-0.1), "ce_loss_weight"),
        (dict(kd_loss_weight=-1.0), "kd_loss_weight"),
        (dict(kd_loss_weight=math.nan), "kd_loss_weight"),
        (dict(kd_reduction="sum"), "kd_reduction"),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(label_smoothing=-0.1), "label_smoothing"),
    ],
)
def test_bad_scalar_argument(backend_device, kwargs, name):
    backend, device = backend_device
    with pytest.raises(ValueError, match=name) as info:
        call(backend, *make_inputs(4, 5, labelled="all", device=device), **kwargs)
    assert type(info.value) is ValueError


# (edit of (teacher, labels) of a (6, 50) batch, the message). The labels are all valid before the edit.
KERNEL_FOUND = {
    "label = C": (lambda t, y: y.__setitem__(4, 50), label_error(4, 50, 50, IGNORE)),
    "label 100": (lambda t, y: y.__setitem__(2, 100), label_error(2, 100, 50, IGNORE)),
    "label -1": (lambda t, y: y.__setitem__(0, -1), label_error(0, -1, 50, IGNORE)),
    "label -101": (lambda t, y: y.__setitem__(5, -101), label_error(5, -101, 50, IGNORE)),
    "NaN teacher": (lambda t, y: t.__setitem__((2, 5), math.nan), teacher_row_error(2, all_masked=False)),
    "+inf teacher": (lambda t, y: t.__setitem__((3, 0), math.inf), teacher_row_error(3, all_masked=False)),
    "teacher -inf everywhere": (lambda t, y: t.__setitem__(1, -math.inf), teacher_row_error(1, all_masked=True)),
}


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
@pytest.mark.parametrize("edit, message", KERNEL_FOUND.values(), ids=KERNEL_FOUND.keys())
def test_kernel_found_value_errors_have_one_message(backend_device, edit, message):
    # The same text on every backend: each is compared with the one message of dho_fast.ops.validation.
    backend, device = backend_device
    ce, kd, teacher, labels = make_inputs(6, 50, labelled="all", device=device)
    edit(teacher, labels)
    with pytest.raises(ValueError) as info:
        call(backend, ce, kd, teacher, labels)
    assert type(info.value) is ValueError
    assert str(info.value) == message


@pytest.mark.parametrize("backend_device", LINEAR_BACKENDS)
@pytest.mark.parametrize("edit, message", KERNEL_FOUND.values(), ids=KERNEL_FOUND.keys())
def test_linear_op_reports_value_errors_with_their_batch_row(backend_device, edit, message):
    # Chunks of 4 rows: the row in the message is the batch's, not the chunk's.
    backend, device = backend_device
    _, _, teacher, labels = make_inputs(6, 50, labelled="all", device=device)
    features, ce_weight, kd_weight = (torch.randn(*shape, device=device) for shape in ((6, 4), (50, 4), (50, 4)))
    edit(teacher, labels)
    with pytest.raises(ValueError) as info:
        dho_fast.fused_linear_dual_head_loss(features, ce_weight, None, kd_weight, None, teacher, labels,
                                             chunk_size=4, backend=backend)  # fmt: skip
    assert type(info.value) is ValueError
    assert str(info.value) == message


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
def test_custom_ignore_index(backend_device):
    backend, device = backend_device
    ce, kd, teacher, labels = make_inputs(4, 5, labelled="all", device=device)
    labels[1] = -1
    assert torch.isfinite(call(backend, ce, kd, teacher, labels, ignore_index=-1))
    with pytest.raises(ValueError) as info:
        call(backend, ce, kd, teacher, labels)
    assert str(info.value) == label_error(1, -1, 5, IGNORE)


def test_cpu_backend_rejects_other_devices():
    meta = [t.to("meta") for t in make_inputs(4, 5, labelled="all")]
    with pytest.raises(ValueError, match="backend='cpu' of dual_head_loss needs CPU tensors, got tensors on meta"):
        call("cpu", *meta)


def test_compiled_op_checks_its_own_inputs():
    # Direct callers of torch.ops.dho_fast.* bypass the Python checks; the kernel must still refuse bad input, with
    # the types of the Python checks.
    ce, kd, teacher, labels = make_inputs(4, 5, labelled="all")
    scalars = (2.0, 0.5, 0.5, True, IGNORE, 0.0, False, False)
    with pytest.raises(ValueError, match="kd_logits"):
        torch.ops.dho_fast.dual_head_loss(ce, kd[:, :3], teacher, labels, *scalars)
    with pytest.raises(ValueError, match="temperature"):
        torch.ops.dho_fast.dual_head_loss(ce, kd, teacher, labels, 0.0, *scalars[1:])
    with pytest.raises(TypeError, match="kd_logits"):
        torch.ops.dho_fast.dual_head_loss(ce, kd.double(), teacher, labels, *scalars)


def chunk_args(device, start=3, rows=6):
    ce, kd, teacher, labels = make_inputs(13, 9, labelled="mixed", device=device)
    labelled = labels[start : start + rows] != IGNORE
    ce_chunk, kd_chunk = ce[start : start + rows][labelled].contiguous(), kd[start : start + rows].clone()
    num_labelled = int((labels != IGNORE).sum())
    return [ce_chunk, kd_chunk, teacher, labels, start, num_labelled, 2.0, True, IGNORE, 0.1, True, True]


@pytest.mark.parametrize("backend_device", CHUNK_BACKENDS)
def test_chunk_op_rejects_ce_rows_that_do_not_match_the_labels(backend_device):
    backend, device = backend_device
    args = chunk_args(device)
    args[0] = torch.cat([args[0], args[0].new_zeros(1, 9)])  # one row more than the chunk's labelled rows
    with pytest.raises(ValueError, match="ce_logits must have one row per labelled row"):
        getattr(torch.ops.dho_fast, CHUNK_OPS[backend])(*args)


@pytest.mark.parametrize("backend_device", CHUNK_BACKENDS)
@pytest.mark.parametrize("name", ["ce_bias", "kd_bias"])
def test_chunk_op_rejects_a_bias_of_the_wrong_shape(backend_device, name):
    backend, device = backend_device
    biases = {"ce_bias": torch.zeros(9, device=device), "kd_bias": torch.zeros(9, device=device)}
    biases[name] = torch.zeros(8, device=device)
    with pytest.raises(ValueError, match=f"{name} must .*\\(9,\\)"):
        getattr(torch.ops.dho_fast, CHUNK_OPS[backend])(*chunk_args(device), **biases)


@pytest.mark.parametrize("backend_device", CHUNK_BACKENDS)
@pytest.mark.parametrize(
    "dtype, grad_out, error, match",
    [
        # Half logits cannot hold their float32 gradient in place. (The compiled kernels spell dtypes as ATen does.)
        (torch.bfloat16, None, TypeError, "ce_grad_out must be given for (torch.bfloat16|BFloat16) ce_logits"),
        (torch.float16, torch.empty_like, TypeError, "ce_grad_out must be (torch.float32|Float).*(float16|Half)"),
        (torch.float64, lambda z: z.float(), TypeError, "ce_grad_out must be (torch.float64|Double)"),
        (torch.float16, lambda z: z.new_empty((z.shape[0] + 1, 9), dtype=torch.float32), ValueError,
         "ce_grad_out must be contiguous, of the shape of ce_logits"),
    ],
)  # fmt: skip
def test_chunk_op_rejects_a_bad_gradient_buffer(backend_device, dtype, grad_out, error, match):
    backend, device = backend_device
    args = chunk_args(device)
    args[:3] = [x.to(dtype) for x in args[:3]]
    kwargs = {}
    if grad_out is not None:
        kwargs = dict(ce_grad_out=grad_out(args[0]), kd_grad_out=torch.empty_like(args[1], dtype=torch.float32))
        if dtype == torch.float64:
            kwargs["kd_grad_out"] = torch.empty_like(args[1])
    with pytest.raises(error, match=match) as info:
        getattr(torch.ops.dho_fast, CHUNK_OPS[backend])(*args, **kwargs)
    assert type(info.value) is error


@pytest.mark.parametrize("backend_device", CHUNK_BACKENDS)
def test_chunk_op_reports_value_errors_with_their_batch_row(backend_device):
    backend, device = backend_device
    args = chunk_args(device, start=3, rows=6)
    args[3][7] = 9
    with pytest.raises(ValueError) as info:
        getattr(torch.ops.dho_fast, CHUNK_OPS[backend])(*args)
    assert str(info.value) == label_error(7, 9, 9, IGNORE)


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
@pytest.mark.parametrize("head", ["ce", "kd"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_student_non_finite_logits_propagate(backend_device, head, value):
    # Not an error: mixed-precision loss scaling (GradScaler) looks for inf/NaN in the gradients to skip the step.
    # C = 40 puts the bad logit inside a vector of the CPU kernel's exp, which maps NaN to a finite value.
    backend, device = backend_device
    ce, kd, teacher, labels = make_inputs(3, 40, labelled="all", device=device)
    (ce if head == "ce" else kd)[1, 20] = value
    ce.requires_grad_()
    kd.requires_grad_()
    loss = call(backend, ce, kd, teacher, labels)
    loss.backward()
    assert torch.isnan(loss)
    grad = ce.grad if head == "ce" else kd.grad
    assert not grad[1].isfinite().any()
    assert grad[[0, 2]].isfinite().all()


def linear_inputs(device="cpu"):
    _, _, teacher, labels = make_inputs(6, 5, labelled="all", device=device)
    params = [torch.randn(6, 4), torch.randn(5, 4), torch.randn(5), torch.randn(5, 4), torch.randn(5)]
    return [p.to(device) for p in params] + [teacher, labels]


@pytest.mark.parametrize("backend_device", LINEAR_BACKENDS)
@pytest.mark.parametrize(
    "position, bad, error, name",
    [
        (0, lambda d: torch.randn(6, device=d), ValueError, "features"),
        (0, lambda d: torch.randint(0, 3, (6, 4), device=d), TypeError, "features"),
        (1, lambda d: torch.randn(5, 3, device=d), ValueError, "ce_weight"),
        (2, lambda d: torch.randn(4, device=d), ValueError, "ce_bias"),
        (3, lambda d: torch.randn(5, 4, dtype=torch.float64, device=d), TypeError, "kd_weight"),
        (3, lambda d: torch.randn(5, 4, device="meta"), ValueError, "kd_weight"),
        (4, lambda d: torch.randn(5, 1, device=d), ValueError, "kd_bias"),
        (5, lambda d: torch.randn(6, 4, device=d), ValueError, "teacher_logits"),
        (6, lambda d: torch.zeros(6, dtype=torch.int32, device=d), TypeError, "labels"),
    ],
)
def test_linear_op_malformed_tensor(backend_device, position, bad, error, name):
    backend, device = backend_device
    args = linear_inputs(device)
    args[position] = bad(device)
    with pytest.raises(error, match=name) as info:
        dho_fast.fused_linear_dual_head_loss(*args, backend=backend)
    assert type(info.value) is error


@pytest.mark.parametrize("backend_device", LINEAR_BACKENDS)
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=2.5), "chunk_size"),
        (dict(chunk_size=True), "chunk_size"),
        (dict(kd_logit_scale=0.0), "kd_logit_scale"),
        (dict(ce_loss_weight=-1.0), "ce_loss_weight"),
        (dict(temperature=0.0), "temperature"),
        (dict(kd_reduction="sum"), "kd_reduction"),
        (dict(label_smoothing=2.0), "label_smoothing"),
    ],
)
def test_linear_op_bad_scalar_argument(backend_device, kwargs, name):
    backend, device = backend_device
    with pytest.raises(ValueError, match=name) as info:
        dho_fast.fused_linear_dual_head_loss(*linear_inputs(device), backend=backend, **kwargs)
    assert type(info.value) is ValueError


def blend_call(function, backend, device, ce=None, kd=None, labels=None, **kwargs):
    ce = torch.randn(3, 4, device=device) if ce is None else ce
    kd = torch.randn(3, 4, device=device) if kd is None else kd
    if function == "predict":
        kwargs.setdefault("alpha", 0.5)
        kwargs.setdefault("beta", 1.0)
        return dho_fast.dual_head_predict(ce, kd, backend=backend, **kwargs)
    labels = torch.tensor([0, 1, 3], device=device) if labels is None else labels
    return dho_fast.search_alpha_beta(ce, kd, labels, backend=backend, **kwargs)


@pytest.mark.parametrize("backend_device", BLEND_BACKENDS)
@pytest.mark.parametrize(
    "function, args, error, name",
    [
        ("predict", lambda d: dict(kd=torch.randn(3, 5, device=d)), ValueError, "kd_logits"),
        ("predict", lambda d: dict(ce=torch.randn(3, device=d)), ValueError, "ce_logits"),
        ("predict", lambda d: dict(ce=torch.ones(3, 4, dtype=torch.int64, device=d)), TypeError, "ce_logits"),
        ("predict", lambda d: dict(kd=torch.ones(3, 4, dtype=torch.int64, device=d)), TypeError, "kd_logits"),
        ("predict", lambda d: dict(kd=torch.randn(3, 4, device="meta")), ValueError, "kd_logits"),
        ("predict", lambda d: dict(alpha=1.5), ValueError, "alpha"),
        ("predict", lambda d: dict(beta=0.0), ValueError, "beta"),
        ("search", lambda d: dict(labels=torch.tensor([0, 1, 4], device=d)), ValueError, "labels"),
        ("search", lambda d: dict(labels=torch.tensor([0, 1, -1], device=d)), ValueError, "labels"),
        ("search", lambda d: dict(labels=torch.tensor([0, 1, 2], dtype=torch.int32, device=d)), TypeError, "labels"),
        ("search", lambda d: dict(labels=torch.tensor([0, 1], device=d)), ValueError, "labels"),
        ("search", lambda d: dict(ce=torch.randn(0, 4, device=d), kd=torch.randn(0, 4, device=d),
                                  labels=torch.zeros(0, dtype=torch.int64, device=d)), ValueError, "ce_logits"),
        ("search", lambda d: dict(alphas=[1.5]), ValueError, "alphas"),
        ("search", lambda d: dict(betas=[0.0]), ValueError, "betas"),
        ("search", lambda d: dict(alphas=[]), ValueError, "alphas"),
    ],
)  # fmt: skip
def test_blend_bad_arguments(backend_device, function, args, error, name):
    backend, device = backend_device
    with pytest.raises(error, match=name) as info, torch.no_grad():
        blend_call(function, backend, device, **args(device))
    assert type(info.value) is error
