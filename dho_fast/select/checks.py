"""Argument checks of dho_fast.select, in dho_fast.ops.validation's vocabulary: a bad value, shape or device is a
``ValueError``, a wrong dtype or Python type a ``TypeError``; each message names the argument."""

import torch

from dho_fast.ops.validation import FLOAT_DTYPES, check_int, describe

#: Elements read at once by the row checks of inputs too large to convert in one piece (e.g. memory-mapped pools).
CHECK_ELEMENTS = 1 << 22


def check_matrix(
    name: str, t: object, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES, *, cols: int | None = None
) -> None:
    """``t`` is a 2-d tensor of one of ``dtypes`` (``TypeError`` otherwise), with ``cols`` columns when given."""
    names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
    want = f"a tensor of shape (N, {cols if cols is not None else 'C'}) of {names}"
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be {want}, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {want}, got {describe(t)}")
    if t.dim() != 2 or (cols is not None and t.shape[1] != cols):
        raise ValueError(f"{name} must be {want}, got {describe(t)}")


def check_same_rows(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``t`` has the rows and device of ``ref`` (one row per pool point)."""
    if t.shape[0] != ref.shape[0] or t.device != ref.device:
        raise ValueError(f"{name} must have the {ref.shape[0]} rows of {ref_name} on {ref.device}, got {describe(t)}")


def check_budget(budget: object, pool_size: int) -> None:
    """``budget``: an int in ``[0, pool_size]``."""
    check_int("budget", budget, f"in [0, {pool_size}] (the pool size)", lambda v: 0 <= v <= pool_size)


def check_generator(generator: object) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def default_chunk_rows(cols: int) -> int:
    """Rows of a (N, cols) tensor read at once when the caller gives no chunk size: :data:`CHECK_ELEMENTS`."""
    return max(1, CHECK_ELEMENTS // max(cols, 1))


def first_bad_row(t: torch.Tensor, *, limit: float = float("inf"), minimum: float | None = None) -> int | None:
    """The first row of a (N, C) tensor holding a NaN, a value of magnitude ``>= limit`` (inf by default) or one below
    ``minimum``; None when every row is good. Read in chunks of :func:`default_chunk_rows` rows."""
    rows = default_chunk_rows(t.shape[1])
    for start in range(0, t.shape[0], rows):
        block = t[start : start + rows].float()
        good = block.abs() < limit  # False for NaN
        if minimum is not None:
            good &= block >= minimum
        bad = (~good.all(dim=1)).nonzero()
        if bad.numel():
            return start + int(bad[0])
    return None


def check_finite_rows(name: str, t: torch.Tensor, *, probabilities: bool = False) -> None:
    """Every value of ``t`` is finite (and ``>= 0`` for ``probabilities``); ``ValueError`` naming the first bad row."""
    row = first_bad_row(t, minimum=0.0 if probabilities else None)
    if row is not None:
        rule = "finite and >= 0 (probabilities)" if probabilities else "finite"
        raise ValueError(f"{name} row {row} has a value that is not {rule}")
