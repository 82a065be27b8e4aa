"""fused_linear_dual_head_loss and its per-chunk op against eager linear layers + the reference loss."""

import pytest
import torch
import torch.nn.functional as F
from helpers import IGNORE, LOSS_TOLERANCES, TOLERANCES, make_inputs

import dho_fast
from dho_fast import reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
PARAM_NAMES = ("features", "ce_weight", "ce_bias", "kd_weight", "kd_bias")


def make_linear_inputs(n, d, c, dtype=torch.float32, *, labelled="mixed", bias=True):
    """Leaf tensors (features, ce_weight, ce_bias, kd_weight, kd_bias) requiring grad, then teacher and labels.
    The weights are scaled so the logits of unit-variance features have a spread of a few units."""
    _, _, teacher, labels = make_inputs(n, c, dtype, labelled=labelled)
    scale = 3.0 / d**0.5
    params = [
        torch.randn(n, d),
        torch.randn(c, d) * scale,
        torch.randn(c) if bias else None,
        torch.randn(c, d) * scale,
        torch.randn(c) if bias else None,
    ]
    params = [None if p is None else p.to(dtype).requires_grad_() for p in params]
    return params, teacher, labels


def eager_loss(features, ce_weight, ce_bias, kd_weight, kd_bias, teacher, labels, *, kd_cosine=False,
               kd_logit_scale=1.0, ce_loss_weight=0.5, kd_loss_weight=0.5, chunk_size=None, **loss_args):  # fmt: skip
    """The oracle: two eager linear layers and the reference loss, as (loss, ce_term, kd_term); no chunks."""
    ce_logits = F.linear(features, ce_weight, ce_bias)
    kd_features = F.normalize(features, dim=1) if kd_cosine else features
    kd_logits = kd_logit_scale * F.linear(kd_features, kd_weight, kd_bias)
    return reference.dual_head_loss(
        ce_logits, kd_logits, teacher, labels, ce_loss_weight=ce_loss_weight, kd_loss_weight=kd_loss_weight, **loss_args
    )


def fused_loss(*args, **kwargs):
    return dho_fast.fused_linear_dual_head_loss(*args, return_terms=True, backend="cpu", **kwargs)


def values_and_grads(fn, params, teacher, labels, output=0, **kwargs):
    """The three loss values and the gradients of output ``output`` w.r.t. the parameters (None where unused)."""
    values = fn(*params, teacher, labels, **kwargs)
    leaves = [p for p in params if p is not None]
    grads = iter(torch.autograd.grad(values[output], leaves, allow_unused=True))
    return [v.detach() for v in values], [None if p is None else next(grads) for p in params]


def assert_matches_eager(params, teacher, labels, dtype, output=0, **kwargs):
    """Values and parameter gradients of the fused op vs the eager oracle.

    fp32/fp64: elementwise against the oracle in the same dtype, by the tolerance tables. Half precision: logits
    rounded to the dtype give the oracle in that dtype errors of the fused op's size (its bf16 normalisation backward
    even larger), and elementwise tolerances fail on gradient entries that are sums of cancelling terms. So there both
    are measured against the oracle in float64 on the same rounded inputs, and the fused op's largest error may be
    twice eager PyTorch's (flash-attention's rule) plus the table's rtol times the largest reference entry (eager's
    error alone can be small by luck).
    """
    got_values, got_grads = values_and_grads(fused_loss, params, teacher, labels, output, **kwargs)
    eager_values, eager_grads = values_and_grads(eager_loss, params, teacher, labels, output, **kwargs)
    half = dtype not in (torch.float32, torch.float64)
    want_values, want_grads = eager_values, eager_grads
    if half:
        params64 = [None if p is None else p.detach().double().requires_grad_() for p in params]
        want_values, want_grads = values_and_grads(eager_loss, params64, teacher.double(), labels, output, **kwargs)

    def check(name, got, want, eager, table):
        if not half:
            torch.testing.assert_close(got, want, **table[dtype], msg=lambda m: f"{name}: {m}")
            return
        eager_error = float((eager.double() - want).abs().max())
        atol = 2 * eager_error + TOLERANCES[dtype]["rtol"] * float(want.abs().max())
        torch.testing.assert_close(got.double(), want, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")

    for name, g, w, e in zip(("loss", "ce_term", "kd_term"), got_values, want_values, eager_values, strict=True):
        check(name, g, w, e, LOSS_TOLERANCES)
    for name, g, w, e in zip(PARAM_NAMES, got_grads, want_grads, eager_grads, strict=True):
        if w is None:  # no such parameter, or one the differentiated output does not depend on
            assert g is None or not g.any(), name
            continue
        assert g.dtype == dtype, name
        check(f"grad {name}", g, w, e, TOLERANCES)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kd_cosine", [False, True], ids=["linear", "cosine"])
# "block": chunks whose labelled rows are consecutive, begin or end inside them, or are all or none of their rows
@pytest.mark.parametrize("labelled", ["all", "none", "mixed", "block"])
@pytest.mark.parametrize("chunk_size", [8, 7, None], ids=["divides", "remainder", "default"])
def test_matches_eager(dtype, kd_cosine, labelled, chunk_size):
    params, teacher, labels = make_linear_inputs(24, 16, 37, dtype, labelled=labelled)
    scale = 10.0 if kd_cosine else 1.0
    assert_matches_eager(
        params, teacher, labels, dtype, kd_cosine=kd_cosine, kd_logit_scale=scale, chunk_size=chunk_size
    )


@pytest.mark.parametrize("kd_cosine", [False, True], ids=["linear", "cosine"])
def test_many_classes_and_chunks(kd_cosine):
    # C spans several column blocks of the row kernel; N = 300 gives chunks of 128, 128 and 44 rows.
    params, teacher, labels = make_linear_inputs(300, 64, 1500)
    assert_matches_eager(params, teacher, labels, torch.float32, kd_cosine=kd_cosine, kd_logit_scale=5.0)


@pytest.mark.parametrize("kd_reduction", ["split", "mean"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_loss_options(kd_reduction, label_smoothing):
    params, teacher, labels = make_linear_inputs(19, 8, 11)
    kwargs = dict(temperature=4.0, ce_loss_weight=1.0, kd_loss_weight=0.3, kd_reduction=kd_reduction, chunk_size=5)
    assert_matches_eager(params, teacher, labels, torch.float32, label_smoothing=label_smoothing, **kwargs)


def test_custom_ignore_index_and_masked_teacher():
    params, _, _ = make_linear_inputs(12, 8, 9)
    _, _, teacher, labels = make_inputs(12, 9, labelled="mixed", masked_fraction=0.3)
    labels[labels == IGNORE] = -1
    assert_matches_eager(params, teacher, labels, torch.float32, ignore_index=-1, chunk_size=5)


def test_without_biases():
    params, teacher, labels = make_linear_inputs(10, 6, 7, bias=False)
    assert_matches_eager(params, teacher, labels, torch.float32, kd_cosine=True, chunk_size=3)


@pytest.mark.parametrize("output", [1, 2], ids=["ce_term", "kd_term"])
def test_gradient_of_each_term(output):
    params, teacher, labels = make_linear_inputs(15, 8, 9)
    assert_matches_eager(params, teacher, labels, torch.float32, output=output, kd_cosine=True, chunk_size=4)


@pytest.mark.parametrize("labelled", ["mixed", "block"])
@pytest.mark.parametrize("loss_weights", [(0.3, 1.7), (0.0, 1.0), (1.0, 0.0)], ids=str)
def test_loss_weights_and_any_combination_of_outputs(labelled, loss_weights):
    # The forward folds nonzero loss weights into the gradients it saves; the backward must undo that for gradients
    # that reach ce_term or kd_term directly, and scale by the incoming gradient when it is not 1.
    params, teacher, labels = make_linear_inputs(15, 8, 9, labelled=labelled)
    weights = dict(ce_loss_weight=loss_weights[0], kd_loss_weight=loss_weights[1], chunk_size=4)
    leaves = [p for p in params if p is not None]
    for combine in (
        lambda loss, ce, kd: 3.0 * loss,
        lambda loss, ce, kd: loss + 0.7 * ce - 0.4 * kd,
        lambda loss, ce, kd: 2.0 * ce,
        lambda loss, ce, kd: kd,
    ):
        unused_are_zero = dict(allow_unused=True, materialize_grads=True)
        got = torch.autograd.grad(combine(*fused_loss(*params, teacher, labels, **weights)), leaves, **unused_are_zero)
        want = torch.autograd.grad(combine(*eager_loss(*params, teacher, labels, **weights)), leaves, **unused_are_zero)
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


def test_gradients_only_where_required():
    params, teacher, labels = make_linear_inputs(9, 5, 6)
    features, ce_weight, ce_bias, kd_weight, kd_bias = params
    frozen_heads = [features] + [p.detach() for p in params[1:]]
    loss = dho_fast.fused_linear_dual_head_loss(*frozen_heads, teacher, labels, chunk_size=4)
    (got,) = torch.autograd.grad(loss, features)
    (want,) = torch.autograd.grad(eager_loss(*frozen_heads, teacher, labels)[0], features)
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])
    want = eager_loss(*params, teacher, labels)[0].detach()
    for mode in (torch.no_grad, torch.inference_mode):  # the autograd kernel without gradients, and no autograd
        with mode():
            loss = dho_fast.fused_linear_dual_head_loss(*params, teacher, labels, chunk_size=4)
        assert not loss.requires_grad
        torch.testing.assert_close(loss, want, **LOSS_TOLERANCES[torch.float32])


def test_backward_twice_through_a_retained_graph():
    # A single backward scales the saved gradients in place; with the graph retained they must stay intact.
    params, teacher, labels = make_linear_inputs(9, 5, 6)
    loss = dho_fast.fused_linear_dual_head_loss(*params, teacher, labels, kd_cosine=True, chunk_size=4)
    first = torch.autograd.grad(loss, params, retain_graph=True)
    second = torch.autograd.grad(2 * loss, params)
    want = torch.autograd.grad(eager_loss(*params, teacher, labels, kd_cosine=True)[0], params)
    torch.testing.assert_close(first, want, **TOLERANCES[torch.float32])
    torch.testing.assert_close(second, [2 * w for w in want], **TOLERANCES[torch.float32])


def test_reference_backend_is_eager():
    params, teacher, labels = make_linear_inputs(9, 5, 6)
    got = dho_fast.fused_linear_dual_head_loss(*params, teacher, labels, backend="reference", return_terms=True)
    torch.testing.assert_close(got, eager_loss(*params, teacher, labels), rtol=0, atol=0)


@pytest.mark.parametrize("kd_cosine", [False, True], ids=["linear", "cosine"])
def test_gradcheck_float64(kd_cosine):
    params, teacher, labels = make_linear_inputs(7, 4, 5, torch.float64)

    def fn(*p):
        return fused_loss(*p, teacher, labels, kd_cosine=kd_cosine, kd_logit_scale=3.0, chunk_size=3)

    assert torch.autograd.gradcheck(fn, params)


def linear_op_args(dtype=torch.float32, requires_grad=True):
    params, teacher, labels = make_linear_inputs(11, 6, 9, dtype)
    params = [p.detach().requires_grad_(requires_grad) for p in params]
    # kd_cosine, kd_logit_scale, chunk_size, temperature, loss weights, kd_split, ignore_index, label_smoothing
    return (*params, teacher, labels, True, 2.0, 4, 2.0, 0.5, 0.7, True, IGNORE, 0.1)


@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_linear_op(requires_grad, dtype):
    torch.library.opcheck(torch.ops.dho_fast.fused_linear_dual_head_loss.default, linear_op_args(dtype, requires_grad))


@pytest.mark.parametrize("grads", [(True, True, True), (False, True, False)])
def test_opcheck_linear_op_with_grads(grads):
    args = (*linear_op_args(requires_grad=False), *grads)
    torch.library.opcheck(torch.ops.dho_fast.fused_linear_dual_head_loss_with_grads.default, args)


def chunk_op_args(dtype=torch.float32, start=3, rows=6, grad=True):
    ce, kd, teacher, labels = make_inputs(13, 9, dtype, labelled="mixed")
    labelled = labels[start : start + rows] != IGNORE
    ce_chunk = ce[start : start + rows][labelled].contiguous()
    kd_chunk = kd[start : start + rows].clone()
    num_labelled = int((labels != IGNORE).sum())
    return (ce_chunk, kd_chunk, teacher, labels, start, num_labelled, 2.0, True, IGNORE, 0.1, grad, grad)


def chunk_biases(c, dtype=torch.float32):
    """Keyword arguments of the chunk op: both heads' biases and gradient scales."""
    ce_bias, kd_bias = torch.randn(c).to(dtype), torch.randn(c).to(dtype)
    return dict(ce_bias=ce_bias, kd_bias=kd_bias, ce_grad_scale=0.3, kd_grad_scale=2.5)


@pytest.mark.parametrize("biased", [False, True], ids=["plain", "biased"])
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_opcheck_chunk_op(grad, dtype, biased):
    kwargs = chunk_biases(9, dtype) if biased else {}
    torch.library.opcheck(
        torch.ops.dho_fast.dual_head_loss_chunk.default, chunk_op_args(dtype, grad=grad), kwargs=kwargs
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunk_op_adds_biases_and_scales_gradients(dtype):
    # With biases and gradient scales: the terms of the logits plus the biases, and the scaled gradients. The oracle
    # is the op without them in float64 on the same values (the kernel adds the bias in its float32 or float64).
    args = chunk_op_args(dtype)
    kwargs = chunk_biases(9, dtype)
    biased = [t.clone() for t in args[:2]]
    got = torch.ops.dho_fast.dual_head_loss_chunk(*biased, *args[2:], **kwargs)
    plus_bias = [t.double() + kwargs[name].double() for t, name in zip(args[:2], ("ce_bias", "kd_bias"), strict=True)]
    want = torch.ops.dho_fast.dual_head_loss_chunk(*plus_bias, args[2].double(), *args[3:])
    torch.testing.assert_close([t.double() for t in got], want, **LOSS_TOLERANCES[dtype])
    for g, w, scale in zip(biased, plus_bias, (kwargs["ce_grad_scale"], kwargs["kd_grad_scale"]), strict=True):
        torch.testing.assert_close(g, (w * scale).to(dtype), **TOLERANCES[dtype])


@pytest.mark.parametrize("name", ["ce_bias", "kd_bias"])
def test_chunk_op_rejects_a_bias_of_the_wrong_shape(name):
    kwargs = chunk_biases(9)
    kwargs[name] = torch.zeros(8)
    with pytest.raises(RuntimeError, match=f"{name} must have shape \\(9,\\)"):
        torch.ops.dho_fast.dual_head_loss_chunk(*chunk_op_args(), **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunk_op_sums_to_whole_batch_op(dtype):
    # The chunk op's contract, which every backend of it must keep: per-chunk terms sum to the batch's terms and
    # the logits are overwritten with exactly the batch op's gradient rows.
    ce, kd, teacher, labels = make_inputs(23, 600, dtype, labelled="mixed")
    batch = torch.ops.dho_fast.dual_head_loss(ce, kd, teacher, labels, 2.0, 0.5, 0.5, True, IGNORE, 0.1, True, True)
    labelled = labels != IGNORE
    ce_term = kd_term = 0.0
    for start in range(0, 23, 5):
        rows = slice(start, start + 5)
        ce_chunk, kd_chunk = ce[rows][labelled[rows]].contiguous(), kd[rows].clone()
        chunk_terms = torch.ops.dho_fast.dual_head_loss_chunk(
            ce_chunk, kd_chunk, teacher, labels, start, int(labelled.sum()), 2.0, True, IGNORE, 0.1, True, True
        )
        ce_term, kd_term = ce_term + chunk_terms[0], kd_term + chunk_terms[1]
        torch.testing.assert_close(ce_chunk, batch[3][rows][labelled[rows]], rtol=0, atol=0)
        torch.testing.assert_close(kd_chunk, batch[4][rows], rtol=0, atol=0)
    torch.testing.assert_close(ce_term, batch[1], **LOSS_TOLERANCES[dtype])
    torch.testing.assert_close(kd_term, batch[2], **LOSS_TOLERANCES[dtype])


def test_chunk_op_rejects_mismatched_ce_rows():
    args = list(chunk_op_args())
    args[0] = torch.cat([args[0], args[0].new_zeros(1, args[0].shape[1])])  # one row more than labelled rows
    with pytest.raises(RuntimeError, match="ce_logits must have one row per labelled row"):
        torch.ops.dho_fast.dual_head_loss_chunk(*args)


def call(params, teacher, labels, **kwargs):
    return dho_fast.fused_linear_dual_head_loss(*params, teacher, labels, **kwargs)


@pytest.mark.parametrize(
    "position, bad, name",
    [
        (0, torch.randn(6), "features"),
        (0, torch.randint(0, 3, (6, 4)), "features"),
        (1, torch.randn(5, 3), "ce_weight"),
        (2, torch.randn(4), "ce_bias"),
        (3, torch.randn(5, 4, dtype=torch.float64), "kd_weight"),
        (4, torch.randn(5, 1), "kd_bias"),
        (5, torch.randn(6, 4), "teacher_logits"),
        (6, torch.zeros(6, dtype=torch.int32), "labels"),
    ],
)
def test_malformed_tensor(position, bad, name):
    params, teacher, labels = make_linear_inputs(6, 4, 5)
    args = [*params, teacher, labels]
    args[position] = bad
    with pytest.raises(ValueError, match=name):
        call(args[:5], *args[5:])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=2.5), "chunk_size"),
        (dict(kd_logit_scale=0.0), "kd_logit_scale"),
        (dict(ce_loss_weight=-1.0), "ce_loss_weight"),
        (dict(temperature=0.0), "temperature"),
        (dict(kd_reduction="sum"), "kd_reduction"),
    ],
)
def test_malformed_scalar(kwargs, name):
    with pytest.raises(ValueError, match=name):
        call(*make_linear_inputs(6, 4, 5), **kwargs)


def test_bad_values_are_reported_with_their_batch_row():
    params, teacher, labels = make_linear_inputs(10, 4, 5, labelled="all")
    labels[7] = 5
    with pytest.raises(RuntimeError, match=r"labels\[7\]"):
        call(params, teacher, labels, chunk_size=3)
    labels[7] = 1
    teacher[8, 2] = float("nan")
    with pytest.raises(RuntimeError, match="teacher_logits row 8"):
        call(params, teacher, labels, chunk_size=3)
