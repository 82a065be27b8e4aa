"""Inputs and tolerances shared by the tests of every backend."""

import torch

import dho_fast

IGNORE = -100

# Kernel vs reference, both from the same (rounded) inputs. bf16/fp16 gradients are rounded to the dtype.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-4),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
}
LOSS_TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-5, atol=1e-5),  # the loss is accumulated in float32 from the same inputs
    torch.float16: dict(rtol=1e-5, atol=1e-5),
}


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
    """Random (ce_logits, kd_logits, teacher_logits, labels) of shape (n, c).

    labelled: "all", "none", "mixed" (about half the rows, at random) or "block" (rows [n/4, 3n/4): consecutive
    labelled rows, as in a batch of labelled then unlabelled samples, with unlabelled rows before and after them).
    masked_fraction: share of teacher entries set to -inf (every row keeps at least one finite entry).
    """
    g = generator or torch.Generator().manual_seed(torch.seed() % (2**31))
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


def run_backend(backend: str, ce, kd, teacher, labels, **kwargs):
    """(loss, ce_term, kd_term, grad ce_logits, grad kd_logits) of fused_dual_head_loss on leaf copies of the
    logits, backward from the loss."""
    ce = ce.detach().clone().requires_grad_()
    kd = kd.detach().clone().requires_grad_()
    terms = dho_fast.fused_dual_head_loss(ce, kd, teacher, labels, return_terms=True, backend=backend, **kwargs)
    terms[0].backward()
    return (*(t.detach() for t in terms), ce.grad, kd.grad)


def assert_backend_matches_reference(
    backend: str, inputs, dtype: torch.dtype, loss_tolerance: dict | None = None, **kwargs
) -> None:
    """Loss terms and gradients of ``backend`` equal the reference's within the dtype's tolerances (the loss terms'
    within ``loss_tolerance`` when given)."""
    got = run_backend(backend, *inputs, **kwargs)
    want = run_backend("reference", *inputs, **kwargs)
    tolerance = loss_tolerance or LOSS_TOLERANCES[dtype]
    for name, g, w in zip(("loss", "ce_term", "kd_term"), got[:3], want[:3], strict=True):
        torch.testing.assert_close(g, w, **tolerance, msg=lambda m, n=name: f"{backend} {n}: {m}")
    for name, g, w in zip(("grad ce_logits", "grad kd_logits"), got[3:], want[3:], strict=True):
        assert g.dtype == dtype, f"{backend} {name}: dtype {g.dtype}"
        torch.testing.assert_close(g, w, **TOLERANCES[dtype], msg=lambda m, n=name: f"{backend} {n}: {m}")
