"""The eleven datasets of METHOD.md's reference protocol, laid out under one ``data_root`` as CoOp's DATASETS.md (and
Tip-Adapter's instructions, the same folders) lay them out, with each dataset's teacher prompt template.

Sample order: a CoOp split file's entries in the order the file gives them; ImageNet's trees in torchvision
``ImageFolder`` order (:func:`~dho_fast.train.data.scan_image_folder`). Image files named by a split file are not
checked one by one (ImageNet-sized lists): only the first image of each split, so that a misplaced image folder fails
here; any other missing image fails when it is read, with its path (:func:`~dho_fast.train.data.pil_loader`).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dho_fast.train.data import DatasetSplits, Sample, load_coop_splits, scan_image_folder

_FGVC_SPLIT_FILES = {split: f"images_variant_{split}.txt" for split in ("train", "val", "test")}


@dataclass(frozen=True)
class DatasetLayout:
    """Where one dataset lives under ``data_root`` and the teacher prompt template spec it uses.

    ``folder``: the dataset's folder in ``data_root``. ``image_dir``: where its images are, relative to ``folder``
    (``""``: the folder itself). ``split_format``: ``"coop"``, the CoOp split json ``split_file`` in ``folder``
    (entries ``[path relative to image_dir, label, classname]``); ``"fgvc"``, ``split_file`` (``variants.txt``, one
    class name a line) and ``images_variant_{train,val,test}.txt`` in ``folder``; ``"imagefolder"``, ImageFolder
    trees ``image_dir/train`` and ``image_dir/val`` (``split_file`` is None). ``templates``: the spec given to
    :func:`~dho_fast.train.teacher.prompt_templates`.
    """

    name: str
    folder: str
    image_dir: str
    split_format: Literal["coop", "fgvc", "imagefolder"]
    split_file: str | None
    templates: str

    def expected_layout(self) -> str:
        """The files this dataset needs, in words, for error messages."""
        images = f"data_root/{self.folder}/{self.image_dir + '/' if self.image_dir else ''}"
        if self.split_format == "coop":
            files = f"data_root/{self.folder}/{self.split_file}"
        elif self.split_format == "fgvc":
            files = f"data_root/{self.folder}/{self.split_file} and images_variant_{{train,val,test}}.txt"
        else:
            return (
                f"{self.name} expects ImageFolder trees {images}train/<wnid>/ and {images}val/<wnid>/ (the CoOp layout)"
            )
        return f"{self.name} expects {files} and images under {images} (the CoOp layout)"


DATASETS = {
    layout.name: layout
    for layout in (
        DatasetLayout(
            "caltech101",
            "caltech-101",
            "101_ObjectCategories",
            "coop",
            "split_zhou_Caltech101.json",
            "a photo of a {}.",
        ),
        DatasetLayout("dtd", "dtd", "images", "coop", "split_zhou_DescribableTextures.json", "{} texture."),
        DatasetLayout(
            "eurosat", "eurosat", "2750", "coop", "split_zhou_EuroSAT.json", "a centered satellite photo of {}."
        ),
        DatasetLayout(
            "fgvc", "fgvc_aircraft", "images", "fgvc", "variants.txt", "a photo of a {}, a type of aircraft."
        ),
        DatasetLayout(
            "food101", "food-101", "images", "coop", "split_zhou_Food101.json", "a photo of {}, a type of food."
        ),
        DatasetLayout(
            "oxford_flowers",
            "oxford_flowers",
            "jpg",
            "coop",
            "split_zhou_OxfordFlowers.json",
            "a photo of a {}, a type of flower.",
        ),
        DatasetLayout(
            "oxford_pets",
            "oxford_pets",
            "images",
            "coop",
            "split_zhou_OxfordPets.json",
            "a photo of a {}, a type of pet.",
        ),
        DatasetLayout("stanford_cars", "stanford_cars", "", "coop", "split_zhou_StanfordCars.json", "a photo of a {}."),
        DatasetLayout("sun397", "sun397", "SUN397", "coop", "split_zhou_SUN397.json", "a photo of a {}."),
        DatasetLayout(
            "ucf101", "ucf101", "UCF-101-midframes", "coop", "split_zhou_UCF101.json", "a photo of a person doing {}."
        ),
        DatasetLayout("imagenet", "imagenet", "images", "imagefolder", None, "dho_imagenet"),
    )
}


def _layout(name: str) -> DatasetLayout:
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    return DATASETS[name]


def _require(path: Path, layout: DatasetLayout, data_root: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {layout.expected_layout()}; data_root is {data_root}")
    return path


def load_dataset(name: str, data_root: str | Path) -> DatasetSplits:
    """Train pool, validation and test set of the dataset ``name`` (a key of :data:`DATASETS`) under ``data_root``.

    Class names come from the split file (fgvc: ``variants.txt``, label = line order) with ``_`` as a space;
    ImageNet's are open_clip's ``IMAGENET_CLASSNAMES`` (its 1000 wnid folders sorted give the same order). ImageNet:
    train = the ``train`` tree, test = the ``val`` tree, val = empty: the reference protocol has no ImageNet
    validation split.

    Raises ValueError for an unknown ``name`` (listing the known ones), an ImageNet train tree without exactly 1000
    class folders, or a malformed split file; FileNotFoundError naming the missing folder or file and the expected
    layout.
    """
    layout = _layout(name)
    data_root = Path(data_root)
    folder = _require(data_root / layout.folder, layout, data_root)
    image_dir = _require(folder / layout.image_dir, layout, data_root)
    if layout.split_format == "imagefolder":
        return _load_imagenet(image_dir, layout, data_root)
    if layout.split_format == "fgvc":
        splits = _load_fgvc(folder, image_dir, layout, data_root)
    else:
        splits = load_coop_splits(_require(folder / layout.split_file, layout, data_root), image_dir)
    for samples in (splits.train, splits.val, splits.test):
        if samples:
            _require(Path(samples[0].path), layout, data_root)
    splits.classnames = [c.replace("_", " ") for c in splits.classnames]
    return splits


def _load_fgvc(folder: Path, image_dir: Path, layout: DatasetLayout, data_root: Path) -> DatasetSplits:
    variants = _require(folder / layout.split_file, layout, data_root).read_text().splitlines()
    classnames = [line.strip() for line in variants if line.strip()]
    labels = {c: i for i, c in enumerate(classnames)}
    splits = {}
    for split, file_name in _FGVC_SPLIT_FILES.items():
        path = _require(folder / file_name, layout, data_root)
        samples = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in labels:
                raise ValueError(f"{path} line {number}: variant {variant!r} is not in {folder / layout.split_file}")
            samples.append(Sample(str(image_dir / f"{image_id}.jpg"), labels[variant]))
        splits[split] = samples
    return DatasetSplits(classnames, splits["train"], splits["val"], splits["test"])


def _load_imagenet(image_dir: Path, layout: DatasetLayout, data_root: Path) -> DatasetSplits:
    import open_clip

    train_dir = _require(image_dir / "train", layout, data_root)
    val_dir = _require(image_dir / "val", layout, data_root)
    num_classes = sum(d.is_dir() for d in train_dir.iterdir())
    if num_classes != 1000:
        raise ValueError(f"imagenet train tree {train_dir} must have 1000 class folders, got {num_classes}")
    train, wnids = scan_image_folder(train_dir)
    test, _ = scan_image_folder(val_dir, wnids)
    return DatasetSplits(list(open_clip.IMAGENET_CLASSNAMES), train, [], test)


def dataset_templates(name: str) -> str:
    """The teacher prompt template spec of the dataset ``name``, for
    :func:`~dho_fast.train.teacher.prompt_templates`: one template with ``{}``, or ``"dho_imagenet"`` (ImageNet's 7).

    Raises ValueError for an unknown ``name``.
    """
    return _layout(name).templates
