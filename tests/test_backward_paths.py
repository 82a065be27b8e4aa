"""The loss op's backward in each way autograd can call it: a plain ``loss.backward()`` hands on the gradients the
forward computed, without a copy (for bfloat16 logits too, whose gradients the forward rounds); every other case (a
scaled loss, a term's own gradient, a zero loss weight, ``retain_graph``, a reused graph, torch.compile, float16
logits, rounded after the scale) scales them, and each gives PyTorch's own gradients.
(torch.func's transforms refuse the op: neither its C++ autograd Function nor the Triton op's torch.library
registration supports them.)"""

import pytest
import torch
from helpers import backend_params, make_inputs

import dho_fast

# The grad-in-forward backends (the reference's backward is PyTorch's own).
BACKENDS = backend_params("cpu", "triton", "cuda", "triton-cuda")
WEIGHTS = dict(temperature=2.0, ce_loss_weight=0.5, kd_loss_weight=0.7)


def _leaves(ce, kd):
    return ce.detach().clone().requires_grad_(), kd.detach().clone().requires_grad_()


def _reference_grads(inputs, combine=lambda loss, ce_term, kd_term: loss, **weights):
    ce, kd = _leaves(*inputs[:2])
    terms = dho_fast.fused_dual_head_loss(ce, kd, *inputs[2:], return_terms=True, backend="reference", **weights)
    return torch.autograd.grad(combine(*terms), (ce, kd), allow_unused=True, materialize_grads=True)


# float32 kernels against PyTorch's float32 autograd (the CPU kernel's exp is within 2.4e-6, README); half
# gradients are rounded once to their dtype.
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-7), torch.float16: dict(rtol=2e-3, atol=1e-5)}
TOLERANCES[torch.bfloat16] = dict(rtol=1e-2, atol=1e-4)


def _close(got, want, dtype=torch.float32):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOLERANCES[dtype])


def _loss(backend, ce, kd, teacher, labels, **weights):
    return dho_fast.fused_dual_head_loss(ce, kd, teacher, labels, return_terms=True, backend=backend, **weights)


def _as_float32(inputs):
    return [t.float() if t.is_floating_point() else t for t in inputs]


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_plain_backward_hands_on_the_forward_gradients(backend_device, dtype):
    # bfloat16 logits too: the forward returns their gradients in bfloat16 (loss_gradient_dtype), so nothing is left
    # to round either.
    backend, device = backend_device
    inputs = make_inputs(16, 9, dtype, device=device)
    leaves = _leaves(*inputs[:2])
    ce, kd = (x * 1 for x in leaves)  # logits inside a graph, as a layer's output would be
    passed_on = []
    for logits in (ce, kd):
        logits.register_hook(passed_on.append)  # the gradient the op's backward returns, as it returns it
    weights = (WEIGHTS["ce_loss_weight"], WEIGHTS["kd_loss_weight"])
    op = torch.ops.dho_fast.dual_head_loss if backend != "triton" else torch.ops.dho_fast.dual_head_loss_triton
    loss, _, _, saved_ce, saved_kd = op(ce, kd, *inputs[2:], 2.0, *weights, True, -100, 0.0, True, True, *weights)
    assert saved_ce.dtype == saved_kd.dtype == dtype
    loss.backward()
    # The forward's buffers themselves: no pass over them, no copy.
    assert sorted(g.data_ptr() for g in passed_on) == sorted((saved_ce.data_ptr(), saved_kd.data_ptr()))
    _close([x.grad.float() for x in leaves], _reference_grads(_as_float32(inputs), **WEIGHTS), dtype)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_leaf_gradients_are_the_forward_buffers(backend_device, dtype):
    # Logits that are leaves (no layer between them and the loss): once the op's own handles are gone, AccumulateGrad
    # takes the forward's buffers as .grad, so the whole backward allocates and writes no (N, C) tensor.
    backend, device = backend_device
    inputs = make_inputs(16, 9, dtype, device=device)
    ce, kd = _leaves(*inputs[:2])
    weights = (WEIGHTS["ce_loss_weight"], WEIGHTS["kd_loss_weight"])
    op = torch.ops.dho_fast.dual_head_loss if backend != "triton" else torch.ops.dho_fast.dual_head_loss_triton
    loss, _, _, saved_ce, saved_kd = op(ce, kd, *inputs[2:], 2.0, *weights, True, -100, 0.0, True, True, *weights)
    buffers = (saved_ce.data_ptr(), saved_kd.data_ptr())
    del saved_ce, saved_kd
    loss.backward()
    assert (ce.grad.data_ptr(), kd.grad.data_ptr()) == buffers
    _close((ce.grad.float(), kd.grad.float()), _reference_grads(_as_float32(inputs), **WEIGHTS), dtype)


@pytest.mark.parametrize("backend_device", [*BACKENDS, *backend_params("reference")])
@pytest.mark.parametrize("term", [1, 2], ids=["ce-term", "kd-term"])
def test_one_term_leaves_the_other_head_without_gradient(backend_device, term):
    # As in PyTorch's own graph: the CE term does not depend on the KD logits, nor the KD term on the CE logits.
    backend, device = backend_device
    inputs = make_inputs(16, 9, device=device)
    ce, kd = _leaves(*inputs[:2])
    _loss(backend, ce, kd, *inputs[2:], **WEIGHTS)[term].backward()
    got, other = (ce, kd) if term == 1 else (kd, ce)
    assert other.grad is None
    want = _reference_grads(inputs, lambda loss, ce_term, kd_term: (loss, ce_term, kd_term)[term], **WEIGHTS)
    _close((got.grad,), want[term - 1 : term])


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_a_gradient_the_forward_did_not_compute_is_refused(backend_device):
    # The op called directly with ce_grad=False on logits that require grad: backward must raise, not return zeros.
    backend, device = backend_device
    inputs = make_inputs(16, 9, device=device)
    ce, kd = _leaves(*inputs[:2])
    op = torch.ops.dho_fast.dual_head_loss if backend != "triton" else torch.ops.dho_fast.dual_head_loss_triton
    loss = op(ce, kd, *inputs[2:], 2.0, 0.5, 0.5, True, -100, 0.0, False, True, 0.5, 0.5)[0]
    with pytest.raises(RuntimeError, match="the gradient of ce_logits was not computed in the forward pass"):
        loss.backward()


@pytest.mark.parametrize("backend_device", backend_params("cpu"))
def test_torch_func_transforms_are_refused(backend_device):
    backend, device = backend_device
    ce, kd, teacher, labels = make_inputs(16, 9, device=device)

    def loss_of(ce_logits):
        return _loss(backend, ce_logits, kd, teacher, labels, **WEIGHTS)[0]

    with pytest.raises(RuntimeError, match="cannot use C\\+\\+ torch::autograd::Function with functorch transforms"):
        torch.func.grad(loss_of)(ce)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize(
    "combine",
    [
        pytest.param(lambda loss, ce_term, kd_term: 3.0 * loss, id="scaled-loss"),
        pytest.param(lambda loss, ce_term, kd_term: ce_term, id="ce-term"),
        pytest.param(lambda loss, ce_term, kd_term: loss + 2.0 * kd_term, id="loss-and-kd-term"),
    ],
)
def test_scaled_and_term_gradients(backend_device, combine):
    backend, device = backend_device
    inputs = make_inputs(16, 9, device=device)
    ce, kd = _leaves(*inputs[:2])
    out = combine(*_loss(backend, ce, kd, *inputs[2:], **WEIGHTS))
    got = torch.autograd.grad(out, (ce, kd), allow_unused=True, materialize_grads=True)
    _close(got, _reference_grads(inputs, combine, **WEIGHTS))


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_a_zero_loss_weight_keeps_its_term_gradient(backend_device):
    backend, device = backend_device
    inputs = make_inputs(16, 9, device=device)
    weights = {**WEIGHTS, "ce_loss_weight": 0.0}
    for combine in (lambda loss, c, k: loss, lambda loss, c, k: loss + c):
        ce, kd = _leaves(*inputs[:2])
        got = torch.autograd.grad(combine(*_loss(backend, ce, kd, *inputs[2:], **weights)), (ce, kd))
        _close(got, _reference_grads(inputs, combine, **weights))


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_retain_graph_and_a_reused_graph(backend_device):
    backend, device = backend_device
    inputs = make_inputs(16, 9, device=device)
    want = _reference_grads(inputs, **WEIGHTS)
    ce, kd = _leaves(*inputs[:2])
    loss = _loss(backend, ce, kd, *inputs[2:], **WEIGHTS)[0]
    loss.backward(retain_graph=True)
    first = ce.grad.clone()
    ce.grad.zero_()  # an optimizer's zero_grad(set_to_none=False) between the two backward passes
    kd.grad.mul_(7.0)
    loss.backward(retain_graph=True)
    _close((first,), want[:1])
    _close((ce.grad, kd.grad), (want[0], 8.0 * want[1]))
    # A third pass, and a gradient of the same graph through torch.autograd.grad, still read the kept gradients.
    _close(torch.autograd.grad(loss, (ce, kd)), want)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_logits_of_a_layer_pass_their_gradient_on(backend_device):
    # The usual graph: the logits come out of a layer, whose backward reads the loss's gradient.
    backend, device = backend_device
    ce, kd, teacher, labels = make_inputs(16, 9, device=device)
    features = torch.randn(16, 5, device=device)
    heads = [torch.randn(5, 9, device=device, requires_grad=True) for _ in range(2)]
    _loss(backend, features @ heads[0], features @ heads[1], teacher, labels, **WEIGHTS)[0].backward()
    ref = [h.detach().clone().requires_grad_() for h in heads]
    _loss("reference", features @ ref[0], features @ ref[1], teacher, labels, **WEIGHTS)[0].backward()
    _close([h.grad for h in heads], [h.grad for h in ref])


@pytest.mark.parametrize("backend_device", backend_params("cpu", "cuda"))
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_torch_compile_backward(backend_device, scale):
    # The forward compiled as one graph; AOTAutograd traces the op's backward, where no value can be read.
    backend, device = backend_device
    inputs = make_inputs(16, 9, device=device)

    @torch.compile(fullgraph=True)
    def loss_of(ce, kd):
        return scale * _loss(backend, ce, kd, *inputs[2:], **WEIGHTS)[0]

    ce, kd = _leaves(*inputs[:2])
    loss_of(ce, kd).backward()
    _close((ce.grad, kd.grad), _reference_grads(inputs, lambda loss, c, k: scale * loss, **WEIGHTS))


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits_get_half_gradients(backend_device, dtype):
    backend, device = backend_device
    inputs = make_inputs(16, 9, dtype, device=device)
    ce, kd = _leaves(*inputs[:2])
    _loss(backend, ce, kd, *inputs[2:], **WEIGHTS)[0].backward()
    assert ce.grad.dtype == kd.grad.dtype == dtype
    want = _reference_grads(_as_float32(inputs), **WEIGHTS)
    _close((ce.grad.float(), kd.grad.float()), want, dtype)


@pytest.mark.parametrize("backend_device", backend_params("cpu", "cuda"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("loss_scale", [1.0, 65536.0], ids=["plain", "loss-scale"])
def test_half_logits_gradient_is_the_float32_gradient_rounded_once(backend_device, dtype, loss_scale):
    # Half logits' gradient must equal that of the same values given as float32, rounded to the logits' dtype once,
    # also under GradScaler's loss scale: float16's is scaled before its rounding; bfloat16's is rounded in the
    # forward, and its exponent range makes scaling by a power of two afterwards exact.
    backend, device = backend_device
    ce, kd, teacher, labels = (t.to(device) for t in make_inputs(13, 517, dtype))
    half = _leaves(ce, kd)
    (loss_scale * dho_fast.fused_dual_head_loss(*half, teacher, labels, backend=backend, **WEIGHTS)).backward()
    full = _leaves(ce.float(), kd.float())
    (loss_scale * dho_fast.fused_dual_head_loss(*full, teacher.float(), labels, backend=backend, **WEIGHTS)).backward()
    for got, want in zip(half, full, strict=True):
        assert got.grad.dtype == dtype
        assert torch.equal(got.grad, want.grad.to(dtype))
