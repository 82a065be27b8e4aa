"""The trainer's settings are checked by type, key by key, from the dataclass fields' own type hints, and every
number against its stated range: a bad setting is an error naming the key, what it takes and the value it got,
the same from Python, from a YAML file and from the command line."""

import importlib.util
import math
import typing
from pathlib import Path

import pytest
import yaml

from dho_fast.train import cli
from dho_fast.train.config import RANGES, TrainConfig, field_types, load_config

ROOT = Path(__file__).resolve().parents[1]

# A valid run's settings; every case below changes a few of them. No file is read before a run starts.
BASE = dict(train_dir="data/train", labelled_fraction=0.1, teacher="logits", teacher_logits="teacher.pt")

# Every bad config: (changed settings, exception type, words the message must contain).
BAD_CONFIGS = [
    # Wrong types: the key, the expected type and the value.
    ({"lr": "0.1"}, TypeError, ["lr must be a number", "got '0.1' (str)"]),
    ({"lr": "1e-3"}, TypeError, ["lr must be a number", "1.0e-3"]),
    ({"lr": True}, TypeError, ["lr must be a number", "got True (bool)"]),
    ({"grad_clip": "none"}, TypeError, ["grad_clip must be a number or null", "'none'"]),
    ({"seed": 1.5}, TypeError, ["seed must be an integer", "got 1.5 (float)"]),
    ({"seed": 2.0}, TypeError, ["seed must be an integer", "got 2.0 (float)"]),
    ({"max_steps": True}, TypeError, ["max_steps must be an integer or null", "got True (bool)"]),
    ({"num_workers": "4"}, TypeError, ["num_workers must be an integer", "'4'"]),
    ({"resume": "false"}, TypeError, ["resume must be a boolean (true or false)", "got 'false' (str)"]),
    ({"hflip": "no"}, TypeError, ["hflip must be a boolean", "'no'"]),
    ({"progress": "false"}, TypeError, ["progress must be a boolean", "'false'"]),
    ({"tensorboard": 1}, TypeError, ["tensorboard must be a boolean", "got 1 (int)"]),
    ({"kd_cosine": "yes"}, TypeError, ["kd_cosine must be a boolean (true or false) or null", "'yes'"]),
    ({"crop_scale": [0.5]}, TypeError, ["crop_scale must be a list of 2 numbers", "got [0.5] (list)"]),
    ({"crop_scale": [0.2, 0.5, 1.0]}, TypeError, ["crop_scale must be a list of 2 numbers", "[0.2, 0.5, 1.0]"]),
    ({"crop_scale": 0.5}, TypeError, ["crop_scale must be a list of 2 numbers", "got 0.5 (float)"]),
    ({"crop_scale": ["0.5", "1"]}, TypeError, ["crop_scale must be a list of 2 numbers", "['0.5', '1']"]),
    ({"student_mean": "0.5"}, TypeError, ["student_mean must be a list of numbers or null", "'0.5'"]),
    ({"output_dir": 3}, TypeError, ["output_dir must be a string", "got 3 (int)"]),
    ({"train_dir": ["a", "b"]}, TypeError, ["train_dir must be a string or null", "['a', 'b']"]),
    # Choices: the key, the choices and the value.
    ({"method": "mixed"}, ValueError, ["method must be one of ('dho', 'kd', 'ce')", "got 'mixed'"]),
    ({"method": 1}, ValueError, ["method must be one of", "got 1"]),
    ({"precision": "fp8"}, ValueError, ["precision must be one of ('fp32', 'bf16', 'fp16')", "'fp8'"]),
    ({"interpolation": "lanczos"}, ValueError, ["interpolation must be one of ('bicubic'", "'lanczos'"]),
    ({"device": None}, ValueError, ["device must be one of ('auto', 'cpu', 'cuda')", "got None"]),
    # Ranges: the key, the range and the value; NaN and inf are in no range.
    ({"grad_clip": math.nan}, ValueError, ["grad_clip must be in (0, inf)", "got nan"]),
    ({"temperature": math.inf}, ValueError, ["temperature must be in (0, inf)", "got inf"]),
    ({"temperature": 0}, ValueError, ["temperature must be in (0, inf)", "got 0.0"]),
    ({"kd_logit_scale": math.inf}, ValueError, ["kd_logit_scale must be in (0, inf)", "got inf"]),
    ({"lr": -1e-3}, ValueError, ["lr must be in (0, inf)", "got -0.001"]),
    ({"labelled_fraction": 1.5}, ValueError, ["labelled_fraction must be in (0, 1]", "got 1.5"]),
    ({"labelled_fraction": 0}, ValueError, ["labelled_fraction must be in (0, 1]", "got 0.0"]),
    (
        {"labelled_fraction": None, "labelled_percent": 0},
        ValueError,
        ["labelled_percent must be in (0, 100]", "got 0.0"],
    ),
    ({"warmup_fraction": 1}, ValueError, ["warmup_fraction must be in [0, 1)", "got 1.0"]),
    ({"label_smoothing": -0.1}, ValueError, ["label_smoothing must be in [0, 1]", "got -0.1"]),
    ({"alpha": 1.5, "beta": 1}, ValueError, ["alpha must be in [0, 1]", "got 1.5"]),
    ({"crop_scale": [0.0, 1.0]}, ValueError, ["every value of crop_scale must be in (0, 1]", "(0.0, 1.0)"]),
    ({"crop_scale": [0.5, math.nan]}, ValueError, ["every value of crop_scale must be in (0, 1]", "nan"]),
    ({"student_mean": [0, 0, 0], "student_std": [1, 0, 1]}, ValueError, ["student_std must be in (0, inf)"]),
    ({"max_steps": 0}, ValueError, ["max_steps must be in [1, inf)", "got 0"]),
    ({"unlabelled_batch_size": -1}, ValueError, ["unlabelled_batch_size must be in [0, inf)", "got -1"]),
    ({"seed": -1}, ValueError, ["seed must be in [0, inf)", "got -1"]),
    # Rules between settings.
    ({"labelled_fraction": None}, ValueError, ["exactly one of labelled_percent, labelled_fraction, num_labelled"]),
    ({"labelled_percent": 1}, ValueError, ["exactly one of", "['labelled_percent', 'labelled_fraction']"]),
    ({"shots": 2}, ValueError, ["exactly one of", "['labelled_fraction', 'shots']"]),
    (
        {"labelled_indices": "round_00/labelled.json"},
        ValueError,
        [
            "exactly one of labelled_percent, labelled_fraction, num_labelled, shots, labelled_indices",
            "'labelled_indices']",
        ],
    ),
    ({"labelled_indices": [1, 2]}, TypeError, ["labelled_indices must be a string or null", "[1, 2]"]),
    ({"crop_scale": [0.9, 0.5]}, ValueError, ["crop_scale must be (lo, hi) with lo <= hi", "(0.9, 0.5)"]),
    ({"alpha": 0.5}, ValueError, ["alpha and beta must be given together"]),
    ({"student_mean": [0.5] * 3}, ValueError, ["student_mean and student_std must be given together"]),
    (
        {"image_mode": "L", "student_mean": [0.5] * 3, "student_std": [0.2] * 3},
        ValueError,
        ["student_mean must have 1 values for image_mode L"],
    ),
    ({"teacher_logits": None}, ValueError, ["teacher_logits", "required when teacher is 'logits'"]),
    ({"train_dir": None}, ValueError, ["train_dir is required"]),
    ({"train_dir": None, "dataset": "dtd"}, ValueError, ["data_root is required with dataset 'dtd'"]),
    (
        {"dataset": "dtd", "data_root": "data"},
        ValueError,
        ["dataset 'dtd' finds its files under data_root", "['train_dir']"],
    ),
    ({"data_root": "data"}, ValueError, ["data_root is read only with dataset"]),
    (
        {"dataset": "cifar10", "data_root": "data"},
        ValueError,
        ["dataset must be one of", "'caltech101'", "got 'cifar10'"],
    ),
    ({"epoch_length": "steps"}, ValueError, ["epoch_length must be one of ('unlabelled', 'labelled')", "'steps'"]),
    ({"test_weights": "best"}, ValueError, ["test_weights must be one of ('last', 'best_val')", "'best'"]),
    ({"teacher_text_embeddings": "mean"}, ValueError, ["teacher_text_embeddings must be one of", "'mean'"]),
    ({"epochs": None}, ValueError, ["max_steps must be set when epochs is None"]),
    ({"unlabelled_batch_size": 0}, ValueError, ["unlabelled_batch_size must be > 0 for method 'dho'"]),
    (
        {"log_gradient_conflict": True, "method": "ce"},
        ValueError,
        ["log_gradient_conflict needs a CE and a KD term", "not 'ce'"],
    ),
    # Keys.
    ({"learning_rate": 0.2}, ValueError, ["unknown config keys ['learning_rate']"]),
    ({"ce_weight": 0.5}, ValueError, ["ce_weight is now ce_loss_weight"]),
]


def from_yaml(tmp_path: Path, values: dict) -> TrainConfig:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return load_config(path)


@pytest.mark.parametrize("source", ["python", "yaml"])
@pytest.mark.parametrize(("changes", "error", "words"), BAD_CONFIGS, ids=[str(c[0]) for c in BAD_CONFIGS])
def test_bad_config_names_key_expectation_and_value(tmp_path, source, changes, error, words):
    values = {**BASE, **changes}
    with pytest.raises(error) as info:
        TrainConfig.from_dict(values) if source == "python" else from_yaml(tmp_path, values)
    assert (error is TypeError) == isinstance(info.value, TypeError)  # wrong types and bad values stay apart
    for word in words:
        assert word in str(info.value)


def fields_of(*kinds: type) -> list[str]:
    return [name for name, kind in field_types().items() if kind in kinds]


def test_every_number_setting_has_a_range():
    assert set(RANGES) == set(fields_of(int, float, tuple))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", fields_of(float, tuple))
def test_every_float_setting_refuses_nan_and_inf(name, value):
    bad = [value, 1.0] if field_types()[name] is tuple else value
    with pytest.raises(ValueError) as info:
        TrainConfig(**{**BASE, name: bad})
    assert f"{name} must be in {RANGES[name]}, got" in str(info.value)


@pytest.mark.parametrize("name", fields_of(int))
def test_every_int_setting_refuses_bools_fractions_and_strings(name):
    for bad in (True, 1.5, 2.0, "2"):
        with pytest.raises(TypeError, match=f"{name} must be an integer"):
            TrainConfig(**{**BASE, name: bad})


@pytest.mark.parametrize("name", fields_of(bool))
def test_every_bool_setting_takes_only_true_and_false(name):
    optional = TrainConfig.__dataclass_fields__[name].default is None
    for bad in ("false", "no", "true", 0, 1, *([] if optional else [None])):
        with pytest.raises(TypeError, match=f"{name} must be a boolean"):
            TrainConfig(**{**BASE, name: bad})
    for good in (True, False):
        assert getattr(TrainConfig(**{**BASE, name: good}), name) is good


@pytest.mark.parametrize("name", fields_of(str))
def test_every_string_setting_refuses_numbers(name):
    with pytest.raises((TypeError, ValueError), match=name):
        TrainConfig(**{**BASE, name: 3})


def test_valid_values_are_stored_in_their_field_type():
    config = TrainConfig(
        **BASE, lr=1, crop_scale=[1, 1], student_mean=[0, 0.5, 1], student_std=(1, 2, 3), alpha=0, beta=1
    )
    assert type(config.lr) is float and config.lr == 1.0
    assert config.crop_scale == (1.0, 1.0) and all(type(v) is float for v in config.crop_scale)
    assert config.student_mean == (0.0, 0.5, 1.0) and config.student_std == (1.0, 2.0, 3.0)
    assert type(config.alpha) is float and config.alpha == 0.0
    assert TrainConfig(**BASE, grad_clip=None).grad_clip is None
    # Closed ends are in their range; an int field keeps an int.
    edge = TrainConfig(**{**BASE, "labelled_fraction": 1}, warmup_fraction=0, label_smoothing=1, weight_decay=0, seed=0)
    assert edge.labelled_fraction == 1.0 and type(edge.seed) is int


def test_yaml_booleans_and_numbers_read_as_their_types(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train_dir: d\nlabelled_fraction: 1\nmethod: ce\nhflip: no\nresume: false\nlr: 1.0e-3\n")
    config = load_config(path)
    assert config.hflip is False and config.resume is False and config.lr == 1e-3
    assert type(config.labelled_fraction) is float
    path.write_text("train_dir: d\nlabelled_fraction: 1\ngrad_clip: .nan\n")
    with pytest.raises(ValueError, match=r"grad_clip must be in \(0, inf\), got nan"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="config file"):
        load_config(tmp_path / "missing.yaml")


# The active loop's configs (configs/active_*.yaml) hold train settings under train: (tests/test_active.py).
TRAIN_CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml") if not p.stem.startswith("active_"))


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_shipped_configs_round_trip(name):
    config = load_config(ROOT / "configs" / f"{name}.yaml")
    assert TrainConfig.from_dict(config.to_dict()) == config  # as a checkpoint stores and eval reloads it


def test_demo_settings_are_valid():
    spec = importlib.util.spec_from_file_location("run_demo", ROOT / "demo" / "run_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    TrainConfig(**{**demo.STUDENT_SETTINGS, **BASE, "max_steps": 10})


CLI_BASE = ["train", "--train-dir", "d", "--labelled-fraction", "1", "--method", "ce"]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--lr", "nan"], "lr must be in (0, inf), got nan"),
        (["--temperature", "inf"], "temperature must be in (0, inf), got inf"),
        (["--grad-clip", "-1"], "grad_clip must be in (0, inf), got -1.0"),
        (["--crop-scale", "0.5"], "crop_scale must be a list of 2 numbers, got [0.5]"),
        (["--precision", "fp8"], "precision must be one of ('fp32', 'bf16', 'fp16'), got 'fp8'"),
    ],
)
def test_cli_bad_setting_exits_2_naming_it(capsys, flags, words):
    assert cli.main([*CLI_BASE, *flags]) == 2
    assert f"dho-fast: error: {words}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--resume", "false"], "unrecognized arguments: false"),
        (["--hflip", "no"], "unrecognized arguments: no"),
        (["--progress=false"], "ignored explicit argument 'false'"),
    ],
)
def test_cli_boolean_flags_take_no_value(capsys, flags, words):
    """Booleans are switches (--hflip / --no-hflip): a value after one is refused, never read as true."""
    with pytest.raises(SystemExit) as info:
        cli.main([*CLI_BASE, *flags])
    assert info.value.code == 2 and words in capsys.readouterr().err


def test_cli_flags_give_typed_settings():
    args = cli._parser().parse_args([*CLI_BASE, "--no-hflip", "--resume", "--seed", "3", "--grad-clip", "none"])
    config = load_config(None, cli._settings(args))
    assert config.hflip is False and config.resume is True and config.seed == 3 and config.grad_clip is None
    hints = typing.get_type_hints(TrainConfig)
    assert all(isinstance(getattr(config, k), (type(None), field_types()[k])) for k in hints)
