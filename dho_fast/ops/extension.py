"""Loads the compiled extension ``dho_fast._C``, whose import registers the C++ ops (csrc/dho_fast.cpp)."""

import torch

try:
    from dho_fast import _C  # noqa: F401  (importing registers the ops)

    EXTENSION_ERROR: Exception | None = None
except ImportError as error:  # a source checkout that was never built
    EXTENSION_ERROR = error


def has_extension() -> bool:
    """Whether the compiled extension loaded."""
    return EXTENSION_ERROR is None


def has_cuda_kernels() -> bool:
    """Whether the extension was built with its CUDA kernels."""
    return has_extension() and torch._C._dispatch_has_kernel_for_dispatch_key("dho_fast::dual_head_loss", "CUDA")


def cpu_kernel_isa() -> str | None:
    """The instruction set of the CPU kernels that run here: "avx512", "avx2" or "default" (``ATEN_CPU_CAPABILITY``
    lowers it, as it does ATen's); None when the extension is not built."""
    return torch.ops.dho_fast.cpu_kernel_isa() if has_extension() else None
