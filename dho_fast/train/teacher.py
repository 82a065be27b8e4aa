"""Teachers of DHO: an open_clip zero-shot VLM, a Tip-Adapter-F few-shot teacher, or precomputed logits.

Every teacher maps a batch to float32 logits ``(N, C)`` without gradients: ``teacher(images, indices)``, where
``images`` are the teacher's views (None for a teacher that needs none) and ``indices`` the rows' train-pool
indices.
"""

import hashlib
import io
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dho_fast.train.checkpoint import load_file
from dho_fast.train.config import InputTypeError, TextMean

#: The 7 ImageNet prompts of the DHO reference (METHOD.md).
DHO_IMAGENET_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
TIP_ADAPTER_KEYS = ("adapter_weight", "cache_keys", "cache_values", "clip_weights", "best_alpha", "best_beta")

Template = str | Callable[[str], str]
TEXT_MEANS: tuple[str, ...] = typing.get_args(TextMean)


def prompt_templates(spec: str) -> list[Template]:
    """``"dho_imagenet"`` (7 prompts), ``"openai_imagenet"`` (open_clip's 80), or one template containing ``{}``."""
    if spec == "dho_imagenet":
        return list(DHO_IMAGENET_TEMPLATES)
    if spec == "openai_imagenet":
        import open_clip

        return list(open_clip.OPENAI_IMAGENET_TEMPLATES)
    if "{}" not in spec:
        raise ValueError(f"templates must be 'dho_imagenet', 'openai_imagenet' or a template with '{{}}', got {spec!r}")
    return [spec]


@torch.no_grad()
def class_text_embeddings(
    model: nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[Template],
    *,
    device: torch.device | str = "cpu",
    classes_per_batch: int = 32,
    mean: TextMean = "normalized",
) -> torch.Tensor:
    """One text embedding per class from a prompt ensemble of ``templates``; ``model``: an open_clip model
    (``encode_text``). With e_t the embedding of prompt t of a class:

    - ``"normalized"`` (METHOD.md): ``normalize(mean_t normalize(e_t))``, unit rows;
    - ``"mean_of_normalized"``: ``mean_t normalize(e_t)`` (the reference's ImageNet teacher, its open_clip path);
    - ``"raw"``: ``mean_t e_t`` (CLAP's W0, :func:`dho_fast.train.clap.mean_text_embeddings`; the reference's
      CLIP-student head init).

    Returns (C, D) float32 on ``device``.
    """
    if not classnames or not templates:
        raise ValueError("classnames and templates must be non-empty")
    if mean not in TEXT_MEANS:
        raise ValueError(f"mean must be one of {TEXT_MEANS}, got {mean!r}")
    rows = []
    for start in range(0, len(classnames), classes_per_batch):
        names = classnames[start : start + classes_per_batch]
        texts = [t.format(n) if isinstance(t, str) else t(n) for n in names for t in templates]
        prompts = model.encode_text(tokenizer(texts).to(device)).float()
        if mean != "raw":
            prompts = F.normalize(prompts, dim=-1)
        means = prompts.view(len(names), len(templates), -1).mean(dim=1)
        rows.append(F.normalize(means, dim=-1) if mean == "normalized" else means)
    return torch.cat(rows)


def create_open_clip(
    arch: str,
    pretrained: str | None,
    *,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    model_config: str | None = None,
) -> tuple[nn.Module, Callable, dict]:
    """An open_clip model, its tokenizer and its preprocessing settings (``size``, ``mean``, ``std``).

    ``arch``: a built-in architecture (``ViT-H-14-378-quickgelu``), ``local-dir:PATH`` or ``hf-hub:ORG/REPO``;
    ``pretrained``: an open_clip tag (``dfn5b``, ``openai``) or a local checkpoint file, None for random weights;
    ``model_config``: a model config json registered first, for architectures open_clip does not ship.

    Raises ValueError when the pretrained tag's weights were trained with QuickGELU (OpenAI's CLIP weights) and
    ``arch`` builds GELU layers: open_clip would load them with only a warning into a model whose features are
    wrong; the message names the QuickGELU architecture to use (``RN50-quickgelu`` for ``RN50``).
    """
    import open_clip

    if model_config is not None:
        if not Path(model_config).is_file():
            raise FileNotFoundError(f"model_config {model_config} does not exist")
        open_clip.add_model_config(model_config)
    _check_quick_gelu(arch, pretrained)
    model = open_clip.create_model(arch, pretrained=pretrained, precision=precision, device=device)
    model.eval()
    return model, open_clip.get_tokenizer(arch), open_clip.get_model_preprocess_cfg(model)


def _check_quick_gelu(arch: str, pretrained: str | None) -> None:
    import open_clip

    if pretrained is None or Path(pretrained).is_file():
        return  # random weights, or a local file whose training open_clip does not record
    weights = open_clip.get_pretrained_cfg(arch, pretrained)
    built = open_clip.get_model_config(arch) or {}
    if weights.get("quick_gelu") and not built.get("quick_gelu"):
        name = f"{arch}-quickgelu"
        hint = f"'{name}'" if name in open_clip.list_models() else "an architecture whose config sets quick_gelu"
        raise ValueError(
            f"pretrained {pretrained!r} weights of {arch!r} were trained with QuickGELU activations but {arch!r} "
            f"builds GELU layers (its features would be wrong): use {hint} instead"
        )


class ZeroShotHead(nn.Module):
    """``logits = 100 * f @ T^T`` for unit image features f (N, D) and class text embeddings T (C, D)."""

    def __init__(self, text_embeddings: torch.Tensor) -> None:
        super().__init__()
        if text_embeddings.dim() != 2:
            raise ValueError(f"text_embeddings must be (C, D), got shape {tuple(text_embeddings.shape)}")
        self.register_buffer("text_embeddings", text_embeddings.float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return 100.0 * features @ self.text_embeddings.T


class TipAdapterHead(nn.Module):
    """Tip-Adapter-F logits ``100 f W + a * exp(-b (1 - f A^T)) V`` for unit image features f (N, D).

    From a checkpoint dict with METHOD.md's keys: ``adapter_weight`` A (NK, D), ``cache_values`` V (NK, C) (one-hot),
    ``clip_weights`` W (D, C), ``best_alpha`` a, ``best_beta`` b (``cache_keys`` initialised A and is not used).
    """

    def __init__(self, checkpoint: dict) -> None:
        super().__init__()
        missing = [k for k in TIP_ADAPTER_KEYS if k not in checkpoint]
        if missing:
            raise ValueError(f"the Tip-Adapter checkpoint lacks the keys {missing}")
        adapter = torch.as_tensor(checkpoint["adapter_weight"]).float()
        values = torch.as_tensor(checkpoint["cache_values"]).float()
        clip_weights = torch.as_tensor(checkpoint["clip_weights"]).float()
        if adapter.dim() != 2 or clip_weights.dim() != 2 or clip_weights.shape[0] != adapter.shape[1]:
            raise ValueError(
                f"adapter_weight must be (NK, D) and clip_weights (D, C), got {tuple(adapter.shape)} and "
                f"{tuple(clip_weights.shape)}"
            )
        if values.shape != (adapter.shape[0], clip_weights.shape[1]):
            raise ValueError(
                f"cache_values must be (NK, C) = {(adapter.shape[0], clip_weights.shape[1])}, got {tuple(values.shape)}"
            )
        self.register_buffer("adapter_weight", adapter)
        self.register_buffer("cache_values", values)
        self.register_buffer("clip_weights", clip_weights)
        self.alpha, self.beta = float(checkpoint["best_alpha"]), float(checkpoint["best_beta"])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        affinity = features @ self.adapter_weight.T
        cache_logits = torch.exp(-self.beta * (1.0 - affinity)) @ self.cache_values
        return 100.0 * features @ self.clip_weights + self.alpha * cache_logits


class ClipTeacher(nn.Module):
    """An open_clip image encoder and a head on its L2-normalised features; frozen, float32 logits out.

    Inputs are cast to ``input_dtype``, the encoder's precision (fp16/bf16 on GPU, float32 on CPU); features and
    logits are float32.
    ``input_size``, ``mean``, ``std``: the preprocessing the encoder expects.
    """

    needs_images = True

    def __init__(
        self, clip_model: nn.Module, head: nn.Module, preprocess: dict, input_dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.visual = clip_model.visual
        self.head = head
        self.requires_grad_(False)
        self.eval()
        size = preprocess["size"]
        self.input_size = size if isinstance(size, int) else int(size[0])
        self.mean, self.std = tuple(preprocess["mean"]), tuple(preprocess["std"])
        self.input_dtype = input_dtype

    def train(self, mode: bool = True) -> "ClipTeacher":
        return super().train(False)  # a teacher never leaves eval mode (no dropout, frozen norms)

    @torch.no_grad()
    def forward(self, images: torch.Tensor | None, indices: torch.Tensor | None = None) -> torch.Tensor:
        if images is None:
            raise ValueError("images must be given to an open_clip teacher, got None")
        features = F.normalize(self.visual(images.to(self.input_dtype)).float(), dim=-1)
        return self.head(features)


class LogitsTeacher(nn.Module):
    """Precomputed teacher logits, one row per train-pool index: ``teacher(None, indices) = logits[indices]``.

    ``logits``: (N, C) float tensor (stored as float32), finite except ``-inf`` for masked classes, with a finite
    entry in every row (the loss's rule for teacher logits); ``source`` names it in errors; ``sha256``: the hex
    SHA-256 of the file it came from (:meth:`from_file`), which a resumed run compares with its checkpoint's.
    """

    needs_images = False

    def __init__(self, logits: torch.Tensor, *, source: str = "teacher logits", sha256: str | None = None) -> None:
        super().__init__()
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
            what = f"a {logits.dtype} tensor" if isinstance(logits, torch.Tensor) else f"a {type(logits).__name__}"
            raise InputTypeError(f"{source} must be a float tensor (N, C), got {what}")
        if logits.dim() != 2 or logits.shape[1] == 0:
            raise ValueError(f"{source} must be a float tensor (N, C), got shape {tuple(logits.shape)}")
        logits = logits.float()
        _check_rows(logits, source)
        self.register_buffer("logits", logits)
        self.sha256 = sha256

    @classmethod
    def from_file(cls, path: str | Path, num_rows: int, num_classes: int) -> "LogitsTeacher":
        """Reads a ``.pt``/``.pth`` file (a tensor, or a dict with ``"logits"``, loaded with ``weights_only=True``)
        or a ``.npy`` file of shape (num_rows, num_classes), and checks it before any step runs.

        The file is read once: its bytes are hashed (SHA-256, ~1 GB/s) and deserialised from memory, so the hash is
        of exactly what was loaded (the bytes are held twice for a moment). Raises FileNotFoundError, ValueError
        (unreadable file, wrong shape, NaN/+inf, a row -inf everywhere; naming the file row) or TypeError (not a float
        tensor), each naming ``path``.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"teacher_logits {path} does not exist")
        source = f"teacher_logits {path}"
        content = path.read_bytes()
        sha256 = hashlib.sha256(content).hexdigest()
        if path.suffix == ".npy":
            try:
                loaded = np.load(io.BytesIO(content))
            except Exception as error:  # numpy reports a damaged file with many exception types
                raise ValueError(f"{source} cannot be read: {type(error).__name__}: {error}") from None
        else:
            loaded = load_file(io.BytesIO(content), source)
        if isinstance(loaded, np.ndarray):
            if loaded.dtype.kind != "f":
                raise InputTypeError(f"{source} must be a float array (N, C), got a numpy {loaded.dtype} array")
            loaded = torch.from_numpy(loaded)
        if isinstance(loaded, dict):
            if "logits" not in loaded:
                keys = sorted(map(str, loaded))
                raise InputTypeError(f"{source} must hold a tensor or a dict with 'logits', got a dict of {keys}")
            loaded = loaded["logits"]
        if isinstance(loaded, torch.Tensor) and loaded.dim() == 2 and tuple(loaded.shape) != (num_rows, num_classes):
            raise ValueError(
                f"{source} must have one row per train image and one column per class "
                f"({num_rows}, {num_classes}), got {tuple(loaded.shape)}"
            )
        return cls(loaded, source=source, sha256=sha256)

    @torch.no_grad()
    def forward(self, images: torch.Tensor | None, indices: torch.Tensor) -> torch.Tensor:
        return self.logits[indices.to(self.logits.device)]


#: Rows checked at a time: the masks of a whole ImageNet logits table (1.28M x 1000) would take gigabytes.
_CHECK_ROWS = 65536


def _check_rows(logits: torch.Tensor, source: str) -> None:
    """Raises ValueError naming the first row of ``logits`` (N, C) float32 with a NaN or +inf, or -inf in every
    column: the loss accepts -inf only for masked classes."""
    for start in range(0, logits.shape[0], _CHECK_ROWS):
        block = logits[start : start + _CHECK_ROWS]
        bad = (block.isnan() | block.isposinf()).any(dim=1) | block.isneginf().all(dim=1)
        if bool(bad.any()):
            row = start + int(bad.nonzero()[0, 0])
            values = logits[row]
            if values.isneginf().all():
                raise ValueError(f"{source} row {row} is -inf in every column: the teacher distribution is undefined")
            column = int((values.isnan() | values.isposinf()).nonzero()[0, 0])
            raise ValueError(
                f"{source} row {row} column {column} is {values[column].item()} "
                "(only -inf is allowed, for masked classes)"
            )
