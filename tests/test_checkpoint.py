"""Checkpoints are verified when read: a corrupt, truncated, empty or foreign file is refused by ``checkpoint.load``,
``dho-fast eval`` and ``--resume``, naming the file; a killed write's temporary file is removed by the next run; a
resumed run refuses a teacher-logits file that changed."""

import pickle
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_fixtures import count_train_images, digits_trees, random_teacher_logits, run_settings

from dho_fast.train import checkpoint, cli
from dho_fast.train.config import TrainConfig
from dho_fast.train.eval_checkpoint import evaluate_checkpoint
from dho_fast.train.students import build_student
from dho_fast.train.trainer import train

REFUSED = "is corrupt or not a dho_fast checkpoint"
LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # a zip local file header, before its file name and extra field


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """Settings and files of a real tiny run with a precomputed teacher, and the bytes of its files as it ended."""
    root = tmp_path_factory.mktemp("run")
    trees = digits_trees(root / "digits")
    logits = random_teacher_logits(root / "logits.pt", count_train_images(trees), 4)
    settings = run_settings(trees, root / "out", teacher="logits", teacher_logits=logits, max_steps=2)
    result = train(TrainConfig(**settings))
    return settings, result.checkpoint, result.checkpoint.read_bytes(), Path(logits).read_bytes()


@pytest.fixture
def run(finished_run):
    """The finished run with its checkpoint and teacher file as written: each test may damage them."""
    settings, path, saved, logits = finished_run
    path.write_bytes(saved)
    Path(settings["teacher_logits"]).write_bytes(logits)
    for leftover in path.parent.glob(".last.pt.tmp*"):
        leftover.unlink()
    return settings, path


def record_offset(path, tensor: torch.Tensor) -> int:
    """Byte offset in the zip archive ``path`` of the record holding ``tensor``'s storage (found by its bytes, in
    storage order: a channels-last weight is saved as laid out)."""
    data = bytes(tensor.untyped_storage().tolist())
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if archive.read(info) == data:
                with open(path, "rb") as f:
                    f.seek(info.header_offset)
                    fields = LOCAL_HEADER.unpack(f.read(LOCAL_HEADER.size))
                return info.header_offset + LOCAL_HEADER.size + fields[-2] + fields[-1]
    raise AssertionError("no record holds the tensor")


def flip_weight_byte(path) -> str:
    """Flips one exponent bit of the first element of the student's largest weight in the file; returns its name."""
    model = torch.load(path, weights_only=True)["model"]
    name = max(model, key=lambda k: model[k].numel())
    offset = record_offset(path, model[name]) + 3  # float32, little-endian: byte 3 holds the sign and exponent
    content = bytearray(path.read_bytes())
    content[offset] ^= 0x40
    path.write_bytes(content)
    return name


def test_flipped_weight_byte_loads_with_torch_but_is_refused(run, capsys):
    settings, path = run
    before = torch.load(path, weights_only=True)["model"]
    name = flip_weight_byte(path)
    after = torch.load(path, weights_only=True)["model"]  # torch.load alone accepts the damaged file
    changed = (after[name] != before[name]).flatten()
    assert changed.nonzero().flatten().tolist() == [0]
    assert all(torch.equal(after[k], before[k]) for k in before if k != name)
    with pytest.raises(ValueError, match=f"checkpoint {path} {REFUSED}: its record .* fails its CRC-32"):
        checkpoint.load(path)
    with pytest.raises(ValueError, match=f"checkpoint {path} {REFUSED}"):
        evaluate_checkpoint(path)
    assert cli.main(["eval", str(path)]) == 2
    assert f"checkpoint {path} {REFUSED}" in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"checkpoint {path} {REFUSED}"):
        train(TrainConfig(**settings, resume=True))


def test_zip_header_damage_the_crcs_miss_is_caught_by_the_content_hash(tmp_path):
    """Setting the DOS directory bit of a tensor record's external attributes: every CRC still matches, and torch's
    zip reader then fills the tensor with whatever memory held."""
    path = tmp_path / "last.pt"
    weight = torch.randn(64)
    checkpoint.save_atomic({"model": {"w": weight}}, path)
    content = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        names = [info.filename for info in archive.infolist()]
    entry = content.index(b"PK\x01\x02")  # the central directory, one 46-byte header + name per record
    for name in names:
        if name.endswith("/data/0"):
            content[entry + 38] |= 0x10  # external attributes, low byte: the DOS directory bit
        entry += 46 + len(name)
    path.write_bytes(content)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None  # the CRCs do not cover the central directory
    assert not torch.equal(torch.load(path, weights_only=True)["model"]["w"], weight)
    with pytest.raises(ValueError, match=f"checkpoint {path} {REFUSED}: its contents do not match the SHA-256"):
        checkpoint.load(path)


def test_every_single_byte_flip_is_refused_or_harmless(tmp_path):
    """A small checkpoint with each of its bytes flipped in turn: load refuses it or returns the state as saved."""
    path = tmp_path / "last.pt"
    state = {"model": {"w": torch.randn(6), "n": torch.arange(3)}, "step": 7, "config": {"lr": 0.1, "name": "x"}}
    checkpoint.save_atomic(state, path)
    saved = path.read_bytes()
    refused = 0
    for i in range(len(saved)):
        content = bytearray(saved)
        content[i] ^= 0xFF
        path.write_bytes(content)
        try:
            loaded = checkpoint.load(path)
        except ValueError as error:
            assert str(error).startswith(f"checkpoint {path} {REFUSED}: "), (i, str(error))
            assert "weights_only=False" not in str(error)
            refused += 1
            continue
        assert loaded["step"] == 7 and loaded["config"] == state["config"], i
        assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items()), i
    assert refused > len(saved) // 2  # headers' padding and timestamps are the harmless rest


def _foreign_pickle(path):
    with open(path, "wb") as f:
        pickle.dump({"model": np.zeros(3)}, f)


def _old_checkpoint(path):
    state = checkpoint.load(path)
    for key in ("format", "version"):
        del state[key]
    torch.save({**state, "version": 1}, path)


BAD_FILES = {
    "truncated to half": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "not a readable zip"),
    "last byte cut": (lambda p: p.write_bytes(p.read_bytes()[:-1]), "not a readable zip"),
    "empty": (lambda p: p.write_bytes(b""), "the file is empty"),
    "text": (lambda p: p.write_text("lr: 0.1\n"), "not a readable zip"),
    "torch.save dict": (lambda p: torch.save({"model": {"w": torch.ones(2)}}, p), "lacks the stamp"),
    "torch.save tensor": (lambda p: torch.save(torch.ones(2), p), "lacks the stamp"),
    "legacy torch.save": (lambda p: torch.save({}, p, _use_new_zipfile_serialization=False), "not a readable zip"),
    "numpy in the pickle": (lambda p: torch.save({"a": np.zeros(3)}, p), "objects other than tensors"),
    "plain pickle": (_foreign_pickle, "not a readable zip"),
    "version 1": (_old_checkpoint, "before version 2"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_file_is_refused_naming_it(run, case):
    _, path = run
    damage, words = BAD_FILES[case]
    damage(path)
    with pytest.raises(ValueError) as info:
        checkpoint.load(path)
    message = str(info.value)
    assert type(info.value) is ValueError and message.startswith(f"checkpoint {path} {REFUSED}: ")
    assert words in message and "weights_only=False" not in message


@pytest.mark.parametrize("case", ["truncated to half", "empty", "torch.save dict", "version 1"])
def test_eval_and_resume_refuse_a_bad_file(run, case):
    settings, path = run
    BAD_FILES[case][0](path)
    for refused in (lambda: evaluate_checkpoint(path), lambda: train(TrainConfig(**settings, resume=True))):
        with pytest.raises(ValueError, match=f"checkpoint {path} {REFUSED}"):
            refused()


def test_resume_refuses_changed_teacher_logits(run):
    settings, path = run
    logits = torch.load(settings["teacher_logits"], weights_only=True)
    logits[5, 2] += 1.0
    torch.save(logits, settings["teacher_logits"])
    with pytest.raises(ValueError, match=f"cannot resume: teacher_logits {settings['teacher_logits']} changed since"):
        train(TrainConfig(**settings, resume=True))


@pytest.mark.slow  # a writer subprocess killed with SIGKILL mid-write
def test_killed_write_leaves_a_temp_file_the_next_run_removes(run):
    settings, path = run
    # A real checkpoint of the run with 256 MiB of padding, written over and over: the kill lands inside a write.
    writer = (
        "import sys, torch\n"
        "from dho_fast.train import checkpoint\n"
        "state = {**checkpoint.load(sys.argv[1]), 'padding': torch.zeros(2**26)}\n"
        "while True:\n"
        "    checkpoint.save_atomic(state, sys.argv[1])\n"
    )
    process = subprocess.Popen([sys.executable, "-c", writer, str(path)], stderr=subprocess.PIPE)
    temp = path.with_name(f".last.pt.tmp{process.pid}")
    deadline = time.monotonic() + 120
    while not temp.is_file():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the writer wrote nothing in time"
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert temp.is_file()
    assert checkpoint.load(path)["step"] == 2  # never a torn file: the run's checkpoint or one complete rewrite
    others = [path.with_name(n) for n in (".last.pt.tmpx", "last.pt.tmp1", ".other.pt.tmp1")]
    for other in others:
        other.write_bytes(b"not ours")
    train(TrainConfig(**settings, resume=True))
    assert not temp.exists() and all(other.is_file() for other in others)
    for other in others:
        other.unlink()


def _unreadable_user_files(tmp_path) -> dict:
    good = tmp_path / "good.pt"
    torch.save({"weight": torch.randn(64, 64)}, good)
    return {
        "empty": b"",
        "text": b"not a torch file",
        "truncated": good.read_bytes()[: good.stat().st_size // 2],
        "pickled object": pickle.dumps(Path("an object, not a tensor")),
    }


@pytest.mark.parametrize("case", ["empty", "text", "truncated", "pickled object"])
def test_unreadable_student_weights_are_refused_naming_the_file(tmp_path, case):
    # The user's own files (student_pretrained, tip_adapter_checkpoint) go through checkpoint.load_file.
    path = tmp_path / "weights.pt"
    path.write_bytes(_unreadable_user_files(tmp_path)[case])
    with pytest.raises(ValueError, match=f"student_pretrained {path} cannot be read") as info:
        build_student("cnn", 4, "dho", pretrained=str(path), in_channels=1, cnn_width=4)
    assert "weights_only=False" not in str(info.value)
    with pytest.raises(FileNotFoundError, match=f"student_pretrained {tmp_path / 'missing.pt'} does not exist"):
        build_student("cnn", 4, "dho", pretrained=str(tmp_path / "missing.pt"), in_channels=1, cnn_width=4)
