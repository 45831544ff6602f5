"""``vit-b16``: timm ViT-B/16 at 224 px (``vit_base_patch16_224``, e.g. its ``augreg_in21k`` weights).

Per frame: 224×224 RGB (bicubic resize, no crop, done by the runner), normalised
``(x/255 − 0.5) / 0.5``, through ``forward_features`` (all blocks and the final layer
norm) → 197 tokens of 768-d.

Streams: ``visual`` (T, 768) = the CLS token; ``visual_dense`` (T, 196, 768) = the 14×14
patch tokens in row-major order (``dense=True``, the default). 8 frames uniformly over
the clip by default.

Weights: a timm ``.safetensors`` / ``.pth`` state dict; the classifier ``head.*`` is not used
and is dropped before the strict load.
"""
from __future__ import annotations

from pathlib import Path

import timm
import timm.models.vision_transformer
import torch

from .base import FeatureEncoder, Preprocess
from .loading import (autocast, check_amp, compute_precision, frames_to_batch, load_checked,
                      read_state_file, seeded, unwrap, weights_id)

#: ``tiny`` is ViT-Ti/16 (192-d), same input and token layout.
VARIANTS = {"base": "vit_base_patch16_224", "tiny": "vit_tiny_patch16_224"}
IMAGE_SIZE = 224
MEAN = STD = 0.5


class VitEncoder(FeatureEncoder):
    """timm ViT-B/16 CLS and patch tokens per frame; see the module docstring."""

    name = "vit-b16"

    def __init__(self, variant: str = "base", *, frames_per_clip: int = 8, clip_seconds: float = 10.0,
                 dense: bool = True, batch_frames: int = 64, amp: str | None = "bfloat16") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"vit-b16: unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
        if frames_per_clip < 1:
            raise ValueError(f"vit-b16: frames_per_clip must be ≥ 1, got {frames_per_clip}")
        self.variant = variant
        self.model_name = VARIANTS[variant]
        self.dense = bool(dense)
        self.batch_frames = int(batch_frames)
        self.amp = check_amp(amp)
        self.model = timm.create_model(self.model_name, pretrained=False, num_classes=0, img_size=IMAGE_SIZE)
        self.preprocess = Preprocess(clip_seconds=float(clip_seconds), frames_per_clip=int(frames_per_clip),
                                     image_size=IMAGE_SIZE, resize="bicubic", audio_rate=0)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def streams(self) -> dict[str, tuple[int, ...]]:
        t, d = self.preprocess.num_frames, self.model.embed_dim
        out = {"visual": (t, d)}
        if self.dense:
            out["visual_dense"] = (t, self.model.patch_embed.num_patches, d)
        return out

    def extra_key(self) -> dict:
        return {"model": self.model_name, "normalize": [MEAN, STD], "layer": "final-norm",
                "visual": "cls", "compute": compute_precision(self.device, self.amp),
                **({"visual_dense": "patch tokens"} if self.dense else {})}

    @torch.inference_mode()
    def encode(self, frames: torch.Tensor | None, audio: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``frames`` (B, T, 224, 224, 3) uint8 → ``visual`` (B, T, D) [and ``visual_dense``
        (B, T, 196, D)], float32."""
        dev = self.device
        x = frames_to_batch(frames.to(dev) if frames is not None else None, IMAGE_SIZE, MEAN, STD)
        b, t = frames.shape[:2]
        n_prefix = self.model.num_prefix_tokens
        cls, patches = [], []
        for chunk in x.split(self.batch_frames):
            with autocast(dev, self.amp):
                tokens = self.model.forward_features(chunk)
            cls.append(tokens[:, 0].float())
            if self.dense:
                patches.append(tokens[:, n_prefix:].float())
        out = {"visual": torch.cat(cls).unflatten(0, (b, t))}
        if self.dense:
            out["visual_dense"] = torch.cat(patches).unflatten(0, (b, t))
        return out

    def load_checkpoint(self, path: str | Path) -> None:
        """Load a timm ViT state dict (``.safetensors`` or ``.pth``)."""
        state = unwrap(read_state_file(path), "state_dict", "model")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        state = timm.models.vision_transformer.checkpoint_filter_fn(state, self.model)
        load_checked(self.model, state, path)
        self.weights = weights_id(path, 0)


def build(variant: str = "base", checkpoint: str | None = None, random_init_seed: int = 0,
          device: str = "cpu", frames_per_clip: int = 8, clip_seconds: float = 10.0, dense: bool = True,
          batch_frames: int = 64, amp: str | None = "bfloat16") -> VitEncoder:
    """Build the frozen ``vit-b16`` encoder.

    Example: ``build(checkpoint='vit_base_patch16_224.augreg_in21k/model.safetensors', device='cuda')``.
    """
    with seeded(random_init_seed):
        enc = VitEncoder(variant, frames_per_clip=frames_per_clip, clip_seconds=clip_seconds, dense=dense,
                         batch_frames=batch_frames, amp=amp)
    enc.weights = f"random-init:{int(random_init_seed)}"
    if checkpoint:
        enc.load_checkpoint(checkpoint)
    return enc.to(device).freeze()
