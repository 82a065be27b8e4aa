"""The shapes, dtypes and modes of the benchmark suite, and the fused backends a device runs natively."""

import torch

from dho_fast import kernels
from dho_fast.ops import extension

#: (N, C): the fine-grained case (a few-shot dataset's batch over 200 classes, e.g. CUB), ImageNet-1k batches of
#: 512 and 4096 rows, and an ImageNet-21k batch.
SHAPES = ((128, 200), (512, 1000), (4096, 1000), (512, 21843))
#: The loss's shapes: SHAPES and an ImageNet-21k batch of 4096 rows, so that the row pass's bytes per second are
#: measured at both batch sizes of both class counts (1.8 GB moved per float32 forward+backward). The other ops skip
#: it: the fused linear op's GEMMs there would take minutes per round on a 2-core CPU.
LOSS_SHAPES = (*SHAPES, (4096, 21843))
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}
MODES = ("forward", "forward+backward")


def shape_id(shape: tuple[int, ...]) -> str:
    return "-".join(f"{axis}{size}" for axis, size in zip("NC", shape, strict=False))


def fused_backends(device: torch.device) -> list[str]:
    """dho_fast's compiled backends for ``device``: "cpu" on a CPU, "cuda" and "triton" on a GPU (Triton under the
    CPU interpreter is a test harness, not a speed)."""
    if device.type == "cuda":
        return [b for b, ok in (("cuda", extension.has_cuda_kernels()), ("triton", kernels.has_triton())) if ok]
    return ["cpu"] if extension.has_extension() else []


def rounds_for(elements: int) -> int:
    """Rounds of a case whose inputs have ``elements`` entries per tensor: more for small, quick cases, fewer for the
    largest, whose eager call takes seconds on a CPU."""
    if elements <= 1_000_000:
        return 30
    return 12 if elements <= 20_000_000 else 6
