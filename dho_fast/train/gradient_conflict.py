"""The paper's gradient-conflict measure: how far the CE term's and the KD term's gradients point apart.

For a student whose loss is ``w_ce * ce_term + w_kd * kd_term`` over shared features ``f`` (N, D), the conflict is
the cosine ``cos(a, b) = <a, b> / (|a| |b|)`` between ``a = d ce_term / d x`` and ``b = d kd_term / d x``, both
flattened, for ``x`` the features (``cos_features``) and for the backbone's parameters (``cos_backbone``, all of them
as one vector). Negative: the terms pull the shared weights apart; the loss weights, positive scalars, do not change
it. It is undefined (NaN) when either gradient is zero, e.g. a micro-batch without labelled rows.
"""

import torch
from torch import nn


def _cosine(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The cosine between two vectors given as the list of their matching pieces ``(a_i, b_i)`` (any shapes, equal
    within a pair): ``sum <a_i, b_i> / sqrt(sum |a_i|^2 sum |b_i|^2)``, a 0-dim float64 tensor, NaN when either vector
    is zero. Accumulated in float64, without a host sync."""
    sums = torch.stack(
        [torch.stack([(a.double() * b.double()).sum(), a.double().square().sum(), b.double().square().sum()])
         for a, b in pairs]
    ).sum(0)  # fmt: skip
    return sums[0] / (sums[1] * sums[2]).sqrt()


def term_gradient_cosines(
    ce_term: torch.Tensor,
    kd_term: torch.Tensor,
    features: torch.Tensor,
    backbone: nn.Module | None = None,
    *,
    backbone_grad_scale: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(cos_features, cos_backbone)``: the cosines between the gradients of ``ce_term`` and ``kd_term`` with
    respect to ``features`` and to ``backbone``'s trainable parameters (module docs); 0-dim float64 tensors,
    ``cos_backbone`` None without ``backbone``.

    Args:
        ce_term, kd_term: the two loss terms, 0-dim, both functions of ``features`` in a graph that is kept (the
            training step's backward runs after this).
        features: the (N, D) features both heads read, as the student's forward returned them.
        backbone: the module that computed ``features``; None skips the parameter cosine.
        backbone_grad_scale: multiplies the feature gradients before they enter the backbone's backward (the fp16
            loss scale, so half-precision gradients do not underflow); the cosine does not depend on it.

    Cost: the feature gradients come from the loss ops' own backward, which scales the gradients their forward
    computed (the fused linear op of a DHO student holds each term's feature gradient already; a single-head
    student's costs one (N, C) x (C, D) GEMM per term), with no backward through the backbone. The parameter cosine
    adds two backward passes through the backbone.
    """
    grad_ce, grad_kd = (torch.autograd.grad(term, features, retain_graph=True)[0] for term in (ce_term, kd_term))
    cos_features = _cosine([(grad_ce, grad_kd)])
    if backbone is None:
        return cos_features, None
    params = [p for p in backbone.parameters() if p.requires_grad]
    per_term = [
        torch.autograd.grad(features, params, grad * backbone_grad_scale, retain_graph=True, allow_unused=True)
        for grad in (grad_ce, grad_kd)
    ]
    pairs = [(a, b) for a, b in zip(*per_term, strict=True) if a is not None and b is not None]
    if not pairs:  # a frozen backbone
        return cos_features, torch.full_like(cos_features, torch.nan)
    return cos_features, _cosine(pairs)
