"""The active-learning loop of ActiveKD (METHOD.md): rounds of DHO training and selection, with an audit trail on
disk that is also the resume point.

Run folder (``output_dir``):

- ``active_settings.json``: the run's settings (:meth:`ActiveConfig.settings`), which a resumed run must share;
- ``round_XX/labelled.json``: the round's labelled set, written before the round trains: ``{"round", "strategy",
  "num_labelled", "labelled", "picks"}``, where ``labelled`` lists the train indices in the order they were
  labelled (:func:`initial_set`'s in its pick order, then each round's picks) and ``picks`` the images this round
  added, in pick order (round 0: none; its set is the initial one). ``TrainConfig.labelled_indices`` reads the file
  as the round's labelled set (in ascending index order);
- ``round_XX/teacher_logits.pt`` (``teacher_refit: clap``): the round's refit teacher on every train image;
- ``round_XX/``: the student's training run (``last.pt``, metrics), through :func:`dho_fast.train.trainer.train`;
- ``active_log.json`` / ``active_log.csv``: one record per finished round (round, labelled images, strategy, test
  accuracies, seconds of training and of selection), rewritten atomically after every round.

A round is finished, and recorded, once its student is trained, tested and, unless it is the last round, has picked
the next round's images (written as ``round_{XX+1}/labelled.json`` before the record). A resumed run skips the
recorded rounds, continues a round killed in training from the trainer's checkpoint, and recomputes a selection that
was killed from the trained student: the labelled sets and the log's accuracies are those of an uninterrupted run
(on the CPU; on a GPU a non-deterministic kernel could make a recomputed selection differ).
"""

import csv
import dataclasses
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from dho_fast.select import pool_outputs, select
from dho_fast.train import checkpoint
from dho_fast.train.active_config import LABELLED_NAME, ActiveConfig
from dho_fast.train.build import (
    build_run_student,
    build_teacher_model,
    eval_dataset,
    load_splits,
    teacher_template_spec,
)
from dho_fast.train.clap import fit_clap, mean_text_embeddings, write_teacher_logits
from dho_fast.train.config import TrainConfig
from dho_fast.train.data import complement, load_classnames
from dho_fast.train.distributed import init_distributed
from dho_fast.train.splits import k_shot_indices
from dho_fast.train.teacher import ClipTeacher, prompt_templates
from dho_fast.train.trainer import CHECKPOINT_NAME, train

SETTINGS_NAME = "active_settings.json"
LOG_NAME = "active_log"
TEACHER_LOGITS_NAME = "teacher_logits.pt"
# Streams of the run's seed, so the pool subsample and each round's selection draw independent numbers.
POOL_STREAM, SELECT_STREAM, CLAP_STREAM = 0, 1, 2


def run_active(config: ActiveConfig) -> list[dict]:
    """Runs the active-learning loop of ``config`` (or continues it, with ``config.resume``) and returns the log:
    one record per round, as ``active_log.json`` holds them.

    Raises FileExistsError when ``output_dir`` is not empty and ``resume`` is not set, FileNotFoundError when
    ``resume`` is set but there is no run to continue, ValueError naming the settings that differ from the run's
    or a pool too small for ``rounds * budget`` picks.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("dho-fast active runs in one process (selection is not distributed): run it without torchrun")
    return _ActiveRun(config).run()


def initial_set(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Round 0's labelled set: the reference's k-shot rule (:func:`~dho_fast.train.splits.k_shot_indices`, ``shots``
    per class drawn with ``seed``) with each image once, int64 in pick order.

    The rule repeats images of a class shorter than ``shots`` (never at the reference's 1 shot); a labelled set
    names an image once, as ``labelled_indices`` files must, so a repeat keeps only its first pick."""
    picks = k_shot_indices(labels, shots, seed)
    return picks[np.sort(np.unique(picks, return_index=True)[1])]


def pool_subsample(num_train: int, initial: np.ndarray, pool_size: int | None, seed: int) -> np.ndarray:
    """The run's pool: sorted int64 train indices outside ``initial``; all of them when ``pool_size`` is None, else
    ``pool_size`` of them drawn without replacement with ``seed``. Raises ValueError when fewer remain."""
    rest = complement(initial, num_train)
    if pool_size is None:
        return rest
    if pool_size > len(rest):
        raise ValueError(f"pool_size ({pool_size}) exceeds the {len(rest)} train images outside the initial set")
    return np.sort(np.random.default_rng([seed, POOL_STREAM]).choice(rest, pool_size, replace=False))


def round_seed(seed: int, round_index: int, stream: int = SELECT_STREAM) -> int:
    """The seed of round ``round_index``'s draws of ``stream``: its selection (random, badge, class_balanced draw
    from it) or its CLAP refit."""
    return int(np.random.SeedSequence([seed, stream, round_index]).generate_state(1)[0])


def read_labelled(folder: Path) -> dict:
    """A round's ``labelled.json`` (module docs); FileNotFoundError naming it when it is missing."""
    path = folder / LABELLED_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the round's labelled set is missing")
    return json.loads(path.read_text())


def _write_labelled(folder: Path, round_index: int, strategy: str, labelled: list[int], picks: list[int]) -> None:
    record = {
        "round": round_index,
        "strategy": strategy,
        "num_labelled": len(labelled),
        "labelled": labelled,
        "picks": picks,
    }
    checkpoint.write_text_atomic(json.dumps(record) + "\n", folder / LABELLED_NAME)


def _csv_text(records: list[dict]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return text.getvalue()


class _ActiveRun:
    def __init__(self, config: ActiveConfig) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        base = config.round_train_config(0)
        self.splits = load_splits(base)
        if not self.splits.test:
            raise ValueError(
                "the active loop reports each round's test accuracy: set train.test_dir (or use a split json with "
                "a test split)"
            )
        self.labels = self.splits.train_labels()
        self.initial = initial_set(self.labels, config.initial_shots, config.seed)
        self.pool = pool_subsample(len(self.labels), self.initial, config.pool_size, config.seed)
        self.budget = config.budget or len(self.splits.classnames)
        if config.rounds * self.budget > len(self.pool):
            raise ValueError(
                f"rounds * budget ({config.rounds} * {self.budget}) exceeds the pool's {len(self.pool)} images: "
                "fewer rounds, a smaller budget or a larger pool_size"
            )
        self.device = init_distributed(base.device).device
        self.records = self._open()  # after every check: a run refused at the start writes nothing
        self.clap_model = None  # (open_clip model, preprocess, input dtype, W0) of the CLAP refits, built once

    def _open(self) -> list[dict]:
        """Checks the run folder against ``resume``, writes or compares the settings; returns the recorded rounds."""
        settings_path = self.out / SETTINGS_NAME
        current = json.loads(json.dumps(self.config.settings()))  # as JSON gives it back: lists, not tuples
        if not self.config.resume:
            if self.out.is_dir() and any(self.out.iterdir()):
                raise FileExistsError(
                    f"{self.out} is not empty: pass resume to continue the run there, or choose another output_dir"
                )
            checkpoint.write_text_atomic(json.dumps(current, indent=2) + "\n", settings_path)
            return []
        if not settings_path.is_file():
            raise FileNotFoundError(f"resume is set but {settings_path} does not exist: there is no run to continue")
        saved = json.loads(settings_path.read_text())
        changed = [
            (f"{group}.{k}" if group else k, old.get(k), new.get(k))
            for group, old, new in (("", saved, current), ("train", saved["train"], current["train"]))
            for k in sorted(set(old) | set(new))
            if k != "train" and old.get(k) != new.get(k)
        ]
        if changed:
            names = [name for name, _, _ in changed]
            values = ", ".join(f"{name}: {old!r} -> {new!r}" for name, old, new in changed)
            raise ValueError(f"cannot resume: the settings {names} differ from those of {settings_path} ({values})")
        for name in (f"{LOG_NAME}.json", f"{LOG_NAME}.csv"):
            checkpoint.remove_stale_temp_files(self.out / name)  # of a run killed while it wrote its log
        log = self.out / f"{LOG_NAME}.json"
        records = json.loads(log.read_text()) if log.is_file() else []
        if [r["round"] for r in records] != list(range(len(records))):
            raise ValueError(f"{log} must record rounds 0, 1, ... in order, got {[r['round'] for r in records]}")
        return records

    def run(self) -> list[dict]:
        config = self.config
        if not self.records:
            _write_labelled(config.round_dir(0), 0, config.strategy, self.initial.tolist(), [])
        for round_index in range(len(self.records), config.rounds + 1):
            self.records.append(self._round(round_index))
            checkpoint.write_text_atomic(json.dumps(self.records, indent=2) + "\n", self.out / f"{LOG_NAME}.json")
            checkpoint.write_text_atomic(_csv_text(self.records), self.out / f"{LOG_NAME}.csv")
        return self.records

    def _round(self, round_index: int) -> dict:
        config = self.config
        folder = config.round_dir(round_index)
        labelled = read_labelled(folder)["labelled"]
        start = time.perf_counter()
        resume = (folder / CHECKPOINT_NAME).is_file()
        teacher_logits = None
        if config.teacher_refit == "clap":
            teacher_logits = self._refit_teacher(folder, labelled, round_index)
        train_config = config.round_train_config(round_index, resume=resume, teacher_logits=teacher_logits)
        result = train(train_config)
        train_seconds = time.perf_counter() - start
        select_seconds = None
        if round_index < config.rounds:
            start = time.perf_counter()
            picks = self._select(train_config, result.checkpoint, labelled, round_index)
            next_round = round_index + 1
            _write_labelled(config.round_dir(next_round), next_round, config.strategy, labelled + picks, picks)
            select_seconds = time.perf_counter() - start
        record = {
            "round": round_index,
            "num_labelled": len(labelled),
            "strategy": config.strategy,
            **{f"test_{k}": v for k, v in result.test.items() if k.startswith("acc")},
            "train_seconds": train_seconds,
            "select_seconds": select_seconds,
        }
        if config.progress:
            print(_progress_line(record, config.rounds), flush=True)
        return record

    def _refit_teacher(self, folder: Path, labelled: list[int], round_index: int) -> str:
        """``folder/teacher_logits.pt``: the logits on every train image of CLAP refit on ``labelled``. A file
        already there is a finished refit (it is written atomically): a resumed round reuses it, as its student's
        checkpoint requires."""
        path = folder / TEACHER_LOGITS_NAME
        if path.is_file():
            return str(path)
        config, train_config = self.config, self.config.round_train_config(round_index)
        if self.clap_model is None:
            model, tokenizer, preprocess, input_dtype = build_teacher_model(train_config, self.device)
            classnames = load_classnames(train_config.classnames, self.splits.classnames)
            templates = prompt_templates(teacher_template_spec(train_config))
            text_means = mean_text_embeddings(model, tokenizer, classnames, templates, device=self.device)
            self.clap_model = (model, preprocess, input_dtype, text_means)
        model, preprocess, input_dtype, text_means = self.clap_model
        head = fit_clap(
            model,
            preprocess,
            text_means,
            [self.splits.train[i] for i in labelled],
            epochs=config.clap_epochs,
            batch_size=config.clap_batch_size,
            lr=config.clap_lr,
            momentum=config.clap_momentum,
            seed=round_seed(config.seed, round_index, CLAP_STREAM),
            device=self.device,
            input_dtype=input_dtype,
            num_workers=train_config.num_workers,
            progress=config.progress,
        )
        write_teacher_logits(
            ClipTeacher(model, head, preprocess, input_dtype),
            self.splits.train,
            path,
            batch_size=train_config.eval_batch_size,
            device=self.device,
            num_workers=train_config.num_workers,
            progress=config.progress,
        )
        return str(path)

    def _select(self, train_config: TrainConfig, path: Path, labelled: list[int], round_index: int) -> list[int]:
        """The round's ``budget`` picks, train indices in pick order, by the student in checkpoint ``path``."""
        state = checkpoint.load(path)
        # The weights come from the checkpoint: the student's pretrained file or tag is not read again.
        student_config = dataclasses.replace(train_config, student_pretrained=None)
        student = build_run_student(student_config, state["classnames"], self.device, init_heads=False)
        student.load_state_dict(state["model"])
        pool = self.pool[~np.isin(self.pool, labelled)]

        def outputs(indices):
            samples = [self.splits.train[i] for i in indices]
            return pool_outputs(
                student,
                eval_dataset(train_config, samples, student),
                batch_size=train_config.eval_batch_size,
                device=self.device,
                num_workers=train_config.num_workers,
                precision=train_config.precision,
                progress=self.config.progress,
            )

        chosen = select(
            self.config.strategy,
            outputs(pool),
            outputs(labelled),
            torch.from_numpy(self.labels[labelled]),
            self.budget,
            seed=round_seed(self.config.seed, round_index),
            progress=self.config.progress,
        )
        return pool[chosen.numpy()].tolist()


def _progress_line(record: dict, rounds: int) -> str:
    accuracies = ", ".join(f"{k.removeprefix('test_')} {100 * v:.2f}%" for k, v in record.items() if "acc" in k)
    line = f"round {record['round']}/{rounds}: {record['num_labelled']} labelled, test {accuracies}"
    line += f"; training {record['train_seconds']:.0f} s"
    if record["select_seconds"] is not None:
        line += f", selection {record['select_seconds']:.0f} s"
    return line
