"""Active selection for ActiveKD (METHOD.md): PCoreSet and its baselines; uses only the public op API.

Layout (each module has one job; nothing here imports dho_fast.train):

- ``outputs``: :class:`PoolOutputs` (both heads' logits and the features of a student on a set of images),
  :func:`pool_outputs` (computing them, batched, streamed, without augmentation) and :func:`blend_probs` (the blend
  the selections use, alpha = 0.5, beta = 1);
- ``kcenter``: the greedy k-center driver over :func:`dho_fast.ops.kcenter_update` (chunks, memory-mapped pools,
  torch.distributed shards);
- ``coresets``: :func:`pcoreset` (k-center on blends) and :func:`coreset` (on normalised features), through it;
- ``pool_mean``: the pool's column mean independent of chunks and ranks (the first pick from an empty labelled set);
- ``baselines``: :func:`random`, :func:`entropy`, :func:`badge`, :func:`class_balanced`;
- ``strategies``: :data:`STRATEGIES` and :func:`select`, the strategies by name;
- ``checks``, ``progress``: argument checks and the progress line.
"""

from dho_fast.select.baselines import badge, class_balanced, entropy, random
from dho_fast.select.coresets import coreset, pcoreset
from dho_fast.select.kcenter import greedy_kcenter
from dho_fast.select.outputs import PoolOutputs, blend_probs, pool_outputs
from dho_fast.select.strategies import STRATEGIES, select

__all__ = [
    "STRATEGIES",
    "PoolOutputs",
    "badge",
    "blend_probs",
    "class_balanced",
    "coreset",
    "entropy",
    "greedy_kcenter",
    "pcoreset",
    "pool_outputs",
    "random",
    "select",
]
