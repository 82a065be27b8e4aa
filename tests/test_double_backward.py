"""Double backward (``create_graph=True``: gradient penalties, gradgradcheck) through both loss ops on every backend.

The fused backends compute the gradients in the forward and their backward only scales them, so a graph of that
backward would treat the gradients as constants and drop the loss's second-order term: a gradient penalty would get
a wrong number. They must raise instead, naming the op and the backend that can do it; the reference backend (eager
PyTorch) must be correct, checked with gradgradcheck and against finite differences of a gradient penalty.
"""

import re

import pytest
import torch
from helpers import LOSS_BACKENDS, LOSS_KW, backend_params, make_inputs

import dho_fast

LINEAR_BACKENDS = backend_params("cpu", "reference", "cuda", "triton-cuda")


def loss_fn(teacher, labels, backend):
    def loss(ce, kd):
        return dho_fast.fused_dual_head_loss(ce, kd, teacher, labels, backend=backend, label_smoothing=0.1, **LOSS_KW)

    return loss


def linear_loss_fn(teacher, labels, backend):
    def loss(features, ce_weight, ce_bias, kd_weight, kd_bias):
        return dho_fast.fused_linear_dual_head_loss(
            features, ce_weight, ce_bias, kd_weight, kd_bias, teacher, labels, chunk_size=3, backend=backend,
            label_smoothing=0.1, **LOSS_KW,
        )  # fmt: skip

    return loss


def linear_inputs(n: int, d: int, c: int, device: str):
    _, _, teacher, labels = make_inputs(n, c, torch.float64, labelled="mixed", device=device)
    params = [torch.randn(n, d), torch.randn(c, d), torch.randn(c), torch.randn(c, d), torch.randn(c)]
    return [p.to(device, torch.float64).requires_grad_() for p in params], teacher, labels


def assert_refused(op_name: str, loss: torch.Tensor, inputs) -> None:
    """A graph of the backward is refused with the error that names the op and the reference backend."""
    message = f"{op_name} has no double backward"
    with pytest.raises(RuntimeError, match=re.escape(message)) as error:
        torch.autograd.grad(loss, inputs, create_graph=True)
    assert 'backend="reference"' in str(error.value)


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
def test_double_backward_of_the_loss(backend_device):
    backend, device = backend_device
    ce, kd, teacher, labels = make_inputs(6, 11, torch.float64, masked_fraction=0.2, device=device)
    inputs = (ce.requires_grad_(), kd.requires_grad_())
    loss = loss_fn(teacher, labels, backend)
    if backend == "reference":
        assert torch.autograd.gradgradcheck(loss, inputs)
        return
    assert_refused("dho_fast.fused_dual_head_loss", loss(*inputs), inputs)
    # Without create_graph the same backward runs (grad mode is off in it), also under an enclosing enable_grad.
    with torch.enable_grad():
        grads = torch.autograd.grad(loss(*inputs), inputs)
    want = torch.autograd.grad(loss_fn(teacher, labels, "reference")(*inputs), inputs)
    # Triton takes its scalars (1 / T) in float32: 1e-7 relative, even for float64 logits.
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend_device", LINEAR_BACKENDS)
def test_double_backward_of_the_linear_loss(backend_device):
    backend, device = backend_device
    params, teacher, labels = linear_inputs(7, 4, 5, device)
    loss = linear_loss_fn(teacher, labels, backend)
    if backend == "reference":
        assert torch.autograd.gradgradcheck(loss, params)
        return
    assert_refused("dho_fast.fused_linear_dual_head_loss", loss(*params), params)


def finite_difference(f, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central differences of the scalar f() in every element of the float64 tensor x (changed in place)."""
    grad = torch.empty_like(x)
    with torch.no_grad():
        for i in range(x.numel()):
            old = x.view(-1)[i].item()
            x.view(-1)[i] = old + eps
            up = f()
            x.view(-1)[i] = old - eps
            down = f()
            x.view(-1)[i] = old
            grad.view(-1)[i] = (up - down) / (2 * eps)
    return grad


def test_gradient_penalty_through_a_linear_layer_matches_finite_differences():
    # The issue's case: the penalty |d loss / d features|^2 through a linear layer whose outputs are both heads'
    # logits; its gradient in the layer's weight has a second-order term through the loss.
    n, d, c = 6, 4, 5
    ce, kd, teacher, labels = make_inputs(n, c, torch.float64)
    features = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(2 * c, d, dtype=torch.float64) * 0.7).requires_grad_()
    loss = loss_fn(teacher, labels, "reference")

    def penalty():
        with torch.enable_grad():
            ce_logits, kd_logits = (features @ weight.T).chunk(2, dim=1)
            (grad,) = torch.autograd.grad(loss(ce_logits, kd_logits), features, create_graph=True)
            return (grad**2).sum()

    (got,) = torch.autograd.grad(penalty(), weight)
    want = finite_difference(lambda: penalty().item(), weight)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_gradient_penalty_through_the_linear_loss_matches_finite_differences():
    params, teacher, labels = linear_inputs(6, 4, 5, "cpu")
    features, ce_weight = params[0], params[1]
    loss = linear_loss_fn(teacher, labels, "reference")

    def penalty():
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss(*params), features, create_graph=True)
            return (grad**2).sum()

    (got,) = torch.autograd.grad(penalty(), ce_weight)
    want = finite_difference(lambda: penalty().item(), ce_weight)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
