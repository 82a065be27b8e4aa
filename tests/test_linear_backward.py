"""Backward of the fused linear op (backend "cpu") against the same call with backend "reference", which builds an
ordinary eager autograd graph, in every situation the op's backward tells apart: a gradient of exactly 1 reaching
the loss (the saved gradients are handed back as they are), any other gradient (they are multiplied out of place),
gradients reaching the returned terms, a retained graph backpropagated twice, gradient buffers updated in place
between two backward passes, torch.compile tracing the backward, and torch.func transforms.

float64 throughout, so that the comparisons are element-wise and tight: the two computations differ only in the
order of their float64 roundings.
"""

import pytest
import torch

import dho_fast

N, D, C = 12, 7, 5
IGNORE = -100
# Unlabelled rows between labelled ones: with 5-row chunks some chunks gather their labelled rows.
LABELS = [0, IGNORE, 4, 1, IGNORE, IGNORE, 3, 2, IGNORE, 0, IGNORE, 4]
CHUNK_SIZE = 5
TOL = dict(rtol=1e-10, atol=1e-12)


def make_inputs(seed=0, *, bias=True):
    """Leaves (features, ce_weight, ce_bias, kd_weight, kd_bias) requiring grad, then teacher logits and labels."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    params = [randn(N, D), randn(C, D, scale=0.8), randn(C) if bias else None, randn(C, D, scale=0.8)]
    params.append(randn(C) if bias else None)
    teacher = torch.randn(N, C, generator=g, dtype=torch.float64) * 2
    return params, teacher, torch.tensor(LABELS)


def loss_of(params, teacher, labels, backend, **kwargs):
    return dho_fast.fused_linear_dual_head_loss(
        *params, teacher, labels, chunk_size=CHUNK_SIZE, ignore_index=IGNORE, backend=backend, **kwargs
    )


def leaves(params):
    return [p for p in params if p is not None]


def grads_of(params):
    return [p.grad.clone() for p in leaves(params)]


def fresh_copy(params):
    return [None if p is None else p.detach().clone().requires_grad_() for p in params]


def assert_all_close(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m, i=i: f"gradient {i}: {m}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("kd_cosine", [False, True], ids=["linear", "cosine"])
def test_loss_backward(bias, kd_cosine):
    params, teacher, labels = make_inputs(bias=bias)
    reference = fresh_copy(params)
    loss_of(params, teacher, labels, "cpu", kd_cosine=kd_cosine).backward()
    loss_of(reference, teacher, labels, "reference", kd_cosine=kd_cosine).backward()
    assert_all_close(grads_of(params), grads_of(reference))


def test_loss_backward_into_an_upstream_layer():
    # The features' gradient flows on into the layer that produced them, which must not change it.
    params, teacher, labels = make_inputs()
    x = torch.randn(N, 3, dtype=torch.float64)
    layers = [torch.nn.Linear(3, D, dtype=torch.float64) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    for layer, backend in zip(layers, ("cpu", "reference"), strict=True):
        loss_of([layer(x), *params[1:]], teacher, labels, backend).backward()
    assert_all_close([p.grad for p in layers[0].parameters()], [p.grad for p in layers[1].parameters()])


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_backward_twice_through_a_retained_graph(scale):
    params, teacher, labels = make_inputs()
    reference = fresh_copy(params)
    loss = loss_of(params, teacher, labels, "cpu") * scale
    loss.backward(retain_graph=True)
    first = grads_of(params)
    loss.backward()
    (loss_of(reference, teacher, labels, "reference") * scale).backward()
    assert_all_close(first, grads_of(reference))
    for p, g in zip(leaves(params), first, strict=True):
        assert torch.equal(p.grad, 2 * g)


@pytest.mark.parametrize("grad_output", [1.0, -0.7])
def test_autograd_grad_twice_through_a_retained_graph(grad_output):
    params, teacher, labels = make_inputs()
    out = torch.tensor(grad_output, dtype=torch.float64)
    loss = loss_of(params, teacher, labels, "cpu")
    first = [g.clone() for g in torch.autograd.grad(loss, leaves(params), out, retain_graph=True)]
    second = torch.autograd.grad(loss, leaves(params), out)
    want = torch.autograd.grad(loss_of(params, teacher, labels, "reference"), leaves(params), out)
    assert_all_close(first, want)
    for g, f in zip(second, first, strict=True):
        assert torch.equal(g, f)


def test_gradient_buffers_updated_in_place_between_backward_passes():
    # Clipping, an optimizer step and zero_grad all write into .grad in place; a second backward through the
    # retained graph must still return the gradients of the forward.
    params, teacher, labels = make_inputs()
    loss = loss_of(params, teacher, labels, "cpu")
    loss.backward(retain_graph=True)
    first = grads_of(params)
    optimizer = torch.optim.SGD(leaves(params), lr=0.1, momentum=0.9, weight_decay=0.01)
    torch.nn.utils.clip_grad_norm_(leaves(params), max_norm=1e-3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    loss.backward()
    for p, g in zip(leaves(params), first, strict=True):
        assert torch.equal(p.grad, g)


def test_writing_into_a_returned_gradient_is_detected():
    # torch.autograd.grad may return a saved gradient itself; writing into it bumps its version, so a backward through
    # the retained graph refuses to use it rather than returning the changed values.
    params, teacher, labels = make_inputs()
    loss = loss_of(params, teacher, labels, "cpu")
    (grad_ce_weight,) = torch.autograd.grad(loss, params[1], retain_graph=True)
    grad_ce_weight.mul_(0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, params[1])


def test_loss_times_a_constant():
    params, teacher, labels = make_inputs()
    reference = fresh_copy(params)
    (loss_of(params, teacher, labels, "cpu") * 3).backward()
    (loss_of(reference, teacher, labels, "reference") * 3).backward()
    assert_all_close(grads_of(params), grads_of(reference))


def test_autograd_grad_with_a_grad_output():
    params, teacher, labels = make_inputs()
    grad_output = torch.tensor(-0.7, dtype=torch.float64)
    got = torch.autograd.grad(loss_of(params, teacher, labels, "cpu"), leaves(params), grad_outputs=grad_output)
    loss = loss_of(params, teacher, labels, "reference")
    assert_all_close(got, torch.autograd.grad(loss, leaves(params), grad_outputs=grad_output))


# d(output) / d(loss, ce_term, kd_term) for the outputs backpropagated
COMBINATIONS = {
    "ce_term": (0.0, 1.0, 0.0),
    "kd_term": (0.0, 0.0, 1.0),
    "both_terms": (0.0, 1.0, 2.0),
    "loss_and_ce_term": (1.0, 0.5, 0.0),
    "all": (1.0, -1.0, 3.0),
}


@pytest.mark.parametrize("combination", COMBINATIONS, ids=str)
def test_backward_through_the_terms(combination):
    params, teacher, labels = make_inputs()

    def grads(backend):
        outputs = loss_of(params, teacher, labels, backend, return_terms=True)
        total = sum(w * out for w, out in zip(COMBINATIONS[combination], outputs, strict=True) if w != 0.0)
        return torch.autograd.grad(total, leaves(params), allow_unused=True, materialize_grads=True)

    assert_all_close(grads("cpu"), grads("reference"))


@pytest.mark.parametrize("zero", ["ce_loss_weight", "kd_loss_weight"])
@pytest.mark.parametrize("output", ["loss", "ce_term", "kd_term"])
def test_a_loss_weight_of_zero(zero, output):
    # A zero weight removes its term from the loss; backward through that term itself must still be right.
    params, teacher, labels = make_inputs()
    index = ("loss", "ce_term", "kd_term").index(output)

    def grads(backend):
        outputs = loss_of(params, teacher, labels, backend, return_terms=True, **{zero: 0.0})
        return torch.autograd.grad(outputs[index], leaves(params), allow_unused=True, materialize_grads=True)

    assert_all_close(grads("cpu"), grads("reference"))


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    torch._dynamo.reset()
    _, teacher, labels = make_inputs()
    x = torch.randn(N, 3, dtype=torch.float64)

    def make_model():
        torch.manual_seed(0)
        return torch.nn.ModuleDict(
            {
                "body": torch.nn.Linear(3, D, dtype=torch.float64),
                "ce_head": torch.nn.Linear(D, C, dtype=torch.float64),
                "kd_head": torch.nn.Linear(D, C, dtype=torch.float64),
            }
        )

    def step_loss(model, backend):
        heads = (model["ce_head"].weight, model["ce_head"].bias, model["kd_head"].weight, model["kd_head"].bias)
        loss, ce_term, _ = loss_of([model["body"](x), *heads], teacher, labels, backend, return_terms=True)
        # A gradient other than 1 for the loss, and one for a term.
        return 2 * loss + ce_term

    def train(backend, compile_step):
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
        step = torch.compile(step_loss, fullgraph=True) if compile_step else step_loss
        losses = []
        for _ in range(3):
            optimizer.zero_grad()
            loss = step(model, backend)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return losses, [p.detach() for p in model.parameters()]

    want_losses, want_params = train("reference", compile_step=False)
    for compile_step in (False, True):
        losses, params = train("cpu", compile_step)
        assert_all_close(losses, want_losses)
        assert_all_close(params, want_params)


@pytest.mark.parametrize("transform", ["grad", "vjp"])
def test_torch_func_transforms_are_refused(transform):
    # The op's autograd formula is a C++ torch::autograd::Function, which functorch cannot transform: it must refuse
    # with an error, never return a gradient.
    params, teacher, labels = make_inputs()
    primals = [p.detach() for p in params]

    def loss_fn(*args):
        return loss_of(args, teacher, labels, "cpu")

    with pytest.raises(RuntimeError, match="cannot use C\\+\\+ torch::autograd::Function with functorch transforms"):
        if transform == "grad":
            torch.func.grad(loss_fn)(*primals)
        else:
            _, vjp_fn = torch.func.vjp(loss_fn, *primals)
            vjp_fn(torch.ones((), dtype=torch.float64))
