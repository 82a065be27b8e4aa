"""DHO's two linear heads over shared student features, trained with the fused linear dual-head loss."""

import torch
from torch import nn

from dho_fast.ops.blend import dual_head_predict
from dho_fast.ops.linear_loss import fused_linear_dual_head_loss
from dho_fast.ops.reference import dual_head_logits
from dho_fast.ops.validation import check_number


@torch.no_grad()
def init_linears_from_text(heads: tuple[nn.Linear, ...], text_embeddings: torch.Tensor) -> None:
    """Copies (C, D) class text embeddings into each linear head's weight and zeroes its bias."""
    weight = heads[0].weight
    if not isinstance(text_embeddings, torch.Tensor) or text_embeddings.shape != weight.shape:
        got = tuple(text_embeddings.shape) if isinstance(text_embeddings, torch.Tensor) else type(text_embeddings)
        want = f"{tuple(weight.shape)} (num_classes, in_features)"
        raise ValueError(f"text_embeddings must be a tensor of shape {want}, got {got}")
    for head in heads:
        head.weight.copy_(text_embeddings)
        head.bias.zero_()


class DualHead(nn.Module):
    """The CE head ``z_ce = W_ce f + b_ce`` and the KD head ``z_kd = s (W_kd g(f) + b_kd)`` of a DHO student.

    ``g`` is the L2 normalisation when ``kd_cosine`` (METHOD.md's cosine KD head of CLIP students, with
    ``kd_logit_scale`` s = 100), else the identity. Each head is an ``nn.Linear(in_features, num_classes)``
    (``ce_head``, ``kd_head``), initialised as ``nn.Linear`` or from class text embeddings by :meth:`init_from_text`.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        kd_cosine: bool = False,
        kd_logit_scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_number("kd_logit_scale", kd_logit_scale, "> 0", lambda v: v > 0)
        self.ce_head = nn.Linear(in_features, num_classes, device=device, dtype=dtype)
        self.kd_head = nn.Linear(in_features, num_classes, device=device, dtype=dtype)
        self.kd_cosine = kd_cosine
        self.kd_logit_scale = float(kd_logit_scale)

    def extra_repr(self) -> str:
        return f"kd_cosine={self.kd_cosine}, kd_logit_scale={self.kd_logit_scale}"

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ce_logits, kd_logits)``, each (N, C) in the features' dtype, from (N, D) features (inference)."""
        return dual_head_logits(
            features, self.ce_head.weight, self.ce_head.bias, self.kd_head.weight, self.kd_head.bias,
            kd_cosine=self.kd_cosine, kd_logit_scale=self.kd_logit_scale,
        )  # fmt: skip

    def loss(
        self,
        features: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        labels: torch.Tensor,
        *,
        ce_loss_weight: float = 0.5,
        kd_loss_weight: float = 0.5,
        **loss_args,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The DHO loss of both heads on (N, D) features, fused with the heads' GEMMs.

        ``teacher_logits`` (N, C) and ``labels`` (N,) as in :func:`dho_fast.fused_dual_head_loss`, whose keyword
        arguments ``loss_args`` takes (``ce_loss_weight`` and ``kd_loss_weight`` are the loss weights w_ce, w_kd;
        ``teacher_probs`` or ``teacher_topk_indices`` / ``teacher_topk_values`` / ``teacher_tail`` with
        ``teacher_logits=None`` for the other teacher forms), plus ``chunk_size``; see
        :func:`dho_fast.fused_linear_dual_head_loss`.
        """
        return fused_linear_dual_head_loss(
            features, self.ce_head.weight, self.ce_head.bias, self.kd_head.weight, self.kd_head.bias, teacher_logits,
            labels, kd_cosine=self.kd_cosine, kd_logit_scale=self.kd_logit_scale, ce_loss_weight=ce_loss_weight,
            kd_loss_weight=kd_loss_weight, **loss_args,
        )  # fmt: skip

    @torch.no_grad()
    def init_from_text(self, text_embeddings: torch.Tensor) -> None:
        """Copies (C, D) class text embeddings into both heads' weights and zeroes both biases (METHOD.md's
        CLIP-student initialisation; the embeddings are used as given, normalise them first if wanted)."""
        init_linears_from_text((self.ce_head, self.kd_head), text_embeddings)

    def predict(self, features: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
        """(N, C) blended probabilities ``alpha * softmax(z_ce) + (1 - alpha) * softmax(z_kd / beta)``
        (:func:`dho_fast.dual_head_predict`); the prediction is ``argmax(1)``."""
        return dual_head_predict(*self(features), alpha, beta)
