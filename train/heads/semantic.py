"""The semantic segmentation model: a segmentation head's fusion + decoder and a growing
per-pixel classifier over background + the seen classes.

The segmentation head (``atlas``, ``avs-static``; :mod:`train.heads.seg`) is built with
``E`` mask outputs, which serve as a pixel embedding ``e`` (B, F, E, H, W). The
classifier is a :class:`~train.trainer.GrowingClassifier` applied at every pixel
(a 1x1 convolution), ``z[c] = W[c] . e + b[c]``; when a task adds classes, rows
are appended and the old rows are kept. ``forward(x)`` returns

* ``mask_logits`` (B, F, C, H, W): pixel logits over the ``C`` seen channels (0 = background);
* ``pixel_embedding`` (B, F, E, H, W): ``e``;
* ``fused`` (B * F, d, gh, gw): the fused audio-visual tokens that enter the head's mask
  decoder, on their grid (captured at the decoder's input), for feature distillation;
* ``feature`` (B, d): the head's pooled fused tokens;
* ``logits`` (B, C): the pixel logits averaged over frames and pixels (the trainer's
  per-clip view of the classifier; by linearity ``W mean(e) + b``).
"""
from __future__ import annotations

import torch
from torch import nn


class SemanticModel(nn.Module):
    def __init__(self, head: nn.Module, n_classes: int = 0) -> None:
        super().__init__()
        from train.trainer import GrowingClassifier

        self.head = head
        self.classifier = GrowingClassifier(head.geometry.mask_channels, n_classes)
        self._fused: torch.Tensor | None = None
        decoder = getattr(head, "decoder", None)
        if decoder is not None:
            decoder.register_forward_pre_hook(self._keep_fused)

    def _keep_fused(self, module, args) -> None:
        self._fused = args[0]

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._fused = None
        out = self.head(x)
        e = out["mask_logits"]  # (B, F, E, H, W)
        w, b = self.classifier.weight, self.classifier.bias
        z = torch.einsum("bfehw,ce->bfchw", e, w) + b.view(1, 1, -1, 1, 1)
        res = {"feature": out["feature"], "logits": z.mean(dim=(1, 3, 4)), "mask_logits": z, "pixel_embedding": e}
        if self._fused is not None:
            g = self.head.geometry
            f = self._fused  # (B * F, P, d)
            res["fused"] = f.transpose(1, 2).reshape(f.shape[0], f.shape[2], *g.grid)
        return res
