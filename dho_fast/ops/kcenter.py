"""The public k-center step: the fused update of a pool's running minimum distances and its argmax."""

import torch

from dho_fast.ops import backends
from dho_fast.ops.validation import check_kcenter_args


def kcenter_update(
    points: torch.Tensor, centres: torch.Tensor, min_sq_dist: torch.Tensor, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of greedy k-center over a block of pool points: new centres lower each point's running minimum
    squared distance, in place, and the farthest remaining point is returned, all in one pass over ``points``.

    Args:
        points: (N, C) float32 or bfloat16 pool points (e.g. the blended probabilities of PCoreSet), rows
            contiguous; a memory-mapped tensor is fine: each row is read once per call. N may be 0.
        centres: (K, C) float32 new centres, K >= 1, on the device of ``points``.
        min_sq_dist: (N,) float32 on that device, updated in place:
            ``min_sq_dist[i] = min(min_sq_dist[i], min_k sum_c (points[i, c] - centres[k, c])^2)``, the sum taken in
            float32 over bf16 values converted exactly. An entry below 0 marks a point already picked: it is left
            as it is and never returned, and its row is not read. Start a pool at ``+inf``; NaN is a ValueError
            (not checked under torch.compile).
        backend: "auto", "cpu", "cuda", "triton" or "reference"; None reads ``$DHO_FAST_BACKEND`` (see
            dho_fast.ops.backends).

    Returns:
        ``(index, value)``: 0-dim int64 and float32 tensors on the device of ``points``: the first (lowest) index of
        the largest updated ``min_sq_dist`` and that value; ``(-1, -inf)`` when every point is picked or N = 0.

    The compiled backends ("cpu", every instruction set, and "cuda") sum each squared distance in one fixed order
    (csrc/kcenter_row.h), so they agree to the bit and break near ties alike; they do not read the rows of picked
    points.

    A squared distance that is not finite (NaN or inf in ``points`` or ``centres``, or an overflow) raises
    ``ValueError`` naming the row (:func:`~dho_fast.ops.validation.kcenter_row_error`) on every backend; ``min_sq_dist``
    is then partly updated. Wrong dtypes are a ``TypeError``; shapes, devices and non-contiguous tensors a
    ``ValueError``.
    """
    check_kcenter_args(points, centres, min_sq_dist)
    name = backends.resolve("kcenter_update", backend, points.device)
    return backends.run("kcenter_update", name, points, centres, min_sq_dist)
