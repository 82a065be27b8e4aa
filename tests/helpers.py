"""What the tests of every backend share: the backends as pytest parameters, random inputs, the float64 oracle of the
DHO loss, and the tolerance rules.

Tolerances (STYLE.md, "Tests that can fail"):

- values (loss terms): against the float64 oracle on the same rounded inputs, :data:`VALUE_TOLERANCES` by dtype,
  ``|got - oracle| <= rtol |oracle| + terms * magnitude + atol``, ``magnitude`` the sum of the absolute values of the
  value's terms in log-probabilities (a KL near 0 is a difference of two cross-entropies); the kernels accumulate in
  float32 (float64 for float64 input) whatever the input dtype.
- gradients: element-wise against the float64 oracle on the same rounded inputs (apple/ml-cross-entropy's rule, the
  error at most eager PyTorch's plus a tolerance of the dtype), :data:`GRAD_TOLERANCES`:
  ``|got - oracle| <= |eager - oracle| + rtol |oracle| + terms * magnitude + atol``.
  ``eager`` is PyTorch's own result in the input dtype; ``rtol`` about an ulp of the dtype (the rounding of the
  result); ``magnitude`` the sum of the absolute values of the terms an element is made of (``w (softmax + target)``
  for a CE gradient, ``w / T (q + p)`` for a KD one), so a difference of two probabilities that cancels is held to the
  accuracy of the probabilities; ``atol`` the smallest normal number of the accumulation dtype (float16's subnormal
  spacing for float16 results), times the largest weight a probability enters a gradient with (an exp may flush a
  probability below it to 0: check_loss's ``atol_weight``). A gradient of these losses is bounded by its loss
  weights, never by the logits, so no bound grows with the logits.
"""

import pytest
import torch

import dho_fast
from dho_fast import kernels
from dho_fast.ops import extension

IGNORE = -100
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LOSS_KW = dict(temperature=2.0, ce_loss_weight=0.5, kd_loss_weight=0.5)

# Loss terms are accumulated in float32 (float64 for float64 input) from the same rounded inputs as the oracle's, so
# half inputs get float32's tolerances.
VALUE_TOLERANCES = {
    torch.float64: dict(rtol=1e-10, terms=1e-13, atol=2.0**-1022),
    torch.float32: dict(rtol=1e-5, terms=1e-6, atol=2.0**-126),
    torch.bfloat16: dict(rtol=1e-5, terms=1e-6, atol=2.0**-126),
    torch.float16: dict(rtol=1e-5, terms=1e-6, atol=2.0**-126),
}
# atol: below the smallest normal number of the accumulation dtype an exp may flush to 0; float16 results round to
# its subnormals' spacing.
GRAD_TOLERANCES = {
    torch.float64: dict(rtol=1e-15, terms=1e-12, atol=2.0**-1022),
    # The CPU kernel's float32 exp is ATen's exp_u20 (at most 2.4e-6 relative, README).
    torch.float32: dict(rtol=2.0**-23, terms=1e-5, atol=2.0**-126),
    # Computed in float32, rounded to the dtype: within an ulp of the dtype and float32's error on the terms.
    torch.bfloat16: dict(rtol=2.0**-8, terms=1e-5, atol=2.0**-126),
    torch.float16: dict(rtol=2.0**-10, terms=1e-5, atol=2.0**-24),
}

_NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
_NO_CUDA_KERNELS = pytest.mark.skipif(
    not extension.has_cuda_kernels(), reason="needs the extension built with its CUDA kernels"
)
# The Triton kernels on CPU tensors run only under the interpreter, in their own invocation (`-m triton`, with
# TRITON_INTERPRET=1 set before triton is imported); on CUDA tensors only without it.
_INTERPRETER = [
    pytest.mark.triton,
    pytest.mark.skipif(not (kernels.has_triton() and kernels.interpreted()), reason="needs Triton, TRITON_INTERPRET=1"),
    # The interpreter evaluates both sides of tl.where with numpy, which warns about the discarded side's inf/NaN.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]
_TRITON_ON_GPU = pytest.mark.skipif(
    not kernels.has_triton() or kernels.interpreted(), reason="needs Triton, without TRITON_INTERPRET"
)


def backend_params(*names: str) -> list:
    """pytest parameters ``(backend, device)`` of the named backends, with the marks that select and skip them.

    Names: "cpu" and "reference" (CPU tensors, always), "triton" (CPU tensors under the interpreter, marker
    ``triton``), "cuda" and "triton-cuda" (CUDA tensors, marker ``gpu``)."""
    table = {
        "cpu": pytest.param(("cpu", "cpu"), id="cpu"),
        "reference": pytest.param(("reference", "cpu"), id="reference"),
        "triton": pytest.param(("triton", "cpu"), id="triton", marks=_INTERPRETER),
        "cuda": pytest.param(("cuda", "cuda"), id="cuda", marks=[pytest.mark.gpu, _NO_GPU, _NO_CUDA_KERNELS]),
        "triton-cuda": pytest.param(
            ("triton", "cuda"), id="triton-cuda", marks=[pytest.mark.gpu, _NO_GPU, _TRITON_ON_GPU]
        ),
    }
    return [table[name] for name in names]


#: Every backend of fused_dual_head_loss and of its per-chunk op.
LOSS_BACKENDS = backend_params("cpu", "reference", "triton", "cuda", "triton-cuda")


def make_inputs(
    n: int,
    c: int,
    dtype: torch.dtype = torch.float32,
    *,
    labelled: str = "mixed",
    scale: float = 3.0,
    masked_fraction: float = 0.0,
    device: str = "cpu",
    generator: torch.Generator | None = None,
):
    """Random (ce_logits, kd_logits, teacher_logits, labels) of shape (n, c), from ``generator`` or torch's global
    generator (tests/conftest.py seeds it afresh for every test and reports the seed when one fails).

    labelled: "all", "none", "mixed" (about half the rows, at random) or "block" (rows [n/4, 3n/4): consecutive
    labelled rows, as in a batch of labelled then unlabelled samples, with unlabelled rows before and after them).
    masked_fraction: share of teacher entries set to -inf (every row keeps at least one finite entry).
    """
    g = generator
    ce = (torch.randn(n, c, generator=g) * scale).to(dtype)
    kd = (torch.randn(n, c, generator=g) * scale).to(dtype)
    teacher = torch.randn(n, c, generator=g) * scale
    if masked_fraction > 0:
        mask = torch.rand(n, c, generator=g) < masked_fraction
        mask[torch.arange(n), torch.randint(0, c, (n,), generator=g)] = False
        teacher = teacher.masked_fill(mask, float("-inf"))
    teacher = teacher.to(dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    if labelled == "none":
        labels[:] = IGNORE
    elif labelled == "mixed":
        labels[torch.rand(n, generator=g) < 0.5] = IGNORE
    elif labelled == "block":
        labels[: n // 4] = IGNORE
        labels[3 * n // 4 :] = IGNORE
    elif labelled != "all":
        raise ValueError(labelled)
    return ce.to(device), kd.to(device), teacher.to(device), labels.to(device)


def run_steps(step, model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 3):
    """``steps`` optimizer steps on the loss ``step(model)``: (the losses, copies of the parameters after them)."""
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = step(model)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses, [p.detach().clone() for p in model.parameters()]


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    """Rows of log-probabilities with the maximum subtracted first, so large logits lose no precision."""
    shifted = x - x.max(dim=1, keepdim=True).values.detach()
    return shifted - shifted.exp().sum(dim=1, keepdim=True).log()


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    m = x.max(dim=1).values.detach()
    return m + (x - m[:, None]).exp().sum(dim=1).log()


def oracle_loss(
    ce_logits: torch.Tensor,
    kd_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 2.0,
    ce_loss_weight: float = 0.5,
    kd_loss_weight: float = 0.5,
    kd_reduction: str = "split",
    ignore_index: int = IGNORE,
    label_smoothing: float = 0.0,
    magnitudes: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """METHOD.md's DHO loss written out in float64 as (loss, ce_term, kd_term), independently of dho_fast.reference:
    the smoothed targets spelt out, each group's mean taken separately. Differentiable in the logits (pass float64
    leaves).

    ``magnitudes`` gives the sums of absolute values that the tolerances scale with instead (tests/helpers.py's
    docstring): "value", each row's CE (a sum of non-negative terms) plus 1 and ``sum_c p_c (|log p_c| + |log q_c|)``
    plus 2 for its KL (a log of a sum of exps is rounded relative to 1, even where it is 0); "gradient", a loss whose
    gradients are the magnitudes of the loss gradients' terms, ``w (softmax + target)`` and ``w / T (q + p)`` (up to
    sign), from ``lse(x) + target . x`` and ``lse(b) + p . b``."""
    ce, kd, t = (x.double() for x in (ce_logits, kd_logits, teacher_logits))
    c = ce.shape[1]
    labelled = labels != ignore_index
    rows = labelled.nonzero().flatten()
    targets = torch.full((len(rows), c), label_smoothing / c, dtype=torch.float64, device=ce.device)
    targets[torch.arange(len(rows)), labels[rows]] += 1.0 - label_smoothing
    if magnitudes == "gradient":
        ce_rows = _logsumexp(ce[rows]) + (targets * ce[rows]).sum(1)
    else:
        ce_rows = -(targets * _log_softmax(ce[rows])).sum(1)
        if magnitudes == "value":
            ce_rows = ce_rows + 1.0  # the log of a sum of exps, rounded relative to 1 even where the CE is 0
    ce_term = ce_rows.mean() if len(rows) else ce.sum() * 0.0

    a, b = t / temperature, kd / temperature
    log_p, log_q = _log_softmax(a), _log_softmax(b)
    p = log_p.exp()
    if magnitudes == "gradient":
        kl = _logsumexp(b) + torch.where(p > 0, p * b, 0.0).sum(1)
    elif magnitudes == "value":
        kl = torch.where(p > 0, p * (log_p.abs() + log_q.abs()), 0.0).sum(1) + 2.0  # and two logs of sums
    else:
        kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(1)  # a masked teacher class adds 0
    groups = (labelled, ~labelled) if kd_reduction == "split" else (torch.ones_like(labelled),)
    kd_term = sum((kl[g].mean() for g in groups if g.any()), kl.sum() * 0.0)
    kd_term = temperature**2 * kd_term
    return ce_loss_weight * ce_term + kd_loss_weight * kd_term, ce_term, kd_term


def loss_terms_and_grads(fn, ce, kd, teacher, labels, combine=None, **kwargs):
    """(loss, ce_term, kd_term) of ``fn`` on leaf copies of the logits, and the gradients of
    ``combine(loss, ce_term, kd_term)`` (default: the loss) with respect to ce_logits and kd_logits."""
    ce = ce.detach().clone().requires_grad_()
    kd = kd.detach().clone().requires_grad_()
    terms = fn(ce, kd, teacher, labels, **kwargs)
    out = terms[0] if combine is None else combine(*terms)
    grad_ce, grad_kd = torch.autograd.grad(out, (ce, kd), allow_unused=True, materialize_grads=True)
    return [t.detach() for t in terms], [grad_ce, grad_kd]


def fused(backend: str, teacher: dict | None = None):
    """fused_dual_head_loss with ``return_terms`` on ``backend``, as a function of the oracle's arguments; with
    ``teacher`` (the keyword arguments of a probability or top-k teacher) the oracle's teacher logits are ignored and
    the teacher is that one."""

    def fn(ce, kd, teacher_logits, labels, **kwargs):
        if teacher is not None:
            return dho_fast.fused_dual_head_loss(ce, kd, None, labels, **teacher, return_terms=True, backend=backend,
                                                 **kwargs)  # fmt: skip
        return dho_fast.fused_dual_head_loss(ce, kd, teacher_logits, labels, return_terms=True, backend=backend,
                                             **kwargs)  # fmt: skip

    return fn


def eager(*args, **kwargs):
    """PyTorch's own DHO loss in the inputs' dtype: the low-precision error the gradient bound allows."""
    return fused("reference")(*args, **kwargs)


def as_float64(*tensors):
    return [t.double() if t is not None and t.is_floating_point() else t for t in tensors]


def assert_values_close(
    name: str,
    got: torch.Tensor,
    want: torch.Tensor,
    dtype: torch.dtype,
    magnitude: torch.Tensor | float = 0.0,
    rounding: torch.Tensor | float = 0.0,
) -> None:
    """A value (loss term) against the float64 oracle: ``|got - want| <= rtol |want| + terms * magnitude + atol +
    rounding`` by :data:`VALUE_TOLERANCES`, ``magnitude`` the oracle's sum of the absolute values of the value's terms,
    ``rounding`` what rounding intermediate results to the dtype may change it by. The value is float32, float64 for
    float64 input."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.dtype == acc, f"{name}: dtype {got.dtype}, want {acc}"
    got, want, magnitude, rounding = (float(torch.as_tensor(x).detach()) for x in (got, want, magnitude, rounding))
    tol = VALUE_TOLERANCES[dtype]
    bound = tol["rtol"] * abs(want) + tol["terms"] * abs(magnitude) + tol["atol"] + rounding
    assert abs(got - want) <= bound, f"{name}: got {got:.12g}, want {want:.12g}, bound {bound:.3g}"


def assert_grad_within(
    name: str,
    got: torch.Tensor,
    want: torch.Tensor,
    dtype: torch.dtype,
    *,
    magnitude: torch.Tensor,
    eager: torch.Tensor | None = None,
    terms: float | None = None,
    rtol: float | None = None,
    atol_weight: float = 1.0,
) -> None:
    """Element-wise ``|got - want| <= |eager - want| + rtol |want| + terms * magnitude + atol_weight * atol`` with
    :data:`GRAD_TOLERANCES` of ``dtype`` (``terms`` and ``rtol`` override the table's; ``atol_weight`` bounds the
    factor a probability is multiplied by in the gradient, as a flushed exp costs that times atol): ``want`` the
    float64 oracle on the same rounded inputs, ``magnitude`` the sum of the absolute values of each element's terms,
    ``eager`` PyTorch's result in the input dtype (None for the eager backend itself). ``got`` must have the input
    dtype and be written everywhere (a NaN fails)."""
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, want {dtype}"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, want {tuple(want.shape)}"
    got, want, magnitude = (t.detach().double().cpu() for t in (got, want, magnitude))
    tol = GRAD_TOLERANCES[dtype]
    rtol = tol["rtol"] if rtol is None else rtol
    bound = rtol * want.abs() + (tol["terms"] if terms is None else terms) * magnitude.abs() + atol_weight * tol["atol"]
    if eager is not None:
        bound = bound + (eager.detach().double().cpu() - want).abs()
    error = (got - want).abs()
    ok = error <= bound  # False where got is NaN
    if not bool(ok.all()):
        excess = torch.where(ok, -1.0, (error - bound).nan_to_num(float("inf")))
        index = tuple(int(i) for i in torch.unravel_index(excess.flatten().argmax(), got.shape))
        raise AssertionError(
            f"{name}: {int((~ok).sum())} of {got.numel()} elements outside the bound; worst at {index}: got "
            f"{float(got[index]):.9g}, want {float(want[index]):.9g}, bound {float(bound[index]):.3g}"
        )


def result_rtol(backend: str, device: torch.device, dtype: torch.dtype) -> float | None:
    """The Triton interpreter converts float32 to bfloat16 by truncation, not rounding: a bfloat16 result is then
    within one ulp (2^-7 relative) instead of half an ulp. None: the table's."""
    if backend == "triton" and device.type == "cpu" and dtype == torch.bfloat16:
        return 2.0**-7
    return None


def check_loss(backend: str, inputs, dtype: torch.dtype, combine=None, teacher: dict | None = None, **kwargs) -> None:
    """The correctness check of one backend of fused_dual_head_loss: loss, ce_term and kd_term against the float64
    oracle, and the gradients of ``combine(loss, ce_term, kd_term)`` (default: the loss) for both logits
    element-wise against it. ``teacher``: the op gets this probability or top-k teacher (fused's) instead of
    ``inputs``' teacher logits, which give the oracle the same distribution (e.g. ``T log p`` in float64)."""
    values, grads = loss_terms_and_grads(fused(backend, teacher), *inputs, combine=combine, **kwargs)
    want_values, want_grads = loss_terms_and_grads(oracle_loss, *as_float64(*inputs), combine=combine, **kwargs)
    value_magnitudes = oracle_loss(*as_float64(*inputs), magnitudes="value", **kwargs)
    _, magnitudes = loss_terms_and_grads(
        oracle_loss, *as_float64(*inputs), combine=combine, magnitudes="gradient", **kwargs
    )
    eager_grads = None
    if backend != "reference":
        eager_grads = loss_terms_and_grads(fused("reference", teacher), *inputs, combine=combine, **kwargs)[1]
    rtol = result_rtol(backend, inputs[0].device, dtype)
    # A probability that an exp flushed to 0 below the smallest normal enters a gradient times its weight: at most
    # w_ce (a CE gradient, w_ce / n_labelled) or w_kd T (a KD one, w_kd T^2 / n_group / T), each probability once.
    weights = {k: kwargs.get(k, LOSS_KW.get(k, 0.5)) for k in ("temperature", "ce_loss_weight", "kd_loss_weight")}
    atol_weight = 2 * max(1.0, weights["ce_loss_weight"], weights["kd_loss_weight"] * weights["temperature"])
    for name, got, want, magnitude in zip(
        ("loss", "ce_term", "kd_term"), values, want_values, value_magnitudes, strict=True
    ):
        assert_values_close(f"{backend} {name}", got, want, dtype, magnitude)
    for i, name in enumerate(("grad ce_logits", "grad kd_logits")):
        eager_grad = eager_grads[i] if eager_grads else None
        assert_grad_within(
            f"{backend} {name}", grads[i], want_grads[i], dtype, magnitude=magnitudes[i], eager=eager_grad, rtol=rtol,
            atol_weight=atol_weight,
        )  # fmt: skip
