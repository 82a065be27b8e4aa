"""fused_linear_dual_head_loss on every backend against eager linear layers and the float64 oracle loss.

Backends: "cpu" (the compiled chunked op), "reference" (eager PyTorch) and, where there is a GPU, "cuda" and
"triton-cuda" (the chunked op with Triton's chunk kernel, in a build without CUDA kernels). Tolerances are
tests/helpers.py's rules; a parameter gradient's magnitude is its logits' gradient magnitudes carried through the
GEMMs in absolute values (``|dZ|^T |X|`` and so on), the accuracy a GEMM of those terms can have.
"""

import pytest
import torch
from helpers import (
    DTYPES,
    GRAD_TOLERANCES,
    IGNORE,
    VALUE_TOLERANCES,
    as_float64,
    assert_grad_within,
    assert_values_close,
    backend_params,
    make_inputs,
    oracle_loss,
)

import dho_fast

LINEAR_BACKENDS = backend_params("cpu", "reference", "cuda", "triton-cuda")
PARAM_NAMES = ("features", "ce_weight", "ce_bias", "kd_weight", "kd_bias")
LOSS_ARGS = ("temperature", "ce_loss_weight", "kd_loss_weight", "kd_reduction", "ignore_index", "label_smoothing")


def make_linear_inputs(n, d, c, dtype=torch.float32, *, labelled="mixed", bias=True, device="cpu"):
    """Leaf tensors (features, ce_weight, ce_bias, kd_weight, kd_bias) requiring grad, then teacher and labels.
    The weights are scaled so the logits of unit-variance features have a spread of a few units."""
    _, _, teacher, labels = make_inputs(n, c, dtype, labelled=labelled, device=device)
    scale = 3.0 / d**0.5
    params = [
        torch.randn(n, d),
        torch.randn(c, d) * scale,
        torch.randn(c) if bias else None,
        torch.randn(c, d) * scale,
        torch.randn(c) if bias else None,
    ]
    params = [None if p is None else p.to(device, dtype).requires_grad_() for p in params]
    return params, teacher, labels


def linear_logits(features, ce_weight, ce_bias, kd_weight, kd_bias, *, kd_cosine=False, kd_logit_scale=1.0):
    """The heads' logits written out: ``x W_ce^T + b_ce`` and ``s (g(x) W_kd^T + b_kd)``, g = x / |x| or the
    identity."""
    kd_features = features / features.norm(dim=1, keepdim=True) if kd_cosine else features
    ce = features @ ce_weight.T + (0 if ce_bias is None else ce_bias)
    kd = kd_features @ kd_weight.T + (0 if kd_bias is None else kd_bias)
    return ce, kd_logit_scale * kd


def split_args(kwargs):
    head = {k: kwargs.pop(k) for k in ("kd_cosine", "kd_logit_scale") if k in kwargs}
    kwargs.pop("chunk_size", None)
    return head, kwargs


def grads_of(values, combine, params):
    leaves = [p for p in params if p is not None]
    grads = iter(torch.autograd.grad(combine(*values), leaves, allow_unused=True, materialize_grads=True))
    return [None if p is None else next(grads) for p in params]


def fused_values_and_grads(backend, params, teacher, labels, combine, **kwargs):
    values = dho_fast.fused_linear_dual_head_loss(*params, teacher, labels, return_terms=True, backend=backend,
                                                  **kwargs)  # fmt: skip
    return [v.detach() for v in values], grads_of(values, combine, params)


def eager_values_and_grads(params, teacher, labels, combine, **kwargs):
    """Eager PyTorch in the inputs' dtype: the heads as above, then PyTorch's own loss (the reference backend)."""
    head, loss_args = split_args(dict(kwargs))
    values = dho_fast.fused_dual_head_loss(*linear_logits(*params, **head), teacher, labels, return_terms=True,
                                           backend="reference", **loss_args)  # fmt: skip
    return grads_of(values, combine, params)


def through_the_heads(m_ce, m_kd, x, w_ce, w_kd, *, kd_cosine=False, kd_logit_scale=1.0):
    """Non-negative (N, C) sizes of the two logits' gradients carried to the five parameters' gradients in absolute
    values: ``|dZ| |W|``, ``|dZ|^T |X|``, column sums; through the cosine head's normalisation ``|dg/dx| <=
    (I + |g| |g|^T) / |x|`` elementwise."""
    s = kd_logit_scale
    norm = x.norm(dim=1, keepdim=True)
    g = x / norm if kd_cosine else x
    v_kd = s * m_kd @ w_kd
    if kd_cosine:
        v_kd = (v_kd + g * (g * v_kd).sum(dim=1, keepdim=True)) / norm
    return [m_ce @ w_ce + v_kd, m_ce.T @ x, m_ce.sum(0), s * m_kd.T @ g, s * m_kd.sum(0)]


def oracle_and_error_bounds(params, teacher, labels, combine, dtype, **kwargs):
    """The float64 oracle's values and parameter gradients on the same rounded inputs, and what each may be off by in
    ``dtype`` beyond the tables' rtol, to first order (an absolute allowance per value and per gradient element):

    - the logits are GEMM results rounded to the dtype, ``dz <= u (|x| |W|^T + |b|)`` (twice the product's part for
      the cosine head, whose normalised features are rounded too), which moves a value by ``sum |dv/dz| dz`` and a
      logit gradient by ``|J| dz``, J the softmax Jacobian ``w (diag p - p p^T)``;
    - the logit gradients are stored in the dtype (``u |dZ|``) and the GEMMs accumulate (the table's ``terms``) before
      they reach the parameters, through the heads in absolute values (:func:`through_the_heads`).
    """
    head, loss_args = split_args(dict(kwargs))
    temperature = loss_args.get("temperature", 2.0)
    u = torch.finfo(dtype).eps / 2
    params64 = [None if p is None else p.detach().double().requires_grad_() for p in params]
    teacher64 = teacher.double()
    values = oracle_loss(*linear_logits(*params64, **head), teacher64, labels, **loss_args)
    grads = grads_of(values, combine, params64)

    ce, kd = (z.detach().requires_grad_() for z in linear_logits(*params64, **head))
    x, w_ce, b_ce, w_kd, b_kd = (None if p is None else p.detach().abs() for p in params64)
    g = x / x.norm(dim=1, keepdim=True) if head.get("kd_cosine") else x
    dz_ce = u * (x @ w_ce.T + (0 if b_ce is None else b_ce))
    dz_kd = (
        u
        * head.get("kd_logit_scale", 1.0)
        * ((2 if head.get("kd_cosine") else 1) * g @ w_kd.T + (0 if b_kd is None else b_kd))
    )

    value_magnitudes = oracle_loss(ce, kd, teacher64, labels, magnitudes="value", **loss_args)
    per_logit = oracle_loss(ce, kd, teacher64, labels, magnitudes="gradient", **loss_args)
    value_bounds = []
    for magnitude, v in zip(value_magnitudes, per_logit, strict=True):
        m_ce, m_kd = torch.autograd.grad(v, (ce, kd), retain_graph=True, materialize_grads=True)
        rounding = (m_ce.abs() * dz_ce).sum() + (m_kd.abs() * dz_kd).sum()
        value_bounds.append(VALUE_TOLERANCES[dtype]["terms"] * magnitude + rounding)

    m_ce, m_kd = (m.abs() for m in torch.autograd.grad(combine(*per_logit), (ce, kd), materialize_grads=True))
    # m = w (p + target) per row: w = row sum / 2, as p and target each sum to 1.
    p_ce, p_kd = torch.softmax(ce.detach(), dim=1), torch.softmax(kd.detach() / temperature, dim=1)
    e_ce = m_ce.sum(1, keepdim=True) / 2 * (p_ce * dz_ce + p_ce * (p_ce * dz_ce).sum(1, keepdim=True))
    e_kd = m_kd.sum(1, keepdim=True) / 2 / temperature * (p_kd * dz_kd + p_kd * (p_kd * dz_kd).sum(1, keepdim=True))
    terms = GRAD_TOLERANCES[dtype]["terms"] + 2 * u
    grad_bounds = [
        terms * a + b
        for a, b in zip(through_the_heads(m_ce, m_kd, x, w_ce, w_kd, **head),
                        through_the_heads(e_ce, e_kd, x, w_ce, w_kd, **head), strict=True)
    ]  # fmt: skip
    return [v.detach() for v in values], grads, value_bounds, grad_bounds


def loss_only(loss, ce_term, kd_term):
    return loss


def check_linear(backend, params, teacher, labels, dtype, combine=loss_only, **kwargs):
    """Values and the parameter gradients of ``combine(loss, ce_term, kd_term)`` of ``backend`` against the float64
    oracle within :func:`oracle_and_error_bounds` (and, except for eager PyTorch itself, eager's own error)."""
    got_values, got_grads = fused_values_and_grads(backend, params, teacher, labels, combine, **kwargs)
    want_values, want_grads, value_bounds, grad_bounds = oracle_and_error_bounds(
        params, teacher, labels, combine, dtype, **kwargs
    )
    eager_grads = None
    if backend != "reference":
        eager_grads = eager_values_and_grads(params, teacher, labels, combine, **kwargs)
    for name, g, w, b in zip(("loss", "ce_term", "kd_term"), got_values, want_values, value_bounds, strict=True):
        assert_values_close(f"{backend} {name}", g, w, dtype, rounding=b)
    for i, name in enumerate(PARAM_NAMES):
        if params[i] is None:
            assert got_grads[i] is None, name
            continue
        eager = None if eager_grads is None else eager_grads[i]
        assert_grad_within(f"{backend} grad {name}", got_grads[i], want_grads[i], dtype, magnitude=grad_bounds[i],
                           eager=eager, terms=1.0)  # fmt: skip


@pytest.mark.parametrize("backend_device", LINEAR_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kd_cosine", [False, True], ids=["linear", "cosine"])
# "block": chunks whose labelled rows are consecutive, begin or end inside them, or are all or none of their rows
@pytest.mark.parametrize("labelled", ["all", "none", "mixed", "block"])
@pytest.mark.parametrize("chunk_size", [8, 7, None], ids=["divides", "remainder", "default"])
def test_correctness(backend_device, dtype, kd_cosine, labelled, chunk_size):
    backend, device = backend_device
    params, teacher, labels = make_linear_inputs(24, 16, 37, dtype, labelled=labelled, device=device)
    scale = 10.0 if kd_cosine else 1.0
    check_linear(backend, params, teacher, labels, dtype, kd_cosine=kd_cosine, kd_logit_scale=scale,
                 chunk_size=chunk_size)  # fmt: skip


@pytest.mark.parametrize("backend_device", LINEAR_BACKENDS)
@pytest.mark.parametrize("kd_cosine", [False, True], ids=["linear", "cosine"])
def test_many_classes_and_chunks(backend_device, kd_cosine):
    # C spans several column blocks of the row kernel; N = 300 gives chunks of 128, 128 and 44 rows.
    backend, device = backend_device
    params, teacher, labels = make_linear_inputs(300, 64, 1500, device=device)
    check_linear(backend, params, teacher, labels, torch.float32, kd_cosine=kd_cosine, kd_logit_scale=5.0)


@pytest.mark.parametrize("backend_device", LINEAR_BACKENDS)
@pytest.mark.parametrize("kd_reduction", ["split", "mean"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_loss_options(backend_device, kd_reduction, label_smoothing):
    backend, device = backend_device
    params, teacher, labels = make_linear_inputs(19, 8, 11, device=device)
    kwargs = dict(temperature=4.0, ce_loss_weight=1.0, kd_loss_weight=0.3, kd_reduction=kd_reduction, chunk_size=5)
    check_linear(backend, params, teacher, labels, torch.float32, label_smoothing=label_smoothing, **kwargs)


@pytest.mark.parametrize("backend_device", LINEAR_BACKENDS)
def test_custom_ignore_index_and_masked_teacher(backend_device):
    backend, device = backend_device
    params, _, _ = make_linear_inputs(12, 8, 9, device=device)
    _, _, teacher, labels = make_inputs(12, 9, labelled="mixed", masked_fraction=0.3, device=device)
    labels[labels == IGNORE] = -1
    check_linear(backend, params, teacher, labels, torch.float32, ignore_index=-1, chunk_size=5)


@pytest.mark.parametrize("backend_device", LINEAR_BACKENDS)
def test_without_biases(backend_device):
    backend, device = backend_device
    params, teacher, labels = make_linear_inputs(10, 6, 7, bias=False, device=device)
    check_linear(backend, params, teacher, labels, torch.float32, kd_cosine=True, chunk_size=3)


COMBINATIONS = {
    "3 loss": lambda loss, ce, kd: 3.0 * loss,
    "loss + 0.7 ce - 0.4 kd": lambda loss, ce, kd: loss + 0.7 * ce - 0.4 * kd,
    "2 ce": lambda loss, ce, kd: 2.0 * ce,
    "kd": lambda loss, ce, kd: kd,
}


@pytest.mark.parametrize("backend_device", LINEAR_BACKENDS)
@pytest.mark.parametrize("labelled", ["mixed", "block"])
@pytest.mark.parametrize("loss_weights", [(0.3, 1.7), (0.0, 1.0), (1.0, 0.0)], ids=str)
@pytest.mark.parametrize("combine", COMBINATIONS.values(), ids=COMBINATIONS.keys())
def test_loss_weights_and_any_combination_of_outputs(backend_device, labelled, loss_weights, combine):
    # The forward folds nonzero loss weights into the gradients it saves; the backward must undo that for gradients
    # that reach ce_term or kd_term directly, and scale by the incoming gradient when it is not 1.
    backend, device = backend_device
    params, teacher, labels = make_linear_inputs(15, 8, 9, labelled=labelled, device=device)
    weights = dict(ce_loss_weight=loss_weights[0], kd_loss_weight=loss_weights[1])
    check_linear(backend, params, teacher, labels, torch.float32, combine, kd_cosine=True, chunk_size=4, **weights)


@pytest.mark.parametrize("backend_device", LINEAR_BACKENDS)
def test_gradients_only_where_required(backend_device):
    backend, device = backend_device
    params, teacher, labels = make_linear_inputs(9, 5, 6, device=device)
    frozen_heads = [params[0]] + [p.detach() for p in params[1:]]
    loss = dho_fast.fused_linear_dual_head_loss(*frozen_heads, teacher, labels, chunk_size=4, backend=backend)
    (got,) = torch.autograd.grad(loss, params[0])
    params64 = as_float64(*[p.detach() for p in params])
    features64 = params64[0].requires_grad_()
    want_loss = oracle_loss(*linear_logits(features64, *params64[1:]), teacher.double(), labels)[0]
    (want,) = torch.autograd.grad(want_loss, features64)
    assert_grad_within("grad features", got, want, torch.float32, magnitude=torch.full_like(want, want.abs().max()))
    for mode in (torch.no_grad, torch.inference_mode):  # the autograd kernel without gradients, and no autograd
        with mode():
            loss = dho_fast.fused_linear_dual_head_loss(*params, teacher, labels, chunk_size=4, backend=backend)
        assert not loss.requires_grad
        assert_values_close("loss", loss, want_loss, torch.float32, magnitude=1.0)


@pytest.mark.parametrize("backend_device", LINEAR_BACKENDS)
def test_backward_twice_through_a_retained_graph(backend_device):
    # A single backward scales the saved gradients in place; with the graph retained they must stay intact.
    backend, device = backend_device
    params, teacher, labels = make_linear_inputs(9, 5, 6, device=device)
    loss = dho_fast.fused_linear_dual_head_loss(*params, teacher, labels, kd_cosine=True, chunk_size=4,
                                                backend=backend)  # fmt: skip
    first = torch.autograd.grad(loss, params, retain_graph=True)
    second = torch.autograd.grad(2 * loss, params)
    for name, a, b in zip(PARAM_NAMES, first, second, strict=True):
        torch.testing.assert_close(b, 2 * a, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    check_linear(backend, params, teacher, labels, torch.float32, kd_cosine=True, chunk_size=4)


@pytest.mark.parametrize("backend_device", LINEAR_BACKENDS)
@pytest.mark.parametrize("kd_cosine", [False, True], ids=["linear", "cosine"])
def test_gradcheck_float64(backend_device, kd_cosine):
    backend, device = backend_device
    params, teacher, labels = make_linear_inputs(7, 4, 5, torch.float64, device=device)

    def fn(*p):
        return dho_fast.fused_linear_dual_head_loss(*p, teacher, labels, kd_cosine=kd_cosine, kd_logit_scale=3.0,
                                                    chunk_size=3, return_terms=True, backend=backend)  # fmt: skip

    assert torch.autograd.gradcheck(fn, params)


def linear_op_args(dtype=torch.float32, requires_grad=True, device="cpu"):
    params, teacher, labels = make_linear_inputs(11, 6, 9, dtype, device=device)
    params = [p.detach().requires_grad_(requires_grad) for p in params]
    # kd_cosine, kd_logit_scale, chunk_size, temperature, loss weights, kd_split, ignore_index, label_smoothing
    return (*params, teacher, labels, True, 2.0, 4, 2.0, 0.5, 0.7, True, IGNORE, 0.1)


COMPILED = backend_params("cpu", "cuda", "triton-cuda")


@pytest.mark.parametrize("backend_device", COMPILED)
@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_linear_op(backend_device, requires_grad, dtype):
    _, device = backend_device
    args = linear_op_args(dtype, requires_grad, device)
    torch.library.opcheck(torch.ops.dho_fast.fused_linear_dual_head_loss.default, args)


@pytest.mark.parametrize("backend_device", COMPILED)
@pytest.mark.parametrize("grads", [(True, True, True), (False, True, False)])
def test_opcheck_linear_op_with_grads(backend_device, grads):
    _, device = backend_device
    args = (*linear_op_args(requires_grad=False, device=device), *grads)
    torch.library.opcheck(torch.ops.dho_fast.fused_linear_dual_head_loss_with_grads.default, args)
