"""dho_fast's public ops and everything that makes them torch ops.

Layout (each module has one job; nothing here imports dho_fast.train or dho_fast.select):

- ``loss``, ``linear_loss``, ``blend``, ``heads``, ``kcenter``: the public functions and ``DualHead``;
- ``backends``: the one backend table (op x backend -> kernel) and the rule for "auto";
- ``registry``: every ``register_fake`` / ``register_autograd`` / ``triton_op`` of the ops;
- ``extension``: loading the compiled extension ``dho_fast._C``;
- ``validation``: argument checks and the messages of the value errors;
- ``reference``: pure PyTorch from the formulas, the oracle and the ``reference`` backend;
- ``compile_cache``: keys torch.compile's caches on this installation.
"""

from dho_fast.ops import reference
from dho_fast.ops.blend import DEFAULT_ALPHAS, DEFAULT_BETAS, AlphaBetaSearch, dual_head_predict, search_alpha_beta
from dho_fast.ops.compile_cache import key_compile_caches
from dho_fast.ops.heads import DualHead, init_linears_from_text
from dho_fast.ops.kcenter import kcenter_update
from dho_fast.ops.linear_loss import default_chunk_size, fused_linear_dual_head_loss
from dho_fast.ops.loss import fused_dual_head_loss

__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_BETAS",
    "AlphaBetaSearch",
    "DualHead",
    "default_chunk_size",
    "dual_head_predict",
    "fused_dual_head_loss",
    "fused_linear_dual_head_loss",
    "init_linears_from_text",
    "kcenter_update",
    "reference",
    "search_alpha_beta",
]

# torch.compile must not serve graphs compiled against another build of these ops (compile_cache.py).
key_compile_caches()
