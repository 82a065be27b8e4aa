"""Keys torch.compile's on-disk caches on this installation of dho_fast.

AOTAutograd and Inductor cache a compiled graph under a hash of the graph, in which an op is only its name. The
backward they compile for a dho_fast op comes from this package's kernels and autograd formulas, so after an upgrade
or a rebuild that changes them a warm cache would serve the old backward: silently wrong gradients. Every entry of
Inductor's ``unsafe_marked_cacheable_functions`` is part of both caches' keys, so one entry naming this
installation's files makes a cache written by any other installation a miss.
"""

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import torch._inductor.config

from dho_fast import kernels

CACHE_KEY_ENTRY = "torch.ops.dho_fast"


def installation_files() -> list[Path]:
    """The files that define the ops' behaviour: the compiled extension, dho_fast.ops and dho_fast.kernels."""
    package = Path(__file__).parent.parent
    files = [p for p in package.iterdir() if p.suffix in (".so", ".pyd")]
    for root in (Path(__file__).parent, Path(kernels.__file__).parent):
        files += [p for p in root.iterdir() if p.suffix == ".py"]
    return sorted(files)


def installation_identity(files: Iterable[Path]) -> str:
    """A hash of the files' names, sizes and modification times: it changes whenever one is rebuilt or replaced."""
    digest = hashlib.sha256()
    for path in files:
        stat = os.stat(path)
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def key_compile_caches() -> None:
    """Adds this installation's identity to torch.compile's cache keys (see the module docstring)."""
    config = torch._inductor.config
    identity = installation_identity(installation_files())
    config.unsafe_marked_cacheable_functions = {**config.unsafe_marked_cacheable_functions, CACHE_KEY_ENTRY: identity}
