"""Evaluation of a saved checkpoint on one of its run's splits (``dho-fast eval``)."""

from pathlib import Path
from typing import Any

from dho_fast.train import checkpoint
from dho_fast.train.build import build_data, build_run_student, eval_dataset
from dho_fast.train.config import TrainConfig
from dho_fast.train.distributed import process_group
from dho_fast.train.evaluate import head_metrics, predict_logits


def evaluate_checkpoint(
    path: str | Path, split: str = "test", overrides: dict[str, Any] | None = None
) -> dict[str, float]:
    """Accuracies of the student in checkpoint ``path`` on ``split`` ("val" or "test") of its run's data.

    ``overrides`` replace settings of the saved config (e.g. ``test_dir``, ``device``, ``eval_batch_size``).
    The blend uses the checkpoint's alpha/beta (chosen on validation during training) unless ``alpha`` and
    ``beta`` are overridden; on "val" without a saved pair they are searched. Runs under torchrun as well.
    """
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    state = checkpoint.load(path)
    # The weights come from the checkpoint: the student's pretrained file or tag is not needed again.
    values = {**state["config"], "resume": False, "student_pretrained": None, **(overrides or {})}
    config = TrainConfig.from_dict(values)
    with process_group(config.device) as info:
        data = build_data(config)
        samples = getattr(data.splits, split)
        if not samples:
            raise ValueError(f"the run has no {split} split to evaluate (set {split}_dir or split_json)")
        student = build_run_student(config, state["classnames"], info.device, init_heads=False)
        student.load_state_dict(state["model"])
        ce, kd, labels = predict_logits(
            student,
            eval_dataset(config, samples, student),
            info,
            batch_size=config.eval_batch_size,
            num_workers=config.num_workers,
            precision=config.precision,
        )
    alpha, beta = config.alpha, config.beta
    if alpha is None:
        alpha, beta = state["alpha"], state["beta"]
    if config.method == "dho" and alpha is None and split == "test":
        raise ValueError(f"checkpoint {path} holds no alpha/beta (no validation ran): pass alpha and beta")
    return head_metrics(ce, kd, labels, config.method, alpha=alpha, beta=beta)
