"""``sam-audio``: the two frozen encoders of SAM-Audio.

- ``audio``: the DACVAE codec encoder (:mod:`extract.encoders.dacvae`) at 48 kHz, hop 1920
  (25 latent frames per second), the 128-d posterior mean per frame: (⌈L/1920⌉, 128),
  i.e. (250, 128) for 10 s.
- ``visual``: Perception Encoder PE-Core-L14-336 (timm ``vit_pe_core_large_patch14_336``)
  per frame: 336×336 RGB (bicubic resize, no crop, done by the runner), normalised
  ``(x/255 − 0.5) / 0.5``, attention-pooled and projected to 1024-d, then L2-normalised:
  (T, 1024) with ‖v‖₂ = 1 per frame.
- ``visual_dense`` (``dense=True``): the last-layer patch tokens (after the final layer
  norm, before pooling), 24×24 per frame, average-pooled to a ``dense_grid``×``dense_grid``
  grid in row-major order: (T, g², 1024). Not normalised.

Frames: 8 uniformly over the clip by default. SAM-Audio itself samples 25 fps (one frame
per audio latent); ``fps=25`` gives that, at ≈352 GFLOPs per PE-L frame.
``frames_per_clip=0`` skips the visual encoder, ``audio=False`` the codec.

Weights: SAM-Audio's ``checkpoint.pt`` (a plain state dict, or the hub directory holding
it): ``audio_codec.encoder.*`` and ``audio_codec.quantizer.in_proj.*`` (weight-normed
convolutions, folded on load; older files nest them under ``audio_codec.model.``) and
``vision_encoder.model.visual.*`` (PE's own layout, mapped by timm's EVA checkpoint filter).
Everything else in the file (separator transformer, text encoder, decoder) is ignored.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path

import timm
import timm.models.eva
import torch
from torch.nn import functional as F

from .base import CheckpointError, FeatureEncoder, Preprocess
from .dacvae import DACVAE_VARIANTS, DacVaeEncoder, fold_weight_norm
from .loading import (autocast, check_amp, check_audio, compute_precision, frames_to_batch,
                      load_checked, read_state_file, seeded, unwrap, weights_id)

#: per variant: codec config, timm model, input side, projection dim.
VARIANTS = {
    "base": dict(codec=DACVAE_VARIANTS["base"], vision="vit_pe_core_large_patch14_336",
                 image_size=336, embed_dim=1024),
    # same code paths, narrow: PE-Core-T16 at 64 px (4×4 patches), narrow DACVAE
    "tiny": dict(codec=DACVAE_VARIANTS["tiny"], vision="vit_pe_core_tiny_patch16_384",
                 image_size=64, embed_dim=512),
}
PE_L_GFLOPS_PER_FRAME = 352
MEAN = STD = 0.5
AUDIO_PREFIXES = ("audio_codec.model.", "audio_codec.")
AUDIO_PARTS = ("encoder.", "quantizer.in_proj.")
VISION_PREFIX = "vision_encoder.model."


class SamAudioEncoder(FeatureEncoder):
    """SAM-Audio's DACVAE audio encoder and PE-Core visual encoder; see the module docstring."""

    name = "sam-audio"

    def __init__(self, variant: str = "base", *, frames_per_clip: int = 8, fps: float | None = None,
                 clip_seconds: float = 10.0, audio: bool = True, dense: bool = False,
                 dense_grid: int = 4, batch_frames: int = 32, amp: str | None = "bfloat16") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"sam-audio: unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
        spec = VARIANTS[variant]
        self.variant = variant
        self.amp = check_amp(amp)
        self.batch_frames = int(batch_frames)
        if fps:
            frames_per_clip = max(1, round(fps * clip_seconds))
        visual = frames_per_clip > 0
        if not (visual or audio):
            raise ValueError("sam-audio: nothing to encode (audio=False and no frames)")
        if fps and visual and variant == "base":
            warnings.warn(
                f"sam-audio fps={fps}: {frames_per_clip} frames per clip through PE-Core-L14-336 cost "
                f"≈{PE_L_GFLOPS_PER_FRAME * frames_per_clip / 1000:.0f} TFLOPs per clip "
                f"(≈{PE_L_GFLOPS_PER_FRAME} GFLOPs per frame); the default samples 8 frames per clip",
                stacklevel=3)
        self.codec_cfg = spec["codec"]
        self.audio_codec = DacVaeEncoder(self.codec_cfg) if audio else None
        self.vision_name = spec["vision"]
        self.vision = None
        self.dense = bool(dense) and visual
        self.dense_grid = int(dense_grid)
        if visual:
            self.vision = timm.create_model(self.vision_name, pretrained=False,
                                            num_classes=spec["embed_dim"], img_size=spec["image_size"])
            # PE's projection has no bias; the zero bias keeps random init and loaded weights alike
            torch.nn.init.zeros_(self.vision.head.bias)
            grid = self.vision.patch_embed.grid_size[0]
            if self.dense and not 1 <= self.dense_grid <= grid:
                raise ValueError(f"sam-audio: dense_grid={dense_grid} must be in 1..{grid} (the patch grid)")
        self.preprocess = Preprocess(
            clip_seconds=float(clip_seconds), frames_per_clip=int(frames_per_clip) if visual else 0,
            fps=float(fps) if (fps and visual) else None, image_size=spec["image_size"] if visual else 0,
            resize="bicubic", audio_rate=self.codec_cfg.sample_rate if audio else 0)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def streams(self) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        if self.audio_codec is not None:
            out["audio"] = (self.audio_codec.num_frames(self.preprocess.num_samples), self.codec_cfg.codebook_dim)
        if self.vision is not None:
            t = self.preprocess.num_frames
            out["visual"] = (t, self.vision.num_classes)
            if self.dense:
                out["visual_dense"] = (t, self.dense_grid ** 2, self.vision.embed_dim)
        return out

    def extra_key(self) -> dict:
        key: dict = {"compute": compute_precision(self.device, self.amp)}
        if self.audio_codec is not None:
            cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.codec_cfg).items()}
            key["audio_feature"] = {"model": "dacvae-encoder", **cfg,
                                    "output": "quantizer.in_proj mean half", "pad": "reflect-right-to-hop"}
        if self.vision is not None:
            key["visual_feature"] = {"model": self.vision_name, "normalize": [MEAN, STD],
                                     "pool": "attention-pool+proj, L2-normalised"}
            if self.dense:
                key["visual_dense"] = {"tokens": "final-norm patch tokens", "pool": "adaptive-avg",
                                       "grid": self.dense_grid}
        return key

    @torch.inference_mode()
    def encode(self, frames: torch.Tensor | None, audio: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``audio`` (B, L) at 48 kHz → ``audio`` (B, ⌈L/1920⌉, 128);
        ``frames`` (B, T, 336, 336, 3) uint8 → ``visual`` (B, T, 1024) unit-norm
        [and ``visual_dense`` (B, T, g², 1024)]. All float32."""
        dev = self.device
        out: dict[str, torch.Tensor] = {}
        if self.audio_codec is not None:
            wav = check_audio(audio).to(dev)
            with autocast(dev, self.amp):
                out["audio"] = self.audio_codec(wav).float()
        if self.vision is not None:
            out.update(self._encode_frames(frames, dev))
        return out

    def _encode_frames(self, frames: torch.Tensor, dev: torch.device) -> dict[str, torch.Tensor]:
        size = self.preprocess.image_size
        x = frames_to_batch(frames.to(dev) if frames is not None else None, size, MEAN, STD)
        b, t = frames.shape[:2]
        pooled, dense = [], []
        n_prefix = self.vision.num_prefix_tokens
        grid = self.vision.patch_embed.grid_size
        for chunk in x.split(self.batch_frames):
            with autocast(dev, self.amp):
                tokens = self.vision.forward_features(chunk)
                emb = self.vision.forward_head(tokens)
            pooled.append(F.normalize(emb.float(), dim=-1))
            if self.dense:
                patches = tokens[:, n_prefix:].float().unflatten(1, grid).permute(0, 3, 1, 2)
                cells = F.adaptive_avg_pool2d(patches, self.dense_grid)
                dense.append(cells.flatten(2).transpose(1, 2))
        out = {"visual": torch.cat(pooled).unflatten(0, (b, t))}
        if self.dense:
            out["visual_dense"] = torch.cat(dense).unflatten(0, (b, t))
        return out

    def load_checkpoint(self, path: str | Path) -> None:
        """Load SAM-Audio's ``checkpoint.pt`` (see the module docstring for the key layout)."""
        path = Path(path)
        if path.is_dir():
            path = path / "checkpoint.pt"
        state = unwrap(read_state_file(path), "state_dict")
        if self.audio_codec is not None:
            load_checked(self.audio_codec, fold_weight_norm(audio_codec_state(state, path)), path)
        if self.vision is not None:
            load_checked(self.vision, vision_state(state, self.vision, path), path)
        self.weights = weights_id(path, 0)


def audio_codec_state(state, path) -> dict[str, torch.Tensor]:
    """The codec-encoder entries of a SAM-Audio state dict, keyed as in :class:`DacVaeEncoder`."""
    for prefix in AUDIO_PREFIXES:
        heads = tuple(prefix + part for part in AUDIO_PARTS)
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(heads)}
        if sub:
            return sub
    raise CheckpointError(
        f"{path}: no SAM-Audio codec weights: expected keys under "
        f"{' or '.join(p + 'encoder.' for p in AUDIO_PREFIXES)} (is this SAM-Audio's checkpoint.pt?)")


def vision_state(state, model, path) -> dict[str, torch.Tensor]:
    """The PE visual-tower entries of a SAM-Audio state dict, mapped onto timm's EVA layout."""
    sub = {k[len(VISION_PREFIX):]: v for k, v in state.items() if k.startswith(VISION_PREFIX + "visual.")}
    if not sub:
        raise CheckpointError(
            f"{path}: no Perception Encoder weights: expected keys under {VISION_PREFIX}visual. "
            "(is this SAM-Audio's checkpoint.pt?)")
    return timm.models.eva.checkpoint_filter_fn(sub, model)


def build(variant: str = "base", checkpoint: str | None = None, random_init_seed: int = 0,
          device: str = "cpu", frames_per_clip: int = 8, fps: float | None = None,
          clip_seconds: float = 10.0, audio: bool = True, dense: bool = False, dense_grid: int = 4,
          batch_frames: int = 32, amp: str | None = "bfloat16") -> SamAudioEncoder:
    """Build the frozen ``sam-audio`` encoder.

    Without ``checkpoint`` the weights are random, drawn from a CPU generator seeded with
    ``random_init_seed`` (``weights = 'random-init:<seed>'``); with one they come from that file
    (``weights = 'sha256:<hex>'``). Example: ``build(checkpoint='sam-audio-large/checkpoint.pt',
    device='cuda', dense=True)``.
    """
    with seeded(random_init_seed):
        enc = SamAudioEncoder(variant, frames_per_clip=frames_per_clip, fps=fps, clip_seconds=clip_seconds,
                              audio=audio, dense=dense, dense_grid=dense_grid, batch_frames=batch_frames,
                              amp=amp)
    enc.weights = f"random-init:{int(random_init_seed)}"
    if checkpoint:
        enc.load_checkpoint(checkpoint)
    return enc.to(device).freeze()
