"""The contract every feature encoder keeps with the extraction runner.

The runner decodes clips into fixed-size arrays described by the encoder's
:class:`Preprocess` (frames already resized to ``image_size`` × ``image_size``,
uint8 RGB; audio mono float32 at ``audio_rate``), batches clips, and calls
:meth:`FeatureEncoder.encode`. Everything that changes the numbers an encoder
writes belongs in :meth:`FeatureEncoder.key_material`, so the cache key changes
with it.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Preprocess:
    """How the runner must decode a clip for one encoder.

    ``frames_per_clip``: frames sampled uniformly over ``clip_seconds`` (0 = no visual input);
    if ``fps`` is set, frames are sampled at that rate instead and
    ``frames_per_clip = round(fps * clip_seconds)``.
    ``image_size``: square side after ``resize`` (no crop), RGB uint8.
    ``audio_rate``: Hz of the mono waveform (0 = no audio input);
    the waveform always has ``round(audio_rate * clip_seconds)`` samples.
    Clips shorter than ``clip_seconds`` are padded by ``pad``:
    ``"repeat-last"`` repeats the last frame and zero-pads audio; ``valid_len``
    in the store records the real duration in seconds.
    """

    clip_seconds: float = 10.0
    frames_per_clip: int = 0
    fps: float | None = None
    image_size: int = 224
    resize: str = "bicubic"
    audio_rate: int = 0
    pad: str = "repeat-last"

    @property
    def num_frames(self) -> int:
        if self.fps:
            return max(1, round(self.fps * self.clip_seconds))
        return self.frames_per_clip

    @property
    def num_samples(self) -> int:
        return round(self.audio_rate * self.clip_seconds) if self.audio_rate else 0

    def as_dict(self) -> dict:
        return asdict(self)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 hex of a weights file (part of the cache key)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


class CheckpointError(RuntimeError):
    """A weights file that does not fit the encoder; names the missing/unexpected keys."""


def check_keys(path, missing, unexpected, limit: int = 8) -> None:
    """Raise :class:`CheckpointError` naming the first few missing / unexpected keys."""
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(sorted(missing)[:limit])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(sorted(unexpected)[:limit])})")
    raise CheckpointError(f"{path}: checkpoint does not match the encoder: " + "; ".join(parts))


class FeatureEncoder(torch.nn.Module):
    """Base class: a frozen module mapping decoded clips to named feature streams.

    Subclasses set ``name`` (the CLI name, e.g. ``"vit-b16"``), ``variant``,
    ``preprocess`` and implement :meth:`streams` and :meth:`encode`.
    ``weights`` is ``"random-init:<seed>"`` or ``"sha256:<hex>"`` of the file loaded.
    """

    name: str = ""
    variant: str = ""
    stored_dtype: str = "float16"

    def __init__(self) -> None:
        super().__init__()
        self.weights = "random-init:0"
        self.preprocess = Preprocess()

    def streams(self) -> dict[str, tuple[int, ...]]:
        """Per-clip shape of each output stream, e.g. ``{"visual": (8, 768)}``."""
        raise NotImplementedError

    def encode(self, frames: torch.Tensor | None, audio: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``frames``: (B, T, S, S, 3) uint8; ``audio``: (B, L) float32 in [-1, 1].

        Returns float tensors shaped ``(B, *streams()[name])`` for every stream.
        Called under ``torch.inference_mode()`` by the runner.
        """
        raise NotImplementedError

    def extra_key(self) -> dict:
        """Layer / pooling / options that change the output (override)."""
        return {}

    def key_material(self) -> dict:
        return {
            "encoder": self.name,
            "variant": self.variant,
            "weights": self.weights,
            "preprocess": self.preprocess.as_dict(),
            "streams": {k: list(v) for k, v in self.streams().items()},
            "stored_dtype": self.stored_dtype,
            **self.extra_key(),
        }

    def freeze(self) -> "FeatureEncoder":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self
