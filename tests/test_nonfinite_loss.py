"""A run whose loss turns non-finite stops with an error naming the step, from the CLI with a non-zero exit code,
instead of finishing "successfully" with NaN weights: at once in fp32 and bf16, after a bounded number of skipped
steps under fp16's loss scaler, and on every rank of a DDP job.

The loss is made non-finite for real: AdamW's first update moves every weight by about ``lr`` (its normalised
step), so ``lr = 1e30`` leaves weights near 1e30 whose products overflow in the next forward: step 2's loss is NaN.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from trainer_fixtures import free_port, run_settings

from dho_fast.train import checkpoint, cli
from dho_fast.train.config import MAX_SKIPPED_STEPS, TrainConfig
from dho_fast.train.distributed import process_group
from dho_fast.train.trainer import _Trainer

ROOT = Path(__file__).resolve().parents[1]


def blow_up_config(trees, logits_file, out: Path, **changes) -> Path:
    """A YAML config of a run whose weights blow up after its first step; a checkpoint after every step."""
    settings = run_settings(
        trees, out / "run", teacher="logits", teacher_logits=logits_file, lr=1e30, checkpoint_every=1, **changes
    )
    path = out / "run.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def finite_weights(state: dict, buffers: bool = True) -> bool:
    """Whether a checkpoint's parameters (and, with ``buffers``, BatchNorm's running statistics) are finite."""
    kept = {k: v for k, v in state["model"].items() if buffers or "running_" not in k}
    return all(torch.isfinite(v).all() for v in kept.values() if v.is_floating_point())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nonfinite_loss_stops_the_cli_naming_the_step(trees, logits_file, tmp_path, capsys, precision):
    path = blow_up_config(trees, logits_file, tmp_path, precision=precision, max_steps=4)
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "dho-fast: error: the loss is not finite at step 2 (loss nan" in err
    # Stopped before step 2 changed the weights: the last checkpoint is step 1's, its weights finite.
    state = checkpoint.load(tmp_path / "run" / "last.pt")
    assert state["step"] == 1 and finite_weights(state)


def test_fp16_scaler_skips_a_bounded_number_of_steps_then_stops(trees, logits_file, tmp_path, capsys):
    path = blow_up_config(trees, logits_file, tmp_path, precision="fp16", max_steps=MAX_SKIPPED_STEPS + 10)
    assert cli.main(["train", "--config", str(path)]) == 2
    last = 1 + MAX_SKIPPED_STEPS
    err = capsys.readouterr().err
    assert f"in {MAX_SKIPPED_STEPS} fp16 steps in a row, steps 2 to {last}, which the loss scaler skipped" in err
    assert f"(step {last}: loss nan" in err
    # The scaler really skipped steps 2 .. last - 1 (the last checkpoint's): it halved its initial scale of 2^16
    # at each of them, and the parameters it kept are step 1's, finite. (The forwards of skipped steps still fed
    # NaN into BatchNorm's running statistics, as in any loop under a loss scaler.)
    state = checkpoint.load(tmp_path / "run" / "last.pt")
    assert state["step"] == last - 1 and finite_weights(state, buffers=False)
    assert state["scaler"]["scale"] == 2.0**16 * 0.5 ** (last - 2)


def test_a_resumed_fp16_run_stops_where_the_uninterrupted_one_does(trees, logits_file, tmp_path, capsys):
    # The run stopped at step 1 + MAX_SKIPPED_STEPS; its last checkpoint (a step earlier) holds MAX_SKIPPED_STEPS - 1
    # skips in a row, so resuming from it stops at the very next step, as the uninterrupted run did.
    path = blow_up_config(trees, logits_file, tmp_path, precision="fp16", max_steps=2 * MAX_SKIPPED_STEPS + 10)
    assert cli.main(["train", "--config", str(path)]) == 2
    last = 1 + MAX_SKIPPED_STEPS
    assert checkpoint.load(tmp_path / "run" / "last.pt")["overflows_in_a_row"] == MAX_SKIPPED_STEPS - 1
    capsys.readouterr()
    assert cli.main(["train", "--config", str(path), "--resume"]) == 2
    assert f"steps 2 to {last}, which the loss scaler skipped" in capsys.readouterr().err


@pytest.mark.slow  # two gloo processes
def test_every_ddp_rank_stops_and_none_hangs(trees, logits_file, tmp_path):
    """Each rank a process of its own, as torchrun starts them, watched separately: torchrun or mp.spawn would kill
    a waiting rank once the other failed, and hide a hang."""
    path = blow_up_config(trees, logits_file, tmp_path, max_steps=4)
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env["OMP_NUM_THREADS"] = "1"
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "dho_fast.train.cli", "train", "--config", str(path)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for process in ranks:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 2, err
        assert "dho-fast: error: the loss is not finite at step 2 (loss nan" in err


def test_nonfinite_gradients_under_a_finite_loss_stop_the_run(trees, logits_file, tmp_path):
    # A finite loss whose backward overflows (e.g. in a backbone's layer) is injected where it would arise: a hook
    # on a real parameter of the real trainer's student makes step 2's gradient NaN.
    settings = run_settings(trees, tmp_path / "run", teacher="logits", teacher_logits=logits_file, checkpoint_every=1)
    with process_group("cpu") as info:
        trainer = _Trainer(TrainConfig(**settings), info)
        backwards = []

        def poison_the_second_step(grad: torch.Tensor) -> torch.Tensor:
            backwards.append(None)
            return grad * math.nan if len(backwards) == 2 else grad

        next(trainer.student.parameters()).register_hook(poison_the_second_step)
        with pytest.raises(FloatingPointError, match="the gradients are not finite at step 2 although the loss is"):
            trainer.run()
    state = checkpoint.load(tmp_path / "run" / "last.pt")
    assert state["step"] == 1 and finite_weights(state)
