"""What selection needs of a student on a set of images: both heads' logits and the penultimate features."""

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from dho_fast.ops import dual_head_predict
from dho_fast.ops.validation import check_int
from dho_fast.select.checks import describe
from dho_fast.select.progress import Progress

#: METHOD.md's fixed blend of active learning (no validation set to search alpha and beta on).
ACTIVE_ALPHA, ACTIVE_BETA = 0.5, 1.0
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def blend_probs(
    ce_logits: torch.Tensor, kd_logits: torch.Tensor, alpha: float = ACTIVE_ALPHA, beta: float = ACTIVE_BETA
) -> torch.Tensor:
    """(N, C) float32 ``alpha softmax(ce_logits) + (1 - alpha) softmax(kd_logits / beta)`` of (N, C) float logits,
    through :func:`dho_fast.dual_head_predict`; METHOD.md's selection vectors use ``alpha = 0.5, beta = 1``."""
    return dual_head_predict(ce_logits, kd_logits, alpha, beta).float()


@dataclass
class PoolOutputs:
    """A student's outputs on N images, float32 on the CPU: ``ce_logits`` and ``kd_logits`` (N, C), ``features``
    (N, D), the heads' input."""

    ce_logits: torch.Tensor
    kd_logits: torch.Tensor
    features: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("ce_logits", "kd_logits", "features"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
                got = describe(t) if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"{name} must be a float32 tensor, got {got}")
        n = self.ce_logits.shape[0]
        if self.ce_logits.dim() != 2 or self.kd_logits.shape != self.ce_logits.shape:
            raise ValueError(
                f"ce_logits and kd_logits must be (N, C) of one shape, got {describe(self.ce_logits)} and "
                f"{describe(self.kd_logits)}"
            )
        if self.features.dim() != 2 or self.features.shape[0] != n:
            raise ValueError(f"features must be (N, D) with the {n} rows of the logits, got {describe(self.features)}")

    def __len__(self) -> int:
        return self.ce_logits.shape[0]

    def probs(self) -> torch.Tensor:
        """(N, C) float32 :func:`blend_probs` of the two heads."""
        return blend_probs(self.ce_logits, self.kd_logits)


def _head_sizes(head: nn.Module) -> tuple[int, int]:
    """(D, C) of a DualHead (its CE head's) or an nn.Linear."""
    linear = getattr(head, "ce_head", head)
    return linear.in_features, linear.out_features


def _heads(head: nn.Module, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ce, kd) logits: a DualHead's pair, or a single head's logits standing for both."""
    out = head(features)
    return out if isinstance(out, tuple) else (out, out)


@torch.no_grad()
def pool_outputs(
    student: nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    precision: str = "fp32",
    progress: bool = False,
) -> PoolOutputs:
    """Both heads' logits and the penultimate features of ``student`` on every image of ``dataset``, in its order.

    ``student``: an nn.Module with ``backbone`` (images -> (N, D) features) and ``head`` (a
    :class:`~dho_fast.DualHead`, features -> (ce, kd); or an nn.Linear, whose logits stand for both heads), e.g. a
    ``dho_fast.train.students.Student``. ``dataset``: items are dicts with ``"student"``, a (C, H, W) float32 image
    (e.g. ``dho_fast.train.data.ImageDataset`` with an evaluation transform: no augmentation). Batches of
    ``batch_size`` images are streamed through the student in eval mode without gradients (the images are never all
    in memory) on ``device`` (None: the student's); ``precision`` "bf16"/"fp16" runs the backbone under autocast,
    the heads in float32, as ``Student.logits`` does. The modules' train/eval modes are restored afterwards.
    ``progress``: a line on stderr every 5% of the batches. One process: to share a pool among ranks give each its
    ``torch.utils.data.Subset`` and pass the shards to :func:`~dho_fast.select.pcoreset` with its ``group``.

    Returns :class:`PoolOutputs`, float32 on the CPU (half-precision features are converted); an empty dataset gives
    (0, C) and (0, D) tensors with the head's sizes.
    """
    for attr in ("backbone", "head"):
        if not isinstance(getattr(student, attr, None), nn.Module):
            raise TypeError(f"student must be an nn.Module with a {attr} module, got {type(student).__name__}")
    check_int("batch_size", batch_size, ">= 1", lambda v: v >= 1)
    check_int("num_workers", num_workers, ">= 0", lambda v: v >= 0)
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {tuple(AUTOCAST_DTYPES)}, got {precision!r}")
    if device is None:
        device = next(student.parameters(), torch.empty(0)).device
    device = torch.device(device)
    total = len(dataset)
    dim, classes = _head_sizes(student.head)
    ce = torch.empty(total, classes, dtype=torch.float32)
    kd = torch.empty(total, classes, dtype=torch.float32)
    features = torch.empty(total, dim, dtype=torch.float32)

    modes = {module: module.training for module in student.modules()}
    student.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    bar = Progress("pool outputs", len(loader), progress)
    start = 0
    try:
        dtype = AUTOCAST_DTYPES[precision]
        for step, batch in enumerate(loader, 1):
            images = batch["student"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                f = student.backbone(images)
            f = f.float()
            ce_batch, kd_batch = _heads(student.head, f)
            stop = start + f.shape[0]
            features[start:stop] = f.cpu()
            ce[start:stop], kd[start:stop] = ce_batch.float().cpu(), kd_batch.float().cpu()
            start = stop
            bar.update(step)
    finally:
        for module, training in modes.items():
            module.train(training)
    return PoolOutputs(ce, kd, features)
