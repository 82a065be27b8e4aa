"""What log_gradient_conflict costs a training step, in interleaved rounds.

Per round, in a shuffled order, each variant times one forward + backward of a student on one batch: ``plain`` (the
step alone), ``features`` (plus the feature-gradient cosine, what every step pays) and ``backbone`` (plus the
backbone-parameter cosine, what a logged step pays). Prints the median over rounds of each variant's time over
plain's in the same round, per student ("dho": the fused linear op; "kd": one head). The batch is the study's
(32 labelled + 96 unlabelled 28x28 images, 10 classes, ``demo/run_demo.py``'s CNN).

``python bench/interleaved_conflict.py [--rounds 30] [--threads 1] [--width 8]``
"""

import argparse
import random
import statistics
import time

import torch

from dho_fast.train.gradient_conflict import term_gradient_cosines
from dho_fast.train.students import build_student

IGNORE = -100


def _step(student, images, teacher, labels, variant: str) -> float:
    start = time.perf_counter()
    _, ce, kd, features = student(images, teacher, labels, return_features=True, ignore_index=IGNORE)
    loss = 0.5 * ce + 0.5 * kd
    if variant != "plain":
        backbone = student.backbone if variant == "backbone" else None
        term_gradient_cosines(ce, kd, features, backbone)  # eager on the CPU: done when it returns
    loss.backward()
    student.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(128, 1, 28, 28)
    teacher = 3 * torch.randn(128, 10)
    labels = torch.randint(0, 10, (128,))
    labels[32:] = IGNORE
    variants = ["plain", "features", "backbone"]
    print(f"CPU threads {args.threads}, ISA {torch.backends.cpu.get_cpu_capability()}, rounds {args.rounds}")
    for method in ("dho", "kd"):
        student, _ = build_student("cnn", 10, method, in_channels=1, cnn_width=args.width)
        for variant in variants:  # warm-up
            _step(student, images, teacher, labels, variant)
        ratios: dict[str, list[float]] = {v: [] for v in variants[1:]}
        for _ in range(args.rounds):
            order = random.sample(variants, len(variants))
            times = {v: _step(student, images, teacher, labels, v) for v in order}
            for v in ratios:
                ratios[v].append(times[v] / times["plain"])
        cells = ", ".join(f"{v} {statistics.median(r):.3f}x" for v, r in ratios.items())
        print(f"{method}: step time over plain (median of per-round ratios): {cells}")


if __name__ == "__main__":
    main()
