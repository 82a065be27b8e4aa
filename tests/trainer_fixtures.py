"""Small real inputs for the trainer's tests: PNG ImageFolder trees of scikit-learn's digits, a tiny open_clip
architecture (random weights), precomputed teacher logits and the settings of a few-step run."""

import json
import socket
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TINY_CLIP = "dho-test-tiny"


def write_tree(root: Path, images: np.ndarray, labels: np.ndarray, classnames: list[str]) -> str:
    """Writes uint8 images (N, H, W) as ``root/<class>/<i>.png``; returns ``str(root)``."""
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / classnames[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{i:04d}.png")
    return str(root)


def digits_trees(root: Path, num_classes: int = 4) -> dict[str, str]:
    """Real 8x8 digit images of ``num_classes`` classes split into train / val / test trees (60/20/20)."""
    from sklearn.datasets import load_digits

    digits = load_digits(n_class=num_classes)
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    cuts = (int(0.6 * len(order)), int(0.8 * len(order)))
    parts = {"train": order[: cuts[0]], "val": order[cuts[0] : cuts[1]], "test": order[cuts[1] :]}
    names = [f"digit_{d}" for d in range(num_classes)]
    return {k: write_tree(root / k, images[idx], digits.target[idx], names) for k, idx in parts.items()}


def tiny_clip_config(root: Path) -> str:
    """An open_clip model config file of a tiny ViT (16x16 images, one block per tower); returns its path.
    Registering it (setting ``open_clip_config``) makes ``TINY_CLIP`` an open_clip architecture name."""
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    path = root / f"{TINY_CLIP}.json"
    path.write_text(json.dumps(config))
    return str(path)


def register_tiny_clip(root: Path) -> str:
    """Registers the tiny architecture with open_clip; returns its name."""
    import open_clip

    open_clip.add_model_config(tiny_clip_config(root))
    return TINY_CLIP


def random_teacher_logits(path: Path, num_rows: int, num_classes: int, seed: int = 0) -> str:
    """A file of random teacher logits (num_rows, num_classes); returns its path."""
    torch.save(torch.randn(num_rows, num_classes, generator=torch.Generator().manual_seed(seed)) * 3, path)
    return str(path)


def run_settings(trees: dict[str, str], out: Path, **changes) -> dict:
    """Settings of a few-step run on the digit trees with the ``cnn`` student and precomputed teacher logits."""
    settings = dict(
        train_dir=trees["train"],
        val_dir=trees["val"],
        test_dir=trees["test"],
        labelled_fraction=0.1,
        image_mode="L",
        student="cnn",
        cnn_width=4,
        student_size=8,
        labelled_batch_size=8,
        unlabelled_batch_size=16,
        max_steps=4,
        num_workers=0,
        progress=False,
        log_every=2,
        checkpoint_every=2,
        device="cpu",
        output_dir=str(out),
    )
    settings.update(changes)
    return settings


def assert_same_weights(a: dict, b: dict, **tolerances) -> None:
    """Two state dicts agree, except attention key biases: softmax ignores a shift of a row, so their true gradient
    is zero and Adam turns float noise in it into steps of up to lr, differently in differently ordered sums."""
    for key, value in a.items():
        other = b[key]
        if key.endswith("attn.in_proj_bias"):
            third = value.shape[0] // 3
            value, other = value.clone(), other.clone()
            value[third : 2 * third] = other[third : 2 * third] = 0
        torch.testing.assert_close(value, other, msg=key, **tolerances)


def count_train_images(trees: dict[str, str]) -> int:
    return sum(1 for _ in Path(trees["train"]).rglob("*.png"))


def free_port() -> int:
    """A TCP port free on this machine now, for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
