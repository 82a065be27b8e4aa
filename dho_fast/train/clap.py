"""CLAP, ActiveKD's few-shot teacher (Silva-Rodriguez et al., "A Closer Look at the Few-Shot Adaptation of Large
Vision-Language Models", CVPR 2024): class prototypes fitted on the labelled images of a frozen open_clip image
encoder under a class-adaptive constraint toward the zero-shot text embeddings; and a teacher's logits on the train
pool written to a file for the trainer's ``teacher="logits"``, so a round's student learns from the CLAP refitted
on that round's labelled set.

Where this follows the ActiveKD reference (PCoreSet's ``clap_others.py`` and ``train_active_others.py``), and where
it deviates:

- W0: per class the plain mean of the raw prompt embeddings, normalised neither before nor after the mean.
- ``a_c``: the zero-shot softmax probability of class c, ``softmax(100 f @ normalize(W0)^T)`` (the fixed scale 100,
  not the model's logit scale), averaged over the labelled images of class c, seen without augmentation (the
  centred square crop, bicubic); 0 for a class without labelled images (the reference divides by ``count + 1e-10``).
- The batches: the reference draws ``300 |L|`` images with replacement in one pass (batches of 64, the last partial
  one dropped); here ``epochs`` (300) seeded permutations of L follow one another and are cut into batches of
  ``batch_size`` (64), the last partial batch dropped, so every image is seen equally often.
- Augmentation: RandomResizedCrop (area 0.08-1, aspect 3/4-4/3, bicubic) and a horizontal flip at the encoder's
  input size and normalisation, each draw seeded (:class:`~dho_fast.train.transforms.PairedTransform`).
"""

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dho_fast.ops.validation import check_int
from dho_fast.train.checkpoint import save_atomic
from dho_fast.train.data import ImageDataset, Sample
from dho_fast.train.schedule import build_scheduler
from dho_fast.train.teacher import ClipTeacher, LogitsTeacher, Template, ZeroShotHead, class_text_embeddings
from dho_fast.train.transforms import PairedTransform

CROP_SCALE = (0.08, 1.0)
WARMUP_FRACTION = 0.1
#: The zero-shot logit scale of the reference's ``a_c`` (and of :class:`~dho_fast.train.teacher.ZeroShotHead`).
ZERO_SHOT_SCALE = 100.0


def mean_text_embeddings(
    model: nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[Template],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """CLAP's W0: ``W0[c] = mean_t encode_text(template_t(classname_c))``, the raw prompt embeddings averaged with
    no normalisation before or after. ``model``: an open_clip model. Returns (C, D) float32 on ``device``."""
    return class_text_embeddings(model, tokenizer, classnames, templates, device=device, mean="raw")


def _float_matrix(value: object, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        what = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
        raise TypeError(f"{name} must be a float tensor (C, D), got {what}")
    if value.dim() != 2 or 0 in value.shape:
        raise ValueError(f"{name} must be a float tensor (C, D) with C, D >= 1, got shape {tuple(value.shape)}")
    if not bool(value.isfinite().all()):
        raise ValueError(f"{name} must be finite, got a NaN or an infinity")
    zero = (value.norm(dim=1) == 0).nonzero()
    if len(zero):
        raise ValueError(f"{name} row {int(zero[0, 0])} is zero: a prototype needs a direction")
    return value.float()


class ClapHead(nn.Module):
    """CLAP's linear probe: ``logits = logit_scale * normalize(f) @ normalize(P)^T`` for image features f (N, D),
    prototypes P (C, D) (a parameter, initialised to ``text_means``), float32 (N, C).

    Called like :class:`~dho_fast.train.teacher.ZeroShotHead`, so ``ClipTeacher(model, head, preprocess)`` is the
    CLAP teacher. ``text_means``: W0 (C, D) float, kept as the constraint's anchor; ``logit_scale``: the CLIP model's
    (``exp(model.logit_scale)``, 100 for OpenAI weights), > 0; ``constraint_weights``: ``a_c`` (C,) float >= 0,
    zeros when None (no constraint).
    """

    def __init__(
        self, text_means: torch.Tensor, logit_scale: float, constraint_weights: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        text_means = _float_matrix(text_means, "text_means")
        if isinstance(logit_scale, bool) or not isinstance(logit_scale, int | float):
            raise TypeError(f"logit_scale must be a float, got a {type(logit_scale).__name__}")
        if not (math.isfinite(logit_scale) and logit_scale > 0):
            raise ValueError(f"logit_scale must be finite and > 0, got {logit_scale}")
        if constraint_weights is None:
            constraint_weights = text_means.new_zeros(text_means.shape[0])
        elif not isinstance(constraint_weights, torch.Tensor) or not constraint_weights.is_floating_point():
            raise TypeError(f"constraint_weights must be a float tensor (C,), got {type(constraint_weights).__name__}")
        if constraint_weights.shape != (text_means.shape[0],):
            raise ValueError(
                f"constraint_weights must have shape (C,) = ({text_means.shape[0]},), got "
                f"{tuple(constraint_weights.shape)}"
            )
        if not bool((constraint_weights.isfinite() & (constraint_weights >= 0)).all()):
            raise ValueError("constraint_weights must be finite and >= 0")
        self.prototypes = nn.Parameter(text_means.clone())
        self.register_buffer("text_means", text_means.clone())
        self.register_buffer("constraint_weights", constraint_weights.float().to(text_means.device))
        self.logit_scale = float(logit_scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * F.normalize(features, dim=-1) @ F.normalize(self.prototypes, dim=-1).T

    def penalty(self) -> torch.Tensor:
        """The class-adaptive constraint ``mean_c a_c ||P_c - W0_c||^2`` (0-dim float32; the mean over all C)."""
        return (self.constraint_weights * (self.prototypes - self.text_means).pow(2).sum(dim=1)).mean()


def clap_loss(head: ClapHead, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CLAP's objective on a batch: ``CE(head(features), labels) + head.penalty()``, the cross-entropy averaged over
    the rows. ``features`` (N, D) float32, ``labels`` (N,) int64 in [0, C); returns a 0-dim float32."""
    return F.cross_entropy(head(features), labels) + head.penalty()


def class_adaptive_weights(zero_shot_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CLAP's ``a_c``: the mean over the rows of class c of ``softmax(zero_shot_logits)[c]``, 0 for a class with no
    row. ``zero_shot_logits`` (N, C) float, ``labels`` (N,) int64 in [0, C); returns (C,) float32."""
    if not zero_shot_logits.is_floating_point() or labels.dtype != torch.int64:
        raise TypeError(
            f"zero_shot_logits must be float and labels int64, got {zero_shot_logits.dtype} and {labels.dtype}"
        )
    if zero_shot_logits.dim() != 2 or labels.shape != zero_shot_logits.shape[:1]:
        raise ValueError(
            f"zero_shot_logits must be (N, C) and labels (N,), got shapes {tuple(zero_shot_logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    num_classes = zero_shot_logits.shape[1]
    if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}")
    own = zero_shot_logits.float().softmax(dim=1).gather(1, labels[:, None]).squeeze(1)
    sums = torch.zeros(num_classes, device=own.device).index_add_(0, labels, own)
    counts = torch.bincount(labels, minlength=num_classes)
    return torch.where(counts > 0, sums / counts.clamp(min=1), 0.0)


def _clip_views(samples: Sequence[Sample], encoder: ClipTeacher, *, train: bool) -> ImageDataset:
    """``samples`` at the encoder's input size and normalisation, augmented (CLAP's crops) or centre-cropped."""
    # PairedTransform always makes its first ("student") view; here that view is the CLIP encoder's own.
    transform = PairedTransform(
        encoder.input_size, encoder.mean, encoder.std, train=train, scale=CROP_SCALE, interpolation="bicubic"
    )
    return ImageDataset(samples, transform, "RGB")


@torch.no_grad()
def _predict(
    module: nn.Module,
    dataset: ImageDataset,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    progress: bool,
    desc: str,
) -> torch.Tensor:
    """``module(images)`` of every image of ``dataset`` in its order, run on ``device``, rows gathered on the CPU
    (a train pool's logits may not fit beside the model)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    rows = [
        module(batch["student"].to(device, non_blocking=True)).cpu()
        for batch in tqdm(loader, desc=desc, disable=not progress)
    ]
    return torch.cat(rows)


def _check_samples(samples: Sequence[Sample], num_classes: int) -> torch.Tensor:
    """The (N,) int64 labels of ``samples``, each a class of ``text_means``."""
    if len(samples) == 0:
        raise ValueError("samples must hold at least one labelled image, got none")
    labels = torch.tensor([s.label for s in samples], dtype=torch.int64)
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"samples[{i}] ({samples[i].path}) has label {int(labels[i])}, outside the {num_classes} classes of "
            "text_means"
        )
    return labels


def _draws(num_images: int, rows_per_step: int, steps: int, seed: int) -> Iterator[list[tuple[int, int, bool]]]:
    """``steps`` batches of ``(index, draw_seed, True)`` keys of :class:`~dho_fast.train.data.ImageDataset`: seeded
    permutations of ``range(num_images)`` one after another, cut into ``rows_per_step`` rows, each with its own crop
    seed; all drawn from one generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    order, position = torch.empty(0, dtype=torch.int64), 0
    for _ in range(steps):
        parts, needed = [], rows_per_step
        while needed:
            if position == len(order):
                order, position = torch.randperm(num_images, generator=generator), 0
            taken = min(needed, len(order) - position)
            parts.append(order[position : position + taken])
            position, needed = position + taken, needed - taken
        draw_seeds = torch.randint(2**62, (rows_per_step,), generator=generator)
        yield [(i, s, True) for i, s in zip(torch.cat(parts).tolist(), draw_seeds.tolist(), strict=True)]


def fit_clap(
    model: nn.Module,
    preprocess: dict,
    text_means: torch.Tensor,
    samples: Sequence[Sample],
    *,
    epochs: int = 300,
    batch_size: int = 64,
    lr: float = 0.01,
    momentum: float = 0.9,
    seed: int = 0,
    device: torch.device | str = "cpu",
    input_dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
    progress: bool = False,
) -> ClapHead:
    """Fits CLAP's prototypes on the labelled images ``samples`` (their paths and labels) and returns the head.

    ``model``: the open_clip model on ``device`` (its image encoder is frozen and put in eval mode, as a teacher's
    is); ``preprocess``: its ``size``, ``mean``, ``std`` (:func:`~dho_fast.train.teacher.create_open_clip`);
    ``input_dtype``: its precision's input dtype; ``text_means``: W0 (C, D) float (:func:`mean_text_embeddings`).

    Minimises :func:`clap_loss`, ``CE(logit_scale normalize(f) @ normalize(P)^T, y) + mean_c a_c ||P_c - W0_c||^2``
    over P only, ``logit_scale = exp(model.logit_scale)``, ``a_c`` by :func:`class_adaptive_weights` on the
    zero-shot logits ``100 normalize(f) @ normalize(W0)^T`` of the un-augmented images; f: the encoder's L2-normalised
    features of each batch's augmented images. SGD (``lr``, ``momentum``), the learning rate rising linearly from 0
    over the first 10% of the steps, then falling linearly to 0. ``epochs`` passes over L in batches of
    ``batch_size`` (fewer rows when ``epochs * len(samples)`` is smaller), ``epochs * len(samples) // batch_size``
    steps, the last partial batch dropped (module docstring). The same ``seed`` gives the same P.
    """
    check_int("epochs", epochs, ">= 1", lambda v: v >= 1)
    check_int("batch_size", batch_size, ">= 1", lambda v: v >= 1)
    device = torch.device(device)
    text_means = _float_matrix(text_means, "text_means").to(device)
    labels = _check_samples(samples, text_means.shape[0]).to(device)
    encoder = ClipTeacher(model, nn.Identity(), preprocess, input_dtype)
    eval_kw = dict(batch_size=batch_size, num_workers=num_workers, device=device, progress=progress)
    features = _predict(encoder, _clip_views(samples, encoder, train=False), desc="CLAP a_c", **eval_kw).to(device)
    zero_shot = ZeroShotHead(F.normalize(text_means, dim=-1))(features)
    weights = class_adaptive_weights(zero_shot, labels)
    head = ClapHead(text_means, float(model.logit_scale.detach().exp()), weights).to(device)

    rows = epochs * len(samples)
    rows_per_step = min(batch_size, rows)
    steps = rows // rows_per_step
    optimizer = torch.optim.SGD([head.prototypes], lr=lr, momentum=momentum)
    scheduler = build_scheduler(optimizer, steps, round(WARMUP_FRACTION * steps), 0.0, "linear")
    loader = DataLoader(
        _clip_views(samples, encoder, train=True),
        batch_sampler=_draws(len(samples), rows_per_step, steps, seed),
        num_workers=num_workers,
    )
    bar = tqdm(total=steps, desc="CLAP fit", disable=not progress, dynamic_ncols=True)
    for batch in loader:
        loss = clap_loss(head, encoder(batch["student"].to(device, non_blocking=True)), batch["label"].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        bar.update(1)
        if progress:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return head.requires_grad_(False).eval()


def write_teacher_logits(
    teacher: ClipTeacher,
    samples: Sequence[Sample],
    path: str | Path,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Writes ``teacher``'s logits on every image of ``samples`` (row i: ``samples[i]``, its centred square crop at
    the teacher's input size, bicubic) to ``path`` in the format of
    :meth:`~dho_fast.train.teacher.LogitsTeacher.from_file` (a ``.pt``/``.pth`` dict with ``"logits"``), atomically
    (:func:`~dho_fast.train.checkpoint.save_atomic`: a reader sees the old file or the new one). ``teacher``: an
    open_clip teacher on ``device``, e.g. ``ClipTeacher(model, fit_clap(...), preprocess)``.

    Returns the (N, C) float32 logits on the CPU. Raises ValueError for an empty ``samples``, a ``path`` of another
    suffix, or logits that LogitsTeacher would refuse (NaN, +inf, a row -inf everywhere), before writing anything.
    """
    if not isinstance(teacher, ClipTeacher):
        raise TypeError(f"teacher must be a ClipTeacher (it looks at images), got a {type(teacher).__name__}")
    check_int("batch_size", batch_size, ">= 1", lambda v: v >= 1)
    if len(samples) == 0:
        raise ValueError("samples must hold at least one image, got none")
    path = Path(path)
    if path.suffix not in (".pt", ".pth"):
        raise ValueError(f"path must end in .pt or .pth (a torch file LogitsTeacher.from_file reads), got {path}")
    views = _clip_views(samples, teacher, train=False)
    logits = _predict(
        teacher,
        views,
        batch_size=batch_size,
        num_workers=num_workers,
        device=torch.device(device),
        progress=progress,
        desc="teacher logits",
    )
    LogitsTeacher(logits, source=f"the teacher logits for {path}")  # refuses what the file's reader would refuse
    save_atomic({"logits": logits}, path)
    return logits
