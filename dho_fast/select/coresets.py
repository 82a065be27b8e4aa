"""PCoreSet (greedy k-center on the students' probabilities) and coreset (on their features): METHOD.md's ActiveKD."""

import torch
import torch.distributed as dist

from dho_fast.select.checks import check_matrix, default_chunk_rows
from dho_fast.select.kcenter import POINT_DTYPES, greedy_kcenter


def pcoreset(
    pool_probs: torch.Tensor,
    labelled_probs: torch.Tensor,
    budget: int,
    *,
    chunk_rows: int | None = None,
    group: dist.ProcessGroup | None = None,
    backend: str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """PCoreSet: greedy k-center in probability space with Euclidean distance.

    ``pool_probs`` (N, C) and ``labelled_probs`` (L, C): float32 or bfloat16 (storage; distances are float32) DHO
    blends (:func:`~dho_fast.select.blend_probs`); the pool may be memory-mapped, or this rank's shard of it (see
    :func:`~dho_fast.select.kcenter.greedy_kcenter` for ``chunk_rows``, ``group``, ``backend``, ``progress``). Each
    pick is the pool point whose distance ``min_c ||p - c||_2`` to the nearest centre (the labelled blends, then the
    earlier picks) is largest, the lowest pool index on ties, as the reference's recompute-everything loop picks it.
    With no labelled row (L = 0) the first pick is the pool point farthest from the pool's mean blend (the
    reference cannot start from an empty set). Returns (budget,) int64 pool indices in pick order; budget 0 gives
    an empty tensor, budget > N a ValueError.
    """
    return greedy_kcenter(
        pool_probs, labelled_probs, budget, chunk_rows=chunk_rows, group=group, backend=backend,
        progress=progress, names=("pool_probs", "labelled_probs"), desc="pcoreset",
    )  # fmt: skip


def _unit_rows(name: str, features: torch.Tensor, chunk_rows: int | None) -> torch.Tensor:
    """(N, D) float32 L2-normalised rows of ``features``, normalised in float64 chunk by chunk (a large finite row
    must not overflow its norm); a zero row stays zero, a NaN or inf stays non-finite for the driver to report."""
    check_matrix(name, features, POINT_DTYPES)
    out = torch.empty(features.shape, dtype=torch.float32, device=features.device)
    rows = chunk_rows or default_chunk_rows(features.shape[1])
    for start in range(0, features.shape[0], rows):
        block = features[start : start + rows].double()
        out[start : start + rows] = torch.nn.functional.normalize(block, dim=1)
    return out


def coreset(
    pool_features: torch.Tensor,
    labelled_features: torch.Tensor,
    budget: int,
    *,
    chunk_rows: int | None = None,
    group: dist.ProcessGroup | None = None,
    backend: str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Coreset (Sener & Savarese): greedy k-center on L2-normalised penultimate features, cosine distance.

    ``pool_features`` (N, D) and ``labelled_features`` (L, D): float32 or bfloat16; the labelled features are the
    starting centres, arguments otherwise as in :func:`pcoreset`. For unit vectors ``||a - b||^2 = 2 - 2 cos(a, b)``,
    a monotone function of the reference's distance ``1 - cos``: the same Euclidean k-center kernel gives the same
    order, in exact arithmetic. In float32 (the kernel's squared distances of the rows normalised in float64, then
    rounded to float32) two candidates whose cosines to their nearest centres differ by about float32's rounding
    (1e-7) may be ordered otherwise than the reference's float32 ``1 - a @ b`` orders them. A zero feature row stays
    zero, at distance 1 from every unit vector (``F.normalize``'s convention, as in the reference).

    Unlike :func:`pcoreset` this normalises into a float32 copy of the pool (or shard), so the pool must fit in
    memory. Returns (budget,) int64 pool indices in pick order.
    """
    pool = _unit_rows("pool_features", pool_features, chunk_rows)
    labelled = _unit_rows("labelled_features", labelled_features, chunk_rows)
    return greedy_kcenter(
        pool, labelled, budget, chunk_rows=chunk_rows, group=group, backend=backend, progress=progress,
        names=("pool_features", "labelled_features"), desc="coreset",
    )  # fmt: skip
