"""Under torch.autocast the fused ops take the mixed dtypes a real model gives them and match explicit casts."""

import torch
from helpers import make_inputs

import dho_fast
from dho_fast import reference


def test_loss_under_autocast_promotes_to_the_teachers_dtype():
    _, _, teacher, labels = make_inputs(16, 40)
    head = torch.nn.Linear(8, 80)
    features = torch.randn(16, 8)
    grads = []
    for backend in ("cpu", "reference"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head(features)  # bfloat16 logits, float32 teacher
            assert logits.dtype == torch.bfloat16
            logits.retain_grad()
            ce, kd = logits.chunk(2, dim=1)
            if backend == "cpu":
                loss = dho_fast.fused_dual_head_loss(ce, kd, teacher, labels, backend="cpu")
            else:  # the explicit casts autocast must amount to
                want = reference.dual_head_loss(ce.float(), kd.float(), teacher, labels)[0]
        (loss if backend == "cpu" else want).backward()
        grads.append((head.weight.grad.clone(), logits.grad))
        head.weight.grad = None
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    (got, got_logits), (want_grad, want_logits) = grads
    # The logits' gradients are rounded to bfloat16 for autocast's GEMM backward: at most an ulp apart, and a bfloat16
    # ulp is up to 2^-7 of the value (2^-8 only at the bottom of a binade; a gradient just under 2^-13 rounding up to
    # it is one such case). The weight gradient sums that over the rows, |d logits|^T |features|.
    assert ((got_logits.float() - want_logits.float()).abs() <= 2.0**-7 * want_logits.float().abs() + 1e-7).all()
    bound = 2.0**-7 * (want_logits.float().abs().T @ features.abs()) + 1e-6
    assert ((got - want_grad).abs() <= bound).all()


def test_dual_head_loss_under_autocast_runs_the_gemms_in_the_autocast_dtype():
    _, _, teacher, labels = make_inputs(32, 24)
    torch.manual_seed(0)
    head = dho_fast.DualHead(16, 24)
    features = torch.randn(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head.loss(features, teacher, labels)
    loss.backward()
    assert head.ce_head.weight.grad.dtype == torch.float32

    bf16 = [t.detach().bfloat16().requires_grad_() for t in (head.ce_head.weight, head.kd_head.weight)]
    want = dho_fast.fused_linear_dual_head_loss(
        features.bfloat16(), bf16[0], head.ce_head.bias.bfloat16(), bf16[1], head.kd_head.bias.bfloat16(),
        teacher.bfloat16(), labels,
    )  # fmt: skip
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(head.ce_head.weight.grad, bf16[0].grad.float())
    torch.testing.assert_close(head.kd_head.weight.grad, bf16[1].grad.float())
