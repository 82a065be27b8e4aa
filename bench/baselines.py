"""The DHO loss as users write it without dho_fast: the baselines every fused provider is measured against.

``eager_dual_head_loss`` is plain PyTorch (also compiled with torch.compile as the "compile" provider);
``liger_dual_head_loss`` builds the same loss from Liger-Kernel's fused Triton losses (GPU only, when installed).
"""

from collections.abc import Callable

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


def liger_dual_head_loss() -> Callable[..., torch.Tensor] | None:
    """The same loss from Liger-Kernel's fused cross-entropy and KL-divergence losses, around PyTorch's log_softmax
    (Liger's KL takes log-probabilities); None when liger_kernel is not installed. Its kernels are Triton: CUDA only."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
    except ImportError:
        return None
    ce_loss, kl_loss = LigerCrossEntropyLoss(), LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def loss(ce_logits, kd_logits, teacher_logits, labels, temperature=2.0, ce_weight=0.5, kd_weight=0.5):
        labelled = labels != -100
        log_q = torch.log_softmax(kd_logits.float() / temperature, dim=1)
        log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=1)
        kd = kl_loss(log_q[labelled], log_p[labelled]) + kl_loss(log_q[~labelled], log_p[~labelled])
        return ce_weight * ce_loss(ce_logits[labelled], labels[labelled]) + kd_weight * temperature**2 * kd

    return loss
