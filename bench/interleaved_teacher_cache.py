"""A DHO training step with a live teacher against one that reads a teacher store, on this CPU; and the same
comparison on paper for the ImageNet recipe, from FLOPs; and a store's size.

    .venv/bin/python bench/interleaved_teacher_cache.py [--rounds 8] [--images 64] [--batch 8]

Step time. Random-weight open_clip models (nothing can be downloaded here; the FLOPs are the architectures'): the
teacher ``--teacher`` (ViT-B-16, 224 px) and the student ``open_clip:--student`` (ViT-S-32, 224 px) on ``--images``
random RGB images written to disk, DHO, a batch of ``--batch`` labelled and ``--batch`` unlabelled rows, AdamW,
float32. Providers, each one step per round in an order shuffled per round (bench/interleaved.py); a ratio is the
median of per-round ratios:

- ``live``: the step as the trainer runs it with ``teacher: open_clip``: the batch's student and teacher views
  (decode, crop, resize), the teacher's forward, the student's forward, the fused loss, backward, optimizer step;
- ``cache``: the step with ``teacher: cache`` (a store of ``--views`` views, top-5, written first): the student views
  cropped with stored boxes, the stored distributions gathered, then the same student step;
- ``student``: the student's own step: its views and a constant teacher tensor, no teacher work at all.

The goal (issue 15): ``cache`` costs at most ``student`` plus 10%.

On paper (``--flops``): forward FLOPs of the recipe's teacher (ViT-H-14-378-quickgelu at 378 px) and student
(ViT-B-16 at 224 px), counted by ``torch.utils.flop_counter`` on meta tensors (no weights, no arithmetic), the
student's step taken as 3 forwards (forward + backward); and the bytes per image of an ImageNet store (R = 10, top-5
and top-10, float16) from the store's record layout.
"""

import argparse
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from conftest import machine
from interleaved import median_ratio, run_round
from PIL import Image

from dho_fast.train.build import build_data, build_run_student, build_teacher, train_dataset
from dho_fast.train.config import TrainConfig
from dho_fast.train.teacher_cache import CacheSettings, record_dtype
from dho_fast.train.write_teacher_cache import write_teacher_cache

LOSS_ARGS = dict(temperature=2.0, ce_loss_weight=0.5, kd_loss_weight=0.5, label_smoothing=0.0, ignore_index=-100)
IMAGENET = 1_281_167


def write_images(root: Path, n: int, classes: int = 10) -> str:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return str(root)


def step_providers(args, root: Path) -> dict:
    train_dir = write_images(root / "train", args.images)
    base = dict(
        train_dir=train_dir, labelled_fraction=0.5, student=f"open_clip:{args.student}", student_size=224,
        teacher="open_clip", teacher_arch=args.teacher, teacher_pretrained=None, device="cpu", progress=False,
        output_dir=str(root / "run"), crop_scale=(0.5, 1.0),
    )  # fmt: skip
    live_config = TrainConfig(**base)
    store = write_teacher_cache(live_config, root / "store", CacheSettings(views=args.views, topk=5), batch_size=32)
    cache_config = TrainConfig(**{**base, "teacher": "cache", "teacher_cache": str(store)})
    data = build_data(live_config)
    classnames, samples = data.classnames, data.splits.train
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    teacher = build_teacher(live_config, classnames, samples, cpu)
    cache = build_teacher(cache_config, classnames, samples, cpu)
    student = build_run_student(live_config, classnames, cpu)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    live_set = train_dataset(live_config, samples, student, teacher)
    cache_set = train_dataset(cache_config, samples, student, cache)
    plain_set = train_dataset(cache_config, samples, student, None)
    constant = torch.randn(2 * args.batch, len(classnames))
    rng = random.Random(0)

    def keys() -> list[tuple[int, int, bool]]:
        rows = rng.sample(range(len(samples)), 2 * args.batch)
        return [(i, rng.getrandbits(62), j < args.batch) for j, i in enumerate(rows)]

    def batch(dataset) -> dict:
        return torch.utils.data.default_collate([dataset[k] for k in keys()])

    def student_step(items: dict, targets) -> None:
        optimizer.zero_grad()
        loss = student(items["student"], targets, items["label"], **LOSS_ARGS)[0]
        loss.backward()
        optimizer.step()

    def live() -> None:
        items = batch(live_set)
        student_step(items, teacher(items["teacher"], items["index"]))

    def cached() -> None:
        items = batch(cache_set)
        student_step(items, cache.targets(items["index"], items["view"], cpu))

    def own() -> None:
        student_step(batch(plain_set), constant)

    return {"live": live, "cache": cached, "student": own}


def forward_flops(arch: str, size: int) -> int:
    """FLOPs of one image through ``arch``'s image tower, counted on meta tensors."""
    import open_clip
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = open_clip.create_model(arch, pretrained=None, device="meta")
        image = torch.empty(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model.visual(image)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="labelled rows per step (as many unlabelled)")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--teacher", default="ViT-B-16")
    parser.add_argument("--student", default="ViT-S-32")
    parser.add_argument("--flops", action="store_true", help="only the FLOPs and store sizes on paper")
    args = parser.parse_args()
    if args.flops:
        teacher, student = forward_flops("ViT-H-14-378-quickgelu", 378), forward_flops("ViT-B-16", 224)
        ratio = (teacher + 3 * student) / (3 * student)
        print(f"ViT-H-14-378 forward {teacher / 1e9:.0f} GFLOPs per image; ViT-B-16 forward {student / 1e9:.1f}, "
              f"step ~3x {3 * student / 1e9:.1f}; a live-teacher step is {ratio:.1f}x the student's own")  # fmt: skip
        for k in (5, 10):
            size = record_dtype(10, k, True, "float16").itemsize
            print(f"R = 10 views, top-{k}, float16: {size} bytes per image, {size * IMAGENET / 2**30:.2f} GiB for "
                  f"ImageNet-1k's {IMAGENET:,} images")  # fmt: skip
        return
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        steps = step_providers(args, Path(tmp))
        print(f"{machine(torch.device('cpu'))}; {args.rounds} interleaved rounds, median of per-round ratios")
        times: dict[str, list[float]] = {name: [] for name in steps}
        order = random.Random(0)
        run_round(steps, {name: [] for name in steps}, order)  # warm-up
        for _ in range(args.rounds):
            run_round(steps, times, order)
    print(f"teacher {args.teacher}, student {args.student}, {2 * args.batch} rows a step, 224 px: "
          f"live / student {median_ratio(times, 'live', 'student'):.2f}, "
          f"cache / student {median_ratio(times, 'cache', 'student'):.3f}, "
          f"live / cache {median_ratio(times, 'live', 'cache'):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
