"""Evaluation of a student: both heads' logits over a split, their accuracies, and DHO's blend."""

import contextlib

import torch
from torch.utils.data import DataLoader

from dho_fast.ops import dual_head_predict, search_alpha_beta
from dho_fast.train.distributed import DistInfo, gather_interleaved
from dho_fast.train.students import Student

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for "bf16"/"fp16" on ``device``; nothing for "fp32"."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


@torch.no_grad()
def predict_logits(
    student: Student,
    dataset: torch.utils.data.Dataset,
    info: DistInfo,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ce_logits, kd_logits, labels)`` of every image of ``dataset``, in its order: (N, C) float32, (N, C)
    float32, (N,) int64 on the CPU. Ranks share the images and gather the rows; the student is left in eval mode.
    """
    student.eval()
    total = len(dataset)
    if total == 0:
        raise ValueError("cannot evaluate an empty split")
    indices = list(range(info.rank, total, info.world_size))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=num_workers)
    ce_rows, kd_rows, label_rows = [], [], []
    for batch in loader:
        with autocast(info.device, precision):
            ce, kd = student.logits(batch["student"].to(info.device, non_blocking=True))
        ce_rows.append(ce.float())
        kd_rows.append(kd.float())
        label_rows.append(batch["label"].to(info.device))
    ce = gather_interleaved(torch.cat(ce_rows), total, info).cpu()
    kd = gather_interleaved(torch.cat(kd_rows), total, info).cpu()
    labels = gather_interleaved(torch.cat(label_rows), total, info).cpu()
    return ce, kd, labels


def accuracy(logits_or_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of (N, C) scores against (N,) labels, in [0, 1]."""
    return float((logits_or_probs.argmax(dim=1) == labels).double().mean())


def head_metrics(
    ce_logits: torch.Tensor,
    kd_logits: torch.Tensor,
    labels: torch.Tensor,
    method: str,
    *,
    alpha: float | None = None,
    beta: float | None = None,
) -> dict[str, float]:
    """Accuracies of a split. "dho": ``acc_ce``, ``acc_kd`` and ``acc_blend`` of DHO's blend with the given
    ``alpha``/``beta``, or with the pair :func:`~dho_fast.search_alpha_beta` finds on these rows when they are None
    (``alpha``/``beta`` are returned either way). "kd"/"ce": ``acc`` of the single head."""
    if method != "dho":
        return {"acc": accuracy(ce_logits, labels)}
    metrics = {"acc_ce": accuracy(ce_logits, labels), "acc_kd": accuracy(kd_logits, labels)}
    if alpha is None:
        search = search_alpha_beta(ce_logits, kd_logits, labels)
        alpha, beta = search.alpha, search.beta
    metrics.update(
        alpha=float(alpha),
        beta=float(beta),
        acc_blend=accuracy(dual_head_predict(ce_logits, kd_logits, alpha, beta), labels),
    )
    return metrics
