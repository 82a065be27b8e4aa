"""The DHO loss as a user writes it in eager PyTorch: the baseline every fused provider is measured against."""

import torch
import torch.nn.functional as F


def eager_dual_head_loss(
    ce_logits: torch.Tensor,
    kd_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 2.0,
    ce_weight: float = 0.5,
    kd_weight: float = 0.5,
    ignore_index: int = -100,
) -> torch.Tensor:
    """``w_ce * CE(labelled) + w_kd * T^2 * (KL(labelled) + KL(unlabelled))`` with F.cross_entropy and F.kl_div."""
    labelled = labels != ignore_index
    ce = F.cross_entropy(ce_logits[labelled], labels[labelled])
    log_q = F.log_softmax(kd_logits / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=1)
    kd = F.kl_div(log_q[labelled], log_p[labelled], reduction="batchmean", log_target=True) + F.kl_div(
        log_q[~labelled], log_p[~labelled], reduction="batchmean", log_target=True
    )
    return ce_weight * ce + kd_weight * temperature**2 * kd
