"""Datasets on disk (ImageFolder trees, CoOp split json files), a labelled set read from a file and its complement."""

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dho_fast.train.config import InputTypeError
from dho_fast.train.transforms import PairedTransform, channels_first

IGNORE_INDEX = -100
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Sample:
    """One image file and its class index."""

    path: str
    label: int


@dataclass
class DatasetSplits:
    """The train pool (labelled and unlabelled images are both drawn from it), validation and test sets."""

    classnames: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]

    def train_labels(self) -> np.ndarray:
        """(len(train),) int64 class indices of the train pool."""
        return np.array([s.label for s in self.train], dtype=np.int64)


def scan_image_folder(root: str | Path, class_dirs: Sequence[str] | None = None) -> tuple[list[Sample], list[str]]:
    """Images of an ImageFolder tree ``root/<class>/...``, in torchvision ``ImageFolder``'s order: class folders
    sorted, then within each one ``sorted(os.walk(class_dir, followlinks=True))`` (folders by path, so a folder's own
    files come before its subfolders') and each folder's file names sorted; extensions ``IMAGE_EXTENSIONS`` in any case.

    Class indices follow the sorted folder names, or ``class_dirs`` when given (so val and test trees index their
    classes like the train tree; a class folder missing from them simply has no images). A class folder that exists
    but holds no image is an error: a class without images is a mistake in the tree, not a class.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    if class_dirs is None:
        class_dirs = found
        if not class_dirs:
            raise ValueError(f"image folder {root} has no class subfolders")
    else:
        extra = sorted(set(found) - set(class_dirs))
        if extra:
            raise ValueError(f"image folder {root} has class folders {extra[:5]} that the train folder lacks")
    samples = []
    for label, name in enumerate(class_dirs):
        # os.walk on strings: pathlib costs seconds on ImageNet-sized trees.
        files = [
            os.path.join(parent, f)
            for parent, _, names in sorted(os.walk(os.path.join(root, name), followlinks=True))
            for f in sorted(names)
            if f.lower().endswith(IMAGE_EXTENSIONS)
        ]
        if not files and name in found:
            raise ValueError(f"class folder {root / name} holds no images with extensions {IMAGE_EXTENSIONS}")
        samples.extend(Sample(path, label) for path in files)
    if not samples:
        raise ValueError(f"image folder {root} holds no images with extensions {IMAGE_EXTENSIONS}")
    return samples, list(class_dirs)


def load_image_folder_splits(
    train_dir: str | Path, val_dir: str | Path | None = None, test_dir: str | Path | None = None
) -> DatasetSplits:
    """Train, val and test ImageFolder trees (ImageNet: ``train/`` and ``val/``, the latter as test set).

    Class names are the train tree's folder names with underscores as spaces.
    """
    train, class_dirs = scan_image_folder(train_dir)
    val = scan_image_folder(val_dir, class_dirs)[0] if val_dir else []
    test = scan_image_folder(test_dir, class_dirs)[0] if test_dir else []
    return DatasetSplits([d.replace("_", " ") for d in class_dirs], train, val, test)


def load_coop_splits(split_json: str | Path, image_root: str | Path) -> DatasetSplits:
    """A CoOp-style split file: ``{"train": [[path, label, classname], ...], "val": [...], "test": [...]}``.

    Paths are relative to ``image_root``; class names come from the entries (index ``label``).
    """
    split_json, image_root = Path(split_json), Path(image_root)
    if not split_json.is_file():
        raise FileNotFoundError(f"split_json {split_json} does not exist")
    content = json.loads(split_json.read_text())
    missing = [k for k in ("train", "val", "test") if k not in content]
    if missing:
        raise ValueError(f"split_json {split_json} lacks the splits {missing}")
    names: dict[int, str] = {}
    splits = {}
    for key in ("train", "val", "test"):
        samples = []
        for i, entry in enumerate(content[key]):
            if not isinstance(entry, list) or len(entry) != 3:
                raise ValueError(f"split_json {key}[{i}] must be [path, label, classname], got {entry!r}")
            path, label, name = entry
            if names.setdefault(int(label), name) != name:
                raise ValueError(f"split_json gives label {label} two class names: {names[int(label)]!r} and {name!r}")
            samples.append(Sample(str(image_root / path), int(label)))
        splits[key] = samples
    num_classes = max(names) + 1
    if sorted(names) != list(range(num_classes)):
        raise ValueError(f"split_json labels must be 0..{num_classes - 1} without gaps, got {sorted(names)[:10]}...")
    return DatasetSplits([names[i] for i in range(num_classes)], splits["train"], splits["val"], splits["test"])


def load_classnames(spec: str | None, default: list[str]) -> list[str]:
    """Class names for text prompts: ``"imagenet"`` (open_clip's 1000 names), a file with one name a line, or
    ``default`` (the dataset's own) when ``spec`` is None."""
    if spec is None:
        return default
    if spec == "imagenet":
        import open_clip

        names = list(open_clip.IMAGENET_CLASSNAMES)
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"classnames must be 'imagenet' or a file of names, {path} does not exist")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) != len(default):
        raise ValueError(f"classnames {spec!r} gives {len(names)} names but the dataset has {len(default)} classes")
    return names


def read_labelled_indices(path: str | Path, num_train: int) -> np.ndarray:
    """The labelled set of the setting ``labelled_indices``: a JSON file holding a list of train-pool indices, or an
    object whose ``"labelled"`` key holds one (the active loop's ``round_XX/labelled.json``). Returns them sorted,
    int64 (N,).

    Raises FileNotFoundError when ``path`` is missing, InputTypeError (a TypeError) when the file holds anything but
    a list of integers, ValueError when it is not JSON, the list is empty, an index is outside ``[0, num_train)``
    or repeats; every message starts with the setting and the file.
    """
    source = f"labelled_indices {path}"
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{source} does not exist")
    try:
        content = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{source} is not a JSON file: {error}") from None
    if isinstance(content, dict) and "labelled" in content:
        content = content["labelled"]
    # bool is an int to Python, not an index.
    if not isinstance(content, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in content):
        raise InputTypeError(
            f"{source} must hold a JSON list of integer train indices (or an object with one under 'labelled'), "
            f"got {_preview(content)}"
        )
    if not content:
        raise ValueError(f"{source} holds an empty list: the labelled set needs at least one image")
    indices = np.array(content, dtype=np.int64)
    outside = indices[(indices < 0) | (indices >= num_train)]
    if len(outside):
        raise ValueError(f"{source} holds index {outside[0]}, outside the train pool's range [0, {num_train})")
    values, counts = np.unique(indices, return_counts=True)
    if len(values) < len(indices):
        raise ValueError(f"{source} lists index {values[counts > 1][0]} more than once: indices must be distinct")
    return values


def _preview(value: object, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def complement(indices: np.ndarray, size: int) -> np.ndarray:
    """Sorted int64 indices of ``range(size)`` that are not in ``indices`` (the unlabelled rest of the pool), each
    once; ``indices`` may be in any order and repeat (a k-shot set of a short class)."""
    mask = np.ones(size, dtype=bool)
    mask[indices] = False
    return np.flatnonzero(mask).astype(np.int64)


def pil_loader(path: str, mode: str = "RGB") -> Image.Image:
    """Opens an image file and converts it to ``mode`` ("RGB" or "L").

    Raises ValueError naming ``path`` when the file is truncated or not an image PIL reads: a data-loader worker
    passes only the message on, and PIL's (``image file is truncated``) names no file.
    """
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert(mode)
    # PIL raises OSError (UnidentifiedImageError, truncated data), SyntaxError and ValueError for broken files.
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"image {path} cannot be read: {type(error).__name__}: {error}") from error


class ImageDataset(torch.utils.data.Dataset):
    """Images of a list of samples through a :class:`~dho_fast.train.transforms.PairedTransform`.

    ``dataset[key]``: ``key`` is an index, or ``(index, draw_seed, labelled)`` from the training batch sampler,
    where ``draw_seed`` seeds this draw's augmentation (so a resumed run draws the same crops) and ``labelled`` is
    False for an unlabelled row. Returns a dict: ``"student"`` (C, H, W) float32, ``"teacher"`` (C, H', W') float32
    when the transform makes teacher images, ``"label"`` (int64; ``IGNORE_INDEX`` when unlabelled) and ``"index"``
    (the sample's position in the list, e.g. the row of a precomputed teacher logits file).

    ``cache_images=True`` decodes every image once, here, and keeps it in memory (about width x height x channels
    bytes each; data-loader workers forked from this process share them): for datasets that fit in RAM, whose small
    images cost more to open and decode than to train on. Augmentation still runs per draw. When the cached images
    all have one size, they are held as one (N, C, H, W) uint8 tensor and a batch (``__getitems__``, which a
    DataLoader calls with a batch's keys) is cropped, flipped, resized and normalised at once by
    :meth:`~dho_fast.train.transforms.PairedTransform.batch_views`, bit for bit what the per-image path gives.

    ``views``: a :class:`~dho_fast.train.teacher_cache.TeacherCache` whose stored views replace the transform's own
    crop and flip: a training draw picks one of the image's views (from the draw's seed) and the item's ``"view"``
    says which, so the loss gets the teacher's distribution of that very crop.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: PairedTransform,
        image_mode: str = "RGB",
        cache_images: bool = False,
        views=None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.image_mode = image_mode
        self.views = views
        self.decoded = [pil_loader(s.path, image_mode) for s in self.samples] if cache_images else None
        # (N, C, H, W) uint8 when every cached image has one size and 8-bit grey or RGB pixels (the modes
        # resize_crops resizes as PIL does): the batched path's input.
        self.pixels = None
        if self.decoded and image_mode in ("L", "RGB") and len({image.size for image in self.decoded}) == 1:
            self.pixels = torch.from_numpy(np.stack([channels_first(np.asarray(image)) for image in self.decoded]))
            self.decoded = None

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, index: int) -> Image.Image:
        if self.pixels is not None:
            pixels = self.pixels[index].numpy()
            return Image.fromarray(pixels[0] if self.image_mode == "L" else pixels.transpose(1, 2, 0), self.image_mode)
        if self.decoded is not None:
            return self.decoded[index]
        return pil_loader(self.samples[index].path, self.image_mode)

    def _draw(self, index: int, draw_seed: int | None, width: int, height: int) -> tuple[int | None, tuple]:
        """The stored view's number (None without a store) and ``(top, left, h, w, flip)`` of this draw."""
        rng = None if draw_seed is None else random.Random(draw_seed)
        if self.views is None:
            return None, self.transform.draw_view(width, height, rng)
        view, box = self.views.draw(index, rng or random.Random())
        top, left, h, w, _ = box
        if top < 0 or left < 0 or top + h > height or left + w > width:
            raise ValueError(
                f"teacher_cache view {view} of image {self.samples[index].path} ({box}) does not fit its "
                f"{(width, height)} pixels: the store was written from other images"
            )
        return view, box

    def _item(self, index: int, labelled: bool, student, teacher, view) -> dict[str, torch.Tensor | int]:
        item: dict[str, torch.Tensor | int] = {
            "student": student,
            "label": self.samples[index].label if labelled else IGNORE_INDEX,
            "index": index,
        }
        if teacher is not None:
            item["teacher"] = teacher
        if view is not None:
            item["view"] = view
        return item

    @staticmethod
    def _parse_key(key: int | tuple[int, int, bool]) -> tuple[int, int | None, bool]:
        """``(index, draw_seed, labelled)`` of a key: an index alone is a labelled, unseeded draw."""
        return key if isinstance(key, tuple) else (key, None, True)

    def __getitem__(self, key: int | tuple[int, int, bool]) -> dict[str, torch.Tensor | int]:
        index, draw_seed, labelled = self._parse_key(key)
        image = self._image(index)
        view, box = self._draw(index, draw_seed, *image.size)
        return self._item(index, labelled, *self.transform.views(image, box), view)

    def __getitems__(self, keys: Sequence[int | tuple[int, int, bool]]) -> list[dict[str, torch.Tensor | int]]:
        """``[self[key] for key in keys]``, in one batch when the images are cached as one tensor."""
        if self.pixels is None:
            return [self[key] for key in keys]
        parsed = [self._parse_key(key) for key in keys]
        height, width = self.pixels.shape[2:]
        drawn = [self._draw(index, draw_seed, width, height) for index, draw_seed, _ in parsed]
        indices = torch.tensor([index for index, _, _ in parsed], dtype=torch.int64)
        student, teacher = self.transform.batch_views(self.pixels[indices], [box for _, box in drawn])
        return [
            self._item(index, labelled, student[row], None if teacher is None else teacher[row], view)
            for row, ((index, _, labelled), (view, _)) in enumerate(zip(parsed, drawn, strict=True))
        ]
