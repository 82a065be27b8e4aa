"""dho_fast: fused dual-head distillation losses for DHO (semi-supervised KD from vision-language models)."""

from dho_fast import reference
from dho_fast._compile_cache import key_compile_caches
from dho_fast.blend import AlphaBetaSearch, dual_head_predict, search_alpha_beta
from dho_fast.heads import DualHead
from dho_fast.linear_loss import fused_linear_dual_head_loss
from dho_fast.loss import fused_dual_head_loss

__all__ = [
    "AlphaBetaSearch",
    "DualHead",
    "dual_head_predict",
    "fused_dual_head_loss",
    "fused_linear_dual_head_loss",
    "reference",
    "search_alpha_beta",
]

# torch.compile must not serve graphs compiled against another build of these ops (dho_fast/_compile_cache.py).
key_compile_caches()
