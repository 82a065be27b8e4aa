"""The batched crop-flip-resize against PIL's, pixel for pixel, and its errors."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from dho_fast.train.transforms import PIL_FILTERS, PairedTransform, pil_resize_weights, resize_crops


def _pil_view(image: np.ndarray, view, size: int, interpolation: str) -> np.ndarray:
    """(C, size, size) uint8: what PairedTransform's PIL path does to one (H, W, C) image."""
    top, left, h, w, flip = view
    mode = "L" if image.shape[2] == 1 else "RGB"
    crop = Image.fromarray(image[:, :, 0] if mode == "L" else image, mode).crop((left, top, left + w, top + h))
    if flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if crop.size != (size, size):
        crop = crop.resize((size, size), PIL_FILTERS[interpolation])
    pixels = np.asarray(crop)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


@pytest.mark.parametrize("interpolation", list(PIL_FILTERS))
@pytest.mark.parametrize("channels", [1, 3])
def test_resize_crops_is_pils_resize_bit_for_bit(interpolation, channels):
    rng = random.Random(channels)
    for trial in range(60):
        height, width = rng.randint(1, 40), rng.randint(1, 40)
        images = np.random.default_rng(trial).integers(0, 256, (5, height, width, channels), dtype=np.uint8)
        if trial % 3 == 0:  # black and white: the cubic's overshoot is clipped in both passes
            images = np.where(images > 127, 255, 0).astype(np.uint8)
        # Up- and downscaling, the identity, and crops whose height shrinks most (PIL's vertical pass first).
        size = rng.choice([1, 3, 7, 16, 28, 33, 64, 224])
        views = []
        for _ in range(len(images)):
            h, w = rng.randint(1, height), rng.randint(1, width)
            views.append((rng.randint(0, height - h), rng.randint(0, width - w), h, w, rng.random() < 0.5))
        got = resize_crops(torch.from_numpy(images).permute(0, 3, 1, 2), views, size, interpolation)
        assert got.dtype == torch.uint8 and got.shape == (len(images), channels, size, size)
        for image, view, out in zip(images, views, got, strict=True):
            np.testing.assert_array_equal(out.numpy(), _pil_view(image, view, size, interpolation), err_msg=str(view))


def test_tall_crops_of_large_images_take_pils_vertical_pass_first():
    # Crops whose height shrinks by more than twice what the width does: PIL (13+) resizes them vertically first,
    # and the two orders round differently, so taking the other order would fail here.
    rng = random.Random(7)
    images = np.random.default_rng(7).integers(0, 256, (8, 240, 160, 3), dtype=np.uint8)
    views = []
    for _ in images:
        h, w = rng.randint(150, 240), rng.randint(20, 90)
        views.append((rng.randint(0, 240 - h), rng.randint(0, 160 - w), h, w, rng.random() < 0.5))
    for size, interpolation in ((40, "bicubic"), (56, "bilinear"), (112, "bicubic")):
        assert any(h > size and h - size > (w - size) * 2 for _, _, h, w, _ in views)
        got = resize_crops(torch.from_numpy(images).permute(0, 3, 1, 2), views, size, interpolation)
        for image, view, out in zip(images, views, got, strict=True):
            np.testing.assert_array_equal(out.numpy(), _pil_view(image, view, size, interpolation), err_msg=str(view))


def test_batch_views_are_views_bit_for_bit():
    images = np.random.default_rng(0).integers(0, 256, (6, 30, 26, 3), dtype=np.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    transform = PairedTransform(16, mean, std, teacher_size=40, teacher_mean=(0.5,) * 3, teacher_std=(0.3,) * 3)
    rng = random.Random(0)
    views = [transform.draw_view(26, 30, rng) for _ in images]
    student, teacher = transform.batch_views(torch.from_numpy(images).permute(0, 3, 1, 2), views)
    assert student.shape == (6, 3, 16, 16) and teacher.shape == (6, 3, 40, 40) and student.dtype == torch.float32
    for row, (image, view) in enumerate(zip(images, views, strict=True)):
        one_student, one_teacher = transform.views(Image.fromarray(image), view)
        assert torch.equal(student[row], one_student) and torch.equal(teacher[row], one_teacher)


def test_pil_weights_rows_sum_to_one_in_fixed_point():
    one = 1 << 22
    for interpolation in ("bilinear", "bicubic"):
        for in_size, out_size in ((28, 28), (24, 28), (100, 7), (3, 224)):
            sums = pil_resize_weights(in_size, out_size, interpolation).sum(1)
            assert (sums - one).abs().max() <= 3, (interpolation, in_size, out_size)  # per-tap rounding only
    assert torch.equal(pil_resize_weights(28, 28, "bicubic"), one * torch.eye(28, dtype=torch.float64))


def test_resize_crops_errors_name_the_argument():
    pixels = torch.zeros(2, 1, 10, 10, dtype=torch.uint8)
    view = (0, 0, 10, 10, False)
    with pytest.raises(ValueError, match="pixels must be a"):
        resize_crops(pixels.float(), [view, view], 8)
    with pytest.raises(ValueError, match="pixels must be a"):
        resize_crops(pixels[0], [view], 8)
    with pytest.raises(ValueError, match="views must hold one view per image"):
        resize_crops(pixels, [view], 8)
    with pytest.raises(ValueError, match=r"views\[1\] = \(1, 0, 10, 10, False\) does not lie inside the 10 x 10"):
        resize_crops(pixels, [view, (1, 0, 10, 10, False)], 8)
    with pytest.raises(ValueError, match=r"views\[0\] .* does not lie inside"):
        resize_crops(pixels, [(0, 0, 0, 10, False), view], 8)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        resize_crops(pixels, [view, view], 8, "lanczos")
    with pytest.raises(ValueError, match="size must be >= 1"):
        resize_crops(pixels, [view, view], 0)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        resize_crops(pixels[:0], [], 8, "lanczos")
    with pytest.raises(ValueError, match="in_size and out_size must be >= 1"):
        pil_resize_weights(10, 0, "bicubic")
    assert resize_crops(pixels[:0], [], 8).shape == (0, 1, 8, 8)
    transform = PairedTransform(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="pixels have 1 channels, the transform's mean and std 3 values"):
        transform.batch_views(pixels, [view, view])
