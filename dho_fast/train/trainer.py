"""The DHO training loop: paired labelled/unlabelled batches, the fused loss, AMP, gradient accumulation, DDP,
atomic checkpoints with exact resume, and evaluation of both heads and their blend each epoch."""

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from dho_fast.train import checkpoint
from dho_fast.train.build import build_data, build_run_student, build_teacher, eval_dataset, train_dataset
from dho_fast.train.config import MAX_SKIPPED_STEPS, RESUMABLE_CHANGES, TrainConfig
from dho_fast.train.data import IGNORE_INDEX
from dho_fast.train.distributed import DistInfo, all_reduce_sum, barrier, gather_objects, process_group
from dho_fast.train.evaluate import autocast, head_metrics, predict_logits
from dho_fast.train.gradient_conflict import term_gradient_cosines
from dho_fast.train.metrics_log import MetricsLog
from dho_fast.train.sampling import PairedBatchSampler, steps_per_epoch
from dho_fast.train.schedule import build_scheduler
from dho_fast.train.teacher import LogitsTeacher
from dho_fast.train.teacher_cache import TeacherCache

CHECKPOINT_NAME = "last.pt"
BEST_CHECKPOINT_NAME = "best.pt"  # test_weights "best_val": the epoch with the best validation accuracy


@dataclass
class TrainResult:
    """What a finished run reports (rank 0 and the others alike)."""

    steps: int
    checkpoint: Path
    alpha: float | None = None
    beta: float | None = None
    val: dict[str, float] | None = None
    test: dict[str, float] | None = None
    history: list[dict] = field(default_factory=list)
    # test_weights "best_val": the step whose weights were tested; alpha, beta and val are then that epoch's.
    best_val_step: int | None = None


def train(config: TrainConfig) -> TrainResult:
    """Trains the student of ``config`` (one process, or one rank of a torchrun job) and returns its results.

    Writes ``output_dir/last.pt`` every ``checkpoint_every`` steps, at each epoch end (after that epoch's
    evaluation) and at the end; ``config.resume`` continues from it at the exact step, with the optimizer, scheduler,
    loss-scaler and random-number state, so a killed run loses at most ``checkpoint_every`` steps.

    ``test_weights: best_val`` also writes ``output_dir/best.pt`` (the same format) after each epoch whose validation
    accuracy beats every earlier epoch's (strictly: the first maximum is kept), and tests those weights with that
    epoch's alpha and beta at the end, as the reference's few-shot protocol does.
    """
    with process_group(config.device) as info:
        return _Trainer(config, info).run()


def _check_resumable(saved: dict, config: TrainConfig) -> None:
    current = config.to_dict()
    unknown = sorted(k for k in current if k not in saved)
    if unknown:
        raise ValueError(
            f"cannot resume: the checkpoint was written by an earlier version of dho_fast, without the settings "
            f"{unknown}; start the run again"
        )
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
    if changed:
        raise ValueError(
            f"cannot resume: the settings {changed} differ from the checkpoint's "
            f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)})"
        )


class _Trainer:
    def __init__(self, config: TrainConfig, info: DistInfo) -> None:
        self.config, self.info = config, info
        self.out = Path(config.output_dir)
        self.ckpt_path = self.out / CHECKPOINT_NAME
        self.best_path = self.out / BEST_CHECKPOINT_NAME
        if config.resume and not self.ckpt_path.is_file():
            raise FileNotFoundError(f"resume is set but {self.ckpt_path} does not exist")
        if not config.resume and self.ckpt_path.is_file():
            raise FileExistsError(
                f"{self.ckpt_path} exists: pass resume to continue that run, or choose another output_dir"
            )
        if info.is_main:  # of a run killed while it wrote a checkpoint
            for path in (self.ckpt_path, self.best_path):
                checkpoint.remove_stale_temp_files(path)
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.data = build_data(config)
        splits = self.data.splits
        if config.method == "dho" and config.alpha is None and not splits.val:
            raise ValueError(
                "a validation split (val_dir or the split json's 'val') is needed to search alpha and beta; "
                "otherwise fix them with alpha and beta"
            )
        device = info.device
        self.teacher = None
        if config.method != "ce":
            self.teacher = build_teacher(config, self.data.classnames, splits.train, device)
        self.student = build_run_student(config, self.data.classnames, device)
        self.train_set = train_dataset(config, splits.train, self.student, self.teacher)
        self.eval_sets = {k: eval_dataset(config, getattr(splits, k), self.student) for k in ("val", "test")}
        if config.test_weights == "best_val" and not splits.val:
            raise ValueError("test_weights 'best_val' needs a validation split to pick the epoch")
        # A pass over U (over L when U is empty), or with epoch_length "labelled" one over L.
        num_unlabelled = len(self.data.unlabelled) if config.epoch_length == "unlabelled" else 0
        self.steps_per_epoch = steps_per_epoch(
            len(self.data.labelled), num_unlabelled, config.labelled_batch_size, config.unlabelled_batch_size
        )
        limits = [] if config.max_steps is None else [config.max_steps]
        if config.epochs is not None:
            limits.append(config.epochs * self.steps_per_epoch)
        self.total_steps = min(limits)
        warmup = config.warmup_steps
        if warmup is None:
            warmup = round(config.warmup_fraction * self.total_steps)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = build_scheduler(
            self.optimizer, self.total_steps, min(warmup, self.total_steps), config.warmup_start_factor, config.lr_decay
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
        self.overflows_in_a_row = 0  # fp16 steps in a row with inf/NaN gradients (skipped by the scaler) or loss
        self.step = 0
        self.alpha, self.beta = config.alpha, config.beta
        self.history: list[dict] = []
        self.val_metrics: dict | None = None
        # (step, metrics) of the last test-split evaluation, which the final test reuses when it ran at the last step.
        self.last_test: tuple[int, dict] | None = None
        # test_weights "best_val": the step and validation metrics of the weights in best.pt.
        self.best_val: tuple[int, dict] | None = None
        self.use_unlabelled = config.method != "ce"
        if config.resume:
            self._load_checkpoint()
        self.log = MetricsLog(self.out, enabled=info.is_main, tensorboard=config.tensorboard)

    def _load_checkpoint(self) -> None:
        state = checkpoint.load(self.ckpt_path)
        _check_resumable(state["config"], self.config)
        if state["teacher_logits_sha256"] != self._teacher_file_sha256():
            source = f"teacher_cache {self.config.teacher_cache}" if isinstance(self.teacher, TeacherCache) else (
                f"teacher_logits {self.config.teacher_logits}")  # fmt: skip
            raise ValueError(
                f"cannot resume: {source} changed since {self.ckpt_path} was written (SHA-256 "
                f"{self._teacher_file_sha256()}, the checkpoint's {state['teacher_logits_sha256']})"
            )
        # Equal settings can still name a labelled_indices file whose contents changed.
        if not torch.equal(state["labelled"], torch.from_numpy(self.data.labelled)):
            raise ValueError(
                f"cannot resume: the labelled set ({len(self.data.labelled)} images) differs from the one "
                f"{self.ckpt_path} was trained on ({len(state['labelled'])} images)"
            )
        self.student.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.overflows_in_a_row = state["overflows_in_a_row"]
        self.step = state["step"]
        self.alpha, self.beta = state["alpha"], state["beta"]
        self.history, self.val_metrics = state["history"], state["val"]
        self.best_val = state["best_val"]
        rng = state["rng"]
        if len(rng) != self.info.world_size:
            warnings.warn(
                f"resuming with {self.info.world_size} ranks from a checkpoint of {len(rng)}: data order is unchanged "
                "but random draws inside the model (dropout) will differ from an uninterrupted run",
                stacklevel=2,
            )
        checkpoint.set_rng_state(rng[self.info.rank % len(rng)])

    def _teacher_file_sha256(self) -> str | None:
        """The SHA-256 of the teacher read from files (a logits file, a store), None for a teacher model."""
        return self.teacher.sha256 if isinstance(self.teacher, LogitsTeacher | TeacherCache) else None

    def _save_checkpoint(self, test: dict | None = None, path: Path | None = None) -> None:
        """Writes this run's state atomically to ``path`` (``last.pt`` by default); called on every rank."""
        path = path or self.ckpt_path
        rng = gather_objects(checkpoint.rng_state(), self.info)  # every rank's generators, collected on all
        if self.info.is_main:
            state = {
                "config": self.config.to_dict(),
                "step": self.step,
                "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch,
                "model": self.student.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "overflows_in_a_row": self.overflows_in_a_row,
                "rng": rng,
                "alpha": self.alpha,
                "beta": self.beta,
                "classnames": self.data.classnames,
                "labelled": torch.from_numpy(self.data.labelled),
                "history": self.history,
                "val": self.val_metrics,
                "test": test,
                "best_val": self.best_val,
                "teacher_logits_sha256": self._teacher_file_sha256(),  # (a store's too; the key predates stores)
            }
            checkpoint.save_atomic(state, path)
            self.log.log("checkpoint", self.step, {"path": str(path)})
        barrier(self.info)

    def _evaluate(self, split: str, search: bool) -> dict[str, float]:
        """Metrics of ``split``; with ``search`` (validation) the blend's alpha/beta are searched unless fixed."""
        cfg = self.config
        ce, kd, labels = predict_logits(
            self.student,
            self.eval_sets[split],
            self.info,
            batch_size=cfg.eval_batch_size,
            num_workers=cfg.num_workers,
            precision=cfg.precision,
        )
        self.student.train()
        fixed = (self.alpha, self.beta) if (cfg.alpha is not None or not search) else (None, None)
        return head_metrics(ce, kd, labels, cfg.method, alpha=fixed[0], beta=fixed[1])

    def _end_of_epoch(self) -> None:
        split = "val" if self.data.splits.val else "test"
        if not self.data.splits.val and not self.data.splits.test:
            return
        metrics = self._evaluate(split, search=split == "val")
        if split == "val":
            self.val_metrics = metrics
            if self.config.method == "dho":
                self.alpha, self.beta = metrics["alpha"], metrics["beta"]
        else:
            self.last_test = (self.step, metrics)
        record = {"split": split, "epoch": self.step / self.steps_per_epoch, **metrics}
        self.history.append({"step": self.step, **record})
        self.log.log("eval", self.step, record)
        if split == "val" and self.config.test_weights == "best_val":
            key = "acc_blend" if self.config.method == "dho" else "acc"
            if self.best_val is None or metrics[key] > self.best_val[1][key]:  # a tie keeps the earlier epoch
                self.best_val = (self.step, metrics)
                self._save_checkpoint(path=self.best_path)

    def _loader(self) -> DataLoader:
        sampler = PairedBatchSampler(
            self.data.labelled,
            self.data.unlabelled,
            labelled_batch=self.config.labelled_batch_size,
            unlabelled_batch=self.config.unlabelled_batch_size,
            total_steps=self.total_steps,
            seed=self.config.seed,
            start_step=self.step,
            use_unlabelled=self.use_unlabelled,
            rank=self.info.rank,
            world_size=self.info.world_size,
            accumulation_steps=self.config.accumulation_steps,
        )
        # A private generator: creating the loader must not draw from the global RNG the model's dropout uses.
        return DataLoader(
            self.train_set,
            batch_sampler=sampler,
            num_workers=self.config.num_workers,
            pin_memory=self.info.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.config.seed),
        )

    def run(self) -> TrainResult:
        cfg, info = self.config, self.info
        model = self.student
        if info.distributed:
            device_ids = [info.device.index] if info.device.type == "cuda" else None
            model = DistributedDataParallel(self.student, device_ids=device_ids)
        loss_args = dict(
            temperature=cfg.temperature,
            ce_loss_weight=cfg.ce_loss_weight,
            kd_loss_weight=cfg.kd_loss_weight,
            label_smoothing=cfg.label_smoothing,
            ignore_index=IGNORE_INDEX,
        )
        self.student.train()
        sizes = {"labelled": len(self.data.labelled), "unlabelled": len(self.data.unlabelled)}
        plan = {"total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch, "world_size": info.world_size}
        self.log.log("start", self.step, {**plan, **sizes})
        progress = _progress(cfg.progress and info.is_main, self.total_steps, self.step)
        # Since the last log: summed loss, ce and kd terms of the micro-batches, their count, the images, and the
        # gradient cosines' sums and counts (features, backbone; log_gradient_conflict).
        sums = torch.zeros(9, dtype=torch.float64, device=info.device)
        step_terms = torch.zeros(3, dtype=torch.float64, device=info.device)  # this step's loss, ce and kd terms
        window_start = time.perf_counter()
        accum = cfg.accumulation_steps
        for micro, batch in enumerate(self._loader()):
            last_micro = micro % accum == accum - 1
            images = batch["student"].to(info.device, non_blocking=True)
            labels = batch["label"].to(info.device, non_blocking=True)
            teacher = None
            if isinstance(self.teacher, TeacherCache):
                teacher = self.teacher.targets(batch["index"], batch["view"], info.device)
            elif self.teacher is not None:
                teacher_images = batch.get("teacher")
                if teacher_images is not None:
                    teacher_images = teacher_images.to(info.device, non_blocking=True)
                teacher = self.teacher(teacher_images, batch["index"].to(info.device))
            sync = contextlib.nullcontext() if (last_micro or not info.distributed) else model.no_sync()
            with sync:
                with autocast(info.device, cfg.precision):
                    outputs = model(images, teacher, labels, return_features=cfg.log_gradient_conflict, **loss_args)
                loss, ce_term, kd_term = outputs[:3]
                if cfg.log_gradient_conflict:
                    sums[5:] += self._gradient_conflict(*outputs[1:])
                self.scaler.scale(loss / accum).backward()
            terms = torch.stack([loss.detach(), ce_term.detach(), kd_term.detach()]).double()
            sums[:5] += torch.cat([terms, terms.new_tensor([1.0, len(images)])])
            step_terms += terms
            if not last_micro:
                continue
            self._optimizer_step(step_terms)
            step_terms.zero_()
            progress.update(1)
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                window_start = self._log_train(sums, window_start, progress)
                sums.zero_()
            epoch_end = self.step % self.steps_per_epoch == 0
            if epoch_end or self.step == self.total_steps:
                self._end_of_epoch()
            if self.step == self.total_steps:
                break
            if epoch_end or self.step % cfg.checkpoint_every == 0:
                self._save_checkpoint()
        progress.close()
        test = self._final_test()
        self._save_checkpoint(test)
        self.log.close()
        if self.best_val is None:
            return TrainResult(self.step, self.ckpt_path, self.alpha, self.beta, self.val_metrics, test, self.history)
        # test_weights "best_val": the run reports the epoch it tested.
        best_step, best_metrics = self.best_val
        alpha, beta = best_metrics.get("alpha"), best_metrics.get("beta")
        return TrainResult(self.step, self.ckpt_path, alpha, beta, best_metrics, test, self.history, best_step)

    def _final_test(self) -> dict | None:
        """The test metrics of the last weights, or under test_weights "best_val" of best.pt's weights with their
        alpha and beta (the trained weights are restored after, so last.pt keeps the last ones)."""
        if not self.data.splits.test:
            return None
        if self.config.test_weights == "best_val":
            last_weights = {k: v.clone() for k, v in self.student.state_dict().items()}
            last_blend = self.alpha, self.beta
            best = checkpoint.load(self.best_path)
            if best["step"] != self.best_val[0]:
                # Only a run killed between writing best.pt and last.pt, then resumed on another number of ranks
                # whose re-evaluation of that epoch came out lower, gets here: its recorded epoch's weights are gone.
                raise RuntimeError(
                    f"{self.best_path} holds step {best['step']} but the best validation epoch on "
                    f"record is step {self.best_val[0]}: rerun from scratch to test the recorded epoch"
                )
            self.student.load_state_dict(best["model"])
            self.alpha, self.beta = best["alpha"], best["beta"]
            test = self._evaluate("test", search=False)
            self.student.load_state_dict(last_weights)
            self.alpha, self.beta = last_blend
            self.log.log("test", self.step, {**test, "weights_step": best["step"]})
            return test
        at_last_step = self.last_test is not None and self.last_test[0] == self.step
        test = self.last_test[1] if at_last_step else self._evaluate("test", search=False)
        self.log.log("test", self.step, test)
        return test

    def _optimizer_step(self, step_terms: torch.Tensor) -> None:
        """Applies one optimizer step; ``step_terms``: this rank's loss, ce and kd terms summed over the step's
        micro-batches, (3,) float64.

        Raises FloatingPointError naming the step and its terms when the loss is not finite on any rank, before the
        weights change; under the fp16 loss scaler, which skips a step with inf/NaN gradients, only once it has
        skipped ``MAX_SKIPPED_STEPS`` in a row. Every rank takes the same decision, so none is left waiting in a
        collective: the loss terms are summed over ranks (a NaN anywhere makes the sum NaN) and the scaler's
        verdict comes from gradients DDP has already averaged.
        """
        # One scalar sync per step, the price of naming the exact step and of no NaN update reaching a checkpoint;
        # without a loss scaler (which checks them itself) it also carries how many gradients are not finite.
        checks = torch.cat([step_terms, self._nonfinite_gradients()])
        *totals, nonfinite_gradients = all_reduce_sum(checks, self.info).tolist()
        finite = all(math.isfinite(v) for v in totals)
        step = self.step + 1
        means = ", ".join(
            f"{name} {value / (self.config.accumulation_steps * self.info.world_size):.6g}"
            for name, value in zip(("loss", "ce", "kd"), totals, strict=True)
        )
        if not finite and not self.scaler.is_enabled():
            raise FloatingPointError(
                f"the loss is not finite at step {step} ({means}; means over the step's micro-batches and ranks): "
                "the run stops before this step changes the weights (a smaller lr may help)"
            )
        if nonfinite_gradients:
            raise FloatingPointError(
                f"the gradients are not finite at step {step} although the loss is ({means}): the run stops before "
                "this step changes the weights"
            )
        if self.config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.config.grad_clip)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.is_enabled():
            # The scaler lowers its scale exactly when it skipped the step for inf/NaN gradients.
            overflow = self.scaler.get_scale() < scale or not finite
            self.overflows_in_a_row = self.overflows_in_a_row + 1 if overflow else 0
            if self.overflows_in_a_row == MAX_SKIPPED_STEPS:
                first = step - MAX_SKIPPED_STEPS + 1
                raise FloatingPointError(
                    f"inf or NaN gradients or loss in {MAX_SKIPPED_STEPS} fp16 steps in a row, steps {first} to "
                    f"{step}, which the loss scaler skipped (step {step}: {means}; means over the step's micro-batches "
                    "and ranks): the run stops"
                )
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1

    def _gradient_conflict(self, ce_term: torch.Tensor, kd_term: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """(4,) float64 to add to the log window's sums: the cosine between the CE and KD terms' feature gradients
        and a count of 1, then the same for the backbone's parameters on the micro-batches of a step that will be
        logged (0, 0 otherwise). An undefined cosine (a zero gradient) counts 0. No host sync."""
        step = self.step + 1
        logged = step % self.config.log_every == 0 or step == self.total_steps
        backbone = self.student.backbone if logged else None
        scale = self.scaler.scale(features.new_ones(())) if logged else 1.0
        cosines = term_gradient_cosines(ce_term, kd_term, features, backbone, backbone_grad_scale=scale)
        out = []
        for cos in cosines:
            cos = torch.full((), torch.nan, dtype=torch.float64, device=features.device) if cos is None else cos
            defined = cos.isfinite()
            out += [torch.where(defined, cos, 0.0), defined.double()]
        return torch.stack(out)

    def _nonfinite_gradients(self) -> torch.Tensor:
        """(1,) float64: how many parameters have a non-finite gradient element (0 under the loss scaler, which skips
        such steps itself), without a host sync. Checked element-wise, as a norm of large finite gradients can
        overflow."""
        grads = [] if self.scaler.is_enabled() else [p.grad for p in self.student.parameters() if p.grad is not None]
        flags = [(~g.isfinite()).any() for g in grads]
        count = torch.stack(flags).sum() if flags else torch.zeros((), device=self.info.device)
        return count.to(torch.float64).view(1)

    def _log_train(self, sums: torch.Tensor, window_start: float, progress) -> float:
        """Logs the mean loss terms and the throughput since the last log, over all ranks; returns the new start."""
        totals = all_reduce_sum(sums, self.info)
        now = time.perf_counter()
        loss, ce, kd = (float(v) / max(1.0, float(totals[3])) for v in totals[:3])
        values = {
            "epoch": self.step / self.steps_per_epoch,
            "lr": self.scheduler.get_last_lr()[0],
            "loss": loss,
            "ce": ce,
            "kd": kd,
            "images_per_s": float(totals[4]) / max(now - window_start, 1e-9),
        }
        if self.config.log_gradient_conflict:
            # Means over the window's micro-batches (and ranks) where the cosine is defined; None where none was.
            for name, (total, count) in (("grad_cos_features", totals[5:7]), ("grad_cos_backbone", totals[7:9])):
                values[name] = float(total) / float(count) if count else None
        if not all(math.isfinite(v) for v in (loss, ce, kd)):
            warnings.warn(f"non-finite loss at step {self.step}: {values}", stacklevel=2)
        self.log.log("train", self.step, values)
        progress.set_postfix(loss=f"{loss:.4f}", ce=f"{ce:.4f}", kd=f"{kd:.4f}", img_s=f"{values['images_per_s']:.0f}")
        return now


def _progress(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True)
