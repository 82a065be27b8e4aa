"""DHO's inference blend of the two heads and the validation grid search of its alpha and beta."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dho_fast.ops import backends
from dho_fast.ops.validation import accumulate_dtype, check_number

#: METHOD.md's grid: alpha in {0, 0.05, ..., 1}, beta in {0.5, 0.75, 1, 1.25, 1.5, 2, 4}.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))
DEFAULT_BETAS: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)


def _check_pair(ce_logits: torch.Tensor, kd_logits: torch.Tensor) -> None:
    for name, t in (("ce_logits", ce_logits), ("kd_logits", kd_logits)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a float tensor of shape (N, C), got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor of shape (N, C), got {t.dtype}")
    if ce_logits.dim() != 2:
        raise ValueError(f"ce_logits must be a float tensor of shape (N, C), got shape {tuple(ce_logits.shape)}")
    if kd_logits.shape != ce_logits.shape or kd_logits.device != ce_logits.device:
        raise ValueError(
            f"kd_logits must have the shape and device of ce_logits {tuple(ce_logits.shape)} on {ce_logits.device}, "
            f"got {tuple(kd_logits.shape)} on {kd_logits.device}"
        )


def _check_beta(beta: float, name: str = "beta") -> None:
    check_number(name, beta, "> 0", lambda v: v > 0)


def _check_alpha(alpha: float, name: str = "alpha") -> None:
    check_number(name, alpha, "in [0, 1]", lambda v: 0 <= v <= 1)


def _grid(name: str, values: Sequence[float] | torch.Tensor) -> tuple[float, ...]:
    """A non-empty grid axis as floats; a 1-d tensor or array is read as its values."""
    if hasattr(values, "tolist"):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
    if len(values) == 0:
        raise ValueError(f"{name} must be non-empty")
    return tuple(values)


def _wants_graph(*logits: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in logits)


def dual_head_predict(
    ce_logits: torch.Tensor, kd_logits: torch.Tensor, alpha: float, beta: float, *, backend: str | None = None
) -> torch.Tensor:
    """Blended class probabilities of the two heads.

    ``p = alpha * softmax(ce_logits) + (1 - alpha) * softmax(kd_logits / beta)``; ``ce_logits`` and ``kd_logits``
    are (N, C) of any float dtype, alpha in [0, 1], beta > 0. Returns (N, C) float32 (float64 for float64 input);
    the prediction is ``p.argmax(1)``. ``backend`` as in :func:`dho_fast.fused_dual_head_loss`: "auto" runs the
    Triton kernel on CUDA tensors when no autograd graph through the blend is wanted, eager PyTorch ("reference")
    otherwise.
    """
    _check_pair(ce_logits, kd_logits)
    _check_alpha(alpha)
    _check_beta(beta)
    wants_graph = _wants_graph(ce_logits, kd_logits)
    name = backends.resolve("dual_head_predict", backend, ce_logits.device, wants_graph=wants_graph)
    return backends.run("dual_head_predict", name, ce_logits, kd_logits, float(alpha), float(beta))


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
    *,
    backend: str | None = None,
) -> AlphaBetaSearch:
    """Accuracy of ``dual_head_predict(ce_logits, kd_logits, alpha, beta).argmax(1)`` for every grid pair.

    ``ce_logits``, ``kd_logits``: (N, C) float, N >= 1; ``labels``: (N,) int64 in [0, C). The logits are read once:
    each chunk of rows gets one softmax of the CE head, one per beta of the KD head, and all blends from those.
    The best pair maximises accuracy; ties go to the first pair in the reference protocol's scan of the grid
    (METHOD.md: "beta-major, alpha-minor, strict >"): betas in the given order, and for each the alphas from the
    last to the first. The reference weighs the heads ``(1 - a) softmax(z_ce) + a softmax(z_kd / beta)`` and scans
    its ``a`` upwards; here ``alpha`` weighs the CE head, ``alpha = 1 - a``, so its scan runs downwards from the
    pure-CE end of the default grid. (When every pair has accuracy 0 this gives the last alpha and first beta; the
    reference then keeps its initial ``a = 0, beta = 1``.) ``backend`` as in :func:`dual_head_predict` (the search
    has no autograd graph).
    """
    _check_pair(ce_logits, kd_logits)
    n, c = ce_logits.shape
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an int64 tensor of shape ({n},), got {type(labels).__name__}")
    if ce_logits.is_meta:
        raise ValueError("search_alpha_beta needs logits with data (it returns accuracies), got meta tensors")
    if labels.shape != (n,) or labels.device != ce_logits.device or labels.dtype != torch.int64:
        error = TypeError if labels.shape == (n,) and labels.device == ce_logits.device else ValueError
        raise error(
            f"labels must be int64 of shape ({n},) on {ce_logits.device}, got {labels.dtype} {tuple(labels.shape)}"
        )
    if n == 0:
        raise ValueError("ce_logits must have at least one row to search alpha and beta")
    if bool(((labels < 0) | (labels >= c)).any()):
        raise ValueError(f"labels must be in [0, {c}) for every row")
    alphas, betas = _grid("alphas", alphas), _grid("betas", betas)
    for a in alphas:
        _check_alpha(a, "alphas")
    for b in betas:
        _check_beta(b, "betas")

    acc = accumulate_dtype(ce_logits.dtype)
    alpha_t = torch.tensor(list(alphas), dtype=acc, device=ce_logits.device)
    beta_t = torch.tensor(list(betas), dtype=acc, device=ce_logits.device)
    name = backends.resolve("blend_search", backend, ce_logits.device)
    correct = backends.run("blend_search", name, ce_logits, kd_logits, labels, alpha_t, beta_t)
    table = correct.double().cpu() / n
    # The first maximum of the reference's scan: beta-major, alphas last to first.
    best = int(table.flip(0).t().flatten().argmax())
    j, reversed_i = divmod(best, len(alphas))
    i = len(alphas) - 1 - reversed_i
    return AlphaBetaSearch(float(alphas[i]), float(betas[j]), float(table[i, j]), table, tuple(alphas), tuple(betas))
