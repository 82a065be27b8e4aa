"""Under torch.autocast the fused ops take the mixed dtypes a real model gives them and match explicit casts."""

import torch
from helpers import make_inputs

import dho_fast
from dho_fast import reference


def test_loss_under_autocast_promotes_to_the_teachers_dtype():
    _, _, teacher, labels = make_inputs(16, 40)
    head = torch.nn.Linear(8, 80)
    features = torch.randn(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce, kd = head(features).chunk(2, dim=1)  # bfloat16 logits, float32 teacher
        assert ce.dtype == torch.bfloat16
        loss = dho_fast.fused_dual_head_loss(ce, kd, teacher, labels)
    loss.backward()
    got = head.weight.grad.clone()
    head.weight.grad = None

    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce, kd = head(features).chunk(2, dim=1)
    want = reference.dual_head_loss(ce.float(), kd.float(), teacher, labels)[0]
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, head.weight.grad, rtol=1e-5, atol=1e-6)


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
