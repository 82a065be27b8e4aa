"""pool_outputs on a real tiny student over a real ImageDataset of PNG files, against the student run on the stacked
images; blend_probs against the float64 formula; PoolOutputs' checks."""

import pytest
import torch

from dho_fast.select import PoolOutputs, blend_probs, pool_outputs
from dho_fast.train.data import ImageDataset, scan_image_folder
from dho_fast.train.students import build_student
from dho_fast.train.transforms import PairedTransform


def digits_dataset(trees, student, split: str = "train") -> ImageDataset:
    """The digits split with an evaluation transform (centre crop, no augmentation), 1-channel images."""
    samples, _ = scan_image_folder(trees[split])
    return ImageDataset(samples, PairedTransform(8, student.mean, student.std, train=False), image_mode="L")


def stacked_outputs(student, dataset):
    """The student on all the images at once, in eval mode: (ce, kd, features)."""
    images = torch.stack([dataset[i]["student"] for i in range(len(dataset))])
    student.eval()
    with torch.no_grad():
        features = student.backbone(images)
        ce, kd = student.logits(images)
    return ce, kd, features


@pytest.mark.parametrize("method", ["dho", "kd"])
def test_pool_outputs_equal_the_student_on_the_stacked_images(trees, method):
    student, _ = build_student("cnn", 4, method, in_channels=1, cnn_width=4)
    dataset = digits_dataset(trees, student, "val")
    student.train()
    with torch.no_grad():  # BN statistics that differ from their initial values, so that eval mode matters
        student.backbone(torch.randn(16, 1, 8, 8) * 3 + 1)
    running = {k: v.clone() for k, v in student.state_dict().items()}
    got = pool_outputs(student, dataset, batch_size=13)  # does not divide the split
    assert student.training and all(m.training for m in student.modules())
    assert all(torch.equal(v, running[k]) for k, v in student.state_dict().items())
    ce, kd, features = stacked_outputs(student, dataset)
    assert len(got) == len(dataset)
    for name, t in (("ce_logits", got.ce_logits), ("kd_logits", got.kd_logits), ("features", got.features)):
        assert t.dtype == torch.float32 and t.device.type == "cpu", name
    torch.testing.assert_close(got.features, features, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.ce_logits, ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.kd_logits, kd, rtol=1e-5, atol=1e-6)
    if method == "kd":
        assert torch.equal(got.ce_logits, got.kd_logits)


def test_pool_outputs_under_autocast_store_float32(trees):
    student, _ = build_student("cnn", 4, "dho", in_channels=1, cnn_width=4)
    dataset = digits_dataset(trees, student, "test")
    full = pool_outputs(student, dataset, batch_size=64)
    half = pool_outputs(student, dataset, batch_size=64, precision="bf16", progress=True)
    assert half.features.dtype == torch.float32 and half.ce_logits.dtype == torch.float32
    # bfloat16 keeps 8 bits of the backbone's activations.
    assert not torch.equal(half.features, full.features)
    torch.testing.assert_close(half.features, full.features, rtol=0.05, atol=0.05)


def test_pool_outputs_of_an_empty_dataset_have_the_heads_sizes(trees):
    student, _ = build_student("cnn", 3, "dho", in_channels=1, cnn_width=4)
    empty = ImageDataset([], PairedTransform(8, student.mean, student.std, train=False), image_mode="L")
    got = pool_outputs(student, empty)
    assert got.ce_logits.shape == (0, 3) and got.features.shape == (0, student.backbone.num_features)


def test_pool_outputs_argument_errors(trees):
    student, _ = build_student("cnn", 4, "dho", in_channels=1, cnn_width=4)
    dataset = digits_dataset(trees, student, "val")
    with pytest.raises(TypeError, match="student must be an nn.Module with a backbone"):
        pool_outputs(student.head, dataset)
    with pytest.raises(ValueError, match="batch_size must be"):
        pool_outputs(student, dataset, batch_size=0)
    with pytest.raises(ValueError, match="precision must be one of"):
        pool_outputs(student, dataset, precision="fp8")


def test_blend_probs_is_the_fixed_active_learning_blend():
    ce, kd = torch.randn(20, 7) * 5, torch.randn(20, 7) * 5
    want = 0.5 * torch.softmax(ce.double(), 1) + 0.5 * torch.softmax(kd.double(), 1)
    got = blend_probs(ce, kd)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    want = 0.25 * torch.softmax(ce.double(), 1) + 0.75 * torch.softmax(kd.double() / 2, 1)
    torch.testing.assert_close(blend_probs(ce, kd, alpha=0.25, beta=2.0).double(), want, rtol=1e-5, atol=1e-7)
    outputs = PoolOutputs(ce, kd, torch.randn(20, 3))
    assert torch.equal(outputs.probs(), blend_probs(ce, kd))


def test_pool_outputs_checks_its_fields():
    with pytest.raises(TypeError, match="features must be a float32 tensor"):
        PoolOutputs(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="ce_logits and kd_logits must be"):
        PoolOutputs(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="features must be \\(N, D\\) with the 2 rows"):
        PoolOutputs(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 4))
