"""A teacher soft-label store: the teacher run once over a dataset's train pool, R augmented views per image.

Per image and view the store keeps the crop box and flip (enough to re-create the student's view exactly from the
original image) and the teacher's distribution ``p = softmax(teacher / T)`` at the run's temperature T: its top-k
(values in float16 or float32, int32 class ids) or, for small C, the dense row. Training with ``teacher: cache``
draws one of an image's views per step (seeded by the row's draw seed, so a resumed run draws the same), crops the
student's input with that view's box and feeds the stored distribution to the fused loss (``teacher_probs``, or the
top-k with the tail the store was written with). ``mode="center"`` stores one centred, unflipped view per image
(evaluation-style caching).

Layout of a store folder:

- ``header.json``: the format, the settings (views, k, tail, dtype, mode, temperature, crop scale, flip,
  interpolation, teacher input size, seed, shard size), the dataset's identity (image count, a SHA-256 of its
  relative paths and labels, class count) and the teacher's (its settings and a SHA-256 of its weights);
- ``shard-NNNNN.npy``: the records of images ``[N * shard_size, ...)``, a numpy structured array (memory-mapped when
  read) with fields ``box`` (R, 4) int32 ``(top, left, h, w)``, ``flip`` (R,) uint8, ``values`` (R, k or C) and, for
  top-k, ``indices`` (R, k) int32;
- ``shard-NNNNN.json``: that shard's SHA-256 and size, written after the shard is complete (both atomically): a shard
  without it is unfinished, and one whose bytes no longer match it is corrupted; either is named, never read.

Writing resumes: finished shards are kept, and a rerun with the same settings writes the rest. Under torchrun each
rank writes the shards ``s`` with ``s % world_size == rank``.
"""

import dataclasses
import hashlib
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dho_fast.train.checkpoint import write_text_atomic
from dho_fast.train.data import Sample, pil_loader

FORMAT = "dho_fast.teacher_cache"
VERSION = 1
HEADER_NAME = "header.json"
LOG_NAME = "teacher_cache.log"
MODES = ("random", "center")
TAILS = ("uniform", "renormalize")
VALUE_DTYPES = ("float16", "float32")


def dataset_sha256(samples: Sequence[Sample]) -> str:
    """SHA-256 of the train pool's image paths (relative to their common folder, so a moved dataset still matches)
    and labels, in order."""
    paths = [s.path for s in samples]
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0]) if paths else ""
    listing = [[os.path.relpath(s.path, root), int(s.label)] for s in samples]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def module_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, dtypes, shapes and bytes): the teacher's identity."""
    digest = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        digest.update(f"{name} {t.dtype} {tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def record_dtype(views: int, width: int, topk: bool, value_dtype: str) -> np.dtype:
    """One image's record: ``views`` boxes and flips, and ``width`` stored probabilities (k, or C when dense)."""
    fields = [("box", "<i4", (views, 4)), ("flip", "u1", (views,)), ("values", np.dtype(value_dtype), (views, width))]
    if topk:
        fields.append(("indices", "<i4", (views, width)))
    return np.dtype(fields)


def view_seed(seed: int, index: int, view: int) -> random.Random:
    """The generator of image ``index``'s view ``view``: the same in every run, on every rank."""
    return random.Random(f"{seed}:{index}:{view}")


@dataclass(frozen=True)
class CacheSettings:
    """What a store is written with (``header.json`` records each)."""

    views: int = 10
    topk: int | None = 5  # None: dense rows
    tail: str = "uniform"
    value_dtype: str = "float16"
    mode: str = "random"
    shard_size: int = 1024

    def record_dtype(self, num_classes: int) -> np.dtype:
        """One image's record in a store of these settings over ``num_classes`` classes."""
        return record_dtype(self.views, self.topk or num_classes, self.topk is not None, self.value_dtype)

    def check(self, num_classes: int) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "center" and self.views != 1:
            raise ValueError(f"mode 'center' stores one view per image, got views={self.views}")
        if self.views < 1 or self.shard_size < 1:
            raise ValueError(f"views and shard_size must be >= 1, got {self.views} and {self.shard_size}")
        if self.topk is not None and not 1 <= self.topk <= num_classes:
            raise ValueError(f"topk must be in [1, {num_classes}] (or None for dense rows), got {self.topk}")
        if self.tail not in TAILS:
            raise ValueError(f"tail must be one of {TAILS}, got {self.tail!r}")
        if self.value_dtype not in VALUE_DTYPES:
            raise ValueError(f"value_dtype must be one of {VALUE_DTYPES}, got {self.value_dtype!r}")


def shard_paths(root: Path, shard: int) -> tuple[Path, Path]:
    """The shard's records and its checksum file."""
    return root / f"shard-{shard:05d}.npy", root / f"shard-{shard:05d}.json"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_shard(root: Path, shard: int, count: int, dtype: np.dtype) -> np.ndarray:
    """The shard's records, memory-mapped, after checking its size and SHA-256 against its checksum file and its
    dtype and length against the header's; ValueError naming the shard otherwise (FileNotFoundError when it was never
    finished)."""
    data, meta = shard_paths(root, shard)
    if not meta.is_file() or not data.is_file():
        raise FileNotFoundError(
            f"teacher_cache {root} is incomplete: shard {data.name} was not finished; rerun dho-fast teacher-cache "
            "with the same settings to write the rest"
        )
    expected = json.loads(meta.read_text())
    size = data.stat().st_size
    if size != expected["bytes"]:
        raise ValueError(f"teacher_cache shard {data} is truncated or damaged: {size} bytes, {expected['bytes']} "
                         "written")  # fmt: skip
    if _file_sha256(data) != expected["sha256"]:
        raise ValueError(f"teacher_cache shard {data} is corrupted: its SHA-256 differs from the one written with it")
    records = np.load(data, mmap_mode="r")
    if records.dtype != dtype or records.shape != (count,):
        raise ValueError(
            f"teacher_cache shard {data} holds {records.shape} records of {records.dtype}, the header says {count} "
            f"of {dtype}"
        )
    return records


class TeacherCache:
    """A finished store opened for training: ``draw(index, rng)`` picks a view of an image, ``targets`` gathers the
    stored distributions of a batch as the loss's teacher arguments.

    Opening checks the store against the run: its dataset (image count, paths and labels), class count and
    temperature must be the run's, and so must its image mode and interpolation (the teacher saw the view as the
    student will) and the crop settings (``crop``: crop_scale, hflip) of a store of random views; every shard is
    verified (size, SHA-256, layout) before any step. ``sha256``: of the header and the shards' checksums (a resumed
    run compares it with its checkpoint's).
    """

    needs_images = False

    def __init__(
        self,
        path: str | Path,
        samples: Sequence[Sample],
        num_classes: int,
        *,
        temperature: float,
        crop: tuple[tuple[float, float], bool],
        image_mode: str,
        interpolation: str,
    ) -> None:
        self.root = Path(path)
        header_path = self.root / HEADER_NAME
        if not header_path.is_file():
            raise FileNotFoundError(f"teacher_cache {self.root} has no {HEADER_NAME}: not a store dho-fast wrote")
        header_text = header_path.read_text()
        header = json.loads(header_text)
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise ValueError(f"teacher_cache {header_path} is not a version-{VERSION} {FORMAT} header")
        expected = {
            "num_images": len(samples),
            "dataset_sha256": dataset_sha256(samples),
            "num_classes": num_classes,
            "temperature": temperature,
            "image_mode": image_mode,
            "interpolation": interpolation,
        }
        if header["mode"] == "random":
            expected.update(crop_scale=list(crop[0]), hflip=crop[1])
        differ = {k: (header[k], v) for k, v in expected.items() if header[k] != v}
        if differ:
            details = ", ".join(f"{k}: store {a!r}, run {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"teacher_cache {self.root} was written for another dataset or settings ({details})")
        self.header = header
        self.views, self.topk, self.tail = header["views"], header["topk"], header["tail"]
        settings = CacheSettings(**{f.name: header[f.name] for f in dataclasses.fields(CacheSettings)})
        dtype = settings.record_dtype(num_classes)
        size = header["shard_size"]
        self.shard_size = size
        self.shards = [
            verify_shard(self.root, s, min(size, len(samples) - s * size), dtype) for s in range(header["num_shards"])
        ]
        digest = hashlib.sha256(header_text.encode())
        for s in range(header["num_shards"]):
            digest.update(shard_paths(self.root, s)[1].read_bytes())
        self.sha256 = digest.hexdigest()

    def _record(self, index: int) -> np.void:
        return self.shards[index // self.shard_size][index % self.shard_size]

    def draw(self, index: int, rng: random.Random) -> tuple[int, tuple[int, int, int, int, bool]]:
        """One of image ``index``'s views, drawn from ``rng``: ``(view, (top, left, h, w, flip))``."""
        view = rng.randrange(self.views)
        record = self._record(index)
        top, left, h, w = (int(v) for v in record["box"][view])
        return view, (top, left, h, w, bool(record["flip"][view]))

    def targets(self, indices: torch.Tensor, views: torch.Tensor, device: torch.device) -> dict[str, object]:
        """The stored distributions of rows ``(indices[i], views[i])`` as fused_dual_head_loss's teacher keyword
        arguments: ``teacher_probs`` (N, C) float32, or ``teacher_topk_indices`` (N, k) int32,
        ``teacher_topk_values`` (N, k) and ``teacher_tail``."""
        records = [self._record(int(i)) for i in indices]
        rows = [int(v) for v in views]
        values = torch.from_numpy(np.stack([r["values"][v] for r, v in zip(records, rows, strict=True)]))
        if self.topk is None:
            return {"teacher_probs": values.to(device, torch.float32)}
        ids = torch.from_numpy(np.stack([r["indices"][v] for r, v in zip(records, rows, strict=True)]))
        return {"teacher_topk_indices": ids.to(device), "teacher_topk_values": values.to(device),
                "teacher_tail": self.tail}  # fmt: skip


def log_line(root: Path, rank: int, message: str) -> None:
    """Appends a line to the store's log (O_APPEND: lines of concurrent ranks do not interleave)."""
    with open(root / LOG_NAME, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} rank {rank}: {message}\n")


def write_shard(root: Path, shard: int, records: np.ndarray) -> None:
    """Writes a shard atomically, then its checksum file: a reader never sees a partial one as finished."""
    data, meta = shard_paths(root, shard)
    meta.unlink(missing_ok=True)  # a shard being rewritten is unfinished until its new checksum is in place
    tmp = data.with_name(f".{data.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, data)
    finally:
        tmp.unlink(missing_ok=True)
    write_text_atomic(json.dumps({"sha256": _file_sha256(data), "bytes": data.stat().st_size}), meta)


@torch.no_grad()
def teacher_distributions(teacher: nn.Module, images: torch.Tensor | None, indices: torch.Tensor, temperature: float):
    """``softmax(teacher / T)`` (N, C) float32 of a batch of views; ValueError naming the first image whose teacher
    row is not a distribution (NaN, +inf, or -inf everywhere)."""
    logits = teacher(images, indices).float()
    probs = torch.softmax(logits / temperature, dim=1)
    bad = ~probs.isfinite().all(dim=1)
    if bool(bad.any()):
        raise ValueError(f"the teacher's logits of train image {int(indices[bad][0])} are not a distribution")
    return probs


def build_records(
    teacher: nn.Module,
    samples: Sequence[Sample],
    first: int,
    count: int,
    transform,
    settings: CacheSettings,
    *,
    image_mode: str,
    temperature: float,
    seed: int,
    num_classes: int,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """The records of images ``[first, first + count)``: each view's box and flip drawn by ``transform``
    (``view_seed``), the teacher's views of a batch of them run at once."""
    records = np.zeros(count, settings.record_dtype(num_classes))
    keys = [(i, v) for i in range(count) for v in range(settings.views)]
    for start in range(0, len(keys), batch_size):
        chunk = keys[start : start + batch_size]
        views = []
        for i, v in chunk:
            image = pil_loader(samples[first + i].path, image_mode)
            view = transform.draw_view(*image.size, view_seed(seed, first + i, v))
            records[i]["box"][v] = view[:4]
            records[i]["flip"][v] = view[4]
            views.append(transform.views(image, view)[0] if teacher.needs_images else None)
        images = torch.stack(views).to(device) if teacher.needs_images else None
        indices = torch.tensor([first + i for i, _ in chunk], device=device)
        probs = teacher_distributions(teacher, images, indices, temperature).cpu()
        if settings.topk is None:
            values, ids = probs, None
        else:
            values, ids = probs.topk(settings.topk, dim=1)
        values = values.numpy().astype(settings.value_dtype)
        for row, (i, v) in enumerate(chunk):
            records[i]["values"][v] = values[row]
            if ids is not None:
                records[i]["indices"][v] = ids[row].numpy()
    return records
