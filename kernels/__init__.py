"""Triton kernels of dho_fast's ops (installed as ``dho_fast.kernels``): ``@triton.jit`` code and its launchers.

A leaf: it imports only torch, triton and itself. dho_fast.ops.registry registers the launchers as torch ops with
``torch.library.triton_op``, so torch.compile can see into them, and raises the errors they flag. Everything here is
optional: without Triton (or with a torch older than ``torch.library.triton_op``) the ops run
on the other backends and importing this package still works. The kernels run on CUDA tensors, and on CPU
tensors under the Triton interpreter (``TRITON_INTERPRET=1``, set before ``triton`` is imported), which is how
they are tested on machines without a GPU.
"""

import importlib.util
import os

import torch

# Decided once, at import: a plain constant is also what torch.compile traces best.
_HAS_TRITON = importlib.util.find_spec("triton") is not None and hasattr(torch.library, "triton_op")


def has_triton() -> bool:
    """Whether the Triton kernels can be loaded: Triton is installed and torch has ``triton_op``."""
    return _HAS_TRITON


def interpreted() -> bool:
    """Whether Triton runs kernels on the CPU through its interpreter (then they take CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def supports_device(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``."""
    return has_triton() and (device.type == "cuda" or (device.type == "cpu" and interpreted()))
