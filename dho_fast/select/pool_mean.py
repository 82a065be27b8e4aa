"""The column mean of a pool that does not depend on how the pool is cut into chunks or ranks.

A float64 sum of float32 values rounds, so summing the same rows in another order (other chunks, shards summed on
their ranks and then across them) can change its last bits, and with them the float32 mean and a tie between two
points' distances to it. Here each value goes into the bin of its binary exponent: the values of one bin are multiples
of ``2^(e - 24)`` below ``2^e`` (float32's 24-bit significand; bfloat16 values are float32 values), so a float64 sum of
up to ``2^29`` of them is exact, in any order. The bins are added up last, in one fixed order. The mean is therefore a
function of the set of rows alone, for pools of up to ``2^29`` rows.
"""

import torch

# frexp exponents of float32 values, as float64: 2^-149 (the smallest subnormal) has -148, float32's maximum 128.
_MIN_EXPONENT, _MAX_EXPONENT = -148, 128
NUM_BINS = _MAX_EXPONENT - _MIN_EXPONENT + 1


def binned_column_sums(points: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """(NUM_BINS, C) float64 exact per-exponent sums of the columns of (N, C) float32/bfloat16 finite ``points``,
    read ``chunk_rows`` rows at a time; add such tables of several parts of a pool (exactly) with ``+`` or an
    all-reduce, then :func:`mean_of_bins`."""
    bins = torch.zeros(NUM_BINS, points.shape[1], dtype=torch.float64, device=points.device)
    for start in range(0, points.shape[0], chunk_rows):
        values = points[start : start + chunk_rows].double()
        exponents = torch.frexp(values).exponent.long() - _MIN_EXPONENT  # 0 gets exponent 0: it adds nothing
        bins.scatter_add_(0, exponents, values)
    return bins


def mean_of_bins(bins: torch.Tensor, count: int) -> torch.Tensor:
    """(1, C) float32 mean of ``count`` rows from their :func:`binned_column_sums`: the bins summed one after another
    in float64 (a fixed order, unlike a parallel reduction), divided by ``count``, rounded to float32."""
    total = torch.zeros_like(bins[0])
    for row in bins:
        total += row
    return (total / count).float().unsqueeze(0)
