"""Data splits, labelled-index files, the paired batch sampler and the shared student/teacher crop."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from trainer_fixtures import digits_trees

from dho_fast.train.data import (
    IGNORE_INDEX,
    ImageDataset,
    load_coop_splits,
    load_image_folder_splits,
    read_labelled_indices,
    scan_image_folder,
)
from dho_fast.train.sampling import PairedBatchSampler, steps_per_epoch
from dho_fast.train.transforms import PairedTransform


def test_labelled_indices_file(tmp_path):
    path = tmp_path / "labelled.json"
    path.write_text(json.dumps([7, 0, 3]))
    chosen = read_labelled_indices(path, 10)
    assert chosen.dtype == np.int64 and chosen.tolist() == [0, 3, 7]
    path.write_text(json.dumps({"round": 2, "labelled": [9, 1], "picks": [1]}))  # as the active loop writes it
    assert read_labelled_indices(path, 10).tolist() == [1, 9]


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        ("[1, 2", ValueError, "is not a JSON file"),
        ("[]", ValueError, "holds an empty list"),
        ("[0, 10]", ValueError, "holds index 10, outside the train pool's range [0, 10)"),
        ("[-1]", ValueError, "holds index -1, outside"),
        ("[4, 2, 4]", ValueError, "lists index 4 more than once"),
        ("[1.5]", TypeError, "must hold a JSON list of integer train indices"),
        ("[1.0]", TypeError, "got [1.0]"),
        ("[true]", TypeError, "got [true]"),
        ('["1"]', TypeError, 'got ["1"]'),
        ("3", TypeError, "got 3"),
        ('{"indices": [1]}', TypeError, "under 'labelled'"),
    ],
)
def test_labelled_indices_file_errors_name_the_setting_and_file(tmp_path, content, error, message):
    path = tmp_path / "labelled.json"
    path.write_text(content)
    with pytest.raises(error) as info:
        read_labelled_indices(path, 10)
    assert str(info.value).startswith(f"labelled_indices {path} ") and message in str(info.value)
    with pytest.raises(FileNotFoundError, match="labelled_indices .*missing.json does not exist"):
        read_labelled_indices(tmp_path / "missing.json", 10)


def test_image_folder_and_coop_splits(tmp_path):
    trees = digits_trees(tmp_path)
    splits = load_image_folder_splits(trees["train"], trees["val"], trees["test"])
    assert splits.classnames == ["digit 0", "digit 1", "digit 2", "digit 3"]
    assert len(splits.val) and len(splits.test)
    assert all(s.path.startswith(trees["train"]) for s in splits.train)
    # The same images described by a CoOp split file.
    entries = {
        key: [[s.path.removeprefix(str(tmp_path) + "/"), s.label, f"digit {s.label}"] for s in samples]
        for key, samples in (("train", splits.train), ("val", splits.val), ("test", splits.test))
    }
    (tmp_path / "split.json").write_text(json.dumps(entries))
    coop = load_coop_splits(tmp_path / "split.json", tmp_path)
    assert coop.classnames == splits.classnames
    assert coop.train == splits.train and coop.test == splits.test
    entries["val"][0][2] = "another name"
    (tmp_path / "bad.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="two class names"):
        load_coop_splits(tmp_path / "bad.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="image folder"):
        load_image_folder_splits(tmp_path / "missing")


def collect(sampler):
    return list(sampler)


def test_paired_batches_cover_unlabelled_once_per_epoch_and_cycle_labelled():
    labelled, unlabelled = np.arange(0, 10), np.arange(10, 60)
    sampler = PairedBatchSampler(
        labelled, unlabelled, labelled_batch=4, unlabelled_batch=16, total_steps=6, seed=3
    )  # 50 // 16 = 3 steps per epoch: 2 epochs
    batches = collect(sampler)
    assert sampler.steps_per_epoch == 3 and len(batches) == 6
    for batch in batches:
        assert [k[2] for k in batch] == [True] * 4 + [False] * 16
    for epoch in range(2):
        seen = [k[0] for b in batches[3 * epoch : 3 * epoch + 3] for k in b if not k[2]]
        assert len(seen) == len(set(seen)) == 48 and set(seen) <= set(unlabelled)
    stream = [k[0] for b in batches for k in b if k[2]]  # 24 labelled rows: two full passes and a partial one
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # each pass is a fresh permutation
    seeds = [k[1] for b in batches for k in b]
    assert len(set(seeds)) == len(seeds)  # every draw has its own augmentation seed


def test_paired_batches_independent_of_ranks_accumulation_and_resume():
    labelled, unlabelled = np.arange(0, 7), np.arange(7, 107)
    args = dict(labelled_batch=8, unlabelled_batch=16, total_steps=5, seed=0)
    single = collect(PairedBatchSampler(labelled, unlabelled, **args))
    for world, accum in ((2, 1), (2, 2), (1, 4)):
        parts = [
            collect(
                PairedBatchSampler(labelled, unlabelled, **args, rank=r, world_size=world, accumulation_steps=accum)
            )
            for r in range(world)
        ]
        for step in range(5):
            rows = [k for p in parts for b in p[step * accum : (step + 1) * accum] for k in b]
            assert sorted(rows) == sorted(single[step])
    resumed = collect(PairedBatchSampler(labelled, unlabelled, **args, start_step=3))
    assert resumed == single[3:]
    ce_only = collect(PairedBatchSampler(labelled, unlabelled, **args, use_unlabelled=False))
    assert [[k for k in b if k[2]] for b in single] == ce_only
    with pytest.raises(ValueError, match="labelled_batch_size \\(8\\) must be divisible"):
        PairedBatchSampler(labelled, unlabelled, **args, world_size=3)
    with pytest.raises(ValueError, match="larger than the unlabelled set"):
        steps_per_epoch(7, 10, 8, 16)


def test_shared_crop_for_student_and_teacher():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    same = PairedTransform(32, mean, std, teacher_size=32, teacher_mean=mean, teacher_std=std, scale=(0.3, 0.6))
    student, teacher = same(image, random.Random(1))
    torch.testing.assert_close(student, teacher)  # one crop, one flip decision for both views
    again, _ = same(image, random.Random(1))
    other, _ = same(image, random.Random(2))
    torch.testing.assert_close(student, again)
    assert not torch.equal(student, other)
    sized = PairedTransform(16, mean, std, teacher_size=48, teacher_mean=mean, teacher_std=std, scale=(0.3, 0.6))
    small, large = sized(image, random.Random(1))
    assert small.shape == (3, 16, 16) and large.shape == (3, 48, 48)
    # The teacher's view shrunk to the student's size is the student's view, up to resampling.
    shrunk = torch.nn.functional.interpolate(large[None], size=16, mode="area")[0]
    assert torch.corrcoef(torch.stack([shrunk.flatten(), small.flatten()]))[0, 1] > 0.9


def test_dataset_items(tmp_path):
    trees = digits_trees(tmp_path)
    splits = load_image_folder_splits(trees["train"])
    transform = PairedTransform(8, (0.5,), (0.5,), train=True)
    dataset = ImageDataset(splits.train, transform, "L")
    labelled, unlabelled, plain = dataset[(3, 11, True)], dataset[(3, 11, False)], dataset[3]
    assert labelled["label"] == splits.train[3].label and unlabelled["label"] == IGNORE_INDEX
    assert labelled["index"] == 3 and "teacher" not in labelled
    torch.testing.assert_close(labelled["student"], unlabelled["student"])
    assert plain["student"].shape == (1, 8, 8) and plain["student"].dtype == torch.float32


def test_flip_mirrors_the_same_crop():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    plain = PairedTransform(24, mean, std, scale=(0.3, 0.6), hflip=False)
    flipping = PairedTransform(24, mean, std, scale=(0.3, 0.6), hflip=True)
    flips = []
    for seed in range(8):  # the box is drawn before the flip decision: both draw the same box
        unflipped, _ = plain(image, random.Random(seed))
        view, _ = flipping(image, random.Random(seed))
        flips.append(not torch.equal(view, unflipped))
        torch.testing.assert_close(view, unflipped.flip(-1) if flips[-1] else unflipped)
    assert any(flips) and not all(flips)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        PairedTransform(24, mean, std, interpolation="lanczos")


def test_cached_images_are_the_same_draws_without_the_files(tmp_path):
    trees = digits_trees(tmp_path)
    samples = load_image_folder_splits(trees["train"]).train
    transform = PairedTransform(8, (0.5,), (0.5,), teacher_size=12, teacher_mean=(0.5,), teacher_std=(0.5,))
    from_files = ImageDataset(samples, transform, "L")
    cached = ImageDataset(samples, transform, "L", cache_images=True)
    keys = [(3, 11, True), (3, 12, False), (7, 11, True)]
    expected = [from_files[k] for k in keys]
    for sample in samples:
        Path(sample.path).unlink()
    for key, want in zip(keys, expected, strict=True):
        got = cached[key]
        assert got.keys() == want.keys()
        for name in ("student", "teacher"):
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
        assert (got["label"], got["index"]) == (want["label"], want["index"])
    with pytest.raises(ValueError, match="cannot be read"):
        from_files[3]


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_cached_batch_is_the_files_batch_bit_for_bit(tmp_path, mode):
    """The DataLoader's batched fetch of cached images (one tensor, __getitems__) gives the per-image path's batch."""
    trees = digits_trees(tmp_path)
    samples = load_image_folder_splits(trees["train"]).train
    channels = len(mode)
    grey, light, dark = (0.5,) * channels, (0.4,) * channels, (0.3,) * channels
    transform = PairedTransform(10, grey, grey, teacher_size=20, teacher_mean=light, teacher_std=dark, scale=(0.3, 0.9))
    from_files = ImageDataset(samples, transform, mode)
    cached = ImageDataset(samples, transform, mode, cache_images=True)
    assert cached.pixels is not None and cached.pixels.shape == (len(samples), channels, 8, 8)
    sampler = PairedBatchSampler(np.arange(0, len(samples), 5), np.arange(len(samples)), labelled_batch=4,
                                 unlabelled_batch=12, total_steps=3, seed=0)  # fmt: skip
    loaders = (DataLoader(from_files, batch_sampler=sampler), DataLoader(cached, batch_sampler=sampler))
    for want, got in zip(*loaders, strict=True):
        assert want.keys() == got.keys() == {"student", "teacher", "label", "index"}
        for name in want:
            assert torch.equal(want[name], got[name]), name
        assert (got["label"] == IGNORE_INDEX).sum() == 12
    # A single item goes through PIL from the cached pixels: the same tensors again.
    key = next(iter(sampler))[0]
    assert torch.equal(cached[key]["student"], from_files[key]["student"])


def test_cached_images_of_several_sizes_keep_the_per_image_path(tmp_path):
    trees = digits_trees(tmp_path)
    samples = load_image_folder_splits(trees["train"]).train[:6]
    Image.fromarray(np.full((12, 9), 200, dtype=np.uint8)).save(samples[0].path)
    transform = PairedTransform(8, (0.5,), (0.5,))
    cached = ImageDataset(samples, transform, "L", cache_images=True)
    assert cached.pixels is None
    assert ImageDataset(samples[1:], PairedTransform(8, (0.5,) * 2, (0.5,) * 2), "LA", cache_images=True).pixels is None
    keys = [(i, i + 3, True) for i in range(6)]
    from_files = ImageDataset(samples, transform, "L")
    for want, got in zip([from_files[k] for k in keys], cached.__getitems__(keys), strict=True):
        assert torch.equal(want["student"], got["student"])


def test_empty_class_folder_is_an_error_a_missing_one_is_not(tmp_path):
    trees = digits_trees(tmp_path)
    _, class_dirs = scan_image_folder(trees["train"])
    missing = tmp_path / "val" / "digit_2"
    for image in missing.iterdir():
        image.unlink()
    missing.rmdir()
    samples, _ = scan_image_folder(trees["val"], class_dirs)  # a val tree may lack a class
    assert samples and 2 not in {s.label for s in samples}
    missing.mkdir()
    (missing / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"class folder {missing} holds no images"):
        scan_image_folder(trees["val"], class_dirs)
    empty = tmp_path / "train" / "digit_1"
    for image in empty.iterdir():
        image.unlink()
    with pytest.raises(ValueError, match=f"class folder {empty} holds no images"):
        load_image_folder_splits(trees["train"])


def _truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage, cause",
    [
        (_truncate, "OSError"),
        (lambda p: p.write_bytes(b"not a png"), "UnidentifiedImageError"),
        (Path.unlink, "No such file"),
    ],
)
@pytest.mark.parametrize("num_workers", [0, 1])
def test_unreadable_image_names_its_file(tmp_path, damage, cause, num_workers):
    trees = digits_trees(tmp_path)
    splits = load_image_folder_splits(trees["train"])
    bad = Path(splits.train[5].path)
    damage(bad)
    dataset = ImageDataset(splits.train, PairedTransform(8, (0.5,), (0.5,)), "L")
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=num_workers)
    with pytest.raises(ValueError) as info:
        list(loader)
    assert type(info.value) is ValueError
    assert f"image {bad} cannot be read" in str(info.value) and cause in str(info.value)
