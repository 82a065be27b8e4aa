"""Checkpoints written atomically and verified when read, and the random-number state a resumed run needs to
continue exactly.

A checkpoint is a ``torch.save`` zip archive of a dict stamped ``"format": FORMAT, "version": VERSION`` and
``"sha256"``: a SHA-256 of the state's contents (every tensor's dtype, shape and bytes, every plain value, in order;
:func:`content_sha256`). :func:`load` checks two things, since ``torch.load`` checks neither:

- the CRC-32 that ``torch.save`` stores for every record of the archive (each tensor's storage and the pickle), so a
  damaged archive is refused before torch parses it;
- the SHA-256 of what was loaded against the stored one. The CRCs alone do not suffice: they do not cover the zip
  headers, which torch's zip reader interprets (one flipped bit in a record's external attributes marks it a
  directory, and torch then fills the tensor with uninitialised memory, CRCs intact). Hashing the loaded contents
  rather than the file's bytes verifies exactly what the caller gets, whatever the container, at the cost of one
  pass over the tensors (about 1 GB/s), with no second copy in memory.

Corruption, not tampering, is the threat: whoever can rewrite the file can rewrite the hash. Files without the stamp
are refused, including checkpoints of version 1 (dho_fast before these checks): they cannot be told from a foreign
``torch.save`` dict, and no released version wrote them.

Files the user names (pretrained weights, a Tip-Adapter checkpoint, teacher logits) are read by :func:`load_file`,
which refuses an unreadable one naming it.
"""

import hashlib
import os
import pickle
import random
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.utils.serialization.config

FORMAT = "dho_fast checkpoint"
VERSION = 2


def _update(digest: "hashlib._Hash", value: object) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        digest.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)};".encode())
        for key, item in value.items():
            _update(digest, key)
            _update(digest, item)
    elif isinstance(value, list | tuple):
        digest.update(f"{type(value).__name__} {len(value)};".encode())
        for item in value:
            _update(digest, item)
    elif value is None or isinstance(value, bool | int | float | str | bytes):
        digest.update(f"{type(value).__name__} {value!r};".encode())
    else:
        raise TypeError(f"a checkpoint holds tensors and plain Python values, got a {type(value).__name__}")


def content_sha256(state: dict) -> str:
    """Hex SHA-256 of ``state``'s contents: each tensor's dtype, shape and bytes (on the CPU, contiguous), each
    ``None``/bool/int/float/str/bytes by type and ``repr``, dicts (keys in order), lists and tuples by length then
    items. It is the same for ``state`` and for ``torch.load(torch.save(state))``."""
    digest = hashlib.sha256()
    _update(digest, state)
    return digest.hexdigest()


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def save_atomic(state: dict, path: str | Path) -> None:
    """Writes ``state`` stamped with ``FORMAT``, ``VERSION`` and its :func:`content_sha256` (as ``"sha256"``) with
    ``torch.save`` (a CRC-32 per record, even where ``torch.serialization.set_crc32_options(False)`` turned them off)
    to a temporary file beside ``path``, flushes it to disk, then renames it over ``path``: a reader (or a run killed
    mid-write) sees the old checkpoint or the new one, never a torn file. A killed write leaves its temporary file
    behind; :func:`remove_stale_temp_files` removes it."""
    stamped = {**state, "format": FORMAT, "version": VERSION}
    stamped["sha256"] = content_sha256(stamped)

    def write(f: BinaryIO) -> None:
        with torch.utils.serialization.config.patch({"save.compute_crc32": True}):
            torch.save(stamped, f)

    _write_atomic(path, write)


def write_text_atomic(text: str, path: str | Path) -> None:
    """Writes ``text`` (UTF-8) to ``path`` as :func:`save_atomic` writes a checkpoint: a reader sees the old file or
    the new one, never a torn one (a log rewritten every round, a round's labelled set)."""
    _write_atomic(path, lambda f: f.write(text.encode()))


def _write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """``write(file)`` into a temporary file beside ``path``, flushed to disk, then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temp_files(path: str | Path) -> list[Path]:
    """Removes the temporary files ``.<name>.tmp<pid>`` that :func:`save_atomic` of a killed process left beside
    ``path``, and returns them. Only the one process that writes ``path`` may call it (at start-up): a temporary file
    of a write in progress looks the same."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    name = re.compile(rf"\.{re.escape(path.name)}\.tmp\d+")
    stale = [p for p in path.parent.iterdir() if name.fullmatch(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _corrupt(path: Path, why: str) -> ValueError:
    return ValueError(f"checkpoint {path} is corrupt or not a dho_fast checkpoint: {why}")


def _check_records(path: Path) -> None:
    """Reads every record of the zip archive at ``path`` and compares it with its CRC-32."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    # zipfile reports a damaged header with several exception types (BadZipFile, EOFError, NotImplementedError for
    # a flipped compression method, ...): any of them means the archive cannot be read as written.
    except Exception as error:
        raise _corrupt(path, f"not a readable zip archive as torch.save writes ({error})") from None
    if bad is not None:
        raise _corrupt(path, f"its record {bad!r} fails its CRC-32 check (the file changed after it was written)")


def load(path: str | Path) -> dict:
    """A checkpoint written by :func:`save_atomic`, on the CPU, loaded with ``weights_only=True`` after every record
    of the archive passed its CRC-32 check, and returned once its contents match their stored SHA-256.

    Raises FileNotFoundError when ``path`` is missing, ValueError naming ``path`` when the file is empty, truncated,
    corrupt, or not a dho_fast checkpoint of this version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise _corrupt(path, "the file is empty")
    _check_records(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # PyTorch's message advises weights_only=False, which would run whatever code the file holds.
        raise _corrupt(path, "it holds objects other than tensors and plain Python values") from None
    # Past the CRC check, whatever else torch.load raises comes from the zip headers the CRCs do not cover.
    except Exception as error:
        raise _corrupt(path, f"torch.load cannot read it ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise _corrupt(
            path,
            f"it lacks the stamp 'format': {FORMAT!r} (a torch.save file of something else, or a checkpoint of "
            "dho_fast before version 2, which cannot be verified: start a new run)",
        )
    if state.get("version") != VERSION:
        raise _corrupt(path, f"its version is {state.get('version')!r}, this dho_fast reads version {VERSION}")
    stored = state.pop("sha256", None)
    if stored != content_sha256(state):
        raise _corrupt(
            path, "its contents do not match the SHA-256 stored with them (the file changed after it was written)"
        )
    return state


def load_file(file: str | Path | BinaryIO, name: str) -> object:
    """``torch.load(file, weights_only=True)`` on the CPU of a file the user names; ``name`` (the setting and the
    path, e.g. "student_pretrained /weights.pt") starts every error. A missing path is FileNotFoundError; a damaged
    file, or one holding objects other than tensors and plain Python values, ValueError, never PyTorch's advice to
    retry with ``weights_only=False`` (which would run whatever code the file holds)."""
    if isinstance(file, (str, Path)) and not Path(file).is_file():
        raise FileNotFoundError(f"{name} does not exist")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{name} cannot be read by torch.load with weights_only=True: it is damaged, or holds objects other than "
            "tensors and plain Python values"
        ) from None
    except Exception as error:  # torch reports a damaged file with many exception types
        raise ValueError(f"{name} cannot be read: {type(error).__name__}: {error}") from None


def rng_state() -> dict:
    """The state of Python's, NumPy's, torch's CPU and (when present) CUDA generators, in types that
    ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
