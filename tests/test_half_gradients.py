"""Half-precision gradients under loss scaling, as mixed-precision training takes them: ``(loss * 65536).backward()``.

The fused ops compute their gradients in the forward, before the loss scale is known. Rounded to float16 there, the
small entries of a batch's gradient (a probability times 1 / number of rows) underflow to 0 and the scale that
follows cannot bring them back; the gradient that reaches a half-precision leaf must instead be as accurate as eager
PyTorch's, which computes in float32 and rounds once, after scaling. Both checked against float64 on the same rounded
inputs, and against eager PyTorch's error there.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import GRAD_TOLERANCES, IGNORE, LOSS_BACKENDS, LOSS_KW, backend_params, make_inputs, oracle_loss

import dho_fast
from dho_fast import kernels, reference

#: GradScaler's initial scale.
SCALE = 65536.0
HALF_DTYPES = [torch.float16, torch.bfloat16]
LINEAR_BACKENDS = backend_params("cpu", "reference", "cuda", "triton-cuda")


def scaled_grads(loss_fn, inputs):
    """The gradients of ``SCALE * loss_fn(*inputs)`` with respect to each of inputs (leaf copies)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    return torch.autograd.grad(loss_fn(*leaves) * SCALE, leaves)


def assert_as_accurate_as_eager(name, got, eager, exact, magnitude, dtype):
    """Element-wise: ``got`` (of ``dtype``) no further from the float64 ``exact`` than eager PyTorch's gradient of the
    same inputs, plus what two float32 computations of it may differ by (float32's ``terms`` tolerance of the sum of
    the absolute values of its terms, ``magnitude``: a KD gradient is a difference of probabilities), half an ulp of
    the dtype (two float32 results a little apart may round to neighbouring values) and float16's subnormal
    spacing."""
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, want {dtype}"
    got, eager, exact, magnitude = (t.detach().double().cpu() for t in (got, eager, exact, magnitude))
    bound = (eager - exact).abs() + GRAD_TOLERANCES[torch.float32]["terms"] * magnitude
    bound = bound + torch.finfo(dtype).eps / 2 * exact.abs() + 2.0**-24
    error = (got - exact).abs()
    bad = ~(error <= bound)
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} of {got.numel()} elements less accurate than eager PyTorch's; worst: error "
        f"{float(error[bad].max()):.3g} where eager's is {float((eager - exact).abs()[bad][error[bad].argmax()]):.3g}"
    )


@pytest.mark.parametrize("backend_device", LOSS_BACKENDS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_loss_gradients_under_a_loss_scale(backend_device, dtype):
    backend, device = backend_device
    # The interpreter runs a program per row in Python: fewer rows, which still puts many entries of w / N * p below
    # float16's smallest subnormal.
    n = 256 if backend == "triton" and kernels.interpreted() else 4096
    ce, kd, teacher, labels = make_inputs(n, 1000, dtype, labelled="mixed", device=device)

    def fused(a, b):
        return dho_fast.fused_dual_head_loss(a, b, teacher, labels, backend=backend, **LOSS_KW)

    def eager(a, b):  # PyTorch's loss in float32 on the half logits, its gradient rounded to them once
        return reference.dual_head_loss(a.float(), b.float(), teacher.float(), labels, **LOSS_KW)[0]

    def exact(a, b, magnitudes=None):
        return oracle_loss(a, b, teacher.double(), labels, magnitudes=magnitudes, **LOSS_KW)[0]

    got = scaled_grads(fused, (ce, kd))
    want = scaled_grads(exact, (ce.double(), kd.double()))
    magnitudes = scaled_grads(lambda a, b: exact(a, b, "gradient"), (ce.double(), kd.double()))
    eager_grads = scaled_grads(eager, (ce, kd))
    labelled = labels != IGNORE
    # No entry underflows to 0 where the exact gradient, rounded to the dtype, is not 0.
    lost = (want[0][labelled].to(dtype) != 0) & (got[0][labelled] == 0)
    assert not lost.any(), f"{int(lost.sum())} of {lost.numel()} labelled rows' CE-gradient entries underflowed to 0"
    for i, name in enumerate(("grad ce_logits", "grad kd_logits")):
        assert_as_accurate_as_eager(f"{backend} {name}", got[i], eager_grads[i], want[i], magnitudes[i], dtype)


@pytest.mark.parametrize("backend_device", LINEAR_BACKENDS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_linear_loss_gradients_under_autocast_and_a_loss_scale(backend_device, dtype):
    # The trainer's `precision: fp16` (or bf16): float32 parameters, the op under autocast, GradScaler's scale. Eager
    # AMP is nn.Linear's GEMMs in the autocast dtype and the reference loss in float32; both round the logits to the
    # dtype, which dominates their error, so each gradient is compared as a whole: its mean and largest error against
    # float64 (on the same rounded inputs and parameters) at most 1.5 times eager AMP's, plus an ulp.
    backend, device = backend_device
    n, d, c = 4096, 32, 1000
    _, _, teacher, labels = make_inputs(n, c, labelled="mixed", device=device)
    teacher = teacher.to(dtype).float()  # the same teacher whether or not a cast to the dtype meets it
    scale = 3.0 / d**0.5
    params = [torch.randn(n, d), torch.randn(c, d) * scale, torch.randn(c), torch.randn(c, d) * scale, torch.randn(c)]
    params = [p.to(device) for p in params]

    def under_autocast(loss_fn):
        def run(*leaves):
            with torch.autocast(device, dtype=dtype):
                return loss_fn(*leaves)

        return run

    def fused(*leaves):
        return dho_fast.fused_linear_dual_head_loss(*leaves, teacher, labels, backend=backend, **LOSS_KW)

    def eager_amp(x, w_ce, b_ce, w_kd, b_kd):
        return reference.dual_head_loss(F.linear(x, w_ce, b_ce), F.linear(x, w_kd, b_kd), teacher, labels, **LOSS_KW)[0]

    def exact(x, w_ce, b_ce, w_kd, b_kd):
        return oracle_loss(x @ w_ce.T + b_ce, x @ w_kd.T + b_kd, teacher.double(), labels, **LOSS_KW)[0]

    got = scaled_grads(under_autocast(fused), params)
    eager = scaled_grads(under_autocast(eager_amp), params)
    want = scaled_grads(exact, [p.to(dtype).double() for p in params])
    ulp = torch.finfo(dtype).eps
    names = ("features", "ce_weight", "ce_bias", "kd_weight", "kd_bias")
    for name, g, e, w in zip(names, got, eager, want, strict=True):
        assert g.dtype == torch.float32, f"{name}: dtype {g.dtype}"
        error, eager_error = (g.double() - w).abs(), (e.double() - w).abs()
        magnitude = w.abs()
        assert error.mean() <= 1.5 * eager_error.mean() + ulp * magnitude.mean(), (
            f"{backend} grad {name}: mean error {float(error.mean()):.3g}, eager AMP's {float(eager_error.mean()):.3g}"
        )
        assert error.max() <= 1.5 * eager_error.max() + ulp * magnitude.max(), (
            f"{backend} grad {name}: largest error {float(error.max()):.3g}, eager AMP's {float(eager_error.max()):.3g}"
        )
