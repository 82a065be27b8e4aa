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
from dho_fast.ops.validation import (
    TEACHER_ALL_MASKED,
    TEACHER_NON_FINITE,
    TEACHER_OVERFLOW,
    label_error,
    teacher_row_error,
)

LOSS_BACKENDS = backend_params("cpu", "reference", "triton", "cuda", "triton-cuda")
LINEAR_BACKENDS = backend_params("cpu", "reference", "cuda", "triton-cuda")
CHUNK_BACKENDS = backend_params("cpu", "triton", "cuda", "triton-cuda")
BLEND_BACKENDS = backend_params("reference", "triton", "triton-cuda")
CHUNK_OPS = {"cpu": "dual_head_loss_chunk", "cuda": "dual_head_loss_chunk", "triton": "dual_head_loss_chunk_triton"}


def call(backend, ce, kd, teacher, labels, **kwargs):
    return dho_fast.fused_dual_head_loss(ce, kd, teacher, labels, backend=backend, **kwargs)


def linear_inputs(device="cpu"):
    _, _, teacher, labels = make_inputs(6, 5, labelled="all", device=device)
    params = [torch.randn(6, 4), torch.randn(5, 4), torch.randn(5), torch.randn(5, 4), torch.randn(5)]
    return [p.to(device) for p in params] + [teacher, labels]


def loss_with(position=None, bad=None, **kwargs):
    """A call of fused_dual_head_loss on a valid (4, 5) batch with argument ``position`` replaced by ``bad(device)``
    and ``kwargs`` added."""

    def run(backend, device):
        args = list(make_inputs(4, 5, labelled="all", device=device))
        if position is not None:
            args[position] = bad(device)
        call(backend, *args, **kwargs)

    return run


def linear_with(position=None, bad=None, **kwargs):
    def run(backend, device):
        args = linear_inputs(device)
        if position is not None:
            args[position] = bad(device)
        dho_fast.fused_linear_dual_head_loss(*args, backend=backend, **kwargs)

    return run


def blend_with(function, **edits):
    """dual_head_predict or search_alpha_beta on valid (3, 4) logits, with arguments replaced by ``edits``: values,
    or functions of the device that make them."""

    def run(backend, device):
        args = dict(ce=torch.randn(3, 4, device=device), kd=torch.randn(3, 4, device=device))
        if function == "predict":
            args.update(alpha=0.5, beta=1.0)
        else:
            args.update(labels=torch.tensor([0, 1, 3], device=device))
        args.update({k: v(device) if callable(v) else v for k, v in edits.items()})
        ce, kd = args.pop("ce"), args.pop("kd")
        with torch.no_grad():
            if function == "predict":
                dho_fast.dual_head_predict(ce, kd, backend=backend, **args)
            else:
                dho_fast.search_alpha_beta(ce, kd, args.pop("labels"), backend=backend, **args)

    return run


def randn(*shape, device=None, dtype=torch.float32):
    return lambda d: torch.randn(*shape, device=device or d, dtype=dtype)


# The one table of bad arguments to the public ops: (ops, call, exception type, words its message must contain).
# Each case runs on every backend of its ops; the exception's type must be exactly the one given.
BAD_INPUTS = {
    # fused_dual_head_loss: tensors
    "ce_logits 1-d": ("loss", loss_with(0, randn(4)), ValueError, ["ce_logits", "(N, C)"]),
    "ce_logits no classes": ("loss", loss_with(0, randn(4, 0)), ValueError, ["ce_logits", "C >= 1"]),
    "ce_logits int": ("loss", loss_with(0, lambda d: torch.randint(0, 3, (4, 5), device=d)), TypeError,
                      ["ce_logits", "int64"]),
    "ce_logits list": ("loss", loss_with(0, lambda d: [[0.0] * 5] * 4), TypeError, ["ce_logits", "tensor", "list"]),
    "kd_logits shape": ("loss", loss_with(1, randn(4, 6)), ValueError, ["kd_logits", "(4, 5)"]),
    "kd_logits dtype": ("loss", loss_with(1, randn(4, 5, dtype=torch.float64)), TypeError, ["kd_logits", "float64"]),
    "kd_logits None": ("loss", loss_with(1, lambda d: None), TypeError, ["kd_logits", "NoneType"]),
    "teacher rows": ("loss", loss_with(2, randn(3, 5)), ValueError, ["teacher_logits", "(3, 5)"]),
    "teacher half": ("loss", loss_with(2, lambda d: torch.randn(4, 5, device=d).half()), TypeError,
                     ["teacher_logits", "float16"]),
    "teacher device": ("loss", loss_with(2, randn(4, 5, device="meta")), ValueError, ["teacher_logits", "meta"]),
    "labels int32": ("loss", loss_with(3, lambda d: torch.zeros(4, dtype=torch.int32, device=d)), TypeError,
                     ["labels", "int64", "int32"]),
    "labels 2-d": ("loss", loss_with(3, lambda d: torch.zeros(4, 1, dtype=torch.int64, device=d)), ValueError,
                   ["labels", "(4,)"]),
    "labels rows": ("loss", loss_with(3, lambda d: torch.zeros(5, dtype=torch.int64, device=d)), ValueError,
                    ["labels", "(5,)"]),
    "labels float": ("loss", loss_with(3, lambda d: torch.zeros(4, device=d)), TypeError, ["labels", "float32"]),
    "labels list": ("loss", loss_with(3, lambda d: [0, 1, 2, 3]), TypeError, ["labels", "list"]),
    # fused_dual_head_loss: scalars
    "temperature 0": ("loss", loss_with(temperature=0.0), ValueError, ["temperature", "> 0", "0.0"]),
    "temperature < 0": ("loss", loss_with(temperature=-1.0), ValueError, ["temperature", "-1.0"]),
    "temperature nan": ("loss", loss_with(temperature=math.nan), ValueError, ["temperature", "finite", "nan"]),
    "temperature inf": ("loss", loss_with(temperature=math.inf), ValueError, ["temperature", "finite", "inf"]),
    "temperature str": ("loss", loss_with(temperature="2.0"), TypeError, ["temperature", "real number", "str"]),
    "temperature None": ("loss", loss_with(temperature=None), TypeError, ["temperature", "NoneType"]),
    "temperature tensor": ("loss", loss_with(temperature=torch.tensor(2.0)), TypeError, ["temperature", "Tensor"]),
    "ce_loss_weight < 0": ("loss", loss_with(ce_loss_weight=-0.1), ValueError, ["ce_loss_weight", ">= 0"]),
    "ce_loss_weight bool": ("loss", loss_with(ce_loss_weight=True), TypeError, ["ce_loss_weight", "bool"]),
    "kd_loss_weight < 0": ("loss", loss_with(kd_loss_weight=-1.0), ValueError, ["kd_loss_weight", "-1.0"]),
    "kd_loss_weight nan": ("loss", loss_with(kd_loss_weight=math.nan), ValueError, ["kd_loss_weight", "nan"]),
    "kd_loss_weight inf": ("loss", loss_with(kd_loss_weight=math.inf), ValueError, ["kd_loss_weight", "inf"]),
    "kd_reduction": ("loss", loss_with(kd_reduction="sum"), ValueError, ["kd_reduction", "'sum'", "split"]),
    "label_smoothing > 1": ("loss", loss_with(label_smoothing=1.5), ValueError, ["label_smoothing", "[0, 1]"]),
    "label_smoothing < 0": ("loss", loss_with(label_smoothing=-0.1), ValueError, ["label_smoothing", "-0.1"]),
    "label_smoothing nan": ("loss", loss_with(label_smoothing=math.nan), ValueError, ["label_smoothing", "nan"]),
    "ignore_index float": ("loss", loss_with(ignore_index=1.5), TypeError, ["ignore_index", "int", "1.5"]),
    "ignore_index str": ("loss", loss_with(ignore_index="-100"), TypeError, ["ignore_index", "str"]),
    "ignore_index huge": ("loss", loss_with(ignore_index=2**70), ValueError, ["ignore_index", "int64"]),
    # fused_linear_dual_head_loss
    "features 1-d": ("linear", linear_with(0, randn(6)), ValueError, ["features", "(N, D)"]),
    "features int": ("linear", linear_with(0, lambda d: torch.randint(0, 3, (6, 4), device=d)), TypeError,
                     ["features", "int64"]),
    "features list": ("linear", linear_with(0, lambda d: [[0.0] * 4] * 6), TypeError, ["features", "list"]),
    "ce_weight width": ("linear", linear_with(1, randn(5, 3)), ValueError, ["ce_weight", "(5, 4)"]),
    "ce_bias shape": ("linear", linear_with(2, randn(4)), ValueError, ["ce_bias", "(5,)"]),
    "kd_weight dtype": ("linear", linear_with(3, randn(5, 4, dtype=torch.float64)), TypeError,
                        ["kd_weight", "float64"]),
    "kd_weight device": ("linear", linear_with(3, randn(5, 4, device="meta")), ValueError, ["kd_weight", "meta"]),
    "kd_bias 2-d": ("linear", linear_with(4, randn(5, 1)), ValueError, ["kd_bias", "(5,)"]),
    "linear teacher": ("linear", linear_with(5, randn(6, 4)), ValueError, ["teacher_logits", "(6, 5)"]),
    "linear labels": ("linear", linear_with(6, lambda d: torch.zeros(6, dtype=torch.int32, device=d)), TypeError,
                      ["labels", "int32"]),
    "chunk_size 0": ("linear", linear_with(chunk_size=0), ValueError, ["chunk_size", ">= 1"]),
    "chunk_size float": ("linear", linear_with(chunk_size=2.5), TypeError, ["chunk_size", "int", "2.5"]),
    "chunk_size bool": ("linear", linear_with(chunk_size=True), TypeError, ["chunk_size", "bool"]),
    "kd_logit_scale 0": ("linear", linear_with(kd_logit_scale=0.0), ValueError, ["kd_logit_scale", "> 0"]),
    "kd_logit_scale inf": ("linear", linear_with(kd_logit_scale=math.inf), ValueError, ["kd_logit_scale", "inf"]),
    "kd_logit_scale str": ("linear", linear_with(kd_logit_scale="100"), TypeError, ["kd_logit_scale", "str"]),
    "linear ce_loss_weight": ("linear", linear_with(ce_loss_weight=-1.0), ValueError, ["ce_loss_weight"]),
    "linear temperature": ("linear", linear_with(temperature=math.inf), ValueError, ["temperature", "inf"]),
    "linear ignore_index": ("linear", linear_with(ignore_index=0.5), TypeError, ["ignore_index", "0.5"]),
    "linear kd_reduction": ("linear", linear_with(kd_reduction="sum"), ValueError, ["kd_reduction"]),
    "linear label_smoothing": ("linear", linear_with(label_smoothing=2.0), ValueError, ["label_smoothing", "2.0"]),
    # dual_head_predict and search_alpha_beta
    "predict kd shape": ("blend", blend_with("predict", kd=randn(3, 5)), ValueError, ["kd_logits", "(3, 4)"]),
    "predict ce 1-d": ("blend", blend_with("predict", ce=randn(3)), ValueError, ["ce_logits", "(N, C)"]),
    "predict ce int": ("blend", blend_with("predict", ce=lambda d: torch.ones(3, 4, dtype=torch.int64, device=d)),
                       TypeError, ["ce_logits", "float", "int64"]),
    "predict kd int": ("blend", blend_with("predict", kd=lambda d: torch.ones(3, 4, dtype=torch.int64, device=d)),
                       TypeError, ["kd_logits", "int64"]),
    "predict kd bool": ("blend", blend_with("predict", kd=lambda d: torch.ones(3, 4, dtype=torch.bool, device=d)),
                        TypeError, ["kd_logits", "bool"]),
    "predict ce list": ("blend", blend_with("predict", ce=lambda d: [[0.0] * 4] * 3), TypeError,
                        ["ce_logits", "list"]),
    "predict kd ndarray": ("blend", blend_with("predict", kd=lambda d: torch.randn(3, 4).numpy()), TypeError,
                           ["kd_logits", "ndarray"]),
    "predict kd device": ("blend", blend_with("predict", kd=randn(3, 4, device="meta")), ValueError,
                          ["kd_logits", "meta"]),
    "predict alpha > 1": ("blend", blend_with("predict", alpha=1.5), ValueError, ["alpha", "[0, 1]", "1.5"]),
    "predict alpha nan": ("blend", blend_with("predict", alpha=math.nan), ValueError, ["alpha", "nan"]),
    "predict beta 0": ("blend", blend_with("predict", beta=0.0), ValueError, ["beta", "> 0"]),
    "predict beta inf": ("blend", blend_with("predict", beta=math.inf), ValueError, ["beta", "inf"]),
    "predict beta str": ("blend", blend_with("predict", beta="1"), TypeError, ["beta", "str"]),
    "search label = C": ("blend", blend_with("search", labels=lambda d: torch.tensor([0, 1, 4], device=d)),
                         ValueError, ["labels", "[0, 4)"]),
    "search label -1": ("blend", blend_with("search", labels=lambda d: torch.tensor([0, 1, -1], device=d)),
                        ValueError, ["labels"]),
    "search labels int32": ("blend", blend_with("search", labels=lambda d: torch.tensor([0, 1, 2], dtype=torch.int32,
                                                                                         device=d)),
                            TypeError, ["labels", "int32"]),
    "search labels rows": ("blend", blend_with("search", labels=lambda d: torch.tensor([0, 1], device=d)),
                           ValueError, ["labels", "(3,)"]),
    "search labels list": ("blend", blend_with("search", labels=[0, 1, 2]), TypeError, ["labels", "list"]),
    "search no rows": ("blend", blend_with("search", ce=randn(0, 4), kd=randn(0, 4),
                                           labels=lambda d: torch.zeros(0, dtype=torch.int64, device=d)),
                       ValueError, ["ce_logits", "at least one row"]),
    "search meta": ("blend", blend_with("search", ce=randn(3, 4, device="meta"), kd=randn(3, 4, device="meta"),
                                        labels=lambda d: torch.zeros(3, dtype=torch.int64, device="meta")),
                    ValueError, ["meta"]),
    "search alphas > 1": ("blend", blend_with("search", alphas=[1.5]), ValueError, ["alphas", "1.5"]),
    "search betas 0": ("blend", blend_with("search", betas=[0.0]), ValueError, ["betas", "> 0"]),
    "search betas inf": ("blend", blend_with("search", betas=[1.0, math.inf]), ValueError, ["betas", "inf"]),
    "search alphas empty": ("blend", blend_with("search", alphas=[]), ValueError, ["alphas", "non-empty"]),
    "search alphas number": ("blend", blend_with("search", alphas=0.5), TypeError, ["alphas", "sequence"]),
}  # fmt: skip
_BACKENDS_OF = {"loss": LOSS_BACKENDS, "linear": LINEAR_BACKENDS, "blend": BLEND_BACKENDS}


def _bad_input_params() -> list:
    params = []
    for name, (ops, run, error, words) in BAD_INPUTS.items():
        for backend in _BACKENDS_OF[ops]:
            params.append(pytest.param(run, error, words, backend.values[0], id=f"{name}-{backend.id}",
                                       marks=backend.marks))  # fmt: skip
    return params


@pytest.mark.parametrize("run, error, words, backend_device", _bad_input_params())
def test_bad_input(run, error, words, backend_device):
    backend, device = backend_device
    with pytest.raises(error) as info:
        run(backend, device)
    assert type(info.value) is error
    for word in words:
        assert word in str(info.value), f"{word!r} not in the message {str(info.value)!r}"


def test_dual_head_rejects_a_non_finite_logit_scale():
    with pytest.raises(ValueError, match="kd_logit_scale must be a finite number > 0, got inf"):
        dho_fast.DualHead(4, 3, kd_logit_scale=math.inf)


@pytest.mark.parametrize("op", ["loss", "linear"])
def test_meta_tensors_give_meta_results_through_the_public_api(op):
    # Shape inference (e.g. a model built on the meta device) goes through the compiled ops' fake implementations.
    meta = [t.to("meta") for t in (make_inputs(6, 5, labelled="mixed") if op == "loss" else linear_inputs())]
    trained = meta[:2] if op == "loss" else meta[:5]  # the logits, or the features and both heads' parameters
    for t in trained:
        t.requires_grad_()
    run = dho_fast.fused_dual_head_loss if op == "loss" else dho_fast.fused_linear_dual_head_loss
    for backend in ("auto", "cpu"):
        loss, ce_term, kd_term = run(*meta, backend=backend, return_terms=True)
        assert loss.device.type == "meta" and loss.shape == () and loss.dtype == torch.float32
        loss.backward()
        assert all(t.grad.shape == t.shape and t.grad.is_meta for t in trained)


def test_reference_backend_refuses_meta_tensors_clearly():
    meta = [t.to("meta") for t in make_inputs(4, 5, labelled="all")]
    with pytest.raises(ValueError, match="backend='reference' of dual_head_loss reads the tensors' values"):
        call("reference", *meta)
    probabilities = dho_fast.dual_head_predict(meta[0], meta[1], 0.5, 1.0)
    assert probabilities.device.type == "meta" and probabilities.shape == (4, 5)


# (edit of (teacher, labels) of a (6, 50) batch, the message). The labels are all valid before the edit; the loss is
# called at KERNEL_FOUND_TEMPERATURE.
KERNEL_FOUND_TEMPERATURE = 0.5
KERNEL_FOUND = {
    "label = C": (lambda t, y: y.__setitem__(4, 50), label_error(4, 50, 50, IGNORE)),
    "label 100": (lambda t, y: y.__setitem__(2, 100), label_error(2, 100, 50, IGNORE)),
    "label -1": (lambda t, y: y.__setitem__(0, -1), label_error(0, -1, 50, IGNORE)),
    "label -101": (lambda t, y: y.__setitem__(5, -101), label_error(5, -101, 50, IGNORE)),
    "NaN teacher": (lambda t, y: t.__setitem__((2, 5), math.nan), teacher_row_error(2, TEACHER_NON_FINITE)),
    "+inf teacher": (lambda t, y: t.__setitem__((3, 0), math.inf), teacher_row_error(3, TEACHER_NON_FINITE)),
    "teacher -inf everywhere": (lambda t, y: t.__setitem__(1, -math.inf), teacher_row_error(1, TEACHER_ALL_MASKED)),
    # Finite, but teacher / T overflows at the temperature of 0.5 the tests call with: not "contains +inf".
    "teacher / T overflows": (lambda t, y: t.__setitem__((4, 7), 3e38), teacher_row_error(4, TEACHER_OVERFLOW)),
    # An overflowing row before a NaN one: the first invalid row is reported, whatever its kind.
    "overflowing row before a NaN row": (
        lambda t, y: (t.__setitem__((1, 0), math.nan), t.__setitem__((0, 3), 2e38)),
        teacher_row_error(0, TEACHER_OVERFLOW),
    ),
}


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
@pytest.mark.parametrize("edit, message", KERNEL_FOUND.values(), ids=KERNEL_FOUND.keys())
def test_kernel_found_value_errors_have_one_message(backend_device, edit, message):
    # The same text on every backend: each is compared with the one message of dho_fast.ops.validation.
    backend, device = backend_device
    ce, kd, teacher, labels = make_inputs(6, 50, labelled="all", device=device)
    edit(teacher, labels)
    with pytest.raises(ValueError) as info:
        call(backend, ce, kd, teacher, labels, temperature=KERNEL_FOUND_TEMPERATURE)
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
                                             chunk_size=4, temperature=KERNEL_FOUND_TEMPERATURE,
                                             backend=backend)  # fmt: skip
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


# Direct callers of the compiled ops: every float argument finite and in range, each error naming its argument.
NON_FINITE_SCALARS = [
    ("temperature", math.inf, "temperature must be finite and > 0, got inf"),
    ("temperature", math.nan, "temperature must be finite and > 0, got nan"),
    ("temperature", -2.0, "temperature must be finite and > 0, got -2"),
    ("ce_loss_weight", math.inf, "ce_loss_weight must be finite and >= 0, got inf"),
    ("kd_loss_weight", math.nan, "kd_loss_weight must be finite and >= 0, got nan"),
    ("label_smoothing", math.nan, "label_smoothing must be in [0, 1], got nan"),
    ("label_smoothing", math.inf, "label_smoothing must be in [0, 1], got inf"),
]
LOSS_OP_SCALARS = dict(temperature=2.0, ce_loss_weight=0.5, kd_loss_weight=0.5, kd_split=True, ignore_index=IGNORE,
                       label_smoothing=0.0, ce_grad=False, kd_grad=False)  # fmt: skip


@pytest.mark.parametrize("name, value, message", NON_FINITE_SCALARS)
def test_compiled_loss_op_rejects_non_finite_scalars(name, value, message):
    scalars = {**LOSS_OP_SCALARS, name: value}
    with pytest.raises(ValueError) as info:
        torch.ops.dho_fast.dual_head_loss(*make_inputs(4, 5, labelled="all"), *scalars.values())
    assert type(info.value) is ValueError
    assert message in str(info.value)


@pytest.mark.parametrize("name, value, message", [s for s in NON_FINITE_SCALARS if "weight" not in s[0]])
def test_compiled_chunk_op_rejects_non_finite_scalars(name, value, message):
    args = chunk_args("cpu")
    args[{"temperature": 6, "label_smoothing": 9}[name]] = value
    with pytest.raises(ValueError) as info:
        torch.ops.dho_fast.dual_head_loss_chunk(*args)
    assert type(info.value) is ValueError
    assert message in str(info.value)


@pytest.mark.parametrize("op", ["fused_linear_dual_head_loss", "fused_linear_dual_head_loss_with_grads"])
@pytest.mark.parametrize(
    "name, value, message",
    [
        *NON_FINITE_SCALARS,
        ("kd_logit_scale", math.inf, "kd_logit_scale must be finite and > 0, got inf"),
        ("kd_logit_scale", math.nan, "kd_logit_scale must be finite and > 0, got nan"),
        ("kd_logit_scale", 0.0, "kd_logit_scale must be finite and > 0, got 0"),
    ],
)
def test_compiled_linear_ops_reject_non_finite_scalars(op, name, value, message):
    scalars = dict(kd_cosine=False, kd_logit_scale=1.0, chunk_size=4, temperature=2.0, ce_loss_weight=0.5,
                   kd_loss_weight=0.5, kd_split=True, ignore_index=IGNORE, label_smoothing=0.0)  # fmt: skip
    scalars[name] = value
    grads = (True, True, True) if op.endswith("with_grads") else ()
    with pytest.raises(ValueError) as info:
        getattr(torch.ops.dho_fast, op)(*linear_inputs(), *scalars.values(), *grads)
    assert type(info.value) is ValueError
    assert message in str(info.value)


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


@pytest.mark.parametrize("backend_device", CHUNK_BACKENDS)
def test_chunk_op_reports_an_overflowing_teacher_with_its_batch_row(backend_device):
    backend, device = backend_device
    args = chunk_args(device, start=3, rows=6)
    args[2][5, 4] = 3e38
    args[6] = 0.5  # temperature: 3e38 / 0.5 overflows float32
    with pytest.raises(ValueError) as info:
        getattr(torch.ops.dho_fast, CHUNK_OPS[backend])(*args)
    assert str(info.value) == teacher_row_error(5, TEACHER_OVERFLOW)


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
