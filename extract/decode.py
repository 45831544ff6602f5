"""Decoding one clip into the fixed-size arrays an encoder's :class:`Preprocess` asks for.

Video frames come from decord's ``VideoReader`` (or, for AVSBench-style rows, from
an image folder read with PIL), audio from decord's ``AudioReader``, which decodes,
resamples to ``audio_rate`` and mixes to mono.

**Clip window.** A clip starts at ``start`` (the manifest row's ``start``, default
0 s) and spans ``D = preprocess.clip_seconds``. Its *content* ends at the earliest of
``start + D``, the row's ``end`` (if given) and the end of every stream the encoder
needs (video: end of the last frame; audio: decoded samples / ``audio_rate``).

**Frame sampling.** ``T = preprocess.num_frames`` frames at the times

    t_k = start + (k + 1/2) * step,   k = 0 .. T-1,

with ``step = D / T`` (uniform sampling) or ``step = 1 / fps`` (fps sampling), i.e. the
centre of each of T equal steps. Frame k is the video frame shown at ``t_k``: the
last frame whose presentation time is ``<= t_k``.

**Padding rule (short clips).** Sample times at or past the video's content end
(``min(start + D, end, end of the video)``) take the *last frame before that end*
(``repeat-last``); the waveform is the ``num_samples = round(audio_rate * D)``
samples from ``start``, zero after ``min(start + D, end, end of the audio)``.
``valid_len = content_end - start`` in seconds, where ``content_end`` is the
earliest end over the streams the encoder needs (a full clip has ``valid_len == D``).

**Resizing.** Every frame is resized to ``image_size`` x ``image_size`` (no crop, the
aspect ratio is not kept) with the encoder's ``resize`` mode (torch
``F.interpolate``, antialiased for bilinear/bicubic), rounded and clamped to uint8.

**Errors** never raise: they come back as a status code of :mod:`avcl_core.cache`
with a reason naming the file —
``STATUS_MISSING`` (no such file / folder), ``STATUS_UNREADABLE`` (not a media file,
truncated, decoder error), ``STATUS_NO_AUDIO`` (the encoder needs audio and the file
has no audio track; a video-only encoder does not care), ``STATUS_NO_VIDEO`` (frames
needed, no video stream), ``STATUS_EMPTY`` (0-byte file, no frames, or a window
that starts past the end of the media).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from avcl_core.cache import (STATUS_EMPTY, STATUS_MISSING, STATUS_NO_AUDIO, STATUS_NO_VIDEO, STATUS_OK,
                             STATUS_UNREADABLE)
from extract.encoders.base import Preprocess

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: Image folders without a row ``end`` are taken at this rate (AVSBench: one frame per second).
IMAGE_FOLDER_FPS = 1.0
#: Seconds within which a sample time counts as on a frame boundary (timestamps are float32).
TIME_EPS = 1e-4
RESIZE_MODES = ("bicubic", "bilinear", "nearest", "nearest-exact", "area")

_quiet = False
_DECORD_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")


@dataclass
class DecodedClip:
    """One decoded clip.

    ``frames``: uint8 (T, S, S, 3) RGB or None (encoder needs no frames, or failure);
    ``audio``: float32 (L,) mono in [-1, 1] or None; ``valid_len``: seconds of real
    content in the window; ``status``: a ``STATUS_*`` code; ``reason``: '' when ok,
    else why (naming the file).
    """

    frames: np.ndarray | None
    audio: np.ndarray | None
    valid_len: float
    status: int = STATUS_OK
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


class _DecodeFailure(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def quiet_decoder_logs() -> None:
    """Silence FFmpeg's console messages (a broken file is reported by its status instead)."""
    global _quiet
    if not _quiet:
        import decord

        decord.logging.set_level(decord.logging.QUIET)
        _quiet = True


# -- sampling ------------------------------------------------------------------
def sample_times(preprocess: Preprocess, start: float = 0.0) -> np.ndarray:
    """Frame sample times in seconds, ``t_k = start + (k + 1/2) * step`` (see the module docstring)."""
    t = preprocess.num_frames
    if t <= 0:
        return np.zeros(0, dtype=np.float64)
    step = 1.0 / preprocess.fps if preprocess.fps else preprocess.clip_seconds / t
    return start + (np.arange(t, dtype=np.float64) + 0.5) * step


def frame_indices(times: np.ndarray, frame_starts: np.ndarray, content_end: float) -> np.ndarray:
    """Index of the frame shown at each time (int64, same length as ``times``).

    Frame ``i`` is shown from ``frame_starts[i]`` (sorted, seconds) until the next frame;
    a time before the first frame takes frame 0; a time at or past ``content_end`` takes
    the last frame that starts before ``content_end`` (the repeat-last padding rule).
    """
    starts = np.asarray(frame_starts, dtype=np.float64)
    if starts.size == 0:
        raise ValueError("frame_indices: no frames")
    # decord's timestamps are float32: a time on a frame boundary must not fall a frame early
    idx = np.searchsorted(starts, np.asarray(times, dtype=np.float64) + TIME_EPS, side="right") - 1
    last = max(0, int(np.searchsorted(starts, content_end - TIME_EPS, side="left")) - 1)
    return np.clip(idx, 0, last).astype(np.int64)


def resize_frames(frames: np.ndarray, size: int, mode: str = "bicubic") -> np.ndarray:
    """uint8 (T, H, W, 3) → uint8 (T, size, size, 3), resized with ``mode`` (no crop)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r} is not one of {RESIZE_MODES}")
    if frames.shape[1] == size and frames.shape[2] == size:
        return np.ascontiguousarray(frames)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    kw = {"antialias": True, "align_corners": False} if mode in ("bicubic", "bilinear") else {}
    y = F.interpolate(x, size=(size, size), mode=mode, **kw)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


# -- readers -------------------------------------------------------------------
def _first_line(err: BaseException, limit: int = 200) -> str:
    """The useful part of a decoder error: FFmpeg's ``strerror`` or decord's last message line."""
    if getattr(err, "strerror", None):
        return str(err.strerror)[:limit]
    lines = str(err).strip().splitlines()
    line = lines[-1] if lines else type(err).__name__
    # decord prefixes its messages with "[hh:mm:ss] /path/to/source.cc:NN: "
    return _DECORD_PREFIX.sub("", line)[:limit] or type(err).__name__


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise _DecodeFailure(STATUS_MISSING, f"{path}: {what} file not found")
    if path.is_file() and path.stat().st_size == 0:
        raise _DecodeFailure(STATUS_EMPTY, f"{path}: {what} file is empty (0 bytes)")


def _probe_reason(path: Path) -> tuple[int, str] | None:
    """Ask FFmpeg (through PyAV) why a file cannot be read; ``(status, reason)`` or None."""
    try:
        import av

        with av.open(str(path)) as c:
            if not c.streams.video:
                return STATUS_NO_VIDEO, f"{path}: no video stream (streams: {[s.type for s in c.streams]})"
    except Exception as e:  # noqa: BLE001 - any FFmpeg error is the reason we want
        return STATUS_UNREADABLE, f"{path}: {_first_line(e)}"
    return None


def _read_video(path: Path, times: np.ndarray, start: float, limit_end: float):
    """(frames uint8 (T, H, W, 3), video content end in seconds) from a video file."""
    import decord

    _check_file(path, "video")
    try:
        vr = decord.VideoReader(str(path), num_threads=1)
    except Exception as e:  # noqa: BLE001 - decord raises RuntimeError / DECORDError for any bad file
        msg = str(e)
        if "video stream" in msg:
            raise _DecodeFailure(STATUS_NO_VIDEO, f"{path}: no video stream") from None
        probed = _probe_reason(path)
        if probed is not None:
            raise _DecodeFailure(*probed) from None
        raise _DecodeFailure(STATUS_UNREADABLE,
                             f"{path}: cannot be read, truncated or corrupt ({_first_line(e)})") from None
    n = len(vr)
    if n == 0:
        raise _DecodeFailure(STATUS_EMPTY, f"{path}: the video stream has no frames")
    try:
        stamps = np.asarray(vr.get_frame_timestamp(list(range(n))), dtype=np.float64)
        video_end = float(stamps[-1, 1])
        if start >= video_end:
            raise _DecodeFailure(STATUS_EMPTY, f"{path}: window starts at {start:g}s, the video ends at {video_end:g}s")
        idx = frame_indices(times, stamps[:, 0], min(limit_end, video_end))
        uniq, inverse = np.unique(idx, return_inverse=True)
        frames = vr.get_batch(uniq.tolist()).asnumpy()[inverse]
    except _DecodeFailure:
        raise
    except Exception as e:  # noqa: BLE001 - a decoder error mid-file is a truncated / corrupt file
        raise _DecodeFailure(STATUS_UNREADABLE, f"{path}: decoding frames failed ({_first_line(e)})") from None
    return frames, video_end


def _read_image_folder(folder: Path, times: np.ndarray, start: float, end: float | None, limit_end: float):
    """(frames uint8 (T, H, W, 3), content end) from a folder of images in name order.

    The images spread evenly over ``[start, end]`` when the row gives ``end``,
    otherwise they are taken at :data:`IMAGE_FOLDER_FPS` from ``start``.
    """
    from PIL import Image

    if not folder.is_dir():
        raise _DecodeFailure(STATUS_MISSING, f"{folder}: frame folder not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise _DecodeFailure(STATUS_EMPTY, f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the frame folder")
    step = (end - start) / len(files) if end is not None and end > start else 1.0 / IMAGE_FOLDER_FPS
    starts = start + np.arange(len(files)) * step
    folder_end = start + len(files) * step
    idx = frame_indices(times, starts, min(limit_end, folder_end))
    frames = []
    cache: dict[int, np.ndarray] = {}
    for i in idx.tolist():
        if i not in cache:
            try:
                with Image.open(files[i]) as im:
                    cache[i] = np.asarray(im.convert("RGB"))
            except Exception as e:  # noqa: BLE001 - PIL raises several types for a bad image
                raise _DecodeFailure(STATUS_UNREADABLE, f"{files[i]}: {_first_line(e)}") from None
        frames.append(cache[i])
    if len({f.shape for f in frames}) > 1:
        sizes = sorted({f.shape for f in frames})
        raise _DecodeFailure(STATUS_UNREADABLE, f"{folder}: images of different sizes {sizes}")
    return np.stack(frames), folder_end


def _read_audio(path: Path, rate: int, num_samples: int, start: float, limit_end: float):
    """(waveform float32 (num_samples,), audio content end) from any file FFmpeg reads."""
    import decord

    _check_file(path, "audio")
    try:
        ar = decord.AudioReader(str(path), sample_rate=rate, mono=True)
    except Exception as e:  # noqa: BLE001
        if "audio stream" in str(e):
            raise _DecodeFailure(STATUS_NO_AUDIO, f"{path}: no audio track") from None
        probed = _probe_reason(path)
        if probed is not None and probed[0] == STATUS_UNREADABLE:
            raise _DecodeFailure(*probed) from None
        raise _DecodeFailure(STATUS_UNREADABLE, f"{path}: {_first_line(e)}") from None
    total = ar.shape[1]
    audio_end = total / rate
    if total == 0:
        raise _DecodeFailure(STATUS_EMPTY, f"{path}: the audio track has no samples")
    if start >= audio_end:
        raise _DecodeFailure(STATUS_EMPTY, f"{path}: window starts at {start:g}s, the audio ends at {audio_end:g}s")
    a = int(round(start * rate))
    b = min(total, a + num_samples, int(round(min(limit_end, audio_end) * rate)))
    out = np.zeros(num_samples, dtype=np.float32)
    if b > a:
        out[: b - a] = ar[a:b].asnumpy()[0]
    return out, audio_end


# -- public --------------------------------------------------------------------
def decode_clip(
    path: str | os.PathLike | None,
    preprocess: Preprocess,
    start: float | None = None,
    end: float | None = None,
    *,
    frames_dir: str | os.PathLike | None = None,
    audio_path: str | os.PathLike | None = None,
) -> DecodedClip:
    """Decode the window ``[start, start + clip_seconds)`` of a clip as ``preprocess`` asks.

    Frames come from ``frames_dir`` (image folder) when given, else from the video at
    ``path``; audio from ``audio_path`` (e.g. a wav) when given, else from ``path``.
    Returns ``frames`` uint8 (T, S, S, 3) when ``preprocess.num_frames > 0`` and
    ``audio`` float32 (num_samples,) when ``preprocess.audio_rate > 0``, padded by the
    rule in the module docstring; a failure comes back as a status code and reason
    (never raised), with ``frames``/``audio`` None and ``valid_len`` 0.
    """
    quiet_decoder_logs()
    start = float(start or 0.0)
    window_end = start + float(preprocess.clip_seconds)
    limit_end = min(window_end, float(end)) if end is not None else window_end
    needs_video = preprocess.num_frames > 0
    needs_audio = preprocess.num_samples > 0
    if not (needs_video or needs_audio):
        raise ValueError(f"preprocess asks for neither frames nor audio: {preprocess}")
    if end is not None and float(end) <= start:
        where = frames_dir or path or audio_path
        return DecodedClip(None, None, 0.0, STATUS_EMPTY, f"{where}: empty window start={start:g}s end={float(end):g}s")
    content_end = limit_end
    frames = audio = None
    try:
        if needs_video:
            times = sample_times(preprocess, start)
            if frames_dir is not None:
                raw, vend = _read_image_folder(Path(frames_dir), times, start, end, limit_end)
            else:
                if path is None:
                    raise ValueError("decode_clip: frames are needed but neither path nor frames_dir is given")
                raw, vend = _read_video(Path(path), times, start, limit_end)
            content_end = min(content_end, vend)
            try:
                frames = resize_frames(raw, preprocess.image_size, preprocess.resize)
            except RuntimeError as e:  # e.g. a frame too small for the antialias kernel
                raise _DecodeFailure(STATUS_UNREADABLE,
                                     f"{frames_dir or path}: resizing failed ({_first_line(e)})") from None
        if needs_audio:
            src = audio_path if audio_path is not None else path
            if src is None:
                raise ValueError("decode_clip: audio is needed but neither path nor audio_path is given")
            audio, aend = _read_audio(Path(src), preprocess.audio_rate, preprocess.num_samples, start, limit_end)
            content_end = min(content_end, aend)
    except _DecodeFailure as f:
        return DecodedClip(None, None, 0.0, f.status, f.reason)
    return DecodedClip(frames, audio, float(max(0.0, content_end - start)), STATUS_OK, "")


def row_paths(row: dict, root: str | os.PathLike) -> dict:
    """Absolute ``path`` / ``frames_dir`` / ``audio_path`` of a manifest row under ``root``."""
    root = Path(root)

    def resolve(p):
        return None if p in (None, "") else (Path(p) if os.path.isabs(p) else root / p)

    return {"path": resolve(row.get("video")), "frames_dir": resolve(row.get("frames")),
            "audio_path": resolve(row.get("audio"))}


def decode_row(row: dict, root: str | os.PathLike, preprocess: Preprocess) -> DecodedClip:
    """:func:`decode_clip` for a manifest row (paths relative to ``root``; ``start``/``end`` from the row)."""
    return decode_clip(preprocess=preprocess, start=row.get("start"), end=row.get("end"), **row_paths(row, root))


def decoder_identity() -> dict:
    """What decoded the clips, for the cache key: library versions and the audio rules
    (decord's audio reader mixes channels to mono and resamples with FFmpeg)."""
    import decord
    import PIL

    return {"frames": f"decord {decord.__version__}", "images": f"pillow {PIL.__version__}",
            "audio": f"decord {decord.__version__}", "downmix": "decord-mono", "resampler": "ffmpeg (decord)"}
