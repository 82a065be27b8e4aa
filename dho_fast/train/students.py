"""Student networks: a feature backbone and its heads (DHO's two heads, or one head for the KD/CE baselines)."""

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dho_fast.ops import DualHead, fused_dual_head_loss, init_linears_from_text
from dho_fast.train.checkpoint import load_file
from dho_fast.train.transforms import IMAGENET_MEAN, IMAGENET_STD

TORCHVISION_STUDENTS = ("resnet18", "mobilenet_v2")


class SmallConvNet(nn.Module):
    """Three conv-BN-ReLU stages (``width``, 2x, 4x channels; 2x2 max-pooling after the first two), average-pooled
    to a 3x3 grid: (N, 36 * width) features. Keeping a coarse grid instead of one global average lets a network
    this shallow see where in the image a pattern is, which small images (the embedded demo's 28x28
    Fashion-MNIST, tests) need. It runs in channels-last memory order, where PyTorch's CPU max-pooling is several
    times faster (forward + backward of the whole network about 1.5x on one core at 28x28,
    ``bench/interleaved_demo_step.py``); the features' values and order do not change.
    """

    def __init__(self, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for stage in range(3):
            out = width * 2**stage
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2) if stage < 2 else nn.AdaptiveAvgPool2d(3))
            channels = out
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.num_features = channels * 9
        self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images.contiguous(memory_format=torch.channels_last))


def _load_state_dict(model: nn.Module, path: str, classifier_prefix: str) -> None:
    """Loads a torchvision-style weights file; only the (replaced) classifier may be missing or extra."""
    state = load_file(path, f"student_pretrained {path}")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    result = model.load_state_dict(state, strict=False)
    bad = [k for k in result.missing_keys + result.unexpected_keys if not k.startswith(classifier_prefix)]
    if bad:
        raise ValueError(f"student_pretrained {path} does not match the architecture: keys {bad[:5]}")


def torchvision_backbone(name: str, pretrained: str | None) -> tuple[nn.Module, int]:
    """ResNet-18 or MobileNetV2 without its classifier: (backbone, feature dim). ``pretrained``: a local file."""
    import torchvision

    if name == "resnet18":
        model = torchvision.models.resnet18(weights=None)
        if pretrained:
            _load_state_dict(model, pretrained, "fc.")
        dim = model.fc.in_features
        model.fc = nn.Identity()
    else:
        model = torchvision.models.mobilenet_v2(weights=None)
        if pretrained:
            _load_state_dict(model, pretrained, "classifier.")
        dim = model.classifier[1].in_features
        model.classifier = nn.Identity()
    return model, dim


def timm_backbone(name: str, pretrained: str | None) -> tuple[nn.Module, int]:
    """Any timm model without its classifier; ``pretrained``: a local weights file (timm's own loading)."""
    import timm

    if pretrained and not Path(pretrained).is_file():
        raise FileNotFoundError(f"student_pretrained {pretrained} does not exist")
    overlay = {"file": pretrained} if pretrained else None
    model = timm.create_model(name, pretrained=bool(pretrained), pretrained_cfg_overlay=overlay, num_classes=0)
    return model, model.num_features


class Student(nn.Module):
    """``backbone(images) -> (N, D)`` features and the heads of ``method``.

    "dho": a :class:`~dho_fast.DualHead` (CE head and KD head). "kd" and "ce": one linear head, which in
    :meth:`logits` stands for both heads. ``mean``/``std``: the input normalisation the backbone expects.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_classes: int,
        method: str,
        *,
        kd_cosine: bool = False,
        kd_logit_scale: float = 1.0,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if method not in ("dho", "kd", "ce"):
            raise ValueError(f"method must be 'dho', 'kd' or 'ce', got {method!r}")
        self.backbone, self.method, self.mean, self.std = backbone, method, mean, std
        if method == "dho":
            self.head = DualHead(feature_dim, num_classes, kd_cosine=kd_cosine, kd_logit_scale=kd_logit_scale)
        else:
            self.head = nn.Linear(feature_dim, num_classes)

    @torch.no_grad()
    def init_from_text(self, text_embeddings: torch.Tensor) -> None:
        """Head weights from class text embeddings (C, D), biases zero (METHOD.md's CLIP-student init)."""
        heads = (self.head.ce_head, self.head.kd_head) if self.method == "dho" else (self.head,)
        init_linears_from_text(heads, text_embeddings)

    def logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ce_logits, kd_logits), each (N, C) float32; the single head's logits twice for the KD and CE baselines.
        Under autocast only the backbone runs in half precision (as in :meth:`forward`)."""
        features = self.backbone(images)
        with torch.autocast(features.device.type, enabled=False):
            if self.method == "dho":
                return self.head(features.float())
            z = self.head(features.float())
            return z, z

    def forward(
        self,
        images: torch.Tensor,
        teacher: torch.Tensor | Mapping[str, object] | None,
        labels: torch.Tensor,
        *,
        return_features: bool = False,
        **loss_args,
    ) -> tuple[torch.Tensor, ...]:
        """The training loss of ``method`` and its terms: ``(loss, ce_term, kd_term)``, float32 scalars; with
        ``return_features`` also the (N, D) float32 features both heads read (for
        :func:`~dho_fast.train.gradient_conflict.term_gradient_cosines`).

        images: (N, ...) labelled and unlabelled rows in one batch (one forward: shared BN statistics);
        teacher: (N, C) float32 logits, or the fused loss's teacher keyword arguments of another form (a store's
        ``teacher_probs`` or top-k: dho_fast.train.teacher_cache); None for "ce"; labels: (N,) int64,
        ``ignore_index`` for unlabelled rows;
        loss_args: ``temperature, ce_loss_weight, kd_loss_weight, label_smoothing, ignore_index``.
        "dho": both heads through the fused linear op. "kd": one head takes CE and KD, as a single-head student
        does (the same logits as both heads of the fused loss, so their gradients add up). "ce": cross-entropy
        of the labelled rows, weighted by ``ce_loss_weight``.
        """
        features = self.backbone(images)
        # The heads and the loss run in float32 outside autocast: they cost little next to the backbone, and full
        # precision keeps the two heads' logits comparable for the inference blend.
        with torch.autocast(features.device.type, enabled=False):
            features = features.float()
            terms = self._head_loss(features, teacher, labels, loss_args)
        return (*terms, features) if return_features else terms

    def _head_loss(
        self,
        features: torch.Tensor,
        teacher: torch.Tensor | Mapping[str, object] | None,
        labels: torch.Tensor,
        loss_args: dict,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.method != "ce":
            # Logits go positionally; a store's other forms are the loss's keyword arguments.
            logits, forms = (teacher.float(), {}) if isinstance(teacher, torch.Tensor) else (None, teacher)
            loss_args = {**loss_args, **forms, "return_terms": True}
        if self.method == "dho":
            return self.head.loss(features, logits, labels, **loss_args)
        z = self.head(features)
        if self.method == "kd":
            return fused_dual_head_loss(z, z, logits, labels, **loss_args)
        ignore_index = loss_args.get("ignore_index", -100)
        ce = F.cross_entropy(
            z, labels, ignore_index=ignore_index, label_smoothing=loss_args.get("label_smoothing", 0.0)
        )
        return loss_args.get("ce_loss_weight", 0.5) * ce, ce, torch.zeros_like(ce)


def build_student(
    name: str,
    num_classes: int,
    method: str,
    *,
    pretrained: str | None = None,
    in_channels: int = 3,
    cnn_width: int = 32,
    kd_cosine: bool | None = None,
    kd_logit_scale: float | None = None,
    open_clip_config: str | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Student, object | None]:
    """The student ``name`` (resnet18, mobilenet_v2, cnn, ``timm:NAME``, ``open_clip:ARCH``) with fresh heads.

    For ``open_clip:ARCH`` (``pretrained``: an open_clip tag or a local file) the KD head defaults to METHOD.md's
    cosine classifier (scale 100) and the open_clip model is also returned, so the caller can compute the class
    text embeddings of its text tower for :meth:`Student.init_from_text`; otherwise the second value is None.
    ``open_clip_config``: a model config json to register first (an architecture open_clip does not ship).
    """
    clip_model = None
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if name != "cnn" and in_channels != 3:
        raise ValueError(f"student {name!r} takes RGB images; image_mode 'L' (1 channel) works with student 'cnn'")
    if name in TORCHVISION_STUDENTS:
        backbone, dim = torchvision_backbone(name, pretrained)
    elif name == "cnn":
        backbone = SmallConvNet(in_channels, cnn_width)
        dim = backbone.num_features
        if pretrained:
            backbone.load_state_dict(load_file(pretrained, f"student_pretrained {pretrained}"))
        if in_channels == 1:
            mean, std = (0.5,), (0.5,)
    elif name.startswith("timm:"):
        backbone, dim = timm_backbone(name.removeprefix("timm:"), pretrained)
        cfg = backbone.pretrained_cfg
        mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    elif name.startswith("open_clip:"):
        from dho_fast.train.teacher import create_open_clip

        clip_model, _, preprocess = create_open_clip(
            name.removeprefix("open_clip:"), pretrained, device=device, model_config=open_clip_config
        )
        backbone = clip_model.visual
        dim = backbone.output_dim
        mean, std = tuple(preprocess["mean"]), tuple(preprocess["std"])
        kd_cosine = True if kd_cosine is None else kd_cosine
    else:
        raise ValueError(
            f"student must be one of {(*TORCHVISION_STUDENTS, 'cnn')} or 'timm:NAME' or 'open_clip:ARCH', got {name!r}"
        )
    kd_cosine = bool(kd_cosine)
    if kd_logit_scale is None:
        kd_logit_scale = 100.0 if kd_cosine else 1.0
    student = Student(
        backbone, dim, num_classes, method, kd_cosine=kd_cosine, kd_logit_scale=kd_logit_scale, mean=mean, std=std
    )
    return student.to(device), clip_model
