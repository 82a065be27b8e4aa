"""Learning-rate schedules of METHOD.md's recipes: linear warm-up, then cosine, linear or constant."""

import math

import torch


def lr_factor(step: int, total_steps: int, warmup_steps: int, start_factor: float, decay: str) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Warm-up goes linearly from ``start_factor`` to 1 over ``warmup_steps``; the rest decays to 0 at
    ``total_steps`` along a half cosine or a line, or stays at 1 ("constant").
    """
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    if decay == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(progress, 1.0)
    if decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if decay == "linear":
        return 1.0 - progress
    raise ValueError(f"decay must be 'cosine', 'linear' or 'constant', got {decay!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, start_factor: float, decay: str
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step following :func:`lr_factor`."""
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    lr_factor(0, total_steps, warmup_steps, start_factor, decay)  # rejects an unknown decay now, not mid-run
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, start_factor, decay)
    )
