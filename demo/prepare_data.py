"""The demo's real images, written as ImageFolder trees ``train/``, ``val/`` and ``test/`` of PNG files.

Sources, first that works: Fashion-MNIST from Debian's package ``dataset-fashion-mnist`` (installed here with
apt-get when missing and this process may), torchvision's download of Fashion-MNIST, and scikit-learn's bundled
8x8 digits. ``python demo/prepare_data.py --out DIR`` prepares them on its own.
"""

import argparse
import gzip
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FASHION_CLASSES = (
    "t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)  # fmt: skip
SOURCES = ("auto", "debian", "torchvision", "digits")
# Share of each class's training images held out for validation: 2,000 of Fashion-MNIST's 60,000 images; the
# digits set is small, so it keeps a larger share to make the validation accuracy mean something.
VAL_FRACTION = {"fashion-mnist": 1 / 30, "digits": 0.2}


@dataclass
class ImageArrays:
    """uint8 images (N, H, W) with int64 labels, the class folder names, and where they came from."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classnames: tuple[str, ...]
    source: str


def _read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST format, gzipped): uint8 array of the shape its header gives."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()  # writable


def _install_debian_package() -> bool:
    """apt-get install of the Fashion-MNIST package, when apt-get exists and we are root; True on success."""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", DEBIAN_PACKAGE]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        # The package lists may be missing or stale on a fresh machine.
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            return False
    return (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file()


def load_debian() -> ImageArrays | None:
    if not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file() and not _install_debian_package():
        return None
    parts = [
        _read_idx(DEBIAN_DIR / name)
        for name in (
            "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
        )
    ]  # fmt: skip
    return ImageArrays(
        parts[0], parts[1].astype(np.int64), parts[2], parts[3].astype(np.int64), FASHION_CLASSES, "fashion-mnist"
    )


def load_torchvision(cache: Path) -> ImageArrays | None:
    try:
        from torchvision.datasets import FashionMNIST

        train = FashionMNIST(str(cache), train=True, download=True)
        test = FashionMNIST(str(cache), train=False, download=True)
    except Exception:  # no network (the usual case here), or a broken mirror: fall through to the next source
        return None
    return ImageArrays(
        train.data.numpy(),
        train.targets.numpy().astype(np.int64),
        test.data.numpy(),
        test.targets.numpy().astype(np.int64),
        FASHION_CLASSES,
        "fashion-mnist",
    )


def load_digits(seed: int = 0) -> ImageArrays:
    """scikit-learn's 1,797 8x8 digits (values 0..16, scaled to 0..255), a seeded 80/20 train/test split."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    cut = int(0.8 * len(images))
    train, test = order[:cut], order[cut:]
    labels = digits.target.astype(np.int64)
    return ImageArrays(
        images[train], labels[train], images[test], labels[test], tuple(str(d) for d in range(10)), "digits"
    )


def load_arrays(source: str, cache: Path) -> ImageArrays:
    """The first source of ``source`` ("auto": Debian, then torchvision, then digits) that yields images."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source in ("auto", "debian"):
        arrays = load_debian()
        if arrays is not None:
            return arrays
        if source == "debian":
            raise RuntimeError(f"{DEBIAN_DIR} is missing and the package {DEBIAN_PACKAGE} could not be installed")
    if source in ("auto", "torchvision"):
        arrays = load_torchvision(cache / "torchvision")
        if arrays is not None:
            return arrays
        if source == "torchvision":
            raise RuntimeError("torchvision could not download Fashion-MNIST")
    return load_digits()


def _write_tree(root: Path, images: np.ndarray, labels: np.ndarray, classnames: tuple[str, ...]) -> None:
    for name in classnames:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image, mode="L").save(root / classnames[label] / f"{i:05d}.png", compress_level=1)


@dataclass
class PreparedData:
    """The ImageFolder trees (``dirs``: train, val, test) and the same images as arrays: ``splits[name]`` is
    ``(uint8 images (N, H, W), int64 labels (N,))`` with labels indexing ``classnames``; the PNG file
    ``dirs[name]/<class>/<i>.png`` holds ``splits[name][0][i]``. ``splits["teacher"]``, when prepared, has no tree."""

    dirs: dict[str, str]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    classnames: tuple[str, ...]
    source: str


def _hold_out(labels: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask choosing ``round(share * n_c)`` of the ``n_c`` rows of each class of ``labels``."""
    chosen = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        chosen[rng.choice(members, round(share * len(members)), replace=False)] = True
    return chosen


def prepare(
    out: Path, source: str = "auto", seed: int = 0, teacher_share: float = 0.0, pool_per_class: int | None = None
) -> PreparedData:
    """Writes ``out/<source>/{train,val,test}`` once (a marker file records completion). ``VAL_FRACTION`` of each
    class of the training images is held out as validation, chosen with ``seed``.

    ``teacher_share`` > 0 also holds out that share of each class of the remaining training images as
    ``splits["teacher"]`` (arrays only, no tree): images a stand-in teacher may learn from that no student sees, in
    neither its labelled nor its unlabelled set. ``pool_per_class`` keeps at most that many images of each class of
    what remains as the students' pool (``train``; seeded), a smaller pool for a study that must run on a CPU.
    With either, the trees are written under ``out/<source>-teacher<share>-pool<n>``.
    """
    if not 0 <= teacher_share < 1:
        raise ValueError(f"teacher_share must be in [0, 1), got {teacher_share}")
    if pool_per_class is not None and pool_per_class < 1:
        raise ValueError(f"pool_per_class must be >= 1 or None, got {pool_per_class}")
    arrays = load_arrays(source, out)
    rng = np.random.default_rng(seed)
    val = _hold_out(arrays.train_labels, VAL_FRACTION[arrays.source], rng)
    images, labels = arrays.train_images[~val], arrays.train_labels[~val]
    teacher = _hold_out(labels, teacher_share, rng)
    pool = ~teacher
    if pool_per_class is not None:
        for c in np.unique(labels):
            members = np.flatnonzero(pool & (labels == c))
            if len(members) > pool_per_class:
                pool[rng.choice(members, len(members) - pool_per_class, replace=False)] = False
    splits = {
        "train": (images[pool], labels[pool]),
        "val": (arrays.train_images[val], arrays.train_labels[val]),
        "test": (arrays.test_images, arrays.test_labels),
    }
    if teacher_share:
        splits["teacher"] = (images[teacher], labels[teacher])
    name = arrays.source
    if teacher_share or pool_per_class is not None:
        name += f"-teacher{teacher_share:g}-pool{pool_per_class or 'all'}"
    root = out / name
    dirs = {split: str(root / split) for split in ("train", "val", "test")}
    marker = root / ".complete"
    if not marker.is_file():
        if root.exists():
            shutil.rmtree(root)  # a tree left half-written by an interrupted run
        for split, path in dirs.items():
            _write_tree(Path(path), *splits[split], arrays.classnames)
        marker.write_text(arrays.source + "\n")
    return PreparedData(dirs, splits, arrays.classnames, arrays.source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_output/data"))
    parser.add_argument("--source", choices=SOURCES, default="auto")
    args = parser.parse_args()
    print(prepare(args.out, args.source).dirs)


if __name__ == "__main__":
    main()
