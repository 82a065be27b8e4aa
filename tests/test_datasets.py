"""The eleven datasets of the reference protocol on synthetic trees of the CoOp layout, and ImageFolder order."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dho_fast.train.data import ImageDataset, scan_image_folder
from dho_fast.train.datasets import DATASETS, dataset_templates, load_dataset
from dho_fast.train.teacher import prompt_templates
from dho_fast.train.transforms import PairedTransform

# The layout of METHOD.md and CoOp's DATASETS.md, written out independently of the registry:
# name -> (folder under data_root, image dir in it, split json, template).
COOP_LAYOUTS = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", "a photo of a {}."),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json", "{} texture."),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}."),
    "food101": ("food-101", "images", "split_zhou_Food101.json", "a photo of {}, a type of food."),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", "a photo of a {}, a type of flower."),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json", "a photo of a {}, a type of pet."),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json", "a photo of a {}."),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json", "a photo of a {}."),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "a photo of a person doing {}."),
}
CLASSES = ["red_fox", "sea_lion_pup", "owl"]
# (relative path, label) per split, deliberately neither sorted by path nor by label: the file's order must be kept.
ENTRIES = {
    "train": [("sea_lion_pup/b.jpg", 1), ("red_fox/z.png", 0), ("owl/a.jpg", 2), ("red_fox/a.jpg", 0)],
    "val": [("owl/v.png", 2), ("red_fox/v.jpg", 0)],
    "test": [("sea_lion_pup/t.png", 1), ("owl/t.jpg", 2), ("red_fox/t.jpg", 0)],
}


def write_image(path: Path, value: int) -> None:
    """A 6x4 RGB image of one grey level ``value``; JPEG or PNG by the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 6, 3), value, dtype=np.uint8)).save(path)


def grey_level(index: int) -> int:
    return 20 + 25 * index


def assert_first_test_image_loads(splits, expected_value: int) -> None:
    """Loads test[0] through ImageDataset: the file is the one written with grey level ``expected_value``."""
    transform = PairedTransform(4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), train=False)
    item = ImageDataset(splits.test, transform)[0]
    assert item["student"].shape == (3, 4, 4) and item["label"] == splits.test[0].label
    np.testing.assert_allclose(item["student"].numpy(), expected_value / 255, atol=3 / 255)


def write_coop(data_root: Path, name: str) -> dict[str, list[tuple[str, int]]]:
    """A CoOp tree of ``name``; returns the expected (path, label) lists per split."""
    folder, image_dir, split_json, _ = COOP_LAYOUTS[name]
    image_root = data_root / folder / image_dir
    # Stanford Cars' json paths name the train or test folder under the dataset folder.
    prefix = "cars_train/" if name == "stanford_cars" else ""
    content, expected, count = {}, {}, 0
    for split, entries in ENTRIES.items():
        content[split] = [[prefix + path, label, CLASSES[label]] for path, label in entries]
        expected[split] = [(str(data_root / folder / image_dir / (prefix + path)), label) for path, label in entries]
        for path, _ in entries:
            write_image(image_root / (prefix + path), grey_level(count))
            count += 1
    (data_root / folder / split_json).write_text(json.dumps(content))
    return expected


@pytest.mark.parametrize("name", sorted(COOP_LAYOUTS))
def test_coop_dataset(tmp_path, name):
    expected = write_coop(tmp_path, name)
    splits = load_dataset(name, tmp_path)
    assert splits.classnames == ["red fox", "sea lion pup", "owl"]
    for split in ("train", "val", "test"):
        assert [(s.path, s.label) for s in getattr(splits, split)] == expected[split]
    assert dataset_templates(name) == COOP_LAYOUTS[name][3]
    assert prompt_templates(dataset_templates(name)) == [COOP_LAYOUTS[name][3]]
    assert_first_test_image_loads(splits, grey_level(len(ENTRIES["train"]) + len(ENTRIES["val"])))


VARIANTS = ["Boeing 737-200", "F/A-18", "DC_3"]
# Blank lines and stray spaces around lines: stripped and skipped; a name keeps its inner spaces.
FGVC_LINES = {
    "train": ["0001 DC_3", "", "0002 Boeing 737-200  ", "0003 F/A-18"],
    "val": ["0004 Boeing 737-200", ""],
    "test": ["  0005 F/A-18", "0006 DC_3"],
}
FGVC_EXPECTED = {
    "train": [("0001", 2), ("0002", 0), ("0003", 1)],
    "val": [("0004", 0)],
    "test": [("0005", 1), ("0006", 2)],
}


def write_fgvc(data_root: Path) -> Path:
    folder = data_root / "fgvc_aircraft"
    folder.mkdir()
    (folder / "variants.txt").write_text("\n".join(VARIANTS) + "\n\n")
    for split, lines in FGVC_LINES.items():
        (folder / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    for i in range(1, 7):
        write_image(folder / "images" / f"000{i}.jpg", grey_level(i))
    return folder


def test_fgvc(tmp_path):
    folder = write_fgvc(tmp_path)
    splits = load_dataset("fgvc", tmp_path)
    assert splits.classnames == ["Boeing 737-200", "F/A-18", "DC 3"]
    for split, expected in FGVC_EXPECTED.items():
        paths = [(str(folder / "images" / f"{i}.jpg"), label) for i, label in expected]
        assert [(s.path, s.label) for s in getattr(splits, split)] == paths
    assert dataset_templates("fgvc") == "a photo of a {}, a type of aircraft."
    assert_first_test_image_loads(splits, grey_level(5))


def test_fgvc_unknown_variant_names_file_and_line(tmp_path):
    folder = write_fgvc(tmp_path)
    (folder / "images_variant_val.txt").write_text("0004 Boeing 737-200\n\n0006 Boeing 747\n")
    with pytest.raises(ValueError, match=r"images_variant_val.txt line 3: variant 'Boeing 747' is not in .*variants"):
        load_dataset("fgvc", tmp_path)


def write_imagenet(data_root: Path, num_classes: int = 1000) -> tuple[Path, Path]:
    train, val = data_root / "imagenet" / "images" / "train", data_root / "imagenet" / "images" / "val"
    write_image(train / "n00000000" / "probe.png", 0)
    png = (train / "n00000000" / "probe.png").read_bytes()
    for c in range(num_classes):
        (train / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
        (train / f"n{c:08d}" / f"n{c:08d}_1.JPEG").write_bytes(png)
    for c, level in ((999, 1), (3, 2)):
        write_image(val / f"n{c:08d}" / f"ILSVRC2012_val_{c}.JPEG", grey_level(level))
    return train, val


def test_imagenet(tmp_path):
    import open_clip

    train, val = write_imagenet(tmp_path)
    splits = load_dataset("imagenet", tmp_path)
    assert splits.classnames == list(open_clip.IMAGENET_CLASSNAMES) and len(splits.classnames) == 1000
    expected_train = [(str(train / "n00000000" / "n00000000_1.JPEG"), 0), (str(train / "n00000000" / "probe.png"), 0)]
    expected_train += [(str(train / f"n{c:08d}" / f"n{c:08d}_1.JPEG"), c) for c in range(1, 1000)]
    assert [(s.path, s.label) for s in splits.train] == expected_train
    assert splits.val == []
    assert [(s.path, s.label) for s in splits.test] == [
        (str(val / "n00000003" / "ILSVRC2012_val_3.JPEG"), 3),
        (str(val / "n00000999" / "ILSVRC2012_val_999.JPEG"), 999),
    ]
    assert dataset_templates("imagenet") == "dho_imagenet" and len(prompt_templates("dho_imagenet")) == 7
    assert_first_test_image_loads(splits, grey_level(2))


def test_imagenet_needs_1000_classes(tmp_path):
    write_imagenet(tmp_path, num_classes=999)
    with pytest.raises(ValueError, match="must have 1000 class folders, got 999"):
        load_dataset("imagenet", tmp_path)


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.parametrize(
    ("name", "missing", "layout"),
    [
        ("dtd", "dtd/split_zhou_DescribableTextures.json", "dtd expects data_root/dtd/split_zhou_DescribableTextures"),
        ("oxford_flowers", "oxford_flowers/jpg", "images under data_root/oxford_flowers/jpg/"),
        ("eurosat", "eurosat", "eurosat expects data_root/eurosat/split_zhou_EuroSAT.json"),
        ("stanford_cars", "stanford_cars/cars_train/sea_lion_pup/b.jpg", "images under data_root/stanford_cars/ "),
        ("fgvc", "fgvc_aircraft/variants.txt", "fgvc expects data_root/fgvc_aircraft/variants.txt"),
        ("fgvc", "fgvc_aircraft/images_variant_test.txt", "images_variant_{train,val,test}.txt"),
        ("fgvc", "fgvc_aircraft/images", "images under data_root/fgvc_aircraft/images/"),
        ("imagenet", "imagenet/images/val", "trees data_root/imagenet/images/train/<wnid>/ and"),
    ],
)
def test_missing_path_names_it_and_the_layout(tmp_path, name, missing, layout):
    if name == "fgvc":
        write_fgvc(tmp_path)
    elif name == "imagenet":
        write_imagenet(tmp_path, num_classes=2)
    else:
        write_coop(tmp_path, name)
    remove(tmp_path / missing)
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(name, tmp_path)
    assert f"{tmp_path / missing} does not exist" in str(info.value) and layout in str(info.value)


def test_unknown_dataset_lists_the_names(tmp_path):
    with pytest.raises(ValueError) as info:
        load_dataset("cifar10", tmp_path)
    assert "'cifar10'" in str(info.value) and all(repr(name) in str(info.value) for name in DATASETS)
    assert len(DATASETS) == 11
    with pytest.raises(ValueError, match="cifar10"):
        dataset_templates("cifar10")


def test_scan_image_folder_order_is_torchvision(tmp_path):
    from torchvision.datasets import ImageFolder

    root, elsewhere = tmp_path / "train", tmp_path / "elsewhere"
    for path in [
        "b_cls/z.png",
        "b_cls/a/x.png",  # sorted full paths put it before z.png; ImageFolder after
        "b_cls/a/b/y.jpg",
        "b_cls/a b/w.png",  # "a b" sorts between "a" and "a/b"
        "b_cls/B.PNG",
        "b_cls/c.JpEg",
        "a_cls/only.bmp",
    ]:
        write_image(root / path, 0)
    (root / "b_cls" / "notes.txt").write_text("not an image")
    for path in ["linked_class/q.png", "linked_class/deep/p.png", "linked_sub/k.webp", "linked_sub/K.TIF"]:
        write_image(elsewhere / path, 0)
    os.symlink(elsewhere / "linked_class", root / "c_linked")
    os.symlink(elsewhere / "linked_sub", root / "b_cls" / "m_linked")

    reference = ImageFolder(str(root))
    assert reference.samples != sorted(reference.samples)  # the tree tells the two orders apart
    samples, classes = scan_image_folder(str(root))
    assert classes == reference.classes == ["a_cls", "b_cls", "c_linked"]
    assert [(s.path, s.label) for s in samples] == reference.samples
    assert len(samples) == 11
