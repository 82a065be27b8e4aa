"""The active-learning loop's settings (``dho-fast active``): a YAML file with the loop's settings at the top level and
the student's training settings under ``train:``.

Top-level settings are checked like :class:`~dho_fast.train.config.TrainConfig`'s (type from the field's hint, then
``ACTIVE_RANGES``, then the rules between them), ``train:`` by ``TrainConfig`` itself, with the round's values the
loop sets (``labelled_indices``, ``output_dir``, ``resume``) filled in.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dho_fast.select import STRATEGIES
from dho_fast.train.config import (
    LABELLED_SET_SETTINGS,
    RESUMABLE_CHANGES,
    InputTypeError,
    TrainConfig,
    check_keys,
    check_ranges,
    conform_fields,
    read_yaml_settings,
)

ACTIVE_RANGES = {
    "rounds": "[0, inf)",
    "budget": "[1, inf)",
    "initial_shots": "[1, inf)",
    "pool_size": "[1, inf)",
    "clap_epochs": "[1, inf)",
    "clap_batch_size": "[1, inf)",
    "clap_lr": "(0, inf)",
    "clap_momentum": "[0, 1)",
    "seed": "[0, inf)",
}
# The file of a round's labelled set in its folder (dho_fast.train.active describes it).
LABELLED_NAME = "labelled.json"
# Train settings the loop sets for every round; the labelled set is the round's labelled.json.
LOOP_TRAIN_SETTINGS = (*LABELLED_SET_SETTINGS, "split_seed", "output_dir", "resume")
# The student's blend when train sets neither alpha nor beta: active learning has no validation set to search them
# on, so METHOD.md's fixed selection blend (alpha = 0.5, beta = 1) is the evaluation blend too.
DEFAULT_BLEND = {"alpha": 0.5, "beta": 1.0}
# Top-level settings that may change when a run resumes, beside the train settings of RESUMABLE_CHANGES.
ACTIVE_RESUMABLE_CHANGES = frozenset({"resume", "progress", "output_dir"})


@dataclass
class ActiveConfig:
    """Every setting of an active-learning run (METHOD.md, ActiveKD).

    Round 0 trains on ``initial_shots`` images per class (drawn with ``seed``); each of the ``rounds`` selection
    rounds after it picks ``budget`` images (None: one per class) from the pool with ``strategy``, reveals their
    labels and retrains the student from scratch. ``pool_size``: the pool is a subsample of that many train images
    outside the initial set, drawn with ``seed`` and fixed for the run (None: every unlabelled image).
    ``teacher_refit``: "none" trains every round's student with the teacher of ``train``; "clap" refits a CLAP head
    on the round's labelled set at the start of the round, on the open_clip model ``train`` names, and the student
    learns from its logits (``clap_*``: the refit's settings). ``seed`` seeds the loop's draws (initial set, pool,
    random strategies, CLAP) and, unless ``train`` sets one, the student's training.
    """

    strategy: Literal[STRATEGIES] = "pcoreset"  # type: ignore[valid-type]  # the names of dho_fast.select
    rounds: int = 15
    budget: int | None = None
    initial_shots: int = 1
    pool_size: int | None = None
    teacher_refit: Literal["none", "clap"] = "none"
    # CLAP's refit (METHOD.md): passes over the labelled set, batch, SGD learning rate and momentum.
    clap_epochs: int = 300
    clap_batch_size: int = 64
    clap_lr: float = 0.01
    clap_momentum: float = 0.9
    output_dir: str = "runs/active"
    seed: int = 0
    resume: bool = False
    progress: bool = True
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        conform_fields(self)
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first number out of its range (``ACTIVE_RANGES``), a train setting the loop
        sets itself, or a rule broken between settings; a bad train setting raises TrainConfig's error prefixed
        ``train.``."""
        check_ranges(self, ACTIVE_RANGES)
        owned = [k for k in LOOP_TRAIN_SETTINGS if k in self.train]
        if owned:
            raise ValueError(
                f"train settings {owned} are set by the active loop for every round (the labelled set is the round's "
                "labelled.json, the folder output_dir/round_XX): remove them (top level: output_dir, resume)"
            )
        config = self.round_train_config(0)
        if config.test_weights != "last":
            raise ValueError(
                f"train.test_weights must be 'last' in the active loop, got {config.test_weights!r}: each round "
                "selects with the student it trained to the end, and its test accuracy must be that student's"
            )
        if self.teacher_refit == "clap" and (config.teacher != "open_clip" or config.method == "ce"):
            raise ValueError(
                "teacher_refit 'clap' refits a CLAP head on the open_clip model of the train settings: set "
                f"train.teacher to 'open_clip' and train.method to 'dho' or 'kd', got {config.teacher!r} and "
                f"{config.method!r}"
            )

    def round_dir(self, round_index: int) -> Path:
        """``output_dir/round_XX``: the round's labelled.json, teacher logits and training run."""
        return Path(self.output_dir) / f"round_{round_index:02d}"

    def round_train_config(
        self, round_index: int, *, resume: bool = False, teacher_logits: str | None = None
    ) -> TrainConfig:
        """The student's settings for round ``round_index``: ``train`` over the loop's defaults (``DEFAULT_BLEND``,
        ``seed``, ``progress``), trained on the round's labelled.json in the round's folder; ``teacher_logits``
        (a CLAP refit's) replaces the teacher of ``train``. Raises TrainConfig's errors prefixed ``train.``."""
        folder = self.round_dir(round_index)
        values = {"seed": self.seed, "progress": self.progress, **DEFAULT_BLEND, **self.train}
        values.update(labelled_indices=str(folder / LABELLED_NAME), output_dir=str(folder), resume=resume)
        if teacher_logits is not None:
            values.update(teacher="logits", teacher_logits=teacher_logits)
        try:
            return TrainConfig.from_dict(values)
        except InputTypeError as error:
            raise InputTypeError(f"train.{error}") from None
        except ValueError as error:
            raise ValueError(f"train.{error}") from None

    def settings(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues: the top-level settings and every train setting
        (defaults included, so writing a default out is no change), without those that may change
        (``ACTIVE_RESUMABLE_CHANGES``, ``RESUMABLE_CHANGES``) or that the loop sets per round."""
        top = {k: v for k, v in dataclasses.asdict(self).items() if k not in ACTIVE_RESUMABLE_CHANGES | {"train"}}
        train = self.round_train_config(0).to_dict()
        skipped = RESUMABLE_CHANGES | set(LOOP_TRAIN_SETTINGS)
        return {**top, "train": {k: v for k, v in train.items() if k not in skipped}}


def load_active_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ActiveConfig:
    """A YAML file of active settings (optional), then ``overrides`` of top-level settings on top; checked as a
    whole. Unknown top-level keys are an error that lists them."""
    values = {**read_yaml_settings(path), **(overrides or {})}
    check_keys(ActiveConfig, values)
    return ActiveConfig(**values)
