"""The backend table (dho_fast.ops.backends): the "auto" rule for every op, device type and wants_graph this machine
can show, explicit backends that cannot run, unknown names, and $DHO_FAST_BACKEND."""

import warnings

import pytest
import torch
from helpers import backend_params, make_inputs

import dho_fast
from dho_fast import kernels
from dho_fast.ops import backends, extension

LOSSES = ("dual_head_loss", "fused_linear_dual_head_loss")
BLENDS = ("dual_head_predict", "blend_search")
CPU, META, CUDA = torch.device("cpu"), torch.device("meta"), torch.device("cuda")
FALLBACK_WARNING = "has no compiled kernel for .* tensors here, using the slower reference backend"


@pytest.fixture(autouse=True)
def no_backend_from_the_environment(monkeypatch):
    monkeypatch.delenv("DHO_FAST_BACKEND", raising=False)


def resolve_quietly(op, backend, device, wants_graph=False):
    """resolve(), failing on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return backends.resolve(op, backend, device, wants_graph=wants_graph)


@pytest.mark.parametrize("wants_graph", [False, True])
@pytest.mark.parametrize("backend", ["auto", None])
@pytest.mark.parametrize("op", LOSSES + BLENDS)
def test_auto_on_cpu_tensors(op, backend, wants_graph):
    # The losses' compiled CPU kernels; the blends' eager PyTorch, which is their CPU implementation (no warning).
    want = "cpu" if op in LOSSES else "reference"
    assert resolve_quietly(op, backend, CPU, wants_graph) == want


@pytest.mark.parametrize("wants_graph", [False, True])
@pytest.mark.parametrize("op", LOSSES)
def test_auto_on_meta_tensors_is_the_compiled_ops_shape_function(op, wants_graph):
    assert resolve_quietly(op, "auto", META, wants_graph) == "cpu"
    assert resolve_quietly(op, "cpu", META, wants_graph) == "cpu"


@pytest.mark.parametrize("op", LOSSES)
def test_meta_tensors_without_the_extension_are_refused_clearly(op, monkeypatch):
    # The reference reads the labels and teacher rows to check them, which a meta tensor cannot give.
    monkeypatch.setattr(backends, "has_extension", lambda: False)
    with pytest.raises(ValueError, match=f"no backend of {op} can run here; backend='reference' reads the tensors'"):
        backends.resolve(op, "auto", META)
    with pytest.raises(ValueError, match=f"backend='reference' of {op} reads the tensors' values"):
        backends.resolve(op, "reference", META)


@pytest.mark.parametrize("wants_graph", [False, True])
@pytest.mark.parametrize("op", BLENDS)
def test_auto_blend_on_meta_tensors_is_the_reference_without_a_warning(op, wants_graph):
    assert resolve_quietly(op, "auto", META, wants_graph) == "reference"


@pytest.mark.skipif(not kernels.has_triton() or kernels.interpreted(), reason="needs Triton, without TRITON_INTERPRET")
@pytest.mark.parametrize("wants_graph", [False, True])
@pytest.mark.parametrize("op", LOSSES + BLENDS)
def test_auto_on_cuda_tensors(op, wants_graph):
    # No CUDA tensor is made: the rule needs only the device. The compiled CUDA kernels when the build has them,
    # else Triton's; the blends' Triton kernels have no autograd formula, so a wanted graph gets eager PyTorch.
    if op in LOSSES:
        want = "cuda" if extension.has_cuda_kernels() else "triton"
    else:
        want = "reference" if wants_graph else "triton"
    assert resolve_quietly(op, "auto", CUDA, wants_graph) == want


@pytest.mark.parametrize("op", LOSSES)
def test_auto_without_the_extension_falls_back_to_the_reference(op, monkeypatch):
    monkeypatch.setattr(backends, "has_extension", lambda: False)
    with pytest.warns(UserWarning, match=FALLBACK_WARNING):
        assert backends.resolve(op, "auto", CPU) == "reference"
    with pytest.raises(RuntimeError, match=f"backend='cpu' of {op} needs the compiled extension, which failed to load"):
        backends.resolve(op, "cpu", CPU)


@pytest.mark.parametrize("op", LOSSES + BLENDS)
def test_triton_without_triton(op, monkeypatch):
    monkeypatch.setattr(kernels, "has_triton", lambda: False)
    with pytest.raises(RuntimeError, match=f"backend='triton' of {op} needs Triton installed"):
        backends.resolve(op, "triton", CUDA)


@pytest.mark.parametrize("op", LOSSES)
def test_cuda_backend_needs_cuda_tensors_and_a_cuda_build(op):
    with pytest.raises(ValueError, match=f"backend='cuda' of {op} needs CUDA tensors, got tensors on cpu"):
        backends.resolve(op, "cuda", CPU)
    if not extension.has_cuda_kernels():
        with pytest.raises(
            RuntimeError, match=f"backend='cuda' of {op} needs the extension built with its CUDA kernels"
        ):
            backends.resolve(op, "cuda", CUDA)


@pytest.mark.skipif(not kernels.has_triton() or kernels.interpreted(), reason="needs Triton, without TRITON_INTERPRET")
@pytest.mark.parametrize("op", LOSSES)
def test_cpu_backend_needs_cpu_tensors(op):
    # No CUDA tensor is made: the rule needs only the device.
    with pytest.raises(ValueError, match=f"backend='cpu' of {op} needs CPU tensors, got tensors on cuda"):
        backends.resolve(op, "cpu", CUDA)


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
@pytest.mark.parametrize("op", BLENDS)
def test_blends_have_no_compiled_kernels(op, backend):
    with pytest.raises(
        ValueError, match=f"backend='{backend}' has no kernel of {op}; it has \\('triton', 'reference'\\)"
    ):
        backends.resolve(op, backend, CPU)


@pytest.mark.skipif(kernels.interpreted(), reason="under TRITON_INTERPRET the Triton kernels take CPU tensors")
@pytest.mark.parametrize("op", LOSSES + BLENDS)
def test_triton_on_cpu_tensors_needs_the_interpreter(op):
    with pytest.raises(ValueError, match=f"backend='triton' of {op} needs CUDA tensors \\(or TRITON_INTERPRET=1"):
        backends.resolve(op, "triton", CPU)


@pytest.mark.parametrize("backend_device", backend_params("triton"))
def test_triton_on_cpu_tensors_under_the_interpreter(backend_device):
    _, device = backend_device
    device = torch.device(device)
    assert resolve_quietly("dual_head_loss", "triton", device, wants_graph=True) == "triton"
    for op in BLENDS:
        assert resolve_quietly(op, "triton", device) == "triton"
        with pytest.raises(ValueError, match=f"backend='triton' of {op} has no autograd formula"):
            backends.resolve(op, "triton", device, wants_graph=True)
    # The fused linear op reaches Triton through the CUDA dispatch of its chunk op.
    with pytest.raises(ValueError, match="its chunks reach Triton through the CUDA dispatch"):
        backends.resolve("fused_linear_dual_head_loss", "triton", device)
    # "auto" on CPU tensors stays the compiled kernel.
    assert resolve_quietly("dual_head_loss", "auto", device) == "cpu"


@pytest.mark.parametrize("op", LOSSES + BLENDS)
def test_unknown_backend_names(op):
    with pytest.raises(ValueError, match="backend must be one of .*, got 'gpu'"):
        backends.resolve(op, "gpu", CPU)


def test_backend_from_the_environment(monkeypatch):
    monkeypatch.setenv("DHO_FAST_BACKEND", "reference")
    assert resolve_quietly("dual_head_loss", None, CPU) == "reference"
    assert resolve_quietly("dual_head_loss", "cpu", CPU) == "cpu"  # an explicit backend wins
    ce, kd, teacher, labels = make_inputs(3, 4, labelled="all")
    ce.requires_grad_()
    # The reference backend builds an ordinary graph; the compiled op's node is its C++ autograd formula.
    assert "dho_fast" not in dho_fast.fused_dual_head_loss(ce, kd, teacher, labels).grad_fn.name()
    monkeypatch.setenv("DHO_FAST_BACKEND", "cpu")
    assert "dho_fast" in dho_fast.fused_dual_head_loss(ce, kd, teacher, labels).grad_fn.name()
    monkeypatch.setenv("DHO_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend must be one of .*, got 'bogus'"):
        dho_fast.fused_dual_head_loss(ce, kd, teacher, labels)


def _loss_with_a_teacher_that_requires_grad(backend, device, op, students_require_grad):
    ce, kd, teacher, labels = make_inputs(6, 5, labelled="mixed", device=device)
    teacher.requires_grad_()
    if op == "dual_head_loss":
        inputs = [ce, kd]
        run = dho_fast.fused_dual_head_loss
    else:
        inputs = [torch.randn(6, 4, device=device), torch.randn(5, 4, device=device), None,
                  torch.randn(5, 4, device=device), None]  # fmt: skip
        run = dho_fast.fused_linear_dual_head_loss
    for t in inputs:
        if t is not None and students_require_grad:
            t.requires_grad_()
    return run(*inputs, teacher, labels, backend=backend), inputs, teacher


# Every backend of each loss op (the fused linear op's Triton backend takes CUDA tensors only).
_LOSS_OP_BACKENDS = [
    pytest.param(op, *p.values, id=f"{op}-{p.id}", marks=p.marks)
    for op, names in (
        ("dual_head_loss", ("cpu", "reference", "triton", "cuda", "triton-cuda")),
        ("fused_linear_dual_head_loss", ("cpu", "reference", "cuda", "triton-cuda")),
    )
    for p in backend_params(*names)
]


@pytest.mark.parametrize("op, backend_device", _LOSS_OP_BACKENDS)
def test_the_teacher_gets_no_gradient_on_any_backend(op, backend_device):
    # The teacher's logits are a constant target, detached by the public API: a teacher that requires grad (e.g. a
    # teacher model run without no_grad) gets no gradient and does not make the loss require grad.
    backend, device = backend_device
    loss, inputs, teacher = _loss_with_a_teacher_that_requires_grad(backend, device, op, students_require_grad=True)
    loss.backward()
    assert teacher.grad is None
    assert all(t.grad is not None for t in inputs if t is not None)
    loss, _, _ = _loss_with_a_teacher_that_requires_grad(backend, device, op, students_require_grad=False)
    assert not loss.requires_grad
