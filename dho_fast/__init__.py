"""dho_fast: fused dual-head distillation losses for DHO (semi-supervised KD from vision-language models) and the
k-center step of ActiveKD's selection.

The public ops, re-exported from :mod:`dho_fast.ops`; active selection (PCoreSet and its baselines) is
:mod:`dho_fast.select`, the trainer, the active-learning loop and the CLI are :mod:`dho_fast.train`, the Triton
kernels :mod:`dho_fast.kernels`.
"""

from dho_fast.ops import (
    AlphaBetaSearch,
    DualHead,
    dual_head_predict,
    fused_dual_head_loss,
    fused_linear_dual_head_loss,
    kcenter_update,
    reference,
    search_alpha_beta,
)

__all__ = [
    "AlphaBetaSearch",
    "DualHead",
    "dual_head_predict",
    "fused_dual_head_loss",
    "fused_linear_dual_head_loss",
    "kcenter_update",
    "reference",
    "search_alpha_beta",
]
