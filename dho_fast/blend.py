"""DHO's inference blend of the two heads and the validation grid search of its alpha and beta."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

import kernels

if kernels.has_triton():
    import kernels.blend  # noqa: F401  (registers dho_fast::dual_head_predict_triton and blend_search_triton)

#: METHOD.md's grid: alpha in {0, 0.05, ..., 1}, beta in {0.5, 0.75, 1, 1.25, 1.5, 2, 4}.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))
DEFAULT_BETAS: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)

# Elements of the (alphas, betas, rows, C) blend tensor materialised at once: bounds memory on large sets.
_BLEND_ELEMENTS_PER_CHUNK = 1 << 24


def _check_pair(ce_logits: torch.Tensor, kd_logits: torch.Tensor) -> None:
    if ce_logits.dim() != 2 or not ce_logits.is_floating_point():
        raise ValueError(
            f"ce_logits must be a float tensor of shape (N, C), got {ce_logits.dtype} {tuple(ce_logits.shape)}"
        )
    if kd_logits.shape != ce_logits.shape or kd_logits.device != ce_logits.device:
        raise ValueError(
            f"kd_logits must have the shape and device of ce_logits {tuple(ce_logits.shape)} on {ce_logits.device}, "
            f"got {tuple(kd_logits.shape)} on {kd_logits.device}"
        )


def _check_beta(beta: float, name: str = "beta") -> None:
    if not beta > 0:
        raise ValueError(f"{name} must be > 0, got {beta}")


def _check_alpha(alpha: float, name: str = "alpha") -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {alpha}")


def _triton_serves(*logits: torch.Tensor) -> bool:
    """The Triton kernels take over on CUDA tensors when no autograd graph is wanted through the blend."""
    device = logits[0].device
    wants_graph = torch.is_grad_enabled() and any(t.requires_grad for t in logits)
    return device.type == "cuda" and kernels.supports_device(device) and not wants_graph


def dual_head_predict(ce_logits: torch.Tensor, kd_logits: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Blended class probabilities of the two heads.

    ``p = alpha * softmax(ce_logits) + (1 - alpha) * softmax(kd_logits / beta)``; ``ce_logits`` and ``kd_logits``
    are (N, C) of any float dtype, alpha in [0, 1], beta > 0. Returns (N, C) float32 (float64 for float64 input);
    the prediction is ``p.argmax(1)``.
    """
    _check_pair(ce_logits, kd_logits)
    _check_alpha(alpha)
    _check_beta(beta)
    if _triton_serves(ce_logits, kd_logits):
        return torch.ops.dho_fast.dual_head_predict_triton(ce_logits, kd_logits, alpha, beta)
    acc = torch.promote_types(ce_logits.dtype, torch.float32)
    p_ce = torch.softmax(ce_logits.to(acc), dim=1)
    p_kd = torch.softmax(kd_logits.to(acc) / beta, dim=1)
    return alpha * p_ce + (1 - alpha) * p_kd


@dataclass(frozen=True)
class AlphaBetaSearch:
    """Result of :func:`search_alpha_beta`: the best pair and the accuracy of every pair."""

    alpha: float
    beta: float
    accuracy: float
    #: (len(alphas), len(betas)) float64 accuracies, ``table[i, j]`` for ``alphas[i]``, ``betas[j]``.
    table: torch.Tensor
    alphas: tuple[float, ...]
    betas: tuple[float, ...]


def search_alpha_beta(
    ce_logits: torch.Tensor,
    kd_logits: torch.Tensor,
    labels: torch.Tensor,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    betas: Sequence[float] = DEFAULT_BETAS,
) -> AlphaBetaSearch:
    """Accuracy of ``dual_head_predict(ce_logits, kd_logits, alpha, beta).argmax(1)`` for every grid pair.

    ``ce_logits``, ``kd_logits``: (N, C) float, N >= 1; ``labels``: (N,) int64 in [0, C). The logits are read once:
    each chunk of rows gets one softmax of the CE head, one per beta of the KD head, and all blends from those.
    The best pair maximises accuracy; ties go to the first pair in (alpha, beta) order of the grid.
    """
    _check_pair(ce_logits, kd_logits)
    n, c = ce_logits.shape
    if labels.dtype != torch.int64 or labels.shape != (n,) or labels.device != ce_logits.device:
        raise ValueError(
            f"labels must be int64 of shape ({n},) on {ce_logits.device}, got {labels.dtype} {tuple(labels.shape)}"
        )
    if n == 0:
        raise ValueError("ce_logits must have at least one row to search alpha and beta")
    if bool(((labels < 0) | (labels >= c)).any()):
        raise ValueError(f"labels must be in [0, {c}) for every row")
    if len(alphas) == 0 or len(betas) == 0:
        raise ValueError("alphas and betas must be non-empty")
    for a in alphas:
        _check_alpha(a, "alphas")
    for b in betas:
        _check_beta(b, "betas")

    acc = torch.promote_types(ce_logits.dtype, torch.float32)
    alpha_t = torch.tensor(list(alphas), dtype=acc, device=ce_logits.device).view(-1, 1, 1, 1)
    beta_t = torch.tensor(list(betas), dtype=acc, device=ce_logits.device).view(1, -1, 1, 1)
    if _triton_serves(ce_logits, kd_logits):
        correct = torch.ops.dho_fast.blend_search_triton(
            ce_logits, kd_logits, labels, alpha_t.flatten(), beta_t.flatten()
        )
    else:
        correct = _count_correct(ce_logits, kd_logits, labels, alpha_t, beta_t)
    table = correct.double().cpu() / n
    best = int(table.flatten().argmax())  # argmax returns the first maximum: ties go to the earliest pair
    i, j = divmod(best, len(betas))
    return AlphaBetaSearch(float(alphas[i]), float(betas[j]), float(table[i, j]), table, tuple(alphas), tuple(betas))


def _count_correct(
    ce_logits: torch.Tensor, kd_logits: torch.Tensor, labels: torch.Tensor, alpha_t: torch.Tensor, beta_t: torch.Tensor
) -> torch.Tensor:
    """(A, B) int64 hit counts of the grid in PyTorch, over chunks of rows that bound the (A, B, R, C) blend."""
    n, c = ce_logits.shape
    rows = max(1, _BLEND_ELEMENTS_PER_CHUNK // (alpha_t.numel() * beta_t.numel() * c))
    correct = torch.zeros(alpha_t.numel(), beta_t.numel(), dtype=torch.int64, device=ce_logits.device)
    for start in range(0, n, rows):
        ce = ce_logits[start : start + rows].to(alpha_t.dtype)
        kd = kd_logits[start : start + rows].to(alpha_t.dtype)
        p_ce = torch.softmax(ce, dim=1)  # (R, C)
        p_kd = torch.softmax(kd.unsqueeze(0).unsqueeze(0) / beta_t, dim=-1)  # (1, B, R, C)
        blend = alpha_t * p_ce + (1 - alpha_t) * p_kd  # (A, B, R, C)
        correct += (blend.argmax(dim=-1) == labels[start : start + rows]).sum(dim=-1)
    return correct
