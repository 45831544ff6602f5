"""``signal``: a weight-free, deterministic encoder of colour/shape/texture and log-mel statistics.

A pipeline demo and baseline: it needs no weights, runs fast on a CPU and is
exactly reproducible, so the embedded ``synth`` dataset (and tests) can run the
whole pipeline offline with features that carry real information. It is *not* a
substitute for pretrained encoders on natural video.

Visual features (per frame, image ``x`` in [0, 1], S x S x 3 RGB). Per pixel:

* ``chroma = max(R,G,B) - min(R,G,B)``, ``value = max(R,G,B)``, hue ``h`` in turns;
* hue histogram ``H_k = chroma * tri(K * circdist(h, k / K))``, k < K = ``hue_bins``,
  with ``tri(d) = max(0, 1 - |d|)``;
* achromatic histogram ``A_m = (1 - chroma) * tri(3 * value - m)``, m = 0..3;
* oriented edges ``E_o = |grad Y| * tri(O * circdist(theta / pi, o / O))``, o < O =
  ``orientation_bins``, with Sobel gradients of luma ``Y = .299R + .587G + .114B`` and
  unsigned orientation ``theta`` in [0, pi);
* texture ``|lap Y|`` (3 x 3 Laplacian) at full and at half resolution;
* ``R, G, B``.

These C = K + 4 + O + 5 maps are averaged over regions, giving C values per region
in the order ``H_0..H_K-1 | A_0..A_3 | E_0..E_O-1 | |lap| | |lap half| | R G B``:

* ``visual`` (T, Dv) = the whole frame (C) | the cells of a ``grid`` x ``grid`` grid
  (C x grid x grid, channel-major, cells row-major) | the whole-frame
  colour-by-orientation histogram ``J_ko = mean_pixels(H_k * E_o)`` (K x O), which
  binds a colour to its shape; ``Dv = C * (1 + grid**2) + K * O``.
* ``visual_dense`` (T, P, C): each cell of a ``dense_grid`` x ``dense_grid`` grid
  (P = dense_grid**2, row-major), for segmentation heads.

Audio features: power spectrogram ``|STFT|^2 / (sum(w) / 2)^2`` (Hann window ``w`` of
``n_fft`` samples, hop ``hop_length``, centred, so a full-scale sine peaks near 1)
→ triangular mel filterbank (HTK mel scale, ``n_mels`` bands in [``fmin``,
``fmax``], default fmax = audio_rate / 2) → ``log(mel + 1e-8)``. Of the
``F = L // hop_length + 1`` frames, the first ``Ta * (F // Ta)`` are cut into
``Ta = round(clip_seconds / window_seconds)`` equal windows, and ``audio``
(Ta, 2 * n_mels) holds each window's per-band mean and standard deviation
(population std).
"""
from __future__ import annotations

import math
import numpy as np
import torch
import torch.nn.functional as F

from extract.encoders.base import FeatureEncoder, Preprocess

ACHROMATIC_BINS = 4
EPS_LOG = 1e-8


def hz_to_mel(f):
    """HTK mel scale: ``2595 * log10(1 + f / 700)``."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Triangular filters (n_mels, n_fft // 2 + 1), peak 1, centres equally spaced in mel.

    Filter ``m`` rises linearly from centre ``m-1`` to centre ``m`` and falls to
    centre ``m+1`` (centres ``m = 0 .. n_mels+1`` equally spaced in HTK mel between
    ``fmin`` and ``fmax``), evaluated at the FFT bin frequencies ``k * rate / n_fft``.
    """
    if not 0 <= fmin < fmax <= sample_rate / 2:
        raise ValueError(f"signal encoder: need 0 <= fmin < fmax <= rate/2, "
                         f"got fmin={fmin}, fmax={fmax}, rate={sample_rate}")
    freqs = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


def _soft_hist(x: torch.Tensor, n: int, weight: torch.Tensor, circular: bool) -> torch.Tensor:
    """Per-pixel soft histogram: ``weight * max(0, 1 - |x - j|)`` for bins j = 0..n-1
    (distance taken mod n when ``circular``); x, weight (N, H, W) → (N, n, H, W).

    Computed as linear interpolation between the two nearest bins, which is the
    same triangle kernel without materialising the distance to every bin.
    """
    if circular:
        x = torch.remainder(x, float(n))
        lo = torch.floor(x)
        frac = x - lo
        lo = lo.long() % n
        hi = (lo + 1) % n
    else:
        x = x.clamp(0.0, float(n - 1))
        lo = torch.floor(x).clamp_max(max(n - 2, 0))
        frac = x - lo
        lo = lo.long()
        hi = (lo + 1).clamp_max(n - 1)
    out = torch.zeros(x.shape[0], n, *x.shape[1:], dtype=weight.dtype, device=weight.device)
    out.scatter_(1, lo.unsqueeze(1), (weight * (1.0 - frac)).unsqueeze(1))
    return out.scatter_add_(1, hi.unsqueeze(1), (weight * frac).unsqueeze(1))


def _int(key: str, val, low: int) -> int:
    if isinstance(val, bool) or not isinstance(val, (int, float, np.integer, np.floating)) or int(val) != val \
            or val < low:
        raise ValueError(f"signal encoder: {key} must be an integer >= {low}, got {val!r}")
    return int(val)


def _positive(key: str, val, allow_zero: bool = False) -> float:
    if isinstance(val, bool) or not isinstance(val, (int, float, np.integer, np.floating)) \
            or not (val >= 0 if allow_zero else val > 0):
        raise ValueError(f"signal encoder: {key} must be a number {'>=' if allow_zero else '>'} 0, got {val!r}")
    return float(val)


class SignalEncoder(FeatureEncoder):
    """Weight-free colour/shape/texture + log-mel statistics (see the module docstring).

    Streams (per clip): ``visual`` (T, Dv), ``visual_dense`` (T, dense_grid**2, C),
    ``audio`` (Ta, 2 * n_mels); T = ``frames_per_clip``. With ``frames_per_clip=0``
    there are no visual streams, with ``audio_rate=0`` no audio stream.
    """

    name = "signal"
    variant = "v1"

    def __init__(
        self,
        clip_seconds: float = 2.0,
        frames_per_clip: int = 8,
        image_size: int = 64,
        audio_rate: int = 16000,
        grid: int = 2,
        dense_grid: int = 8,
        hue_bins: int = 12,
        orientation_bins: int = 8,
        n_mels: int = 64,
        n_fft: int = 1024,
        hop_length: int = 160,
        fmin: float = 60.0,
        fmax: float | None = None,
        window_seconds: float = 0.25,
    ) -> None:
        super().__init__()
        self.weights = "none"
        frames_per_clip, audio_rate = _int("frames_per_clip", frames_per_clip, 0), _int("audio_rate", audio_rate, 0)
        if frames_per_clip == 0 and audio_rate == 0:
            raise ValueError("signal encoder: frames_per_clip and audio_rate are both 0: nothing to encode")
        image_size, grid, dense_grid = (_int(k, v, 1) for k, v in
                                        (("image_size", image_size), ("grid", grid), ("dense_grid", dense_grid)))
        hue_bins, orientation_bins = _int("hue_bins", hue_bins, 1), _int("orientation_bins", orientation_bins, 1)
        n_mels, n_fft, hop_length = (_int(k, v, 1) for k, v in
                                     (("n_mels", n_mels), ("n_fft", n_fft), ("hop_length", hop_length)))
        clip_seconds = _positive("clip_seconds", clip_seconds)
        window_seconds = _positive("window_seconds", window_seconds)
        if max(grid, dense_grid) > image_size:
            raise ValueError(f"signal encoder: grid {grid} / dense_grid {dense_grid} exceed image_size {image_size}")
        self.preprocess = Preprocess(
            clip_seconds=float(clip_seconds),
            frames_per_clip=int(frames_per_clip),
            image_size=int(image_size),
            audio_rate=int(audio_rate),
        )
        self.grid, self.dense_grid = int(grid), int(dense_grid)
        self.hue_bins, self.orientation_bins = int(hue_bins), int(orientation_bins)
        self.n_mels, self.n_fft, self.hop_length = int(n_mels), int(n_fft), int(hop_length)
        self.fmin = _positive("fmin", fmin, allow_zero=True)
        self.fmax = _positive("fmax", fmax) if fmax is not None else audio_rate / 2.0
        self.window_seconds = float(window_seconds)
        if audio_rate:
            self.audio_windows = max(1, round(clip_seconds / window_seconds))
            if self.preprocess.num_samples <= n_fft // 2:
                raise ValueError(f"signal encoder: a clip of {self.preprocess.num_samples} samples is too short "
                                 f"for n_fft {n_fft} (needs more than n_fft / 2)")
            frames = self.preprocess.num_samples // self.hop_length + 1
            if frames < self.audio_windows:
                raise ValueError(
                    f"signal encoder: {frames} STFT frames cannot fill {self.audio_windows} windows "
                    f"(hop_length {hop_length}, window_seconds {window_seconds})"
                )
            fb = mel_filterbank(self.preprocess.audio_rate, self.n_fft, self.n_mels, self.fmin, self.fmax)
            self.register_buffer("mel_fb", torch.from_numpy(fb), persistent=False)
            self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)
        else:
            self.audio_windows = 0
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
        lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
        self.register_buffer("kernels", torch.stack([sobel, sobel.T, lap]).unsqueeze(1), persistent=False)
        self.freeze()

    # -- contract ---------------------------------------------------------------
    @property
    def channels(self) -> int:
        """C: per-region statistics (hue, achromatic, orientation, 2 texture, RGB)."""
        return self.hue_bins + ACHROMATIC_BINS + self.orientation_bins + 2 + 3

    def streams(self) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        t = self.preprocess.num_frames
        if t:
            c = self.channels
            out["visual"] = (t, c * (1 + self.grid**2) + self.hue_bins * self.orientation_bins)
            out["visual_dense"] = (t, self.dense_grid**2, c)
        if self.preprocess.audio_rate:
            out["audio"] = (self.audio_windows, 2 * self.n_mels)
        return out

    def extra_key(self) -> dict:
        return {
            "options": {
                "grid": self.grid,
                "dense_grid": self.dense_grid,
                "hue_bins": self.hue_bins,
                "orientation_bins": self.orientation_bins,
                "achromatic_bins": ACHROMATIC_BINS,
                "n_mels": self.n_mels,
                "n_fft": self.n_fft,
                "hop_length": self.hop_length,
                "fmin": self.fmin,
                "fmax": self.fmax,
                "window_seconds": self.window_seconds,
                "mel_scale": "htk",
                "log_eps": EPS_LOG,
            }
        }

    @torch.inference_mode()
    def encode(self, frames: torch.Tensor | None, audio: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``frames`` uint8 (B, T, S, S, 3), ``audio`` float32 (B, L) → float32 streams (B, *shape)."""
        out: dict[str, torch.Tensor] = {}
        shapes = self.streams()
        if "visual" in shapes:
            t, s = self.preprocess.num_frames, self.preprocess.image_size
            if frames is None:
                raise ValueError("signal encoder: visual streams need frames, got None")
            if frames.dim() != 5 or tuple(frames.shape[1:]) != (t, s, s, 3) or frames.dtype != torch.uint8:
                raise ValueError(f"signal encoder: frames must be (B, {t}, {s}, {s}, 3) uint8, "
                                 f"got {tuple(frames.shape)} {frames.dtype}")
            out.update(self._visual(frames))
        if "audio" in shapes:
            n = self.preprocess.num_samples
            if audio is None:
                raise ValueError("signal encoder: the audio stream needs a waveform, got None")
            if audio.dim() != 2 or audio.shape[1] != n:
                raise ValueError(f"signal encoder: audio must be (B, {n}) float32, got {tuple(audio.shape)}")
            out["audio"] = self._audio(audio)
        return out

    # -- visual -----------------------------------------------------------------
    def _pixel_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, 3, S, S) in [0, 1] → hue histogram (N, K, S, S), oriented edges (N, O, S, S),
        the other full-resolution maps achromatic | |lap| (N, 5, S, S) and the
        half-resolution |lap| (N, 1, S/2, S/2)."""
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        vmax, vmin = x.max(1).values, x.min(1).values
        chroma = vmax - vmin
        safe = chroma.clamp_min(1e-6)
        # Hexagonal hue in turns (0 red, 1/3 green, 2/3 blue); arbitrary but harmless where chroma = 0.
        hue = torch.where(vmax == r, torch.remainder((g - b) / safe, 6.0),
                          torch.where(vmax == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)) / 6.0
        k, o = self.hue_bins, self.orientation_bins
        hue_h = _soft_hist(hue * k, k, chroma, circular=True)
        achro = _soft_hist(vmax * (ACHROMATIC_BINS - 1), ACHROMATIC_BINS, 1.0 - chroma, circular=False)
        luma = (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)
        filt = F.conv2d(F.pad(luma, (1, 1, 1, 1), mode="replicate"), self.kernels.to(x.dtype))
        gx, gy, lap = filt[:, 0], filt[:, 1], filt[:, 2]
        mag = torch.sqrt(gx * gx + gy * gy)
        theta = torch.remainder(torch.atan2(gy, gx), math.pi) / math.pi  # unsigned orientation / pi
        edges = _soft_hist(theta * o, o, mag, circular=True)
        half = F.avg_pool2d(luma, 2, ceil_mode=True)
        lap_half = F.conv2d(F.pad(half, (1, 1, 1, 1), mode="replicate"), self.kernels[2:3].to(x.dtype)).abs()
        return hue_h, edges, torch.cat([achro, lap.abs().unsqueeze(1)], 1), lap_half

    def _regions(self, hue_h, edges, other, lap_half, x, g: int) -> torch.Tensor:
        """Means over a g x g grid of cells: (N, C, g, g), channels hue | achromatic |
        edges | |lap| | |lap at half resolution| | RGB."""
        pool = lambda z: F.adaptive_avg_pool2d(z, g)  # noqa: E731
        achro_lap = pool(other)
        return torch.cat([pool(hue_h), achro_lap[:, :ACHROMATIC_BINS], pool(edges),
                          achro_lap[:, ACHROMATIC_BINS:], pool(lap_half), pool(x)], 1)

    def _visual(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        b, t, s = frames.shape[:3]
        x = frames.reshape(b * t, s, s, 3).permute(0, 3, 1, 2).float() / 255.0
        vis, dense = [], []
        for chunk in x.split(256):  # bounds the (N, C, S, S) working set
            maps = self._pixel_maps(chunk)
            whole = self._regions(*maps, chunk, 1).flatten(1)
            cells = self._regions(*maps, chunk, self.grid).flatten(1)
            hue_h, edges = maps[0], maps[1]
            joint = torch.einsum("nkhw,nohw->nko", hue_h, edges) / (s * s)
            vis.append(torch.cat([whole, cells, joint.flatten(1)], 1))
            d = self._regions(*maps, chunk, self.dense_grid)  # (n, C, G, G)
            dense.append(d.flatten(2).transpose(1, 2))
        return {
            "visual": torch.cat(vis).reshape(b, t, -1),
            "visual_dense": torch.cat(dense).reshape(b, t, self.dense_grid**2, self.channels),
        }

    # -- audio ------------------------------------------------------------------
    def _audio(self, audio: torch.Tensor) -> torch.Tensor:
        wav = audio.float()
        spec = torch.stft(
            wav, self.n_fft, hop_length=self.hop_length, window=self.window.to(wav.device),
            center=True, pad_mode="reflect", return_complex=True,
        )
        power = spec.real**2 + spec.imag**2  # (B, F, frames)
        # Scale so a full-scale sine has power ~ 1 whatever the window length.
        power = power / (self.window.sum() ** 2 / 4)
        logmel = torch.log(torch.einsum("mf,bft->btm", self.mel_fb.to(power.dtype), power) + EPS_LOG)
        w = self.audio_windows
        per = logmel.shape[1] // w
        chunks = logmel[:, : per * w].reshape(wav.shape[0], w, per, self.n_mels)
        return torch.cat([chunks.mean(2), chunks.std(2, unbiased=False)], -1)


def build(variant: str = "v1", device: str = "cpu", **options) -> SignalEncoder:
    """Registry hook: the frozen ``signal`` encoder (no weights; ``variant`` must be ``"v1"``).

    Example: ``build(frames_per_clip=4, image_size=32).streams()`` →
    ``{"visual": (4, 241), "visual_dense": (4, 64, 29), "audio": (8, 128)}``.
    An unknown keyword is a ``TypeError`` (Python's own, naming it).
    """
    if variant != SignalEncoder.variant:
        raise ValueError(f"signal encoder: unknown variant {variant!r}; the only one is {SignalEncoder.variant!r}")
    return SignalEncoder(**options).to(device).freeze()
