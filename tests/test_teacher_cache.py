"""The teacher soft-label store (dho_fast.train.teacher_cache): what it holds against the teacher run afresh on the
same views, training from it, resuming a killed writer, two gloo ranks writing it, and every damaged or mismatched
store refused by name."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from PIL import Image
from trainer_fixtures import (
    TINY_CLIP,
    count_train_images,
    digits_trees,
    free_port,
    random_teacher_logits,
    run_settings,
    tiny_clip_config,
)

from dho_fast.train import cli
from dho_fast.train.build import build_data, build_teacher, train_dataset
from dho_fast.train.config import TrainConfig
from dho_fast.train.data import ImageDataset
from dho_fast.train.teacher_cache import CacheSettings, TeacherCache, shard_paths, view_seed
from dho_fast.train.trainer import train
from dho_fast.train.transforms import PairedTransform
from dho_fast.train.write_teacher_cache import write_teacher_cache


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    trees = digits_trees(root)
    return trees, random_teacher_logits(root / "logits.pt", count_train_images(trees), 4)


def logits_config(digits, out: Path, **changes) -> TrainConfig:
    trees, logits = digits
    return TrainConfig(**run_settings(trees, out, teacher="logits", teacher_logits=logits, **changes))


def open_store(config: TrainConfig, path: Path) -> TeacherCache:
    samples = build_data(config).splits.train
    return TeacherCache(path, samples, 4, temperature=config.temperature, crop=(config.crop_scale, config.hflip),
                        image_mode=config.image_mode, interpolation=config.interpolation)  # fmt: skip


def rgb_trees(root: Path) -> dict[str, str]:
    """Three classes of noisy RGB images of several sizes (crops of them differ)."""
    rng = np.random.default_rng(0)
    trees = {}
    for split, n in (("train", 12), ("val", 6), ("test", 6)):
        for i in range(n):
            folder = root / split / f"c{i % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            size = (20 + 3 * (i % 4), 24 - 2 * (i % 3))
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
        trees[split] = str(root / split)
    return trees


@pytest.mark.parametrize("topk", [2, None], ids=["top2", "dense"])
def test_store_holds_each_views_box_and_the_teachers_distribution_of_it(tmp_path, topk):
    """A real (tiny, random-weight) open_clip teacher: every stored view is the box and flip view_seed draws, and its
    values are the teacher's softmax at T of that view, computed here afresh."""
    trees = rgb_trees(tmp_path / "rgb")
    config = TrainConfig(**run_settings(
        trees, tmp_path / "run", image_mode="RGB", teacher="open_clip", teacher_arch=TINY_CLIP,
        teacher_pretrained=None, open_clip_config=tiny_clip_config(tmp_path), teacher_templates="a {} square.",
        crop_scale=(0.3, 1.0), temperature=3.0,
    ))  # fmt: skip
    settings = CacheSettings(views=3, topk=topk, value_dtype="float32", shard_size=5)
    write_teacher_cache(config, tmp_path / "store", settings, batch_size=4)
    samples = build_data(config).splits.train
    torch.manual_seed(config.seed)
    teacher = build_teacher(config, ["c0", "c1", "c2"], samples, torch.device("cpu"))
    transform = PairedTransform(16, teacher.mean, teacher.std, scale=(0.3, 1.0), interpolation="bicubic")
    store = TeacherCache(tmp_path / "store", samples, 3, temperature=3.0, crop=((0.3, 1.0), True), image_mode="RGB",
                         interpolation="bicubic")  # fmt: skip
    for index in (0, 5, 11):  # first, a second shard's first, the last (short) shard
        image = Image.open(samples[index].path).convert("RGB")
        for view in range(3):
            box = transform.draw_view(*image.size, view_seed(config.seed, index, view))
            assert store.draw(index, _FixedView(view))[1] == box
            want = torch.softmax(teacher(transform.views(image, box)[0][None], None) / 3.0, dim=1)[0]
            got = store.targets(torch.tensor([index]), torch.tensor([view]), torch.device("cpu"))
            if topk is None:
                torch.testing.assert_close(got["teacher_probs"][0], want, rtol=1e-5, atol=1e-7)
            else:
                values, ids = want.topk(2)
                assert got["teacher_topk_indices"][0].tolist() == ids.tolist()
                torch.testing.assert_close(got["teacher_topk_values"][0], values, rtol=1e-5, atol=1e-7)
    assert len({store.draw(i, _FixedView(v))[1] for i in range(12) for v in range(3)}) > 30  # views differ


class _FixedView:
    """A stand-in for random.Random whose randrange always picks ``view``."""

    def __init__(self, view: int) -> None:
        self.view = view

    def randrange(self, _n: int) -> int:
        return self.view


def test_center_mode_stores_the_centre_crop(digits, tmp_path):
    config = logits_config(digits, tmp_path / "run")
    write_teacher_cache(config, tmp_path / "store", CacheSettings(views=1, mode="center", topk=None))
    store = open_store(config, tmp_path / "store")
    assert {store.draw(i, _FixedView(0))[1] for i in range(5)} == {(0, 0, 8, 8, False)}  # 8x8 digits
    probs = store.targets(torch.arange(3), torch.zeros(3, dtype=torch.int64), torch.device("cpu"))["teacher_probs"]
    logits = torch.load(digits[1])[:3]
    torch.testing.assert_close(probs, torch.softmax(logits / config.temperature, 1), rtol=1e-3, atol=1e-4)  # float16


def test_training_reads_the_views_it_draws(digits, tmp_path):
    """Each training row's student image is the stored view its draw picked; a run from the store trains, twice
    alike, and its checkpoint records the store's hash."""
    config = logits_config(digits, tmp_path / "w")
    write_teacher_cache(config, tmp_path / "store", CacheSettings(views=4, topk=3, shard_size=16))
    settings = run_settings(digits[0], tmp_path / "a", teacher="cache", teacher_cache=str(tmp_path / "store"))
    cached = TrainConfig(**settings)
    store = open_store(cached, tmp_path / "store")
    data = build_data(cached)
    student = torch.nn.Module()
    student.mean, student.std = (0.5,), (0.5,)
    dataset = train_dataset(cached, data.splits.train, student, store)
    for index, seed in ((3, 11), (40, 12345)):
        item = dataset[(index, seed, False)]
        view, box = store.draw(index, random.Random(seed))
        assert item["view"] == view
        image = Image.open(data.splits.train[index].path).convert("L")
        torch.testing.assert_close(item["student"], dataset.transform.views(image, box)[0])
    # With cache_images the DataLoader's batched fetch draws the same stored views and gives the same pixels.
    in_memory = ImageDataset(data.splits.train, dataset.transform, "L", cache_images=True, views=store)
    assert in_memory.pixels is not None
    keys = [(index, 100 + index, index % 2 == 0) for index in range(0, 48, 3)]
    for want, got in zip([dataset[k] for k in keys], in_memory.__getitems__(keys), strict=True):
        assert want.keys() == got.keys() and want["view"] == got["view"] and want["label"] == got["label"]
        assert torch.equal(want["student"], got["student"])
    first = train(cached)
    second = train(TrainConfig(**{**settings, "output_dir": str(tmp_path / "b")}))
    assert first.steps == second.steps == 4
    a, b = (torch.load(Path(d) / "last.pt", weights_only=False) for d in (tmp_path / "a", tmp_path / "b"))
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0)
    assert a["teacher_logits_sha256"] == store.sha256


def test_damaged_or_mismatched_stores_are_refused_by_name(digits, tmp_path):
    config = logits_config(digits, tmp_path / "run")
    store = tmp_path / "store"
    write_teacher_cache(config, store, CacheSettings(views=2, topk=2, shard_size=20))
    data, meta = shard_paths(store, 1)
    original = data.read_bytes()
    data.write_bytes(original[:-7])
    with pytest.raises(ValueError, match=f"shard {data} is truncated or damaged"):
        open_store(config, store)
    damaged = bytearray(original)
    damaged[-3] ^= 0x40
    data.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=f"shard {data} is corrupted"):
        open_store(config, store)
    meta.unlink()
    with pytest.raises(FileNotFoundError, match="is incomplete: shard shard-00001.npy was not finished"):
        open_store(config, store)
    # The writer rewrites the unfinished shard and keeps the others.
    kept = shard_paths(store, 0)[0].stat().st_mtime_ns
    write_teacher_cache(config, store, CacheSettings(views=2, topk=2, shard_size=20))
    assert data.read_bytes() == original and shard_paths(store, 0)[0].stat().st_mtime_ns == kept
    open_store(config, store)
    with pytest.raises(ValueError, match=r"temperature: store 2\.0, run 4\.0"):
        open_store(logits_config(digits, tmp_path / "run", temperature=4.0), store)
    with pytest.raises(ValueError, match=r"crop_scale: store \[0\.5, 1\.0\], run \[0\.8, 1\.0\]"):
        open_store(logits_config(digits, tmp_path / "run", crop_scale=(0.8, 1.0)), store)
    with pytest.raises(ValueError, match="hflip: store True, run False"):
        open_store(logits_config(digits, tmp_path / "run", hflip=False), store)
    with pytest.raises(ValueError, match="interpolation: store 'bicubic', run 'bilinear'"):
        open_store(logits_config(digits, tmp_path / "run", interpolation="bilinear"), store)
    # A checksum file whose shard is gone: the writer rewrites the shard.
    data.unlink()
    write_teacher_cache(config, store, CacheSettings(views=2, topk=2, shard_size=20))
    assert data.read_bytes() == original
    other = digits_trees(tmp_path / "other", num_classes=4)
    other_config = TrainConfig(**run_settings(other, tmp_path / "o", teacher="logits", teacher_logits=digits[1]))
    first_class = Path(other["train"]) / "digit_0"
    (first_class / sorted(os.listdir(first_class))[0]).unlink()  # one image fewer
    with pytest.raises(ValueError, match="another dataset or settings.*num_images"):
        open_store(other_config, store)
    with pytest.raises(ValueError, match=r"holds a teacher store written with other settings.*topk"):
        write_teacher_cache(config, store, CacheSettings(views=2, topk=3, shard_size=20))
    with pytest.raises(FileNotFoundError, match="has no header.json"):
        open_store(config, tmp_path)


def test_settings_and_config_errors(digits, tmp_path):
    config = logits_config(digits, tmp_path / "run")
    for settings, message in (
        (CacheSettings(topk=9), r"topk must be in \[1, 4\]"),
        (CacheSettings(mode="center", views=2), "one view per image"),
        (CacheSettings(topk=2, tail="spread"), "tail must be one of"),
        (CacheSettings(topk=2, value_dtype="int8"), "value_dtype must be one of"),
    ):
        with pytest.raises(ValueError, match=message):
            write_teacher_cache(config, tmp_path / "s", settings)
    with pytest.raises(ValueError, match="teacher_cache .* is required when teacher is 'cache'"):
        TrainConfig(**run_settings(digits[0], tmp_path / "x", teacher="cache"))


def test_cli_writes_a_store(digits, tmp_path, capsys):
    config_path = tmp_path / "run.yaml"
    trees, logits = digits
    config_path.write_text(yaml.safe_dump(run_settings(trees, tmp_path / "run", teacher="logits",
                                                       teacher_logits=logits)))  # fmt: skip
    argv = ["teacher-cache", "--config", str(config_path), "--output", str(tmp_path / "s"), "--views", "2",
            "--topk", "none", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    assert f"teacher store: {tmp_path / 's'}" in capsys.readouterr().out
    header = json.loads((tmp_path / "s" / "header.json").read_text())
    assert header["views"] == 2 and header["topk"] is None and header["teacher"]["teacher_logits"] == logits


def _store_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.suffix in (".npy", ".json")}


@pytest.mark.slow  # kill -9 of a real writer process
def test_killed_writer_resumes_to_the_store_of_an_uninterrupted_one(digits, tmp_path):
    trees = digits_trees(tmp_path / "digits", num_classes=10)
    logits = random_teacher_logits(tmp_path / "logits.pt", count_train_images(trees), 10)
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(run_settings(trees, tmp_path / "run", teacher="logits",
                                                       teacher_logits=logits)))  # fmt: skip

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "dho_fast.train.cli", "teacher-cache", "--config", str(config_path),
                "--output", str(out), "--views", "8", "--shard-size", "4", "--batch-size", "8"]  # fmt: skip

    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / "shard-00003.json").is_file():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    num_shards = json.loads((killed / "header.json").read_text())["num_shards"]
    assert len(list(killed.glob("shard-*.json"))) < num_shards, "killed after the last shard: nothing to resume"
    subprocess.run(command(killed), check=True, capture_output=True)
    subprocess.run(command(tmp_path / "straight"), check=True, capture_output=True)
    assert _store_bytes(killed) == _store_bytes(tmp_path / "straight")
    assert "wrote shard-" in (killed / "teacher_cache.log").read_text()


def _writer_rank(rank: int, world_size: int, port: int, settings: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    write_teacher_cache(TrainConfig(**settings), out, CacheSettings(views=3, topk=2, shard_size=7))


@pytest.mark.slow  # two gloo processes
def test_two_gloo_ranks_write_the_store_one_process_writes(digits, tmp_path):
    trees, logits = digits
    settings = run_settings(trees, tmp_path / "run", teacher="logits", teacher_logits=logits)
    mp.spawn(_writer_rank, args=(2, free_port(), settings, str(tmp_path / "two")), nprocs=2)
    write_teacher_cache(TrainConfig(**settings), tmp_path / "one", CacheSettings(views=3, topk=2, shard_size=7))
    log = (tmp_path / "two" / "teacher_cache.log").read_text()
    assert "rank 0: wrote" in log and "rank 1: wrote" in log
    assert _store_bytes(tmp_path / "two") == _store_bytes(tmp_path / "one")
