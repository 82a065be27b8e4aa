"""Image transforms that give the student and the teacher the same view of an image at their own input sizes."""

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

# PIL's resampling filter for each ``interpolation`` name (what torchvision's PIL path uses).
PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _generator(rng: random.Random | None) -> random.Random:
    """``rng``, or a generator seeded from Python's global one (so ``random.seed`` makes an unseeded draw repeat)."""
    return rng if rng is not None else random.Random(random.getrandbits(64))


def _affine_norm(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(C, 1, 1) float32 ``scale`` and ``shift`` with ``uint8 * scale + shift == (uint8 / 255 - mean) / std``."""
    mean_, std_ = np.asarray(mean, np.float32).reshape(-1, 1, 1), np.asarray(std, np.float32).reshape(-1, 1, 1)
    return 1.0 / (255.0 * std_), -mean_ / std_


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rng: random.Random | None = None,
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a crop covering a ``scale`` share of the area with aspect ratio in ``ratio``
    (log-uniform), drawn from ``rng`` (seeded from Python's global generator when None); falls back to the largest
    centred crop within ``ratio``, as torchvision's RandomResizedCrop does."""
    rng = _generator(rng)
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class PairedTransform:
    """One crop of an image, resized separately for the student and (optionally) the teacher.

    Training (``train=True``): one RandomResizedCrop box (area ``scale``) and one horizontal flip decision per
    image, drawn from the ``random.Random`` passed in, then each view is resized from that same crop straight to its
    own size with PIL (bicubic by default), so the teacher sees exactly what the student sees. Evaluation: the
    centred square crop of the shorter side. Each view is normalised with its own mean and std:
    ``(pixel / 255 - mean) / std``.

    ``__call__(image, rng) -> (student, teacher)``: (C, S, S) float32 tensors; ``teacher`` is None when
    ``teacher_size`` is None (e.g. a teacher of precomputed logits needs no images). It is ``views(image,
    draw_view(*image.size, rng))``: a teacher store (dho_fast.train.teacher_cache) keeps the drawn view and
    re-creates the student's tensor from it with ``views``.
    """

    def __init__(
        self,
        student_size: int,
        student_mean: Sequence[float],
        student_std: Sequence[float],
        *,
        teacher_size: int | None = None,
        teacher_mean: Sequence[float] = CLIP_MEAN,
        teacher_std: Sequence[float] = CLIP_STD,
        train: bool = True,
        scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool = True,
        interpolation: str = "bicubic",
    ) -> None:
        if student_size < 1 or (teacher_size is not None and teacher_size < 1):
            raise ValueError(f"student_size and teacher_size must be >= 1, got {student_size} and {teacher_size}")
        if interpolation not in PIL_FILTERS:
            raise ValueError(f"interpolation must be one of {tuple(PIL_FILTERS)}, got {interpolation!r}")
        self.student_size, self.teacher_size = student_size, teacher_size
        self.student_norm = _affine_norm(student_mean, student_std)
        self.teacher_norm = _affine_norm(teacher_mean, teacher_std)
        self.train, self.scale, self.hflip = train, scale, hflip
        self.filter = PIL_FILTERS[interpolation]

    def _view(self, crop: Image.Image, size: int, norm: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
        if crop.size != (size, size):
            crop = crop.resize((size, size), self.filter)
        # Straight from the uint8 pixels in numpy: a handful of torch calls per image cost more than its decode.
        pixels = np.asarray(crop)
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        scale, shift = norm
        if pixels.shape[0] != scale.shape[0]:
            raise ValueError(f"the image has {pixels.shape[0]} channels, the normalisation {scale.shape[0]} values")
        return torch.from_numpy(pixels * scale + shift)

    def draw_view(self, width: int, height: int, rng: random.Random | None = None) -> tuple[int, int, int, int, bool]:
        """``(top, left, h, w, flip)`` of one view of a ``width`` x ``height`` image: in training a RandomResizedCrop
        box and a flip decision drawn from ``rng``; in evaluation the centred square crop, unflipped."""
        if self.train:
            rng = _generator(rng)
            top, left, h, w = random_resized_crop_box(width, height, self.scale, rng=rng)
            return top, left, h, w, self.hflip and rng.random() < 0.5
        side = min(width, height)
        return (height - side) // 2, (width - side) // 2, side, side, False

    def views(
        self, image: Image.Image, view: tuple[int, int, int, int, bool]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The student's and the teacher's tensors of ``view`` (``draw_view``'s box and flip) of ``image``."""
        top, left, h, w, flip = view
        width, height = image.size
        crop = image if (top, left, h, w) == (0, 0, height, width) else image.crop((left, top, left + w, top + h))
        if flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        student = self._view(crop, self.student_size, self.student_norm)
        teacher = None if self.teacher_size is None else self._view(crop, self.teacher_size, self.teacher_norm)
        return student, teacher

    def __call__(
        self, image: Image.Image, rng: random.Random | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.views(image, self.draw_view(*image.size, rng))
