"""The selection strategies by name: what the active-learning loop calls each round."""

import torch

from dho_fast.select.baselines import badge, class_balanced, entropy, random
from dho_fast.select.coresets import coreset, pcoreset
from dho_fast.select.outputs import PoolOutputs

#: The strategies :func:`select` knows, PCoreSet first (METHOD.md's ActiveKD and its baselines).
STRATEGIES: tuple[str, ...] = ("pcoreset", "random", "entropy", "coreset", "badge", "class_balanced")


def select(
    strategy: str,
    pool: PoolOutputs,
    labelled: PoolOutputs,
    labelled_labels: torch.Tensor,
    budget: int,
    *,
    seed: int,
    progress: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """(budget,) int64 indices into ``pool`` of the points ``strategy`` picks, in pick order, distinct.

    ``pool``, ``labelled``: the student's :func:`~dho_fast.select.pool_outputs` on the unlabelled pool and on the
    labelled set; ``labelled_labels``: (L,) int64 labels of the labelled set. The inputs each strategy reads:
    pcoreset the blends of both, coreset the features of both, entropy the pool's blends, badge the pool's blends and
    features, class_balanced the pool's blends and the labels; random only the pool size. ``seed`` seeds a fresh
    ``torch.Generator`` for the random ones (random, badge, class_balanced), so a round's picks are reproducible.
    ``progress``: pcoreset's and coreset's progress lines; ``backend``: their k-center op's backend.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    for name, outputs in (("pool", pool), ("labelled", labelled)):
        if not isinstance(outputs, PoolOutputs):
            raise TypeError(f"{name} must be a PoolOutputs, got {type(outputs).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    generator = torch.Generator().manual_seed(seed)
    if strategy == "pcoreset":
        return pcoreset(pool.probs(), labelled.probs(), budget, backend=backend, progress=progress)
    if strategy == "coreset":
        return coreset(pool.features, labelled.features, budget, backend=backend, progress=progress)
    if strategy == "entropy":
        return entropy(pool.probs(), budget)
    if strategy == "badge":
        return badge(pool.probs(), pool.features, budget, generator=generator)
    if strategy == "class_balanced":
        return class_balanced(pool.probs(), labelled_labels, budget, generator=generator)
    return random(len(pool), budget, generator=generator)
