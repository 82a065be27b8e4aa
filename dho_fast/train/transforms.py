"""Image transforms that give the student and the teacher the same view of an image at their own input sizes."""

import functools
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

# PIL's fixed-point resampling of 8-bit images (libImaging/Resample.c): coefficients with 22 fractional bits.
PIL_PRECISION_BITS = 22

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


def channels_first(pixels: np.ndarray) -> np.ndarray:
    """(C, H, W) view of one image's (H, W) (grey) or (H, W, C) pixels, as ``np.asarray`` gives a PIL image's."""
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _check_channels(channels: int, scale: np.ndarray | torch.Tensor) -> None:
    if channels != scale.shape[0]:
        raise ValueError(f"pixels have {channels} channels, the transform's mean and std {scale.shape[0]} values")


def _pil_bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _pil_bicubic(x: float) -> float:
    # Keys' cubic with a = -0.5, written in PIL's order of operations so that every coefficient rounds as PIL's.
    x = abs(x)
    if x < 1.0:
        return (1.5 * x - 2.5) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * -0.5
    return 0.0


_PIL_KERNELS = {"bilinear": (_pil_bilinear, 1.0), "bicubic": (_pil_bicubic, 2.0)}


def _check_interpolation(interpolation: str) -> None:
    if interpolation not in PIL_FILTERS:
        raise ValueError(f"interpolation must be one of {tuple(PIL_FILTERS)}, got {interpolation!r}")


@functools.lru_cache(maxsize=4096)
def pil_resize_weights(in_size: int, out_size: int, interpolation: str) -> torch.Tensor:
    """(out_size, in_size) float64 matrix of PIL's integer coefficients for resizing a row of ``in_size`` pixels to
    ``out_size``: output pixel i is ``clip8((sum_j W[i, j] * pixel_j + 2**21) >> 22)``, as PIL computes it.

    bilinear / bicubic: PIL's ``precompute_coeffs`` (filter support widened by the scale when shrinking, weights
    normalised per output pixel, then rounded to ``PIL_PRECISION_BITS`` fractional bits); nearest: PIL's affine
    scaling, which takes pixel ``floor(x)`` with ``x`` stepping from ``scale / 2`` by ``scale``. Cached and shared:
    do not modify the result.
    """
    _check_interpolation(interpolation)
    if in_size < 1 or out_size < 1:
        raise ValueError(f"in_size and out_size must be >= 1, got {in_size} and {out_size}")
    one = 1 << PIL_PRECISION_BITS
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    scale = in_size / out_size
    if interpolation == "nearest":
        x = scale * 0.5
        for i in range(out_size):  # PIL accumulates x; so does this, so every floor() matches
            if 0 <= int(x) < in_size:
                weights[i, int(x)] = one
            x += scale
        return weights
    kernel, support = _PIL_KERNELS[interpolation]
    filter_scale = max(scale, 1.0)
    support *= filter_scale
    inv_filter_scale = 1.0 / filter_scale
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = [kernel((j - center + 0.5) * inv_filter_scale) for j in range(lo, hi)]
        total = 0.0
        for tap in taps:  # one by one, as PIL sums (Python 3.12's sum() compensates, so it could round otherwise)
            total += tap
        for j, tap in zip(range(lo, hi), taps, strict=True):
            tap = tap / total if total != 0.0 else tap
            weights[i, j] = int(tap * one - 0.5) if tap < 0 else int(tap * one + 0.5)
    return weights


def _axis_weights(
    starts: torch.Tensor, lengths: torch.Tensor, flips: torch.Tensor, in_size: int, out_size: int, interpolation: str
) -> torch.Tensor:
    """(B, out_size, in_size) float64: row b resizes pixels ``starts[b] : starts[b] + lengths[b]`` of an axis of
    ``in_size`` pixels (read backwards where ``flips[b]``) to ``out_size`` with :func:`pil_resize_weights`."""
    distinct, which = torch.unique(lengths, return_inverse=True)
    table = torch.zeros(len(distinct), out_size, in_size, dtype=torch.float64)
    for row, length in enumerate(distinct.tolist()):
        table[row, :, :length] = pil_resize_weights(length, out_size, interpolation)
    # Image pixel p is pixel p - start of the crop, or start + length - 1 - p of the flipped crop.
    pixel = torch.arange(in_size)
    starts, lengths = starts[:, None], lengths[:, None]
    in_crop = torch.where(flips[:, None], starts + lengths - 1 - pixel, pixel - starts)
    inside = (in_crop >= 0) & (in_crop < lengths)
    gathered = table[which].gather(2, in_crop.clamp(0, in_size - 1)[:, None, :].expand(-1, out_size, -1))
    return gathered * inside[:, None, :]


def _clip8(sums: torch.Tensor) -> torch.Tensor:
    """PIL's rounding of a fixed-point sum to a pixel: ``clip8((sum + 2**21) >> 22)``, exact in float64."""
    half, one = float(1 << (PIL_PRECISION_BITS - 1)), float(1 << PIL_PRECISION_BITS)
    return torch.floor((sums + half) / one).clamp_(0, 255)


def resize_crops(
    pixels: torch.Tensor, views: Sequence[tuple[int, int, int, int, bool]], size: int, interpolation: str = "bicubic"
) -> torch.Tensor:
    """Every row's view cropped, flipped and resized to ``size`` x ``size`` in one batch, bit-for-bit what PIL's
    ``image.crop(box)``, ``transpose(FLIP_LEFT_RIGHT)`` and ``resize((size, size), filter)`` give.

    ``pixels``: (B, C, H, W) uint8 images (C = 1 or 3: PIL's "L" or "RGB"); ``views``: B ``(top, left, h, w, flip)``
    as :meth:`PairedTransform.draw_view` draws them. Returns (B, C, size, size) uint8. PIL resizes in two passes
    (horizontal first, unless the height shrinks by more than twice what the width does), each ``clip8(W @
    pixels)`` with the integer coefficients of :func:`pil_resize_weights`; here each pass is one batched float64
    matmul, whose sums of products of 8-bit pixels and 22-bit coefficients are exact, so the rounding is PIL's.
    The matrices are dense, (B, size, H) and (B, W, size) float64: fine for small images such as the demo's 28x28
    (what ``ImageDataset``'s batched path is for), far more memory than PIL's banded passes for large ones.
    """
    if pixels.dtype != torch.uint8 or pixels.dim() != 4:
        raise ValueError(f"pixels must be a (B, C, H, W) uint8 tensor, got {tuple(pixels.shape)} {pixels.dtype}")
    if len(views) != len(pixels):
        raise ValueError(f"views must hold one view per image: got {len(views)} for {len(pixels)} images")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    _check_interpolation(interpolation)
    height, width = pixels.shape[2:]
    if not views:
        return pixels.new_empty(0, pixels.shape[1], size, size)
    top, left, h, w, flip = (torch.tensor(column) for column in zip(*views, strict=True))
    outside = (top < 0) | (left < 0) | (h < 1) | (w < 1) | (top + h > height) | (left + w > width)
    if bool(outside.any()):
        row = int(outside.nonzero()[0, 0])
        raise ValueError(f"views[{row}] = {views[row]} does not lie inside the {width} x {height} images")
    across = _axis_weights(left, w, flip.bool(), width, size, interpolation)[:, None].transpose(2, 3)  # (B,1,W,S)
    down = _axis_weights(top, h, torch.zeros_like(flip, dtype=torch.bool), height, size, interpolation)[:, None]
    image = pixels.double()
    out = torch.empty(len(views), pixels.shape[1], size, size, dtype=torch.float64)
    # PIL (13 and later) runs the vertical pass first when the height shrinks by more than twice what the width does.
    vertical_first = (h > size) & (h - size > (w - size) * 2)
    rows = (~vertical_first).nonzero()[:, 0]
    out[rows] = _clip8(down[rows] @ _clip8(image[rows] @ across[rows]))
    rows = vertical_first.nonzero()[:, 0]
    out[rows] = _clip8(_clip8(down[rows] @ image[rows]) @ across[rows])
    return out.to(torch.uint8)


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
        _check_interpolation(interpolation)
        self.student_size, self.teacher_size = student_size, teacher_size
        self.student_norm = _affine_norm(student_mean, student_std)
        self.teacher_norm = _affine_norm(teacher_mean, teacher_std)
        self.train, self.scale, self.hflip = train, scale, hflip
        self.interpolation, self.filter = interpolation, PIL_FILTERS[interpolation]

    def _view(self, crop: Image.Image, size: int, norm: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
        if crop.size != (size, size):
            crop = crop.resize((size, size), self.filter)
        # Straight from the uint8 pixels in numpy: a handful of torch calls per image cost more than its decode.
        pixels = channels_first(np.asarray(crop))
        scale, shift = norm
        _check_channels(pixels.shape[0], scale)
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

    def batch_views(
        self, pixels: torch.Tensor, views: Sequence[tuple[int, int, int, int, bool]]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`views` of a batch at once, equal to it bit for bit: ``pixels`` (B, C, H, W) uint8 images of one
        size, ``views`` their B ``draw_view`` boxes and flips. Returns the student's (B, C, S, S) float32 tensors and
        the teacher's (B, C, S', S') or None (:func:`resize_crops`, then the same normalisation)."""

        def normalised(size: int, norm: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
            scale, shift = (torch.from_numpy(a) for a in norm)
            _check_channels(pixels.shape[1], scale)
            return resize_crops(pixels, views, size, self.interpolation).to(torch.float32) * scale + shift

        student = normalised(self.student_size, self.student_norm)
        teacher = None if self.teacher_size is None else normalised(self.teacher_size, self.teacher_norm)
        return student, teacher

    def __call__(
        self, image: Image.Image, rng: random.Random | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.views(image, self.draw_view(*image.size, rng))
