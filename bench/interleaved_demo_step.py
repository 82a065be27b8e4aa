"""Where a step of the demo's students goes, and what ``cache_images`` and channels-last buy, in interleaved rounds.

Per round, in a shuffled order, each case runs once: ``files``, ``cached`` and ``batched`` fetch one training batch
of the study (64 labelled + 64 unlabelled 28x28 Fashion-MNIST images through the trainer's ``ImageDataset``,
augmentation and collation): image by image from the PNG files, image by image from the images ``cache_images``
decoded once (``dataset[key]``, a PIL image rebuilt from the cached tensor per item), and as the trainer's
DataLoader fetches cached images, the whole batch at once (``__getitems__``, ``PairedTransform.batch_views``); and
``channels_first`` and ``channels_last`` run the demo's CNN student (width 8) forward + backward on such a batch in
either memory order.
Prints each case's median time and the median over rounds of the per-round ratios. The images come from the demo's
data (``demo/prepare_data.py``, built on first use); the files are read through the page cache, warm after the
first round.

``python bench/interleaved_demo_step.py [--rounds 30] [--threads 1]``
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import default_collate

DEMO = Path(__file__).resolve().parent.parent / "demo"
sys.path.insert(0, str(DEMO))

from prepare_data import prepare  # noqa: E402
from run_demo import POOL_PER_CLASS, STUDENT_SETTINGS, TEACHER_SHARE  # noqa: E402

from dho_fast.train.data import ImageDataset, load_image_folder_splits  # noqa: E402
from dho_fast.train.sampling import PairedBatchSampler  # noqa: E402
from dho_fast.train.students import SmallConvNet  # noqa: E402
from dho_fast.train.transforms import PairedTransform  # noqa: E402


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", type=Path, default=Path("demo_output/data"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = prepare(args.data, "auto", teacher_share=TEACHER_SHARE, pool_per_class=POOL_PER_CLASS)
    samples = load_image_folder_splits(data.dirs["train"]).train
    transform = PairedTransform(28, (0.5,), (0.5,), scale=STUDENT_SETTINGS["crop_scale"])
    datasets = {
        "files": ImageDataset(samples, transform, "L"),
        "cached": ImageDataset(samples, transform, "L", cache_images=True),
    }
    labelled, unlabelled = torch.arange(0, len(samples), 100).numpy(), torch.arange(len(samples)).numpy()
    sampler = PairedBatchSampler(
        labelled, unlabelled, labelled_batch=64, unlabelled_batch=64, total_steps=10**6, seed=0
    )
    torch.manual_seed(0)
    nets = {
        "channels_first": SmallConvNet(1, 8).to(memory_format=torch.contiguous_format),
        "channels_last": SmallConvNet(1, 8),
    }
    images = default_collate([datasets["cached"][k] for k in next(iter(sampler))])["student"]

    def fetch(name: str, keys) -> None:
        default_collate([datasets[name][k] for k in keys])

    def fetch_batch(keys) -> None:
        default_collate(datasets["cached"].__getitems__(keys))

    def step(name: str) -> None:
        net = nets[name]
        # channels_first calls the layers directly: SmallConvNet.forward always converts to channels-last.
        out = net.features(images) if name == "channels_first" else net(images)
        out.sum().backward()
        net.zero_grad(set_to_none=True)

    cases = {
        "files": lambda keys: fetch("files", keys),
        "cached": lambda keys: fetch("cached", keys),
        "batched": fetch_batch,
        "channels_first": lambda keys: step("channels_first"),
        "channels_last": lambda keys: step("channels_last"),
    }
    batches = iter(sampler)
    for case in cases.values():  # warm-up
        case(next(batches))
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        keys = next(batches)
        for name in random.sample(list(cases), len(cases)):
            times[name].append(_timed(cases[name], keys))
    print(f"CPU threads {args.threads}, ISA {torch.backends.cpu.get_cpu_capability()}, rounds {args.rounds}")
    for name, values in times.items():
        print(f"  {name:>14}: median {1e3 * statistics.median(values):.2f} ms")
    for slow, fast in (("files", "cached"), ("cached", "batched"), ("channels_first", "channels_last")):
        ratio = statistics.median(a / b for a, b in zip(times[slow], times[fast], strict=True))
        print(f"{slow} / {fast} (median of per-round ratios): {ratio:.2f}x")


if __name__ == "__main__":
    main()
