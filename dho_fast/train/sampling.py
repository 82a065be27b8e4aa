"""Training batches as a pure function of (seed, step): labelled rows cycle over L, unlabelled rows pass over U.

Every optimizer step has one global batch: ``labelled_batch`` rows of the labelled stream (seeded permutations of
L, one after another, so L cycles and a batch may span two passes) followed by ``unlabelled_batch`` rows of the
current pass over U (one seeded permutation per epoch, the last partial batch dropped). Each rank takes its own
contiguous slice of both parts, cut again into gradient-accumulation micro-batches, so the rows an optimizer step
sees do not depend on the number of ranks or micro-batches, and a resumed run only needs the step it stopped at.
Each row also carries the seed of its augmentation draw.
"""

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

LABELLED_STREAM, UNLABELLED_STREAM = 0, 1


def steps_per_epoch(num_labelled: int, num_unlabelled: int, labelled_batch: int, unlabelled_batch: int) -> int:
    """Optimizer steps in one epoch: one pass over U when there is one (last partial batch dropped), else over L."""
    if num_unlabelled > 0 and unlabelled_batch > 0:
        if num_unlabelled < unlabelled_batch:
            raise ValueError(
                f"unlabelled_batch_size ({unlabelled_batch}) is larger than the unlabelled set ({num_unlabelled})"
            )
        return num_unlabelled // unlabelled_batch
    return -(-num_labelled // labelled_batch)


class PairedBatchSampler(Sampler[list[tuple[int, int, bool]]]):
    """The micro-batches of one rank from ``start_step`` to ``total_steps``, ``accumulation_steps`` per step.

    Yields lists of ``(pool_index, draw_seed, labelled)`` keys for :class:`~dho_fast.train.data.ImageDataset`: first the
    labelled rows, then the unlabelled ones. ``labelled``/``unlabelled``: int64 indices into the train pool.
    ``labelled_batch``/``unlabelled_batch``: global rows per optimizer step; each must divide by
    ``world_size * accumulation_steps``. ``use_unlabelled=False`` (CE-only training) keeps the epoch length of
    the unlabelled pass but leaves its rows out of the batches.
    """

    def __init__(
        self,
        labelled: np.ndarray,
        unlabelled: np.ndarray,
        *,
        labelled_batch: int,
        unlabelled_batch: int,
        total_steps: int,
        seed: int,
        start_step: int = 0,
        use_unlabelled: bool = True,
        rank: int = 0,
        world_size: int = 1,
        accumulation_steps: int = 1,
    ) -> None:
        if len(labelled) == 0:
            raise ValueError("the labelled set is empty")
        parts = world_size * accumulation_steps
        for name, size in (("labelled_batch_size", labelled_batch), ("unlabelled_batch_size", unlabelled_batch)):
            if size % parts:
                raise ValueError(
                    f"{name} ({size}) must be divisible by world_size * accumulation_steps ({world_size} * "
                    f"{accumulation_steps})"
                )
        if not 0 <= start_step <= total_steps:
            raise ValueError(f"start_step must be in [0, total_steps={total_steps}], got {start_step}")
        self.labelled = np.asarray(labelled, dtype=np.int64)
        self.unlabelled = np.asarray(unlabelled, dtype=np.int64)
        self.labelled_batch, self.unlabelled_batch = labelled_batch, unlabelled_batch
        self.use_unlabelled = use_unlabelled and len(self.unlabelled) > 0 and unlabelled_batch > 0
        self.steps_per_epoch = steps_per_epoch(
            len(self.labelled), len(self.unlabelled), labelled_batch, unlabelled_batch
        )
        self.total_steps, self.start_step, self.seed = total_steps, start_step, seed
        self.rank, self.world_size, self.accumulation_steps = rank, world_size, accumulation_steps
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.accumulation_steps

    def _perm(self, stream: int, epoch: int, size: int) -> np.ndarray:
        key = (stream, epoch)
        if key not in self._perms:
            if len(self._perms) >= 4:  # a step touches at most two passes of each stream
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = np.random.default_rng([self.seed, stream, epoch]).permutation(size)
        return self._perms[key]

    def _draw_seeds(self, stream: int, step: int, size: int) -> np.ndarray:
        return np.random.default_rng([self.seed, stream, step, 1]).integers(0, 2**62, size=size)

    def global_batch(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Step ``step``'s global rows: (labelled indices, their draw seeds, unlabelled indices, their seeds)."""
        n = len(self.labelled)
        positions = np.arange(step * self.labelled_batch, (step + 1) * self.labelled_batch)
        passes = positions // n
        order = np.empty_like(positions)
        for p in np.unique(passes):
            at = passes == p
            order[at] = self._perm(LABELLED_STREAM, int(p), n)[positions[at] % n]
        labelled = self.labelled[order]
        labelled_seeds = self._draw_seeds(LABELLED_STREAM, step, len(labelled))
        if not self.use_unlabelled:
            return labelled, labelled_seeds, self.unlabelled[:0], labelled_seeds[:0]
        epoch, within = divmod(step, self.steps_per_epoch)
        perm = self._perm(UNLABELLED_STREAM, epoch, len(self.unlabelled))
        unlabelled = self.unlabelled[perm[within * self.unlabelled_batch : (within + 1) * self.unlabelled_batch]]
        return labelled, labelled_seeds, unlabelled, self._draw_seeds(UNLABELLED_STREAM, step, len(unlabelled))

    def __iter__(self) -> Iterator[list[tuple[int, int, bool]]]:
        parts = self.world_size * self.accumulation_steps
        for step in range(self.start_step, self.total_steps):
            lab, lab_seeds, unl, unl_seeds = self.global_batch(step)
            lb, ub = len(lab) // parts, len(unl) // parts
            for micro in range(self.accumulation_steps):
                part = self.rank * self.accumulation_steps + micro
                rows = slice(part * lb, (part + 1) * lb)
                keys = [(int(i), int(s), True) for i, s in zip(lab[rows], lab_seeds[rows], strict=True)]
                rows = slice(part * ub, (part + 1) * ub)
                keys += [(int(i), int(s), False) for i, s in zip(unl[rows], unl_seeds[rows], strict=True)]
                yield keys
