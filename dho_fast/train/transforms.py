"""Image transforms that give the student and the teacher the same view of an image at their own input sizes."""

import math
from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _norm_tensors(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, 1, 1) float32 mean and std to normalise a (C, H, W) image in [0, 1]."""
    return torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)


def _uniform(generator: torch.Generator | None, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a crop covering a ``scale`` share of the area with aspect ratio in ``ratio``
    (log-uniform), drawn from ``generator``; falls back to the largest centred crop within ``ratio``, as
    torchvision's RandomResizedCrop does."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
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
    image, drawn from the generator passed in, then each view is resized from that same crop straight to its own
    size (bicubic by default), so the teacher sees exactly what the student sees. Evaluation: the centred square
    crop of the shorter side. Each view is normalised with its own mean and std.

    ``__call__(image, generator) -> (student, teacher)``: (C, S, S) float32 tensors; ``teacher`` is None when
    ``teacher_size`` is None (e.g. a teacher of precomputed logits needs no images).
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
        self.student_size, self.teacher_size = student_size, teacher_size
        self.student_norm = _norm_tensors(student_mean, student_std)
        self.teacher_norm = _norm_tensors(teacher_mean, teacher_std)
        self.train, self.scale, self.hflip = train, scale, hflip
        self.interpolation = InterpolationMode(interpolation)

    def _view(
        self, image: Image.Image, box: tuple[int, int, int, int], size: int, norm: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        top, left, h, w = box
        if (top, left, h, w) != (0, 0, image.height, image.width) or (h, w) != (size, size):
            image = TF.resized_crop(image, top, left, h, w, [size, size], interpolation=self.interpolation)
        # Straight from the uint8 pixels: to_tensor + normalize cost more than the decode on small images.
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
        pixels = pixels.unsqueeze(0) if pixels.dim() == 2 else pixels.permute(2, 0, 1)
        mean, std = norm
        if pixels.shape[0] != mean.shape[0]:
            raise ValueError(f"the image has {pixels.shape[0]} channels, the normalisation {mean.shape[0]} values")
        return pixels.float().div_(255.0).sub_(mean).div_(std)

    def __call__(
        self, image: Image.Image, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        width, height = image.size
        if self.train:
            box = random_resized_crop_box(width, height, self.scale, generator=generator)
            if self.hflip and float(torch.rand((), generator=generator)) < 0.5:
                image = TF.hflip(image)
                top, left, h, w = box
                box = (top, width - left - w, h, w)
        else:
            side = min(width, height)
            box = ((height - side) // 2, (width - side) // 2, side, side)
        student = self._view(image, box, self.student_size, self.student_norm)
        teacher = None if self.teacher_size is None else self._view(image, box, self.teacher_size, self.teacher_norm)
        return student, teacher
