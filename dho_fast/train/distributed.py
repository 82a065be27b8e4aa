"""torchrun-style process groups (NCCL on GPU, gloo on CPU) and the collectives the trainer needs."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run: ``rank`` of ``world_size``, and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # this process created the process group, so it also destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Joins the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``), or runs alone when ``WORLD_SIZE`` is unset or 1.

    ``device``: "auto" (CUDA when available), "cpu" or "cuda"; each rank takes GPU ``LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device is 'cuda' but no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device("cpu")
    owns_group = world_size > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, target, owns_group)


def shutdown(info: DistInfo) -> None:
    """Leaves the process group if :func:`init_distributed` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(device: str = "auto") -> Iterator[DistInfo]:
    """:func:`init_distributed` on entry, :func:`shutdown` on exit.

    On a normal exit every rank first waits for the others: a rank that closes its gloo connections while a peer still
    reads them aborts the peer. After an exception it does not wait, so a failed rank cannot hang the rest.
    """
    info = init_distributed(device)
    try:
        yield info
        barrier(info)
    finally:
        shutdown(info)


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``values`` over ranks (a copy; unchanged when running alone)."""
    out = values.clone()
    if info.distributed:
        dist.all_reduce(out)
    return out


def gather_interleaved(rows: torch.Tensor, total: int, info: DistInfo) -> torch.Tensor:
    """Rows computed for ``range(rank, total, world_size)`` on each rank, gathered on every rank in dataset order.

    ``rows``: (n_rank, ...) with ``n_rank = len(range(rank, total, world_size))``; returns (total, ...).
    """
    if not info.distributed:
        return rows
    per_rank = -(-total // info.world_size)
    padded = rows.new_zeros((per_rank, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(gathered, padded)
    # Row j of rank r is dataset row j * world_size + r: stacking on dim 1 restores the order.
    return torch.stack(gathered, dim=1).flatten(0, 1)[:total]


def gather_objects(obj: object, info: DistInfo) -> list[object]:
    """``obj`` of every rank, in rank order (``[obj]`` when running alone)."""
    if not info.distributed:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    """Waits for every rank (no-op when running alone)."""
    if info.distributed:
        dist.barrier()
