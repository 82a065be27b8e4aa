"""Pure PyTorch, written from the formulas: the DHO loss (the oracle every backend is tested against), the heads'
logits, the inference blend and its grid search, and the k-center step of active selection.

Each builds an ordinary autograd graph (no fused gradient) and checks values the way the kernels do, so it is also
the ``reference`` backend of dho_fast.ops.backends, on any device.
"""

import math

import torch
import torch.nn.functional as F

from dho_fast.ops.validation import (
    accumulate_dtype,
    check_teacher_probs,
    check_teacher_values,
    count_labelled,
    kcenter_row_error,
)

# Elements of the (alphas, betas, rows, C) blend tensor materialised at once by blend_search, and of the (rows, K, C)
# differences of kcenter_update: bounds their memory.
ELEMENTS_PER_CHUNK = 1 << 24


def dual_head_loss(
    ce_logits: torch.Tensor,
    kd_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 2.0,
    ce_loss_weight: float = 0.5,
    kd_loss_weight: float = 0.5,
    kd_reduction: str = "split",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    teacher_is_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DHO loss of METHOD.md as ``(loss, ce_term, kd_term)``, computed in float32 (float64 for float64 input).

    ``loss = ce_loss_weight * ce_term + kd_loss_weight * kd_term`` with
    ``ce_term = mean_{labelled} CE(ce_logits, labels)`` (0 when no row is labelled) and
    ``kd_term = T^2 * (mean_{labelled} KL + mean_{unlabelled} KL)`` ("split", an empty group adds 0) or
    ``T^2 * mean_{all} KL`` ("mean"), ``KL_i = sum_c p_c (log p_c - log q_c)``, ``p = softmax(t / T)``,
    ``q = softmax(kd / T)``; with ``teacher_is_probs``, ``teacher_logits`` holds (N, C) probabilities instead (any
    float dtype) and ``p = teacher / teacher.sum(1)``. Arguments are validated by the public API
    (``dho_fast.fused_dual_head_loss``).
    """
    acc = accumulate_dtype(ce_logits.dtype)
    ce, kd, t = ce_logits.to(acc), kd_logits.to(acc), teacher_logits.to(acc)
    num_labelled = count_labelled(labels, ce.shape[1], ignore_index)
    if teacher_is_probs:
        check_teacher_probs(teacher_logits)
        log_p = t.log() - t.sum(dim=1, keepdim=True).log()
    else:
        check_teacher_values(teacher_logits, temperature)
        log_p = F.log_softmax(t / temperature, dim=1)
    labelled = labels != ignore_index

    if num_labelled > 0:
        x, y = ce[labelled], labels[labelled]
        ce_rows = F.cross_entropy(x, y, reduction="none")  # (m - x_y) + log s: relative to the row maximum m
        if label_smoothing:
            # + eps (x_y - mean_c x_c) as in csrc/row_math.h cross_entropy_value: each difference relative to x_y, and
            # scaled by a power of two h <= 1 / (2 C), so that neither x_c - x_y nor their sum overflows near float's
            # maximum (F.cross_entropy's smoothing sums log-probabilities, which overflows there).
            c = x.shape[1]
            h = 0.5 ** ((c - 1).bit_length() + 1)
            x_y = x.gather(1, y[:, None])
            smoothing = label_smoothing / (c * h) * (x * h - x_y * h).sum(1)
            # A label whose logit is -inf has CE +inf; its smoothing sum is NaN (-inf - -inf).
            ce_rows = ce_rows - torch.where(x_y.squeeze(1).isneginf(), 0.0, smoothing)
        ce_term = ce_rows.mean()
    else:
        ce_term = ce.sum() * 0.0  # keeps the graph connected so backward gives a zero gradient

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
    return ce_loss_weight * ce_term + kd_loss_weight * kd_term, ce_term, kd_term


def dual_head_logits(
    features: torch.Tensor,
    ce_weight: torch.Tensor,
    ce_bias: torch.Tensor | None,
    kd_weight: torch.Tensor,
    kd_bias: torch.Tensor | None,
    *,
    kd_cosine: bool = False,
    kd_logit_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (N, C) logits of both linear heads on (N, D) features, which the fused linear op never materialises:
    ``(features @ ce_weight.T + ce_bias, kd_logit_scale * (g(features) @ kd_weight.T + kd_bias))`` with
    ``g = F.normalize`` when ``kd_cosine``, else the identity; in the features' dtype."""
    kd_features = F.normalize(features, dim=1) if kd_cosine else features
    return F.linear(features, ce_weight, ce_bias), kd_logit_scale * F.linear(kd_features, kd_weight, kd_bias)


def dual_head_predict(ce_logits: torch.Tensor, kd_logits: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``alpha * softmax(ce_logits) + (1 - alpha) * softmax(kd_logits / beta)``, (N, C) in float32 (float64 for
    float64 input)."""
    acc = accumulate_dtype(ce_logits.dtype)
    # One expression, the KD head's weight folded into the add: each softmax is freed as soon as it is used, so at
    # most three (N, C) buffers are alive at once.
    weighted_ce = alpha * torch.softmax(ce_logits.to(acc), dim=1)
    return torch.add(weighted_ce, torch.softmax(kd_logits.to(acc) / beta, dim=1), alpha=1 - alpha)


def blend_search(
    ce_logits: torch.Tensor, kd_logits: torch.Tensor, labels: torch.Tensor, alphas: torch.Tensor, betas: torch.Tensor
) -> torch.Tensor:
    """(A, B) int64 counts of rows whose ``dual_head_predict(ce, kd, alphas[a], betas[b]).argmax(1)`` (first
    maximum) equals the label; ``alphas`` (A,) and ``betas`` (B,) in the accumulation dtype of the logits. Rows go in
    chunks that bound the (A, B, rows, C) blend to :data:`ELEMENTS_PER_CHUNK` elements."""
    n, c = ce_logits.shape
    alpha_t, beta_t = alphas.view(-1, 1, 1, 1), betas.view(1, -1, 1, 1)
    rows = max(1, ELEMENTS_PER_CHUNK // (alphas.numel() * betas.numel() * c))
    correct = torch.zeros(alphas.numel(), betas.numel(), dtype=torch.int64, device=ce_logits.device)
    for start in range(0, n, rows):
        ce = ce_logits[start : start + rows].to(alphas.dtype)
        kd = kd_logits[start : start + rows].to(alphas.dtype)
        p_ce = torch.softmax(ce, dim=1)  # (R, C)
        p_kd = torch.softmax(kd.unsqueeze(0).unsqueeze(0) / beta_t, dim=-1)  # (1, B, R, C)
        blend = alpha_t * p_ce + (1 - alpha_t) * p_kd  # (A, B, R, C)
        correct += (blend.argmax(dim=-1) == labels[start : start + rows]).sum(dim=-1)
    return correct


def kcenter_update(
    points: torch.Tensor, centres: torch.Tensor, min_sq_dist: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dho_fast.ops.kcenter.kcenter_update` in eager PyTorch: rows in chunks that bound the (rows, K, C)
    differences to :data:`ELEMENTS_PER_CHUNK` elements; the first maximum by ``torch.max``."""
    n, c = points.shape
    rows = max(1, ELEMENTS_PER_CHUNK // (centres.shape[0] * max(c, 1)))
    for start in range(0, n, rows):
        block = points[start : start + rows].float()
        sq_dists = (block.unsqueeze(1) - centres).square().sum(dim=2)  # (rows, K)
        current = min_sq_dist[start : start + rows]
        # As the compiled kernels: a picked point's row is not read, any centre's distance to the others must be finite.
        bad = ((current >= 0) & ~torch.isfinite(sq_dists).all(dim=1)).nonzero()
        if bad.numel():
            raise ValueError(kcenter_row_error(start + int(bad[0])))
        current.copy_(torch.where(current < 0, current, torch.minimum(current, sq_dists.amin(dim=1))))
    if n == 0:
        return torch.tensor(-1, device=points.device), torch.tensor(-math.inf, device=points.device)
    value, index = min_sq_dist.max(dim=0)
    if value < 0:
        return torch.tensor(-1, device=points.device), torch.tensor(-math.inf, device=points.device)
    return index, value
