"""Pure-PyTorch reference of the DHO loss, written from the formula; the oracle every backend is tested against.

It builds an ordinary autograd graph (no fused gradient) and checks values the way the kernels do, so it can also
be used as a backend (``backend="reference"``) on any device.
"""

import torch
import torch.nn.functional as F

from dho_fast._validation import check_teacher_values, count_labelled


def dual_head_loss(
    ce_logits: torch.Tensor,
    kd_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 2.0,
    ce_weight: float = 0.5,
    kd_weight: float = 0.5,
    kd_reduction: str = "split",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DHO loss of METHOD.md as ``(loss, ce_term, kd_term)``, computed in float32 (float64 for float64 input).

    ``loss = ce_weight * ce_term + kd_weight * kd_term`` with
    ``ce_term = mean_{labelled} CE(ce_logits, labels)`` (0 when no row is labelled) and
    ``kd_term = T^2 * (mean_{labelled} KL + mean_{unlabelled} KL)`` ("split", an empty group adds 0) or
    ``T^2 * mean_{all} KL`` ("mean"), ``KL_i = sum_c p_c (log p_c - log q_c)``, ``p = softmax(t / T)``,
    ``q = softmax(kd / T)``. Arguments are validated by the public API (``dho_fast.fused_dual_head_loss``).
    """
    acc = torch.float64 if ce_logits.dtype == torch.float64 else torch.float32
    ce, kd, t = ce_logits.to(acc), kd_logits.to(acc), teacher_logits.to(acc)
    num_labelled = count_labelled(labels, ce.shape[1], ignore_index)
    check_teacher_values(teacher_logits)
    labelled = labels != ignore_index

    if num_labelled > 0:
        ce_term = F.cross_entropy(ce[labelled], labels[labelled], label_smoothing=label_smoothing)
    else:
        ce_term = ce.sum() * 0.0  # keeps the graph connected so backward gives a zero gradient

    log_p = F.log_softmax(t / temperature, dim=1)
    log_q = F.log_softmax(kd / temperature, dim=1)
    # p * (log p - log q) with the 0 * (-inf) of masked teacher classes taken as 0.
    kl = torch.where(log_p.isneginf(), 0.0, log_p.exp() * (log_p - log_q)).sum(dim=1)
    if kd_reduction == "split":
        kd_term = kl.new_zeros(())
        for group in (labelled, ~labelled):
            if bool(group.any()):
                kd_term = kd_term + kl[group].mean()
    else:
        kd_term = kl.mean() if kl.numel() else kl.sum()
    kd_term = temperature**2 * kd_term
    return ce_weight * ce_term + kd_weight * kd_term, ce_term, kd_term


def dual_head_predict(ce_logits: torch.Tensor, kd_logits: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``alpha * softmax(ce_logits) + (1 - alpha) * softmax(kd_logits / beta)``, (N, C) in float32."""
    return alpha * torch.softmax(ce_logits.float(), dim=1) + (1 - alpha) * torch.softmax(
        kd_logits.float() / beta, dim=1
    )
