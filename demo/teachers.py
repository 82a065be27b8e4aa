"""The demos' stand-in teachers. No vision-language model's weights can be downloaded here, so a small MLP on raw
pixels stands in for one, trained in one of two ways:

- ``oracle``: fitted on every label of the students' training pool, the labels the students are denied. The
  labelled subset then carries nothing the teacher lacks, the regime where the paper expects no gain from DHO's
  second head.
- ``caption``: VLM-like. It never sees a label of the students' pool: it learns from held-out images no student sees
  (``splits["teacher"]``), labelled by "captions" with systematic confusions. Each image keeps its class name, except
  that with the fixed probabilities of ``CAPTION_CONFUSIONS`` it is named as the class a caption writer (and a
  zero-shot VLM) confuses it with: shirts called t-shirts, coats called pullovers, sandals called sneakers, and so
  on. Its errors are therefore systematic (whole classes named as their neighbour) rather than random. This design
  was fixed before any student was trained with it and is not tuned afterwards.

Both are fitted once per seed; their logits on the students' pool are cached, one row per train image in the
trainer's order, one column per class in the trainer's class order.
"""

from pathlib import Path

import numpy as np
import torch
from prepare_data import PreparedData
from torch import nn

from dho_fast.train.checkpoint import save_atomic
from dho_fast.train.data import scan_image_folder

TEACHERS = ("oracle", "caption")
# Per source: {true class: {the class its caption names instead: probability}}; the rest of the time the caption
# names the true class. Three classes are named as their neighbour more often than not, a few others sometimes.
CAPTION_CONFUSIONS = {
    "fashion-mnist": {
        "shirt": {"t-shirt_top": 0.6},
        "coat": {"pullover": 0.6},
        "sandal": {"sneaker": 0.6},
        "pullover": {"coat": 0.3},
        "ankle_boot": {"sneaker": 0.3},
        "dress": {"t-shirt_top": 0.2},
        "t-shirt_top": {"shirt": 0.1},
    },
    "digits": {"8": {"3": 0.6}, "5": {"6": 0.6}, "7": {"1": 0.6}, "9": {"4": 0.3}, "3": {"8": 0.2}},
}


class StandInTeacher(nn.Module):
    """A two-hidden-layer MLP on raw uint8 pixels: the stand-in for a VLM teacher."""

    def __init__(self, num_pixels: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(num_pixels, 512),
            nn.ReLU(),
            nn.Linear(512, 256),
            nn.ReLU(),
            nn.Linear(256, num_classes),
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels.float() / 127.5 - 1.0)


def caption_labels(
    labels: np.ndarray, classnames: tuple[str, ...], confusions: dict[str, dict[str, float]], seed: int
) -> np.ndarray:
    """The class each image's caption names: ``labels`` (N,) int64 with each row of class ``c`` renamed to class
    ``d`` with probability ``confusions[c][d]`` (independently per row, seeded)."""
    rng = np.random.default_rng(seed)
    draws = rng.random(len(labels))
    captions = labels.copy()
    for true_name, swaps in confusions.items():
        rows = labels == classnames.index(true_name)
        low = 0.0
        for caption_name, probability in swaps.items():
            captions[rows & (draws >= low) & (draws < low + probability)] = classnames.index(caption_name)
            low += probability
    return captions


def _fit_mlp(images: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int) -> StandInTeacher:
    """AdamW with a one-cycle schedule, batches of 256 (fewer for fewer images), cross-entropy; seeded by the
    caller."""
    model = StandInTeacher(images[0].numel(), num_classes)
    batch = min(256, len(images))
    steps = epochs * (len(images) // batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    for _ in range(epochs):
        order = torch.randperm(len(images))
        for start in range(0, len(images) - batch + 1, batch):
            rows = order[start : start + batch]
            loss = nn.functional.cross_entropy(model(images[rows]), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def fit_teacher(kind: str, data: PreparedData, out: Path, seed: int, epochs: int) -> tuple[Path, float]:
    """Fits the ``kind`` teacher (module docs) once per seed and caches its logits on the students' pool in
    ``out/teacher_<kind>_e<epochs>.pt``; returns that file and the teacher's test accuracy.

    ``epochs`` passes over the pool for ``oracle``; ``caption`` makes as many optimizer steps over its smaller
    held-out set (``epochs`` times the pool-to-held-out size ratio, rounded).
    """
    if kind not in TEACHERS:
        raise ValueError(f"kind must be one of {TEACHERS}, got {kind!r}")
    # The name carries the epochs, so that a student job (run_demo.student_job) names the teacher it was trained with.
    logits_path = out / f"teacher_{kind}_e{epochs}.pt"
    if logits_path.is_file():
        return logits_path, float(torch.load(logits_path, weights_only=True)["test_acc"])
    torch.manual_seed(seed)
    pool_images, pool_labels = (torch.from_numpy(a) for a in data.splits["train"])
    if kind == "oracle":
        model = _fit_mlp(pool_images, pool_labels, len(data.classnames), epochs)
    else:
        if "teacher" not in data.splits:
            raise ValueError("the caption teacher learns from held-out images: prepare the data with teacher_share > 0")
        images, labels = data.splits["teacher"]
        captions = caption_labels(labels, data.classnames, CAPTION_CONFUSIONS[data.source], seed)
        repeats = max(1, round(epochs * len(pool_labels) / len(labels)))
        model = _fit_mlp(torch.from_numpy(images), torch.from_numpy(captions), len(data.classnames), repeats)
    with torch.no_grad():
        test_images, test_labels = (torch.from_numpy(a) for a in data.splits["test"])
        test_acc = float((model(test_images).argmax(1) == test_labels).double().mean())
        logits = model(pool_images)
    # The trainer's pool is sorted by class folder, then file name; file <i>.png holds image i of the arrays.
    samples, class_dirs = scan_image_folder(data.dirs["train"])
    rows = torch.tensor([int(Path(s.path).stem) for s in samples])
    columns = torch.tensor([data.classnames.index(name) for name in class_dirs])
    save_atomic({"logits": logits[rows][:, columns], "test_acc": test_acc}, logits_path)  # a kill leaves no torn file
    return logits_path, test_acc
