"""dho_fast: fused dual-head distillation losses for DHO (semi-supervised KD from vision-language models).

The public API, re-exported from :mod:`dho_fast.ops`; the trainer and CLI are :mod:`dho_fast.train`, the Triton
kernels :mod:`dho_fast.kernels`.
"""

from dho_fast.ops import (
    AlphaBetaSearch,
    DualHead,
    dual_head_predict,
    fused_dual_head_loss,
    fused_linear_dual_head_loss,
    reference,
    search_alpha_beta,
)

__all__ = [
    "AlphaBetaSearch",
    "DualHead",
    "dual_head_predict",
    "fused_dual_head_loss",
    "fused_linear_dual_head_loss",
    "reference",
    "search_alpha_beta",
]
