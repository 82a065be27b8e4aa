"""A training process killed mid-epoch (SIGKILL) and resumed ends with the weights of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from trainer_fixtures import count_train_images, digits_trees, random_teacher_logits, run_settings

from dho_fast.train import checkpoint

pytestmark = pytest.mark.slow  # kill -9 of a real training subprocess

STEPS, EVERY, KILL_AFTER = 100, 10, 20


def _command(config_path, *flags) -> list[str]:
    return [sys.executable, "-m", "dho_fast.train.cli", "train", "--config", str(config_path), *flags]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic order in every process


def _checkpointed_steps(run_dir) -> list[int]:
    log = run_dir / "metrics.jsonl"
    if not log.is_file():
        return []
    records = [json.loads(line) for line in log.read_text().splitlines() if line.endswith("}")]
    return [r["step"] for r in records if r["kind"] == "checkpoint"]


def _kill_resume_and_rerun(tmp_path: Path, ready: Callable[[Path], bool], **changes) -> dict:
    """Starts a run on 10-class digit trees with ``changes`` in ``tmp_path/killed``, kills it (SIGKILL) once
    ``ready(run_dir)``, resumes it to the end, and runs the same settings uninterrupted in ``tmp_path/straight``.
    Returns the checkpoint the killed run left."""
    trees = digits_trees(tmp_path / "digits", num_classes=10)
    logits = random_teacher_logits(tmp_path / "logits.pt", count_train_images(trees), 10)
    run = dict(teacher="logits", teacher_logits=logits, labelled_batch_size=4, unlabelled_batch_size=8)
    settings = run_settings(trees, tmp_path / "killed", checkpoint_every=EVERY, log_every=EVERY, **run, **changes)
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(settings))

    process = subprocess.Popen(_command(config_path), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not ready(tmp_path / "killed"):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the run did not get to the kill point in time"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    left = checkpoint.load(tmp_path / "killed" / "last.pt")

    subprocess.run(_command(config_path, "--resume"), env=_env(), check=True, capture_output=True)
    subprocess.run(
        _command(config_path, "--output-dir", str(tmp_path / "straight")), env=_env(), check=True, capture_output=True
    )
    return left


def test_killed_run_resumes_exactly(tmp_path):
    saved = _kill_resume_and_rerun(
        tmp_path, lambda run_dir: max(_checkpointed_steps(run_dir), default=0) >= KILL_AFTER, max_steps=STEPS
    )
    # One epoch is longer than the run, so every checkpoint, and the kill, fall mid-epoch.
    assert KILL_AFTER <= saved["step"] < STEPS < saved["steps_per_epoch"] and saved["step"] % EVERY == 0
    resumed, straight = (checkpoint.load(tmp_path / d / "last.pt") for d in ("killed", "straight"))
    assert resumed["step"] == straight["step"] == STEPS
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=1e-6, atol=1e-7, msg=key)
    for state, value in straight["optimizer"]["state"].items():
        torch.testing.assert_close(resumed["optimizer"]["state"][state]["exp_avg_sq"], value["exp_avg_sq"])
    assert resumed["scheduler"]["last_epoch"] == straight["scheduler"]["last_epoch"] == STEPS
    assert resumed["test"] == straight["test"] and resumed["val"] == straight["val"]


def test_killed_run_resumes_its_best_validation_epoch(tmp_path):
    """Epochs over L with the best validation epoch kept: a run killed after its first best.pt, mid-run, and resumed
    writes the same best.pt and tests the same weights as an uninterrupted run."""

    def ready(run_dir: Path) -> bool:
        return (run_dir / "best.pt").is_file() and max(_checkpointed_steps(run_dir), default=0) >= 40

    changes = dict(max_steps=None, epochs=5, epoch_length="labelled", test_weights="best_val", lr=0.05)
    saved = _kill_resume_and_rerun(tmp_path, ready, **changes)
    assert saved["step"] < 5 * saved["steps_per_epoch"]  # the kill fell before the end
    for name in ("best.pt", "last.pt"):
        resumed, straight = (checkpoint.load(tmp_path / d / name) for d in ("killed", "straight"))
        assert resumed["step"] == straight["step"] and resumed["best_val"] == straight["best_val"], name
        assert (resumed["alpha"], resumed["beta"]) == (straight["alpha"], straight["beta"]), name
        for key, value in straight["model"].items():
            torch.testing.assert_close(resumed["model"][key], value, rtol=1e-6, atol=1e-7, msg=f"{name} {key}")
    assert resumed["test"] == straight["test"]
