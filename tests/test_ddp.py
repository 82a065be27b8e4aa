"""Two-process DistributedDataParallel with gloo on the CPU trains the same weights as one process with the same
global batch."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from trainer_fixtures import (
    TINY_CLIP,
    assert_same_weights,
    count_train_images,
    digits_trees,
    free_port,
    random_teacher_logits,
    run_settings,
    tiny_clip_config,
)

from dho_fast.train import checkpoint
from dho_fast.train.config import TrainConfig
from dho_fast.train.trainer import train

pytestmark = pytest.mark.slow  # two gloo processes


def _rank(rank: int, world_size: int, port: int, settings: dict) -> None:
    """One torchrun-style rank: the trainer finds its place in the environment."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    train(TrainConfig(**settings))


BEST_VAL_RUN = dict(max_steps=None, epochs=2, epoch_length="labelled", test_weights="best_val", log_every=3)


@pytest.mark.parametrize("changes", [{}, BEST_VAL_RUN], ids=["steps", "best_val_epochs"])
def test_two_gloo_ranks_match_one_process(tmp_path, changes):
    trees = digits_trees(tmp_path / "digits")
    # A LayerNorm-only student: each rank's rows see the statistics the global batch gives them.
    run = dict(
        teacher="logits",
        teacher_logits=random_teacher_logits(tmp_path / "logits.pt", count_train_images(trees), 4),
        image_mode="RGB",
        student=f"open_clip:{TINY_CLIP}",
        open_clip_config=tiny_clip_config(tmp_path),
        student_size=16,
        max_steps=3,
        lr=1e-3,
        log_every=1,
        log_gradient_conflict=True,  # its extra autograd calls must leave DDP's gradient reduction as it was
    )
    settings = run_settings(trees, tmp_path / "run", **{**run, **changes})
    single = {**settings, "output_dir": str(tmp_path / "single")}
    mp.spawn(_rank, args=(1, free_port(), single), nprocs=1)
    mp.spawn(_rank, args=(2, free_port(), settings), nprocs=2)
    one, two = (checkpoint.load(tmp_path / d / "last.pt") for d in ("single", "run"))
    assert one["step"] == two["step"] == (3 if not changes else 2 * one["steps_per_epoch"])
    assert_same_weights(one["model"], two["model"], rtol=1e-4, atol=1e-5)
    if changes:  # every rank took part in writing best.pt, and the ranks chose the epoch one process chose
        best_one, best_two = (checkpoint.load(tmp_path / d / "best.pt") for d in ("single", "run"))
        assert best_one["step"] == best_two["step"] and best_one["best_val"] == best_two["best_val"]
        assert_same_weights(best_one["model"], best_two["model"], rtol=1e-4, atol=1e-5)
        return
    # Evaluation gathers both ranks' rows: the same logits, so the same accuracies and the same alpha/beta.
    assert one["val"] == two["val"] and one["test"] == two["test"]
    assert len(two["rng"]) == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["kind"] == "train"]
    assert len(logged) == 3 and all(-1 <= r["grad_cos_backbone"] <= 1 for r in logged)
