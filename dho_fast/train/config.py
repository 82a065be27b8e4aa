"""The trainer's settings: one flat dataclass, read from YAML files and command-line flags, checked in one place.

A setting is checked in three stages, each naming the key, what it takes and the value it got:

1. Its type, against the field's own type hint (:func:`conform`): ``bool`` takes only ``True``/``False`` (YAML
   ``true``/``false``; a quoted ``"false"`` or ``"no"`` is a string and refused), ``int`` takes integers but not
   booleans or ``1.5``, ``float`` takes integers and floats but not strings (``"0.1"``), ``tuple[float, float]``
   a list of exactly two numbers and ``tuple[float, ...]`` a list of numbers (stored as tuples of floats), a
   ``Literal`` one of its strings, ``dict`` a mapping (the active loop's ``train`` settings, checked by this class),
   and ``X | None`` also ``None`` (YAML ``null``, the flag value ``none``).
   A wrong type raises :class:`InputTypeError` (a ``TypeError``), a string outside a ``Literal``'s choices a
   ``ValueError`` that lists them.
2. Every number's range (``RANGES``): finite, since NaN is in no interval and an open ``inf`` end excludes ``inf``.
3. The rules between settings (:meth:`TrainConfig.validate`). Both of the last two raise ``ValueError``.
"""

import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# Keys of earlier releases: ce_weight / kd_weight now name the heads' matrices only.
RENAMED_KEYS = {"ce_weight": "ce_loss_weight", "kd_weight": "kd_loss_weight"}
# The reference protocol's datasets (dho_fast.train.datasets.DATASETS lays each out).
DatasetName = Literal[
    "caltech101",
    "dtd",
    "eurosat",
    "fgvc",
    "food101",
    "imagenet",
    "oxford_flowers",
    "oxford_pets",
    "stanford_cars",
    "sun397",
    "ucf101",
]
# How a class's prompt embeddings become its text embedding (dho_fast.train.teacher.class_text_embeddings).
TextMean = Literal["normalized", "mean_of_normalized", "raw"]
# The settings that name files of an ImageFolder tree or a split json; a named dataset finds its own.
DATA_PATH_SETTINGS = ("train_dir", "val_dir", "test_dir", "split_json", "image_root")
# The five ways to choose the labelled set, of which a config sets exactly one.
LABELLED_SET_SETTINGS = ("labelled_percent", "labelled_fraction", "num_labelled", "shots", "labelled_indices")
# Settings that may change between a run and its resumption without changing what is computed.
RESUMABLE_CHANGES = frozenset(
    {
        "resume",
        "num_workers",
        "cache_images",
        "log_every",
        "tensorboard",
        "progress",
        "eval_batch_size",
        "log_gradient_conflict",
    }
)

# Under fp16 the loss scaler skips a step whose gradients hold inf or NaN and halves its scale, as usual; this many
# skipped steps in a row (a scale 2^20 times smaller: far beyond the one or two of a transient overflow) stop the run.
MAX_SKIPPED_STEPS = 20

# The range of every number setting, as in mathematics; a list setting's every value. Every int and float field has
# one (tests/test_config.py checks it), so no number setting goes unchecked.
RANGES = {
    "labelled_percent": "(0, 100]",
    "labelled_fraction": "(0, 1]",
    "num_labelled": "[1, inf)",
    "shots": "[1, inf)",
    "split_seed": "[0, inf)",
    "student_size": "[1, inf)",
    "teacher_size": "[1, inf)",
    "crop_scale": "(0, 1]",
    "student_mean": "(-inf, inf)",
    "student_std": "(0, inf)",
    "num_workers": "[0, inf)",
    "kd_logit_scale": "(0, inf)",
    "cnn_width": "[1, inf)",
    "epochs": "[1, inf)",
    "max_steps": "[1, inf)",
    "labelled_batch_size": "[1, inf)",
    "unlabelled_batch_size": "[0, inf)",
    "lr": "(0, inf)",
    "weight_decay": "[0, inf)",
    "warmup_steps": "[0, inf)",
    "warmup_fraction": "[0, 1)",
    "warmup_start_factor": "[0, 1]",
    "accumulation_steps": "[1, inf)",
    "grad_clip": "(0, inf)",
    "temperature": "(0, inf)",
    "ce_loss_weight": "[0, inf)",
    "kd_loss_weight": "[0, inf)",
    "label_smoothing": "[0, 1]",
    "alpha": "[0, 1]",
    "beta": "(0, inf)",
    "eval_batch_size": "[1, inf)",
    "seed": "[0, inf)",
    "checkpoint_every": "[1, inf)",
    "log_every": "[1, inf)",
}


class InputTypeError(TypeError):
    """A setting, or the contents of a file a setting names (e.g. ``teacher_logits``), of the wrong type. The CLI
    reports it as the user's mistake; other TypeErrors are bugs and keep their traceback."""


@dataclass
class TrainConfig:
    """Every setting of a training run. Batch sizes are global: per optimizer step, summed over ranks.

    A run stops with ``FloatingPointError`` naming the step and its loss terms when the loss is not finite, before
    that step changes the weights; under ``precision: fp16`` the loss scaler skips steps with inf/NaN gradients
    instead, and ``MAX_SKIPPED_STEPS`` (20) such steps (or steps with a non-finite loss) in a row stop the run the
    same way. The count is saved in checkpoints: a resumed run stops where the uninterrupted one would.
    """

    # Data: one of the reference protocol's datasets under data_root in its CoOp layout (dho_fast.train.datasets),
    # or else (data_format) an ImageFolder tree (train_dir, val_dir, test_dir) or a CoOp split json (split_json,
    # image_root); data_format is not read when dataset is set.
    dataset: DatasetName | None = None
    data_root: str | None = None
    data_format: Literal["imagefolder", "coop"] = "imagefolder"
    train_dir: str | None = None
    val_dir: str | None = None
    test_dir: str | None = None
    split_json: str | None = None
    image_root: str | None = None
    classnames: str | None = None  # "imagenet" (open_clip's names), a text file with one name a line, or folder names
    # The labelled set: exactly one of the reference's percent rule (ImageNet 1% / 10%: labelled_percent 1 or 10),
    # a class-balanced fraction or total of exactly that size, the reference's k shots per class, or a file of train
    # indices (a JSON list, or an object whose "labelled" key holds one, as the active loop writes); see
    # dho_fast.train.splits.
    labelled_percent: float | None = None
    labelled_fraction: float | None = None
    num_labelled: int | None = None
    shots: int | None = None
    labelled_indices: str | None = None
    split_seed: int | None = None  # None: the reference's seeds, 13 for labelled_percent, 1 for the other rules
    image_mode: Literal["RGB", "L"] = "RGB"
    student_size: int = 224
    teacher_size: int | None = None  # None: the teacher model's own input size
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = True
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    student_mean: tuple[float, ...] | None = None  # None: the student's own normalisation
    student_std: tuple[float, ...] | None = None
    num_workers: int = 4
    # Decode every image once and keep it in memory (ImageDataset): for small datasets whose images cost more to
    # open and decode than a step costs to train on them; the same draws, so the same run.
    cache_images: bool = False

    # Student.
    method: Literal["dho", "kd", "ce"] = "dho"
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
    # "cache": a store of the teacher's soft labels per augmented view (dho-fast teacher-cache), at teacher_cache.
    teacher: Literal["open_clip", "tip_adapter", "logits", "cache"] = "open_clip"
    teacher_arch: str = "RN50"
    teacher_pretrained: str | None = "openai"  # an open_clip pretrained tag or a local checkpoint file
    teacher_precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # dho_imagenet, openai_imagenet, or one template with "{}"; None: the dataset's own (METHOD.md), else the one
    # "a photo of a {}."
    teacher_templates: str | None = None
    # Class text embeddings of the prompt ensemble (dho_fast.train.teacher.class_text_embeddings): "normalized" is
    # METHOD.md's formula; the reference's ImageNet script averages normalised prompt embeddings without normalising
    # the mean for its open_clip teacher ("mean_of_normalized") and initialises a CLIP student's heads from the raw
    # mean ("raw"): set these to match its published checkpoints.
    teacher_text_embeddings: TextMean = "normalized"
    student_text_embeddings: TextMean = "normalized"
    teacher_logits: str | None = None  # teacher="logits": a (num_train, C) tensor file, one row per train index
    tip_adapter_checkpoint: str | None = None
    teacher_cache: str | None = None  # teacher="cache": the store's folder (dho_fast.train.teacher_cache)

    # Optimisation.
    epochs: int | None = 1  # passes over the set epoch_length names; None: max_steps alone limits the run
    # "unlabelled": an epoch is a pass over U, |U| // unlabelled_batch_size steps (over L if U is empty), as the
    # ImageNet recipes count; "labelled": one over L, ceil(|L| / labelled_batch_size) steps with paired unlabelled
    # batches, as the few-shot recipe counts (200 epochs).
    epoch_length: Literal["unlabelled", "labelled"] = "unlabelled"
    max_steps: int | None = None
    labelled_batch_size: int = 64
    unlabelled_batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int | None = None
    warmup_fraction: float = 0.1
    warmup_start_factor: float = 0.01
    lr_decay: Literal["cosine", "linear", "constant"] = "linear"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16 adds a loss scaler: see the class docs
    accumulation_steps: int = 1
    grad_clip: float | None = None
    temperature: float = 2.0
    ce_loss_weight: float = 0.5
    kd_loss_weight: float = 0.5
    label_smoothing: float = 0.0

    # Evaluation: alpha and beta fixed (both given) or searched on the validation split every epoch.
    alpha: float | None = None
    beta: float | None = None
    # The weights the final test uses: "last", or "best_val": the epoch with the best validation accuracy (the
    # blend's for dho; the first maximum), saved as best.pt beside last.pt, tested with its alpha and beta.
    test_weights: Literal["last", "best_val"] = "last"
    eval_batch_size: int = 256

    # Run.
    output_dir: str = "runs/dho"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int = 500
    resume: bool = False
    log_every: int = 50
    # Log the cosine between the CE and KD terms' gradients (dho_fast.train.gradient_conflict): on the shared
    # features every step, on the backbone's parameters every log_every steps (two more backbone backward passes).
    log_gradient_conflict: bool = False
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        conform_fields(self)
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first number out of its range (``RANGES``) or setting inconsistent with
        the others. The types were checked on construction."""
        check_ranges(self, RANGES)
        if self.dataset is not None:
            if not self.data_root:
                raise ValueError(f"data_root is required with dataset {self.dataset!r}")
            paths = [n for n in DATA_PATH_SETTINGS if getattr(self, n) is not None]
            if paths:
                raise ValueError(f"dataset {self.dataset!r} finds its files under data_root: unset {paths}")
        elif self.data_root is not None:
            raise ValueError("data_root is read only with dataset (one of the reference protocol's datasets)")
        elif self.data_format == "imagefolder" and not self.train_dir:
            raise ValueError("train_dir is required when data_format is 'imagefolder' (or name a dataset)")
        elif self.data_format == "coop" and not (self.split_json and self.image_root):
            raise ValueError("split_json and image_root are required when data_format is 'coop'")
        chosen = [n for n in LABELLED_SET_SETTINGS if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise ValueError(f"exactly one of {', '.join(LABELLED_SET_SETTINGS)} must be set, got {chosen or 'none'}")
        if self.epochs is None and self.max_steps is None:
            raise ValueError("max_steps must be set when epochs is None (no limit on epochs)")
        if self.method != "ce" and self.unlabelled_batch_size == 0 and not self._all_labelled():
            raise ValueError(f"unlabelled_batch_size must be > 0 for method '{self.method}' (KD needs unlabelled rows)")
        lo, hi = self.crop_scale
        if lo > hi:
            raise ValueError(f"crop_scale must be (lo, hi) with lo <= hi, got {self.crop_scale}")
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
        if self.teacher == "cache" and self.method != "ce" and not self.teacher_cache:
            raise ValueError("teacher_cache (a store written by dho-fast teacher-cache) is required when teacher is "
                             "'cache'")  # fmt: skip
        if self.log_gradient_conflict and self.method == "ce":
            raise ValueError("log_gradient_conflict needs a CE and a KD term: method 'dho' or 'kd', not 'ce'")
        if (self.alpha is None) != (self.beta is None):
            raise ValueError("alpha and beta must be given together (fixed blend) or both left unset (searched)")

    def _all_labelled(self) -> bool:
        return self.labelled_fraction == 1 or self.labelled_percent == 100

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (tuples as lists), as written to YAML and to checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Builds a config from plain values (lists for tuples); unknown keys are an error that lists them."""
        check_keys(cls, values, RENAMED_KEYS)
        return cls(**values)


def conform_fields(settings: Any) -> None:
    """Conforms every field of the dataclass instance ``settings`` to its type hint in place (:func:`conform`)."""
    hints = typing.get_type_hints(type(settings))
    for f in dataclasses.fields(settings):
        setattr(settings, f.name, conform(f.name, hints[f.name], getattr(settings, f.name)))


def check_ranges(settings: Any, ranges: dict[str, str]) -> None:
    """Raises ValueError naming the first number setting of ``settings`` outside its interval in ``ranges``
    (``"(0, 1]"``, ``"[0, inf)"``; every value of a tuple setting); None is not checked."""
    for name, interval in ranges.items():
        value = getattr(settings, name)
        values = value if isinstance(value, tuple) else (value,)
        if value is not None and not all(_in_interval(v, interval) for v in values):
            subject = f"every value of {name}" if isinstance(value, tuple) else name
            raise ValueError(f"{subject} must be in {interval}, got {value!r}")


def check_keys(cls: type, values: dict[str, Any], renamed: dict[str, str] | None = None) -> None:
    """Raises ValueError listing the keys of ``values`` that are no field of the dataclass ``cls`` (with the new
    names of ``renamed`` ones)."""
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        hints = [f"{key} is now {renamed[key]}" for key in unknown if key in (renamed or {})]
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise ValueError(f"unknown config keys {unknown}{hint}")


def conform(name: str, hint: Any, value: Any) -> Any:
    """``value`` as setting ``name``, of type ``hint``, stores it: unchanged, an int widened to float for a float, a
    list of numbers made a tuple of floats for a tuple. Raises InputTypeError when ``value`` is not of the type
    ``hint`` names (module docs), ValueError when it is not one of a ``Literal``'s choices."""
    kind, optional = _without_none(hint)
    if value is None and optional:
        return None
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if not (isinstance(value, str) and value in choices):
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        return value
    if not _is_instance(value, kind):
        expected = _describe(kind) + (" or null" if optional else "")
        hint_text = ""
        if isinstance(value, str) and _reads_as_float(value):
            hint_text = "; write numbers unquoted, exponents with a dot (1.0e-3: YAML reads 1e-3 as a string)"
        raise InputTypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__}){hint_text}")
    if kind is float:
        return float(value)
    if typing.get_origin(kind) is tuple:
        return tuple(float(v) for v in value)
    return value


def field_types() -> dict[str, type]:
    """For each setting, the plain type of its values besides None: bool, int, float, str (also for the strings of a
    ``Literal``) or tuple."""
    kinds = {}
    for name, hint in typing.get_type_hints(TrainConfig).items():
        kind, _ = _without_none(hint)
        origin = typing.get_origin(kind)
        kinds[name] = str if origin is Literal else origin or kind
    return kinds


def load_config(
    path: str | Path | Sequence[str | Path] | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """YAML files of settings (optional: one path or a sequence of them, each overriding the ones before), then
    ``overrides`` on top; checked as a whole."""
    paths = [] if path is None else [path] if isinstance(path, str | Path) else list(path)
    settings: dict[str, Any] = {}
    for each in paths:
        settings.update(read_yaml_settings(each))
    return TrainConfig.from_dict({**settings, **(overrides or {})})


def read_yaml_settings(path: str | Path | None) -> dict[str, Any]:
    """The mapping of settings in the YAML file ``path`` (an empty one for None or an empty file), unchecked."""
    if path is None:
        return {}
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, got {type(loaded).__name__}")
    return loaded


def _without_none(hint: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``, ``(hint, False)`` otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (kind,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
        return kind, True
    return hint, False


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)  # True is an int to Python, not to a config


def _is_instance(value: Any, kind: Any) -> bool:
    if kind is bool or kind is str:
        return isinstance(value, kind)
    if typing.get_origin(kind) is dict:
        return isinstance(value, dict)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return _is_number(value)
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, list | tuple):
            return False
        args = typing.get_args(kind)
        return (args[-1] is Ellipsis or len(value) == len(args)) and all(_is_number(v) for v in value)
    # Every field's type is one of the above: a config conforms each default, so a new field of another type fails
    # every test until it gets its check here.
    raise TypeError(f"a config has a field of type {kind}, which _is_instance cannot check")


def _describe(kind: Any) -> str:
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        return "a list of numbers" if args[-1] is Ellipsis else f"a list of {len(args)} numbers"
    if typing.get_origin(kind) is dict:
        return "a mapping of settings"
    return {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string"}[kind]


def _reads_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _in_interval(value: float, interval: str) -> bool:
    """Whether ``value`` lies in ``interval``, written as ``"(0, 1]"`` or ``"[0, inf)"``; NaN lies in none."""
    low, high = (float(end) for end in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below
