"""The one backend table of dho_fast's ops: op x backend -> the kernel that runs it, and the rule for "auto".

Every public op asks :func:`resolve` which backend serves its tensors, then calls ``KERNELS[op][backend]``. A backend
is one of :data:`BACKENDS`:

- ``cpu`` / ``cuda``: the compiled extension's kernels (csrc/cpu, csrc/cuda) on tensors of that device;
- ``triton``: the Triton kernels of dho_fast.kernels, on CUDA tensors (and on CPU tensors under
  ``TRITON_INTERPRET=1``, which is how they are tested without a GPU);
- ``reference``: pure PyTorch (dho_fast.ops.reference), any device, an ordinary autograd graph.

"auto" (the default; ``$DHO_FAST_BACKEND`` overrides it) takes the first available of the device's preference,
``cpu`` then ``reference`` on CPU tensors, ``cuda`` then ``triton`` then ``reference`` on CUDA tensors, ``cpu`` (its
shape functions) on meta tensors, skipping
kernels without an autograd formula when a graph through the op is wanted. Falling back to ``reference`` for an op
whose compiled or Triton kernels are the point of using it warns once per call site.
"""

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dho_fast import kernels
from dho_fast.ops import reference, registry  # importing registry also registers the ops
from dho_fast.ops.extension import EXTENSION_ERROR, has_cuda_kernels, has_extension
from dho_fast.ops.teacher import OpTeacher
from dho_fast.ops.validation import TEACHER_FORM_LOGITS, TEACHER_FORM_SPARSE

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
# Meta tensors (shapes without data) go to the compiled ops, whose fake implementations compute the output shapes.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference"), "meta": ("cpu",)}


def _grad_flags(*logits: torch.Tensor) -> tuple[bool, ...]:
    """Which logits the grad-in-forward kernels must compute gradients for."""
    on = torch.is_grad_enabled()
    return tuple(on and t.requires_grad for t in logits)


def _grad_in_forward_loss(op_name: str) -> Callable:
    """The public loss's kernel on the grad-in-forward op ``torch.ops.dho_fast.<op_name>`` (compiled or Triton,
    looked up when called: it exists only when its backend does): the gradients computed when autograd needs them,
    written times the loss weights (registry.saved_gradient_scale), so that loss.backward() hands them on."""

    def run(ce, kd, teacher, labels, temperature, ce_loss_weight, kd_loss_weight, kd_split, ignore_index,
            label_smoothing, *teacher_args):  # fmt: skip
        weights = (ce_loss_weight, kd_loss_weight)
        scales = tuple(registry.saved_gradient_scale(w) for w in weights)
        op = getattr(torch.ops.dho_fast, op_name)
        return op(
            ce, kd, teacher, labels, temperature, *weights, kd_split, ignore_index, label_smoothing,
            *_grad_flags(ce, kd), *scales, *teacher_args,
        )[:3]  # fmt: skip

    return run


def _loss_reference(ce, kd, teacher, labels, temperature, ce_loss_weight, kd_loss_weight, kd_split, ignore_index,
                    label_smoothing, teacher_form=TEACHER_FORM_LOGITS, teacher_indices=None,
                    teacher_row_terms=None):  # fmt: skip
    if teacher_form == TEACHER_FORM_SPARSE:  # the reference may build the dense teacher that the kernels never do
        teacher = OpTeacher(teacher_form, teacher, teacher_indices, teacher_row_terms).dense_probs(ce.shape[1])
    return reference.dual_head_loss(
        ce, kd, teacher, labels, temperature=temperature, ce_loss_weight=ce_loss_weight,
        kd_loss_weight=kd_loss_weight, kd_reduction="split" if kd_split else "mean", ignore_index=ignore_index,
        label_smoothing=label_smoothing, teacher_is_probs=teacher_form != TEACHER_FORM_LOGITS,
    )  # fmt: skip


def _linear_compiled(*args):
    # The op's per-chunk step goes to the chunk op's kernel of the device: compiled, or Triton's on CUDA when the
    # extension has no CUDA kernels (the availability rules below say which).
    return torch.ops.dho_fast.fused_linear_dual_head_loss(*args)


def _linear_reference(features, ce_weight, ce_bias, kd_weight, kd_bias, teacher, labels, kd_cosine, kd_logit_scale,
                      _chunk_size, *loss_args):  # fmt: skip
    # loss_args: the loss's scalars, then the teacher's form and tensors, as _loss_reference takes them.
    ce_logits, kd_logits = reference.dual_head_logits(
        features, ce_weight, ce_bias, kd_weight, kd_bias, kd_cosine=kd_cosine, kd_logit_scale=kd_logit_scale
    )
    return _loss_reference(ce_logits, kd_logits, teacher, labels, *loss_args)


def _kcenter_compiled(points, centres, min_sq_dist):
    return torch.ops.dho_fast.kcenter_update(points, centres, min_sq_dist)


def _predict_triton(*args):
    return torch.ops.dho_fast.dual_head_predict_triton(*args)


def _search_triton(*args):
    return torch.ops.dho_fast.blend_search_triton(*args)


def _kcenter_triton(*args):
    return torch.ops.dho_fast.kcenter_update_triton(*args)


@dataclass(frozen=True)
class Kernel:
    """One backend of one op: what to call, and whether it can run here."""

    run: Callable
    #: None when the kernel can run on tensors of ``device``, else the error saying why it cannot: ``ValueError``
    #: for tensors of the wrong device, ``RuntimeError`` for a missing build or library.
    unavailable: Callable[[torch.device], Exception | None]
    #: Whether autograd can differentiate through it (the inference blend's Triton kernels cannot).
    differentiable: bool = True


def _needs_extension(device_type: str) -> Callable[[torch.device], Exception | None]:
    def unavailable(device: torch.device) -> Exception | None:
        if device.type not in (device_type, "meta"):
            return ValueError(f"needs {device_type.upper()} tensors, got tensors on {device}")
        if not has_extension():
            return RuntimeError(f"needs the compiled extension, which failed to load: {EXTENSION_ERROR}")
        if device_type == "cuda" and not has_cuda_kernels():
            return RuntimeError("needs the extension built with its CUDA kernels (DHO_FAST_CUDA=1)")
        return None

    return unavailable


def _needs_triton(device: torch.device) -> Exception | None:
    if not kernels.has_triton():
        return RuntimeError("needs Triton installed (and a torch with torch.library.triton_op)")
    if not kernels.supports_device(device):
        return ValueError(f"needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got tensors on {device}")
    return None


def _linear_triton(device: torch.device) -> Exception | None:
    """The fused linear op reaches Triton through its per-chunk op, whose CUDA kernel dho_fast.ops.registry makes the
    Triton one when the extension was built without CUDA kernels."""
    reason = _needs_triton(device)
    if reason is not None:
        return reason
    if device.type != "cuda":
        return ValueError(f"needs CUDA tensors (its chunks reach Triton through the CUDA dispatch), got {device}")
    if not has_extension():
        return RuntimeError(f"needs the compiled extension, which failed to load: {EXTENSION_ERROR}")
    if has_cuda_kernels():
        return RuntimeError("runs its chunks in the compiled CUDA kernels of this build: use backend='cuda'")
    return None


def _anywhere(_device: torch.device) -> None:
    return None


def _has_data(device: torch.device) -> Exception | None:
    """The reference loss checks labels and teacher rows by reading them, which meta tensors cannot."""
    if device.type == "meta":
        return ValueError("reads the tensors' values, which meta tensors lack: use backend='auto' or 'cpu'")
    return None


#: op -> backend -> kernel. Arguments are each op's positional arguments (see the op's public function).
KERNELS: dict[str, dict[str, Kernel]] = {
    "dual_head_loss": {
        "cpu": Kernel(_grad_in_forward_loss("dual_head_loss"), _needs_extension("cpu")),
        "cuda": Kernel(_grad_in_forward_loss("dual_head_loss"), _needs_extension("cuda")),
        "triton": Kernel(_grad_in_forward_loss("dual_head_loss_triton"), _needs_triton),
        "reference": Kernel(_loss_reference, _has_data),
    },
    "fused_linear_dual_head_loss": {
        "cpu": Kernel(_linear_compiled, _needs_extension("cpu")),
        "cuda": Kernel(_linear_compiled, _needs_extension("cuda")),
        "triton": Kernel(_linear_compiled, _linear_triton),
        "reference": Kernel(_linear_reference, _has_data),
    },
    "dual_head_predict": {
        "triton": Kernel(_predict_triton, _needs_triton, differentiable=False),
        "reference": Kernel(reference.dual_head_predict, _anywhere),
    },
    "blend_search": {
        "triton": Kernel(_search_triton, _needs_triton, differentiable=False),
        "reference": Kernel(reference.blend_search, _anywhere),
    },
    "kcenter_update": {
        "cpu": Kernel(_kcenter_compiled, _needs_extension("cpu"), differentiable=False),
        "cuda": Kernel(_kcenter_compiled, _needs_extension("cuda"), differentiable=False),
        "triton": Kernel(_kcenter_triton, _needs_triton, differentiable=False),
        "reference": Kernel(reference.kcenter_update, _has_data, differentiable=False),
    },
}
#: Ops whose eager PyTorch ``reference`` is an ordinary implementation rather than a slow fallback.
_REFERENCE_IS_NATIVE = frozenset({"dual_head_predict", "blend_search"})


def resolve(op: str, backend: str | None, device: torch.device, *, wants_graph: bool = False) -> str:
    """The backend that runs ``op`` on tensors of ``device``: ``backend``, else ``$DHO_FAST_BACKEND``, else "auto".

    ``wants_graph``: autograd must differentiate through the op. An explicit backend that cannot run raises
    ``RuntimeError`` (a missing build or library) or ``ValueError`` (the tensors' device) naming the reason.
    """
    name = backend or os.environ.get("DHO_FAST_BACKEND") or "auto"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    table = KERNELS[op]
    if name != "auto":
        kernel = table.get(name)
        if kernel is None:
            raise ValueError(f"backend={name!r} has no kernel of {op}; it has {tuple(table)}")
        reason = kernel.unavailable(device)
        if reason is not None:
            raise type(reason)(f"backend={name!r} of {op} {reason}")
        if wants_graph and not kernel.differentiable:
            raise ValueError(f"backend={name!r} of {op} has no autograd formula; call it under torch.no_grad()")
        return name
    for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
        kernel = table.get(candidate)
        if kernel is None or kernel.unavailable(device) is not None or (wants_graph and not kernel.differentiable):
            continue
        if candidate == "reference" and op not in _REFERENCE_IS_NATIVE:
            warnings.warn(
                f"dho_fast: {op} has no compiled kernel for {device.type} tensors here, using the slower reference "
                "backend",
                stacklevel=3,
            )
        return candidate
    reason = table["reference"].unavailable(device)
    if reason is not None:
        raise type(reason)(f"no backend of {op} can run here; backend='reference' {reason}")
    return "reference"


def run(op: str, backend: str, *args):
    """Calls ``op``'s kernel of ``backend`` (a name :func:`resolve` returned) with the op's positional arguments."""
    return KERNELS[op][backend].run(*args)
