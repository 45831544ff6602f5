"""``pann-cnn14``: PANN CNN14 (AudioSet tagging), with its log-mel front end.

Front end at 32 kHz (part of the state dict, as upstream):

- STFT as two Conv1d kernels (``spectrogram_extractor.stft.conv_{real,imag}.weight``,
  (513, 1, 1024)): ``real[k, n] = w[n]·cos(2πkn/1024)``, ``imag[k, n] = −w[n]·sin(2πkn/1024)``
  with w the periodic Hann window; hop 320; the waveform is reflect-padded by 512 on each
  side (centred frames), giving ``1 + L // 320`` frames; power = real² + imag².
- Mel: power @ ``logmel_extractor.melW`` (513, 64), Slaney-style triangular filters on the
  Slaney mel scale from 50 to 14000 Hz, each scaled by 2 / (f_right − f_left) (unit area in Hz).
- Log: 10·log10(max(x, 1e-10)) (no top_db clipping).

Network: ``bn0`` (BatchNorm over the 64 mel bins), six conv blocks (each two 3×3 conv →
BN → ReLU; 2×2 average pooling after blocks 1–5; widths 64…2048), mean over frequency →
map ``m`` (C, T'), clip vector ``max_t m + mean_t m``, ``fc1`` + ReLU → the embedding.
``fc_audioset`` (527 classes) is kept so upstream files load strictly, but not output.

Streams: ``audio`` (1, 2048) = fc1 embedding; ``audio_dense`` (T', 2048) = the map ``m``
over time (T' = 31 for 10 s: ``1 + L//320`` frames halved five times, rounding down);
with ``per_second=True`` also ``audio_seconds`` (S, 2048), S = ``round(clip_seconds)``: the
map ``m`` average-pooled over time into S equal bins (``adaptive_avg_pool1d``), about one
token per second — several audio keys per clip for cross-attention (segmentation heads).

Weights: ``Cnn14_mAP=0.431.pth``: ``{'iteration', 'model': state_dict (84 keys), 'sampler'}``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.signal
import torch
from torch import nn
from torch.nn import functional as F

from .base import FeatureEncoder, Preprocess
from .loading import (autocast, check_amp, check_audio, compute_precision, load_checked,
                      read_state_file, seeded, unwrap, weights_id)


@dataclass(frozen=True)
class Cnn14Config:
    widths: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
    classes: int = 527
    sample_rate: int = 32_000
    n_fft: int = 1024
    hop: int = 320
    n_mels: int = 64
    fmin: float = 50.0
    fmax: float = 14_000.0

    @property
    def embed_dim(self) -> int:
        return self.widths[-1]


#: ``tiny`` is CNN14 with every width divided by 16 and the same front end.
VARIANTS = {
    "base": Cnn14Config(),
    "tiny": Cnn14Config(widths=(4, 8, 16, 32, 64, 128)),
}


# --- front end -----------------------------------------------------------------------------

def hz_to_mel(hz):
    """Slaney mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above
    (mel = 15 + 27·ln(f/1000)/ln(6.4))."""
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / (200.0 / 3.0)
    log_step = math.log(6.4) / 27.0
    return np.where(hz >= 1000.0, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / log_step, mel)


def mel_to_hz(mel):
    """Inverse of :func:`hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    log_step = math.log(6.4) / 27.0
    return np.where(mel >= 15.0, 1000.0 * np.exp(log_step * (mel - 15.0)), mel * (200.0 / 3.0))


def slaney_mel_matrix(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """(n_fft//2 + 1, n_mels) float32 filterbank; column i is the triangle with corners
    f[i], f[i+1], f[i+2] (n_mels + 2 points equally spaced in mel from fmin to fmax),
    peak 2 / (f[i+2] − f[i])."""
    fft_hz = np.linspace(0.0, sr / 2.0, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (fft_hz[None, :] - left) / (centre - left)
    falling = (right - fft_hz[None, :]) / (right - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (right - left))
    return weights.T.astype(np.float32)


def dft_kernels(n_fft: int) -> tuple[np.ndarray, np.ndarray]:
    """Hann-windowed real and imaginary DFT rows, each (n_fft//2 + 1, 1, n_fft) float32."""
    window = scipy.signal.get_window("hann", n_fft, fftbins=True)  # periodic Hann
    k = np.arange(n_fft // 2 + 1)[:, None]
    n = np.arange(n_fft)[None, :]
    phase = 2.0 * np.pi * ((k * n) % n_fft) / n_fft  # reduce mod n_fft for exact angles
    real = np.cos(phase) * window
    imag = -np.sin(phase) * window
    return real[:, None, :].astype(np.float32), imag[:, None, :].astype(np.float32)


class _STFT(nn.Module):
    def __init__(self, cfg: Cnn14Config) -> None:
        super().__init__()
        bins = cfg.n_fft // 2 + 1
        self.conv_real = nn.Conv1d(1, bins, cfg.n_fft, stride=cfg.hop, bias=False)
        self.conv_imag = nn.Conv1d(1, bins, cfg.n_fft, stride=cfg.hop, bias=False)
        real, imag = dft_kernels(cfg.n_fft)
        with torch.no_grad():
            self.conv_real.weight.copy_(torch.from_numpy(real))
            self.conv_imag.weight.copy_(torch.from_numpy(imag))


class _Spectrogram(nn.Module):
    def __init__(self, cfg: Cnn14Config) -> None:
        super().__init__()
        self.n_fft = cfg.n_fft
        self.stft = _STFT(cfg)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, L) → power spectrogram (B, 1 + L//hop, n_fft//2 + 1)."""
        x = F.pad(wav.unsqueeze(1), (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        real, imag = self.stft.conv_real(x), self.stft.conv_imag(x)
        return (real.pow(2) + imag.pow(2)).transpose(1, 2)


class _LogMel(nn.Module):
    def __init__(self, cfg: Cnn14Config) -> None:
        super().__init__()
        self.melW = nn.Parameter(torch.from_numpy(
            slaney_mel_matrix(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)))

    def forward(self, power: torch.Tensor) -> torch.Tensor:
        return 10.0 * torch.log10(torch.clamp(power @ self.melW, min=1e-10))


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor, pool: bool) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, 2) if pool else x


class Cnn14(nn.Module):
    """CNN14 with upstream parameter names. ``forward``: (B, L) at 32 kHz →
    (embedding (B, E), frame map (B, T', E))."""

    def __init__(self, cfg: Cnn14Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.spectrogram_extractor = _Spectrogram(cfg)
        self.logmel_extractor = _LogMel(cfg)
        self.bn0 = nn.BatchNorm2d(cfg.n_mels)
        c_in = 1
        for i, width in enumerate(cfg.widths, start=1):
            setattr(self, f"conv_block{i}", ConvBlock(c_in, width))
            c_in = width
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.fc_audioset = nn.Linear(cfg.embed_dim, cfg.classes)
        self._init_like_upstream()

    def _init_like_upstream(self) -> None:
        # Xavier-uniform layers and unit BN keep random-init activations at a usable scale
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def logmel(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, L) → log-mel (B, 1 + L//hop, n_mels) in dB."""
        return self.logmel_extractor(self.spectrogram_extractor(wav))

    def body(self, logmel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.bn0(logmel.transpose(1, 2).unsqueeze(-1))  # (B, mels, T, 1): BN over mel bins
        x = x.squeeze(-1).transpose(1, 2).unsqueeze(1)  # (B, 1, T, mels)
        n_blocks = len(self.cfg.widths)
        for i in range(1, n_blocks + 1):
            x = getattr(self, f"conv_block{i}")(x, pool=i < n_blocks)
        frame_map = x.mean(dim=3)  # (B, C, T')
        clip = frame_map.amax(dim=2) + frame_map.mean(dim=2)
        return F.relu(self.fc1(clip)), frame_map.transpose(1, 2)

    def num_frames(self, num_samples: int) -> int:
        t = 1 + num_samples // self.cfg.hop
        for _ in range(len(self.cfg.widths) - 1):
            t //= 2
        return t

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.body(self.logmel(wav))


class PannEncoder(FeatureEncoder):
    """PANN CNN14 clip embedding and frame map; see the module docstring."""

    name = "pann-cnn14"

    def __init__(self, variant: str = "base", *, clip_seconds: float = 10.0, dense: bool = True,
                 amp: str | None = "bfloat16", per_second: bool = False) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"pann-cnn14: unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
        self.variant = variant
        self.cfg = VARIANTS[variant]
        self.dense = bool(dense)
        self.per_second = bool(per_second)
        self.amp = check_amp(amp)
        self.model = Cnn14(self.cfg)
        self.preprocess = Preprocess(clip_seconds=float(clip_seconds), frames_per_clip=0, image_size=0,
                                     audio_rate=self.cfg.sample_rate)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def streams(self) -> dict[str, tuple[int, ...]]:
        out = {"audio": (1, self.cfg.embed_dim)}
        if self.dense:
            out["audio_dense"] = (self.model.num_frames(self.preprocess.num_samples), self.cfg.embed_dim)
        if self.per_second:
            out["audio_seconds"] = (self.seconds, self.cfg.embed_dim)
        return out

    @property
    def seconds(self) -> int:
        """Tokens of ``audio_seconds``: ``round(clip_seconds)``, at least 1."""
        return max(1, round(self.preprocess.clip_seconds))

    def extra_key(self) -> dict:
        c = self.cfg
        return {
            "compute": compute_precision(self.device, self.amp),
            "widths": list(c.widths),
            "front_end": {"n_fft": c.n_fft, "hop": c.hop, "window": "hann-periodic", "center": "reflect",
                          "n_mels": c.n_mels, "fmin": c.fmin, "fmax": c.fmax, "mel": "slaney",
                          "log": "10log10(max(x,1e-10))", "front_end_precision": "float32"},
            "audio": "fc1+relu of (max_t + mean_t) of freq-mean conv_block6",
            **({"audio_dense": "freq-mean conv_block6 per frame"} if self.dense else {}),
            **({"audio_seconds": "audio_dense adaptive-avg-pooled to round(clip_seconds) tokens"}
               if self.per_second else {}),
        }

    @torch.inference_mode()
    def encode(self, frames: torch.Tensor | None, audio: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``audio`` (B, L) at 32 kHz → ``audio`` (B, 1, E) [and ``audio_dense`` (B, T', E)], float32."""
        dev = self.device
        wav = check_audio(audio).to(dev)
        # the log-mel front end stays float32: dB values of tiny powers lose too much in bf16
        logmel = self.model.logmel(wav)
        with autocast(dev, self.amp):
            emb, frame_map = self.model.body(logmel)
        out = {"audio": emb.float().unsqueeze(1)}
        if self.dense:
            out["audio_dense"] = frame_map.float()
        if self.per_second:
            pooled = torch.nn.functional.adaptive_avg_pool1d(frame_map.float().transpose(1, 2), self.seconds)
            out["audio_seconds"] = pooled.transpose(1, 2)
        return out

    def load_checkpoint(self, path: str | Path, *, trust: bool = False) -> None:
        """Load an upstream CNN14 file (state dict under ``'model'``, as ``Cnn14_mAP=0.431.pth``)."""
        state = unwrap(read_state_file(path, trust=trust), "model", "state_dict")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        load_checked(self.model, state, path)
        self.weights = weights_id(path, 0)


def build(variant: str = "base", checkpoint: str | None = None, random_init_seed: int = 0,
          device: str = "cpu", clip_seconds: float = 10.0, dense: bool = True,
          amp: str | None = "bfloat16", trust_checkpoint: bool = False, per_second: bool = False) -> PannEncoder:
    """Build the frozen ``pann-cnn14`` encoder.

    The numpy data-sampler state in PANN's training checkpoints is read with numpy's array
    reconstructors allowed; ``trust_checkpoint=True`` unpickles a file that needs more
    (only for a trusted file). Example: ``build(checkpoint='Cnn14_mAP=0.431.pth', device='cuda')``.
    """
    with seeded(random_init_seed):
        enc = PannEncoder(variant, clip_seconds=clip_seconds, dense=dense, amp=amp, per_second=per_second)
    enc.weights = f"random-init:{int(random_init_seed)}"
    if checkpoint:
        enc.load_checkpoint(checkpoint, trust=trust_checkpoint)
    return enc.to(device).freeze()
