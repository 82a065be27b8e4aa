"""Teachers: a real (tiny, random-weight) open_clip model end to end, Tip-Adapter-F, precomputed logits."""

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from trainer_fixtures import count_train_images, digits_trees, register_tiny_clip, run_settings, tiny_clip_config

from dho_fast.train import cli
from dho_fast.train.build import build_teacher
from dho_fast.train.config import InputTypeError, TrainConfig
from dho_fast.train.teacher import (
    DHO_IMAGENET_TEMPLATES,
    ClipTeacher,
    LogitsTeacher,
    TipAdapterHead,
    ZeroShotHead,
    class_text_embeddings,
    create_open_clip,
    prompt_templates,
)
from dho_fast.train.trainer import train

CLASSES = ["cat", "dog", "ship"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    name = register_tiny_clip(tmp_path_factory.mktemp("clip"))
    torch.manual_seed(0)
    return name, *create_open_clip(name, None)


def test_prompt_sets():
    assert prompt_templates("dho_imagenet") == list(DHO_IMAGENET_TEMPLATES) and len(DHO_IMAGENET_TEMPLATES) == 7
    assert len(prompt_templates("openai_imagenet")) == 80
    assert prompt_templates("a photo of a {}, a type of pet.") == ["a photo of a {}, a type of pet."]
    with pytest.raises(ValueError, match="templates must be"):
        prompt_templates("a photo")


def test_text_embeddings_are_normalised_prompt_ensembles(tiny_clip):
    _, model, tokenizer, _ = tiny_clip
    templates = prompt_templates("dho_imagenet")
    emb = class_text_embeddings(model, tokenizer, CLASSES, templates, classes_per_batch=2)
    assert emb.shape == (3, 16) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    with torch.no_grad():
        prompts = F.normalize(model.encode_text(tokenizer([t.format("dog") for t in templates])), dim=-1)
    torch.testing.assert_close(emb[1], F.normalize(prompts.mean(0), dim=0))


def test_zero_shot_teacher_logits_and_no_grad(tiny_clip):
    _, model, tokenizer, preprocess = tiny_clip
    text = class_text_embeddings(model, tokenizer, CLASSES, ["a photo of a {}."])
    teacher = ClipTeacher(model, ZeroShotHead(text), preprocess)
    assert teacher.input_size == 16 and len(teacher.mean) == 3
    images = torch.randn(5, 3, 16, 16, requires_grad=True)
    teacher.train()  # a teacher stays in eval mode
    logits = teacher(images, None)
    assert not teacher.training and logits.shape == (5, 3) and logits.dtype == torch.float32
    assert not logits.requires_grad and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        expected = 100 * F.normalize(model.encode_image(images), dim=-1) @ text.T
    torch.testing.assert_close(logits, expected)
    with pytest.raises(ValueError, match="images must be given"):
        teacher(None, torch.arange(5))


def test_pretrained_from_local_checkpoint_file(tiny_clip, tmp_path):
    name, model, _, _ = tiny_clip
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(123)  # a different random init: the file must overwrite it
    loaded, _, _ = create_open_clip(name, str(path))
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images))


def test_build_open_clip_teacher_from_config(tmp_path):
    torch.manual_seed(0)
    name = register_tiny_clip(tmp_path)
    weights = tmp_path / "weights.pt"
    torch.save(create_open_clip(name, None)[0].state_dict(), weights)
    config = TrainConfig(
        train_dir=str(tmp_path),
        labelled_fraction=0.1,
        teacher_arch=name,
        teacher_pretrained=str(weights),
        open_clip_config=tiny_clip_config(tmp_path),
        teacher_templates="dho_imagenet",
    )
    teacher = build_teacher(config, CLASSES, [], torch.device("cpu"))
    assert isinstance(teacher, ClipTeacher) and teacher.needs_images
    assert teacher(torch.randn(4, 3, 16, 16), None).shape == (4, 3)


def tip_checkpoint(d: int = 16, shots: int = 2, classes: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(shots * classes, d, generator=g), dim=1)
    return {
        "adapter_weight": keys + 0.01 * torch.randn(keys.shape, generator=g),
        "cache_keys": keys.T,
        "cache_values": F.one_hot(torch.arange(classes).repeat_interleave(shots), classes).half(),
        "clip_weights": F.normalize(torch.randn(d, classes, generator=g), dim=0),
        "best_alpha": 1.5,
        "best_beta": 5.0,
    }


def test_tip_adapter_logits():
    ckpt = tip_checkpoint()
    head = TipAdapterHead(ckpt)
    f = F.normalize(torch.randn(4, 16), dim=1)
    # Per class: the zero-shot logit plus alpha times the summed affinities of that class's cache entries.
    affinity = torch.exp(-5.0 * (1 - f @ ckpt["adapter_weight"].T)).view(4, 3, 2).sum(-1)
    torch.testing.assert_close(head(f), 100 * f @ ckpt["clip_weights"] + 1.5 * affinity)
    with pytest.raises(ValueError, match="lacks the keys \\['best_beta'\\]"):
        TipAdapterHead({k: v for k, v in ckpt.items() if k != "best_beta"})
    with pytest.raises(ValueError, match="cache_values must be"):
        TipAdapterHead({**ckpt, "cache_values": ckpt["cache_values"][:, :2]})


def test_tip_adapter_teacher_on_open_clip(tiny_clip):
    _, model, _, preprocess = tiny_clip
    teacher = ClipTeacher(model, TipAdapterHead(tip_checkpoint()), preprocess)
    assert teacher(torch.randn(3, 3, 16, 16), None).shape == (3, 3)


@pytest.mark.parametrize("suffix", [".pt", ".npy"])
def test_logits_teacher(tmp_path, suffix):
    logits = torch.randn(6, 3)
    path = tmp_path / f"logits{suffix}"
    if suffix == ".npy":
        np.save(path, logits.numpy())
    else:
        torch.save({"logits": logits}, path)
    teacher = LogitsTeacher.from_file(path, 6, 3)
    assert not teacher.needs_images
    torch.testing.assert_close(teacher(None, torch.tensor([4, 0])), logits[[4, 0]])
    with pytest.raises(ValueError, match="one row per train image"):
        LogitsTeacher.from_file(path, 7, 3)
    with pytest.raises(FileNotFoundError, match="teacher_logits"):
        LogitsTeacher.from_file(tmp_path / "missing.pt", 6, 3)


def _logits_with(row: int, column: int, value: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    logits = torch.randn(6, 3, dtype=dtype)
    logits[row, column] = value
    return logits


def _write_npy(path, array) -> None:
    with open(path, "wb") as f:  # np.save would append ".npy" to a name without it
        np.save(f, array)


def _truncated(path) -> None:
    torch.save(torch.randn(6, 3), path)
    path.write_bytes(path.read_bytes()[:-40])


#: name -> (writes the bad file at path, exception type, words of the message besides the file's name)
BAD_LOGITS_FILES = {
    "nan": (lambda p: torch.save(_logits_with(4, 1, float("nan")), p), ValueError, "row 4 column 1 is nan"),
    "+inf": (lambda p: torch.save(_logits_with(2, 0, float("inf")), p), ValueError, "row 2 column 0 is inf"),
    "row all -inf": (
        lambda p: torch.save(torch.randn(6, 3).index_fill_(0, torch.tensor([3]), float("-inf")), p),
        ValueError,
        "row 3 is -inf in every column",
    ),
    "float64 overflowing float32": (
        lambda p: torch.save(_logits_with(5, 2, 1e300, torch.float64), p),
        ValueError,
        "row 5 column 2 is inf",
    ),
    "npy nan": (lambda p: _write_npy(p, _logits_with(1, 2, float("nan")).numpy()), ValueError, "row 1 column 2"),
    "rows": (lambda p: torch.save(torch.randn(7, 3), p), ValueError, "one column per class (6, 3), got (7, 3)"),
    "columns": (lambda p: torch.save(torch.randn(6, 4), p), ValueError, "one column per class (6, 3), got (6, 4)"),
    "1-d": (lambda p: torch.save(torch.randn(18), p), ValueError, "must be a float tensor (N, C), got shape (18,)"),
    "int64": (lambda p: torch.save(torch.ones(6, 3, dtype=torch.int64), p), InputTypeError, "got a torch.int64 tensor"),
    "npy int32": (lambda p: _write_npy(p, np.ones((6, 3), np.int32)), InputTypeError, "got a numpy int32 array"),
    "dict without logits": (
        lambda p: torch.save({"scores": torch.randn(6, 3)}, p),
        InputTypeError,
        "a dict with 'logits', got a dict of ['scores']",
    ),
    "list": (lambda p: torch.save([torch.randn(6, 3)], p), InputTypeError, "got a list"),
    "empty": (lambda p: p.write_bytes(b""), ValueError, "cannot be read"),
    "text": (lambda p: p.write_text("0.1, 0.2\n"), ValueError, "cannot be read"),
    "truncated": (_truncated, ValueError, "cannot be read"),
    "numpy in the pickle": (lambda p: torch.save({"logits": np.zeros((6, 3))}, p), ValueError, "objects other than"),
    "npy of objects": (lambda p: _write_npy(p, np.array([{}] * 18).reshape(6, 3)), ValueError, "cannot be read"),
}


@pytest.mark.parametrize("case", BAD_LOGITS_FILES)
def test_bad_logits_file_is_refused_naming_it(tmp_path, case):
    write, error, words = BAD_LOGITS_FILES[case]
    path = tmp_path / ("logits.npy" if case.startswith("npy") else "logits.pt")
    write(path)
    with pytest.raises(error) as info:
        LogitsTeacher.from_file(path, 6, 3)
    assert type(info.value) is error
    assert str(info.value).startswith(f"teacher_logits {path} ") and words in str(info.value)
    assert "weights_only=False" not in str(info.value)


def test_logits_file_row_is_the_file_row_and_masks_are_kept(tmp_path):
    """A NaN past the first block of rows the check reads at a time is reported at its row of the file."""
    logits = torch.randn(70_000, 2)
    logits[:, 1] = float("-inf")  # every row masks one class: allowed
    path = tmp_path / "logits.pt"
    torch.save(logits, path)
    torch.testing.assert_close(LogitsTeacher.from_file(path, 70_000, 2).logits, logits)
    logits[69_001, 0] = float("nan")
    logits[69_002, 0] = float("inf")
    torch.save(logits, path)
    with pytest.raises(ValueError, match="row 69001 column 0 is nan"):
        LogitsTeacher.from_file(path, 70_000, 2)


def test_logits_file_hash_is_of_its_bytes(tmp_path):
    path = tmp_path / "logits.pt"
    torch.save(torch.randn(6, 3), path)
    assert LogitsTeacher.from_file(path, 6, 3).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_trainer_refuses_a_bad_logits_file_before_any_step(tmp_path):
    trees = digits_trees(tmp_path / "digits")
    logits = torch.randn(count_train_images(trees), 4)
    logits[7, 3] = float("nan")
    path = tmp_path / "logits.pt"
    torch.save(logits, path)
    settings = run_settings(trees, tmp_path / "out", teacher="logits", teacher_logits=str(path))
    with pytest.raises(ValueError, match=f"teacher_logits {path} row 7 column 3 is nan"):
        train(TrainConfig(**settings))
    assert not (tmp_path / "out" / "last.pt").exists()


def test_cli_reports_a_logits_file_of_the_wrong_type_without_a_traceback(tmp_path, capsys):
    trees = digits_trees(tmp_path / "digits")
    path = tmp_path / "logits.pt"
    torch.save(torch.ones(count_train_images(trees), 4, dtype=torch.int64), path)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_settings(trees, tmp_path / "out", teacher="logits", teacher_logits=str(path))))
    assert cli.main(["train", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert f"teacher_logits {path} must be a float tensor" in error and "Traceback" not in error
