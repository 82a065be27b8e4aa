"""The trainer's settings: one flat dataclass, read from YAML files and command-line flags, checked in one place."""

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METHODS = ("dho", "kd", "ce")
DATA_FORMATS = ("imagefolder", "coop")
TEACHERS = ("open_clip", "tip_adapter", "logits")
PRECISIONS = ("fp32", "bf16", "fp16")
TEACHER_PRECISIONS = ("auto", *PRECISIONS)
LR_DECAYS = ("cosine", "linear", "constant")
IMAGE_MODES = ("RGB", "L")
DEVICES = ("auto", "cpu", "cuda")

# Settings that may change between a run and its resumption without changing what is computed.
# Keys of earlier releases: ce_weight / kd_weight now name the heads' matrices only.
RENAMED_KEYS = {"ce_weight": "ce_loss_weight", "kd_weight": "kd_loss_weight"}
RESUMABLE_CHANGES = frozenset({"resume", "num_workers", "log_every", "tensorboard", "progress", "eval_batch_size"})


@dataclass
class TrainConfig:
    """Every setting of a training run. Batch sizes are global: per optimizer step, summed over ranks."""

    # Data: an ImageFolder tree (train_dir, val_dir, test_dir) or a CoOp split json (split_json, image_root).
    data_format: str = "imagefolder"
    train_dir: str | None = None
    val_dir: str | None = None
    test_dir: str | None = None
    split_json: str | None = None
    image_root: str | None = None
    classnames: str | None = None  # "imagenet" (open_clip's names), a text file with one name a line, or folder names
    # The labelled set: exactly one of a class-balanced fraction, a class-balanced total, or k shots per class.
    labelled_fraction: float | None = None
    num_labelled: int | None = None
    shots: int | None = None
    split_seed: int = 1
    image_mode: str = "RGB"
    student_size: int = 224
    teacher_size: int | None = None  # None: the teacher model's own input size
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = True
    interpolation: str = "bicubic"
    student_mean: tuple[float, ...] | None = None  # None: the student's own normalisation
    student_std: tuple[float, ...] | None = None
    num_workers: int = 4

    # Student.
    method: str = "dho"
    student: str = "resnet18"  # resnet18, mobilenet_v2, cnn, timm:NAME, open_clip:ARCH
    student_pretrained: str | None = None  # a local weights file (open_clip students: also a pretrained tag)
    student_templates: str | None = None  # prompts of an open_clip student's head init; None: teacher_templates
    kd_cosine: bool | None = None  # None: True for open_clip students (METHOD.md), False otherwise
    kd_logit_scale: float | None = None  # None: 100 for a cosine KD head, 1 otherwise
    cnn_width: int = 32
    # An open_clip model config json registered before any open_clip model is built: its file name (without
    # .json) becomes an architecture name for the teacher or an open_clip student (custom architectures).
    open_clip_config: str | None = None

    # Teacher.
    teacher: str = "open_clip"
    teacher_arch: str = "RN50"
    teacher_pretrained: str | None = "openai"  # an open_clip pretrained tag or a local checkpoint file
    teacher_precision: str = "auto"
    teacher_templates: str = "a photo of a {}."  # dho_imagenet, openai_imagenet, or one template with "{}"
    teacher_logits: str | None = None  # teacher="logits": a (num_train, C) tensor file, one row per train index
    tip_adapter_checkpoint: str | None = None

    # Optimisation.
    epochs: int | None = 1  # passes over the unlabelled set (the labelled set if there is none); None: max_steps
    max_steps: int | None = None
    labelled_batch_size: int = 64
    unlabelled_batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int | None = None
    warmup_fraction: float = 0.1
    warmup_start_factor: float = 0.01
    lr_decay: str = "linear"
    precision: str = "fp32"
    accumulation_steps: int = 1
    grad_clip: float | None = None
    temperature: float = 2.0
    ce_loss_weight: float = 0.5
    kd_loss_weight: float = 0.5
    label_smoothing: float = 0.0

    # Evaluation: alpha and beta fixed (both given) or searched on the validation split.
    alpha: float | None = None
    beta: float | None = None
    eval_batch_size: int = 256

    # Run.
    output_dir: str = "runs/dho"
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 500
    resume: bool = False
    log_every: int = 50
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first setting that is out of range or inconsistent with the others."""
        _choice("data_format", self.data_format, DATA_FORMATS)
        _choice("method", self.method, METHODS)
        _choice("teacher", self.teacher, TEACHERS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("teacher_precision", self.teacher_precision, TEACHER_PRECISIONS)
        _choice("lr_decay", self.lr_decay, LR_DECAYS)
        _choice("image_mode", self.image_mode, IMAGE_MODES)
        _choice("device", self.device, DEVICES)
        _choice("interpolation", self.interpolation, ("bicubic", "bilinear", "nearest"))
        if self.data_format == "imagefolder" and not self.train_dir:
            raise ValueError("train_dir is required when data_format is 'imagefolder'")
        if self.data_format == "coop" and not (self.split_json and self.image_root):
            raise ValueError("split_json and image_root are required when data_format is 'coop'")
        chosen = [n for n in ("labelled_fraction", "num_labelled", "shots") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise ValueError(
                f"exactly one of labelled_fraction, num_labelled, shots must be set, got {chosen or 'none'}"
            )
        if self.labelled_fraction is not None and not 0 < self.labelled_fraction <= 1:
            raise ValueError(f"labelled_fraction must be in (0, 1], got {self.labelled_fraction}")
        for name in ("num_labelled", "shots", "student_size", "teacher_size", "epochs", "max_steps", "cnn_width"):
            _positive(name, getattr(self, name))
        for name in ("labelled_batch_size", "eval_batch_size", "accumulation_steps", "checkpoint_every", "log_every"):
            _positive(name, getattr(self, name))
        if self.epochs is None and self.max_steps is None:
            raise ValueError("max_steps must be set when epochs is None (no limit on epochs)")
        if self.unlabelled_batch_size < 0:
            raise ValueError(f"unlabelled_batch_size must be >= 0, got {self.unlabelled_batch_size}")
        if self.method != "ce" and self.unlabelled_batch_size == 0 and self.labelled_fraction != 1:
            raise ValueError(f"unlabelled_batch_size must be > 0 for method '{self.method}' (KD needs unlabelled rows)")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {self.crop_scale}")
        if (self.student_mean is None) != (self.student_std is None):
            raise ValueError("student_mean and student_std must be given together")
        channels = 1 if self.image_mode == "L" else 3
        for name in ("student_mean", "student_std"):
            value = getattr(self, name)
            if value is not None and len(value) != channels:
                raise ValueError(f"{name} must have {channels} values for image_mode {self.image_mode}, got {value}")
        if self.teacher == "logits" and self.method != "ce" and not self.teacher_logits:
            raise ValueError("teacher_logits (a file of precomputed logits) is required when teacher is 'logits'")
        if self.teacher == "tip_adapter" and self.method != "ce" and not self.tip_adapter_checkpoint:
            raise ValueError("tip_adapter_checkpoint is required when teacher is 'tip_adapter'")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 < self.warmup_start_factor <= 1:
            raise ValueError(f"warmup_start_factor must be in (0, 1], got {self.warmup_start_factor}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("ce_loss_weight", "kd_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.label_smoothing <= 1:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        if (self.alpha is None) != (self.beta is None):
            raise ValueError("alpha and beta must be given together (fixed blend) or both left unset (searched)")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.beta is not None and self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (tuples as lists), as written to YAML and to checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Builds a config from plain values; unknown keys are an error that lists them."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            renamed = [f"{key} is now {RENAMED_KEYS[key]}" for key in unknown if key in RENAMED_KEYS]
            hint = f" ({'; '.join(renamed)})" if renamed else ""
            raise ValueError(f"unknown config keys {unknown}{hint}")
        kinds = field_types()
        converted = {}
        for key, value in values.items():
            if value is not None and tuple in kinds[key]:
                if not isinstance(value, list | tuple):
                    raise ValueError(f"{key} must be a list of numbers, got {value!r}")
                value = tuple(float(v) for v in value)
            converted[key] = value
        return cls(**converted)


def field_types() -> dict[str, tuple[type, ...]]:
    """For each setting, the plain types it accepts besides None (e.g. ``(int,)``, ``(tuple,)``)."""
    hints = typing.get_type_hints(TrainConfig)
    kinds = {}
    for name, hint in hints.items():
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        kinds[name] = tuple(typing.get_origin(a) or a for a in args if a is not type(None))
    return kinds


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A YAML file of settings (optional), then ``overrides`` on top of it; checked as a whole."""
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of settings, got {type(loaded).__name__}")
        values.update(loaded)
    values.update(overrides or {})
    return TrainConfig.from_dict(values)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
