"""The embedded demo: DHO vs single-head KD vs CE-only on real images, trained by dho_fast's own trainer.

Offline and on CPU. Images: Fashion-MNIST written as ImageFolder PNG trees (see ``prepare_data.py``). 1% and 10% of
the training labels are kept, the rest of the training images are unlabelled. The teacher is NOT a
vision-language model: no VLM weights can be downloaded here, so a small MLP fitted on all training labels stands in
for one. Its logits on the training images are computed once and cached, so the runs measure the students. Every
student run goes through ``dho_fast.train`` (data pipeline, fused loss, evaluation with the alpha/beta search on
the validation split) with the same settings; only the method and the label fraction change.

``python demo/run_demo.py [--seed 0]`` prints a table of test accuracies; ``--json`` also writes the results.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # prepare_data beside this file, run as a script

from prepare_data import SOURCES, PreparedData, prepare  # noqa: E402
from torch import nn  # noqa: E402

from dho_fast.train.config import TrainConfig  # noqa: E402
from dho_fast.train.data import scan_image_folder  # noqa: E402
from dho_fast.train.trainer import train  # noqa: E402

METHODS = ("dho", "kd", "ce")
FRACTIONS = (0.01, 0.1)

# One setting for every student run: METHOD.md's few-shot recipe (AdamW, 10% linear warm-up then linear decay,
# T = 2, w_ce = w_kd = 0.5, paired labelled and unlabelled batches) scaled to 28x28 images and a CPU budget of a
# few hundred steps, which is why the learning rate is 3e-3 rather than 1e-3 and the crops milder (scale 0.85-1);
# chosen for every method alike. Only the method and the label fraction change between runs.
STUDENT_SETTINGS = dict(
    student="cnn",
    cnn_width=16,
    image_mode="L",
    epochs=None,  # the runs are as long as --steps says
    crop_scale=(0.85, 1.0),
    hflip=True,
    labelled_batch_size=32,
    unlabelled_batch_size=96,
    lr=3e-3,
    weight_decay=0.01,
    warmup_fraction=0.1,
    lr_decay="linear",
    temperature=2.0,
    ce_loss_weight=0.5,
    kd_loss_weight=0.5,
    eval_batch_size=500,
    checkpoint_every=10_000,
    progress=False,
)


class StandInTeacher(nn.Module):
    """A two-hidden-layer MLP on raw pixels: the stand-in for a VLM teacher (fitted on all training labels)."""

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


def fit_teacher(data: PreparedData, out: Path, seed: int, epochs: int) -> tuple[Path, float]:
    """Fits the stand-in teacher on every training label once per seed and caches its logits on the train pool:
    one row per train image in the trainer's order, one column per class in the trainer's class order.
    Returns the logits file and the teacher's test accuracy."""
    logits_path = out / "teacher_logits.pt"
    if logits_path.is_file():
        return logits_path, float(torch.load(logits_path, weights_only=True)["test_acc"])
    torch.manual_seed(seed)
    images, labels = (torch.from_numpy(a) for a in data.splits["train"])
    model = StandInTeacher(images[0].numel(), len(data.classnames))
    batch = 256
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
    model.eval()
    with torch.no_grad():
        test_images, test_labels = (torch.from_numpy(a) for a in data.splits["test"])
        test_acc = float((model(test_images).argmax(1) == test_labels).double().mean())
        logits = model(images)
    # The trainer's pool is sorted by class folder, then file name; file <i>.png holds image i of the arrays.
    samples, class_dirs = scan_image_folder(data.dirs["train"])
    rows = torch.tensor([int(Path(s.path).stem) for s in samples])
    columns = torch.tensor([data.classnames.index(name) for name in class_dirs])
    torch.save({"logits": logits[rows][:, columns], "test_acc": test_acc}, logits_path)
    return logits_path, test_acc


def run_students(
    data: PreparedData, out: Path, logits: Path, seed: int, steps: int, num_workers: int, methods, fractions
) -> list[dict]:
    """Trains every (fraction, method) student from scratch at the images' own size; returns one row each."""
    dirs = data.dirs
    rows = []
    for fraction in fractions:
        for method in methods:
            run_dir = out / f"{method}_{fraction:g}"
            shutil.rmtree(run_dir, ignore_errors=True)
            start = time.perf_counter()
            result = train(
                TrainConfig(
                    **STUDENT_SETTINGS,
                    method=method,
                    labelled_fraction=fraction,
                    student_size=data.splits["train"][0].shape[1],
                    train_dir=dirs["train"],
                    val_dir=dirs["val"],
                    test_dir=dirs["test"],
                    teacher="logits",
                    teacher_logits=str(logits),
                    output_dir=str(run_dir),
                    max_steps=steps,
                    seed=seed,
                    num_workers=num_workers,
                    device="cpu",
                )
            )
            test, val = result.test, result.val
            rows.append(
                {
                    "fraction": fraction,
                    "method": method,
                    "test_acc": test["acc_blend"] if method == "dho" else test["acc"],
                    "test_acc_ce_head": test.get("acc_ce"),
                    "test_acc_kd_head": test.get("acc_kd"),
                    "val_acc": val["acc_blend"] if method == "dho" else val["acc"],
                    "val_acc_ce_head": val.get("acc_ce"),
                    "val_acc_kd_head": val.get("acc_kd"),
                    "alpha": result.alpha,
                    "beta": result.beta,
                    "seconds": time.perf_counter() - start,
                }
            )
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def format_table(rows: list[dict], num_train: int) -> str:
    lines = [
        "| labels | method | test acc % | CE head % | KD head % | alpha | beta |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        labels = f"{r['fraction']:.0%} ({round(r['fraction'] * num_train)})"
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:g}"
        beta = "-" if r["beta"] is None else f"{r['beta']:g}"
        lines.append(
            f"| {labels} | {r['method']} | {_pct(r['test_acc'])} | {_pct(r['test_acc_ce_head'])} | "
            f"{_pct(r['test_acc_kd_head'])} | {alpha} | {beta} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("demo_output"))
    parser.add_argument("--source", choices=SOURCES, default="auto", help="where the images come from")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of each student")
    parser.add_argument("--teacher-epochs", type=int, default=3, help="epochs of the stand-in teacher")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    data = prepare(args.out / "data", args.source)
    setup_s = time.perf_counter() - start
    out = args.out / data.source / f"seed{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    logits, teacher_acc = fit_teacher(data, out, args.seed, args.teacher_epochs)
    teacher_s = time.perf_counter() - start - setup_s
    rows = run_students(data, out, logits, args.seed, args.steps, args.num_workers, args.methods, args.fractions)
    num_train = len(data.splits["train"][1])
    print(f"\nDHO demo on {data.source} ({num_train} training images, seed {args.seed}, {args.steps} steps each)")
    print(
        f"Teacher: a small MLP fitted on all training labels, test accuracy {100 * teacher_acc:.2f}%. It stands in "
        "for a vision-language model, whose weights cannot be downloaded here; its logits are cached once."
    )
    print("DHO's test accuracy is the blend with alpha/beta chosen on the validation split.\n")
    print(format_table(rows, num_train))
    total_s = time.perf_counter() - start
    print(f"\n(data set-up {setup_s:.0f} s, teacher {teacher_s:.0f} s, total {total_s:.0f} s)")
    results = {
        "source": data.source,
        "seed": args.seed,
        "steps": args.steps,
        "teacher_test_acc": teacher_acc,
        "rows": rows,
        "seconds": total_s,
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
