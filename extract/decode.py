"""Decoding one clip into the fixed-size arrays an encoder's :class:`Preprocess` asks for.

Video frames come from decord's ``VideoReader`` or from PyAV (:data:`FRAME_DECODERS`,
default :data:`DEFAULT_FRAME_DECODER`, chosen by ``benchmarks/bench_decode.py``), or,
for AVSBench-style rows, from a sequence of images read with PIL; audio always comes
from PyAV (FFmpeg's decoders, libswresample), which seeks to the window and decodes
only it.

**Timeline.** All times are seconds on one timeline per file: ``t = 0`` is the start
of the file's video stream (the presentation time of its first frame, the origin of
decord's frame timestamps), or of the audio stream for a file without video. A stream
that starts later in the container than the video (its ``start_time``) starts that
much later on the timeline: an audio track that begins 0.5 s after the first frame
gives 0.5 s of silence at the head of a window at 0 s, never audio shifted early.
Audio before ``t = 0`` (a track that starts before the video) is not part of any window.

**Clip window.** A clip starts at ``start`` (the manifest row's ``start``, default
0 s) and spans ``D = preprocess.clip_seconds``. Its *content* ends at the earliest of
``start + D``, the row's ``end`` (if given) and the end of every stream the encoder
needs (video: end of the last frame; audio: end of the last decoded sample).

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

**Audio.** The first audio stream is decoded from a seek point
:data:`AUDIO_SEEK_MARGIN` seconds before the window (so that a codec's warm-up — AAC's
overlapped transform, MP3's bit reservoir — is over by the window's first sample) to
:data:`AUDIO_EDGE` seconds after it. Each decoded frame is placed on the timeline by
its presentation time (gaps stay zero); channels are mixed to mono by their **mean**
(``(L + R) / 2`` for stereo, as SAM-Audio's processor and PANN's ``librosa`` loading
do — not FFmpeg's default ``(L + R) / sqrt(2)`` down-mix); the mono signal is
resampled to ``audio_rate`` by libswresample (PyAV's ``AudioResampler``, default
filter), with :data:`AUDIO_EDGE` seconds of context either side of the window so that
the window's samples are those of resampling the whole track. Memory and time are
bounded by the window, not by the file.

**Resizing.** Every frame is resized to ``image_size`` x ``image_size`` (no crop, the
aspect ratio is not kept) with the encoder's ``resize`` mode (torch
``F.interpolate``, antialiased for bilinear/bicubic), rounded and clamped to uint8.
Frames are resized as they are decoded, a few at a time (:data:`RESIZE_CHUNK_BYTES`),
so a worker never holds more than a chunk of frames at source resolution in float32.

**Image sequences.** A row's ``frames`` is a glob pattern or a folder, resolved by
:func:`avcl_core.manifest.image_sequence` (the manifest's definition); the images, in
natural name order, are spread evenly over ``[start, end]`` when the row gives
``end``, otherwise taken at :data:`IMAGE_FOLDER_FPS` from ``start``.

**Errors** never raise: they come back as a status code of :mod:`avcl_core.cache`
with a reason naming the file —
``STATUS_MISSING`` (no such file / folder / matching image), ``STATUS_UNREADABLE`` (not
a media file, truncated, decoder error), ``STATUS_NO_AUDIO`` (the encoder needs audio
and the file has no audio track; a video-only encoder does not care),
``STATUS_NO_VIDEO`` (frames needed, no video stream), ``STATUS_EMPTY`` (0-byte file,
no frames, or a window that starts past the end of the media).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from avcl_core.cache import (STATUS_EMPTY, STATUS_MISSING, STATUS_NO_AUDIO, STATUS_NO_VIDEO, STATUS_OK,
                             STATUS_UNREADABLE)
from avcl_core.manifest import IMAGE_SUFFIXES, image_sequence, is_pattern
from extract.encoders.base import Preprocess

#: Image folders without a row ``end`` are taken at this rate (AVSBench: one frame per second).
IMAGE_FOLDER_FPS = 1.0
#: Seconds within which a sample time counts as on a frame boundary (timestamps are float32).
TIME_EPS = 1e-4
RESIZE_MODES = ("bicubic", "bilinear", "nearest", "nearest-exact", "area")
#: Frame decoders; the default is the faster one on ``benchmarks/bench_decode.py``.
FRAME_DECODERS = ("decord", "pyav")
DEFAULT_FRAME_DECODER = "decord"
#: Seconds of audio decoded before the window and thrown away: the codec's warm-up.
AUDIO_SEEK_MARGIN = 0.5
#: Seconds of audio kept either side of the window while resampling (the filter's context).
AUDIO_EDGE = 0.1
#: Source-resolution frames are converted to float32 for resizing in chunks of at most this many bytes.
RESIZE_CHUNK_BYTES = 32 << 20

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
        import av.logging
        import decord

        decord.logging.set_level(decord.logging.QUIET)
        av.logging.set_level(None)
        _quiet = True


def decoder_identity(frame_decoder: str | None = None) -> dict:
    """What decides the decoded arrays besides the media and the preprocessing (JSON-serialisable).

    Libraries and their versions (the frame decoder, PIL for image sequences, PyAV and
    the FFmpeg libraries it links for audio), the down-mix rule, the resampler, the
    resize rule and the timeline convention. A store's key includes it, so a change of
    any of them gives a new store.
    """
    import av
    import PIL

    frame_decoder = frame_decoder or DEFAULT_FRAME_DECODER
    if frame_decoder == "decord":
        import decord

        frames = f"decord {decord.__version__}"
    else:
        frames = f"pyav {av.__version__}"
    libav = {name: ".".join(str(x) for x in v) for name, v in sorted(av.library_versions.items())}
    return {
        "frame_decoder": frames,
        "frame_rgb": "decoder's own yuv->rgb24 conversion",
        "image_decoder": f"pillow {PIL.__version__} (convert('RGB'))",
        "audio_decoder": f"pyav {av.__version__}",
        "libav": libav,
        "downmix": "mean",
        "resampler": f"libswresample {libav.get('libswresample', '?')} (PyAV AudioResampler, default filter)",
        "audio_context": {"seek_margin_s": AUDIO_SEEK_MARGIN, "edge_s": AUDIO_EDGE},
        "resize": f"torch {torch.__version__} F.interpolate, antialias for bilinear/bicubic, round, clamp uint8",
        "timeline": "t=0 at the video stream start (audio stream start without video)",
    }


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


def _resize_chunk_len(height: int, width: int) -> int:
    """Frames per resize chunk: as many as fit :data:`RESIZE_CHUNK_BYTES` in float32, at least one."""
    return max(1, RESIZE_CHUNK_BYTES // max(1, height * width * 3 * 4))


def resize_frames(frames: np.ndarray, size: int, mode: str = "bicubic", chunk: int | None = None) -> np.ndarray:
    """uint8 (T, H, W, 3) → uint8 (T, size, size, 3), resized with ``mode`` (no crop).

    Frames are converted to float32 and resized ``chunk`` at a time (default: as many as
    fit :data:`RESIZE_CHUNK_BYTES`), so the float copy is O(chunk), not O(T); the result
    is the same as resizing all frames in one batch (each frame is resized on its own).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r} is not one of {RESIZE_MODES}")
    if frames.shape[1] == size and frames.shape[2] == size:
        return np.ascontiguousarray(frames)
    chunk = chunk or _resize_chunk_len(frames.shape[1], frames.shape[2])
    out = np.empty((frames.shape[0], size, size, 3), dtype=np.uint8)
    kw = {"antialias": True, "align_corners": False} if mode in ("bicubic", "bilinear") else {}
    for a in range(0, frames.shape[0], chunk):
        x = torch.from_numpy(np.ascontiguousarray(frames[a:a + chunk])).permute(0, 3, 1, 2).float()
        y = F.interpolate(x, size=(size, size), mode=mode, **kw)
        out[a:a + chunk] = y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


class _FrameSink:
    """Collects the sampled frames of one clip, resized as they arrive.

    ``put(slots, frame)`` stores the resized ``frame`` (uint8 (H, W, 3)) at output
    positions ``slots``; frames wait in a list until a resize chunk is full, so at most
    one chunk of source-resolution frames is held.
    """

    def __init__(self, n: int, size: int, mode: str, where: str):
        self.out = np.zeros((n, size, size, 3), dtype=np.uint8)
        self.size, self.mode, self.where = size, mode, where
        self.pending: list[tuple[list[int], np.ndarray]] = []
        self.shape: tuple[int, ...] | None = None
        self.filled = np.zeros(n, dtype=bool)

    def put(self, slots, frame: np.ndarray) -> None:
        if self.shape is None:
            self.shape = frame.shape
        elif frame.shape != self.shape:
            raise _DecodeFailure(STATUS_UNREADABLE, f"{self.where}: frames of different sizes "
                                                    f"{sorted({self.shape, frame.shape})}")
        self.pending.append((list(slots), frame))
        if len(self.pending) >= _resize_chunk_len(frame.shape[0], frame.shape[1]):
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        try:
            small = resize_frames(np.stack([f for _, f in self.pending]), self.size, self.mode)
        except RuntimeError as e:  # e.g. a frame too small for the antialias kernel
            raise _DecodeFailure(STATUS_UNREADABLE, f"{self.where}: resizing failed ({_first_line(e)})") from None
        for (slots, _), img in zip(self.pending, small):
            self.out[slots] = img
            self.filled[slots] = True
        self.pending = []

    def result(self) -> np.ndarray:
        self.flush()
        assert self.filled.all(), "every sample time gets a frame"
        return self.out


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
            if not _video_streams(c):
                return STATUS_NO_VIDEO, f"{path}: no video stream (streams: {[s.type for s in c.streams]})"
    except Exception as e:  # noqa: BLE001 - any FFmpeg error is the reason we want
        return STATUS_UNREADABLE, f"{path}: {_first_line(e)}"
    return None


def _open_media(path: Path, what: str):
    """An open PyAV container for ``path`` (a ``_DecodeFailure`` naming the file if it cannot be opened)."""
    import av

    _check_file(path, what)
    if path.is_dir():
        raise _DecodeFailure(STATUS_UNREADABLE, f"{path}: is a folder, not a {what} file")
    try:
        return av.open(str(path), metadata_errors="ignore")
    except Exception as e:  # noqa: BLE001 - FFmpeg raises several error types for a bad file
        raise _DecodeFailure(STATUS_UNREADABLE,
                             f"{path}: cannot be read, truncated or corrupt ({_first_line(e)})") from None


def _video_streams(container) -> list:
    """Video streams that are moving pictures (not a music file's cover art)."""
    import av

    pic = av.stream.Disposition.attached_pic
    return [s for s in container.streams.video if not (int(s.disposition) & int(pic))]


def _seconds(pts, time_base) -> float | None:
    return None if pts is None or time_base is None else float(pts * time_base)


def _timeline_zero(container) -> float:
    """Container time (s) of the timeline's origin: the video stream's start, else the audio's, else 0."""
    for s in _video_streams(container) + list(container.streams.audio):
        t = _seconds(s.start_time, s.time_base)
        if t is not None:
            return t
    return container.start_time / 1e6 if container.start_time is not None else 0.0


def _read_video(path: Path, times: np.ndarray, start: float, limit_end: float, sink: _FrameSink) -> float:
    """Fill ``sink`` with the frames of a video file shown at ``times``; returns the video's content end (s)."""
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
        uniq = np.unique(idx)
        for a in range(0, len(uniq), 8):  # a few frames at a time: source-resolution memory stays O(chunk)
            part = uniq[a:a + 8]
            batch = vr.get_batch(part.tolist()).asnumpy()
            for i, frame in zip(part, batch):
                sink.put(np.flatnonzero(idx == i), frame)
            del batch
    except _DecodeFailure:
        raise
    except Exception as e:  # noqa: BLE001 - a decoder error mid-file is a truncated / corrupt file
        raise _DecodeFailure(STATUS_UNREADABLE, f"{path}: decoding frames failed ({_first_line(e)})") from None
    return video_end


def _read_video_pyav(path: Path, times: np.ndarray, start: float, limit_end: float, sink: _FrameSink,
                     seek: bool = True) -> float:
    """:func:`_read_video` with PyAV: seek once to the keyframe before the first sample time,
    then decode forward to the last one (one decoder thread)."""
    import av

    with _open_media(path, "video") as container:
        streams = _video_streams(container)
        if not streams:
            raise _DecodeFailure(STATUS_NO_VIDEO, f"{path}: no video stream "
                                                  f"(streams: {[s.type for s in container.streams]})")
        vs = streams[0]
        vs.codec_context.thread_count = 1
        tb = vs.time_base
        zero = _timeline_zero(container)
        rate = vs.average_rate or vs.guessed_rate
        default_dur = float(1 / rate) if rate else 0.04
        pending = [int(i) for i in np.argsort(times, kind="stable")]  # output slots waiting for their frame
        first_t = float(times[pending[0]])
        try:
            seeked = seek and _seek(container, vs, first_t + zero, _seconds(vs.start_time, tb))
            prev = None  # (time, frame) of the last decoded frame
            end = None
            for frame in _decode_needed(container, vs, times, pending, zero, 2.5 * default_dur):
                t = _seconds(frame.pts, tb)
                t = t - zero if t is not None else (prev[0] + default_dur if prev else 0.0)
                if seeked and prev is None and t > first_t + TIME_EPS:
                    raise _SeekOvershoot
                # sample times before this frame (all of them once the window's end is reached) show the
                # previous frame; a time before the first frame shows the first
                past_end = t >= limit_end - TIME_EPS
                slots = []
                while pending and (past_end or t > times[pending[0]] + TIME_EPS):
                    slots.append(pending.pop(0))
                if slots:
                    sink.put(slots, (prev[1] if prev is not None else frame).to_ndarray(format="rgb24"))
                if past_end:
                    end = t  # the video lasts at least to the window's end
                    break
                prev = (t, frame)
            if end is None:
                if prev is None:
                    raise _DecodeFailure(STATUS_EMPTY, f"{path}: the video stream has no frames")
                end = prev[0] + (_seconds(prev[1].duration, tb) if prev[1].duration else default_dur)
                if start >= end:
                    raise _DecodeFailure(STATUS_EMPTY, f"{path}: window starts at {start:g}s, "
                                                       f"the video ends at {end:g}s")
                if pending:  # times past the video's end repeat its last frame
                    sink.put(pending, prev[1].to_ndarray(format="rgb24"))
        except _SeekOvershoot:
            pass
        except _DecodeFailure:
            raise
        except (av.error.FFmpegError, ValueError) as e:
            raise _DecodeFailure(STATUS_UNREADABLE, f"{path}: decoding frames failed ({_first_line(e)})") from None
        else:
            return end
    return _read_video_pyav(path, times, start, limit_end, sink, seek=False)


def _decode_needed(container, vs, times: np.ndarray, pending: list[int], zero: float, margin: float):
    """Decoded frames of ``vs`` from the current position, in presentation order, skipping the
    decoding of frames no other frame refers to (H.264/HEVC non-reference B-frames) while their
    presentation time is more than ``margin`` seconds before the next sample time still ``pending``:
    such a frame is never shown at a sample time and never needed to decode another frame."""
    cc = vs.codec_context
    tbf = float(vs.time_base)
    mode = None
    for packet in container.demux(vs):
        if packet.pts is not None and pending:
            want = "NONREF" if packet.pts * tbf - zero < times[pending[0]] - margin else "DEFAULT"
            if want != mode:
                cc.skip_frame = mode = want
        yield from packet.decode()


class _SeekOvershoot(Exception):
    """The first frame after a seek is later than the seek target (an imprecise index): decode from the start."""


def _seek(container, stream, t: float, stream_start: float | None) -> bool:
    """Seek ``container`` to the last keyframe of ``stream`` at or before container time ``t``;
    False when no seek is needed (``t`` at the stream's start) or possible (no index)."""
    import av

    if t <= (stream_start if stream_start is not None else 0.0) + TIME_EPS:
        return False
    try:
        container.seek(int(math.floor(t / stream.time_base)), stream=stream, backward=True, any_frame=False)
    except av.error.FFmpegError:
        return False  # e.g. a stream without an index: decode from the start
    return True


def _read_image_folder(spec: Path, times: np.ndarray, start: float, end: float | None, limit_end: float,
                       sink: _FrameSink) -> float:
    """Fill ``sink`` from the images ``spec`` names (a glob pattern, a folder or one image); returns the
    content end.

    The images spread evenly over ``[start, end]`` when the row gives ``end``,
    otherwise they are taken at :data:`IMAGE_FOLDER_FPS` from ``start``.
    """
    from PIL import Image

    if is_pattern(str(spec)):
        files = image_sequence(spec)
        if not files:
            raise _DecodeFailure(STATUS_MISSING, f"{spec}: no image matches the frames pattern")
    else:
        if not spec.exists():
            raise _DecodeFailure(STATUS_MISSING, f"{spec}: frame folder not found")
        files = image_sequence(spec)
        if not files:
            raise _DecodeFailure(STATUS_EMPTY,
                                 f"{spec}: no images ({', '.join(IMAGE_SUFFIXES)}) in the frame folder")
    step = (end - start) / len(files) if end is not None and end > start else 1.0 / IMAGE_FOLDER_FPS
    starts = start + np.arange(len(files)) * step
    folder_end = start + len(files) * step
    idx = frame_indices(times, starts, min(limit_end, folder_end))
    for i in np.unique(idx).tolist():
        try:
            with Image.open(files[i]) as im:
                img = np.asarray(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001 - PIL raises several types for a bad image
            raise _DecodeFailure(STATUS_UNREADABLE, f"{files[i]}: {_first_line(e)}") from None
        sink.put(np.flatnonzero(idx == i), img)
    return folder_end


_SAMPLE_TYPES = {"u8": np.uint8, "s16": np.int16, "s32": np.int32, "s64": np.int64, "flt": np.float32,
                 "dbl": np.float64}


def _mono(frame) -> np.ndarray:
    """float32 (n,) mean over the channels of a decoded audio frame, in [-1, 1]."""
    a = frame.to_ndarray()
    channels = frame.layout.nb_channels or 1
    if not frame.format.is_planar:
        a = a.reshape(-1, channels).T  # packed: (1, n * C) interleaved
    mix = a.astype(np.float32).sum(axis=0, dtype=np.float32) / np.float32(channels)
    return _to_unit(mix, a.dtype)


def _to_unit(mix: np.ndarray, dtype) -> np.ndarray:
    """Integer sample values (as float32) → [-1, 1]; float samples pass."""
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return (mix - 128.0) / 128.0
    if dtype.kind == "i":
        mix /= float(np.iinfo(dtype).max + 1)
    return mix


def _mixer(frame) -> Callable:
    """:func:`_mono` specialised to the sample format and layout of ``frame`` (a stream's first
    frame): reads the frame's planes without copies; a frame that differs falls back to :func:`_mono`."""
    fmt = frame.format
    dtype = _SAMPLE_TYPES.get(fmt.name.rstrip("p"))
    channels = frame.layout.nb_channels or 1
    if dtype is None:
        return _mono
    n_planes = channels if fmt.is_planar else 1

    def mix(f) -> np.ndarray:
        planes = f.planes
        n = f.samples
        if len(planes) != n_planes:  # the layout changed mid-stream
            return _mono(f)
        if n_planes > 1:
            out = np.frombuffer(planes[0], dtype=dtype, count=n).astype(np.float32)
            for c in range(1, channels):
                out += np.frombuffer(planes[c], dtype=dtype, count=n)
            out /= np.float32(channels)
        elif channels > 1:
            if f.layout.nb_channels != channels:
                return _mono(f)
            out = np.frombuffer(planes[0], dtype=dtype, count=n * channels).reshape(n, channels).astype(np.float32)
            out = out.sum(axis=1, dtype=np.float32) / np.float32(channels)
        else:
            out = np.frombuffer(planes[0], dtype=dtype, count=n).astype(np.float32)
        return _to_unit(out, dtype)

    return mix


def _resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    """float32 (n,) at ``src`` Hz → float32 at ``dst`` Hz with libswresample; output sample 0 is at
    the time of input sample 0 (the resampler's delay is compensated, its tail flushed)."""
    import av
    from av.audio.resampler import AudioResampler

    if src == dst or x.size == 0:
        return x
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[None], dtype=np.float32), format="fltp", layout="mono")
    frame.sample_rate = src
    frame.pts = 0
    frame.time_base = Fraction(1, src)
    r = AudioResampler(format="fltp", layout="mono", rate=dst)
    parts = [f.to_ndarray()[0] for f in r.resample(frame)] + [f.to_ndarray()[0] for f in r.resample(None)]
    return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros(0, np.float32)


def _read_audio(path: Path, rate: int, num_samples: int, start: float, limit_end: float):
    """(waveform float32 (num_samples,), audio content end) from any file FFmpeg reads; see the module docstring."""
    try:
        buf, src, edge, audio_end = _decode_audio_window(path, rate, num_samples, start)
    except _SeekOvershoot:
        buf, src, edge, audio_end = _decode_audio_window(path, rate, num_samples, start, seek=False)
    y = _resample(buf, src, rate)
    off = int(round(edge * rate / src))
    out = np.zeros(num_samples, dtype=np.float32)
    part = y[off:off + num_samples]
    out[: part.size] = part
    stop = int(round((min(limit_end, audio_end) - start) * rate))
    out[max(0, stop):] = 0.0
    return out, audio_end


def _decode_audio_window(path: Path, rate: int, num_samples: int, start: float, seek: bool = True):
    """``(buf, src, edge, audio_end)``: mono float32 samples at the stream's rate ``src`` for the
    window with ``edge`` samples of context either side (``buf[0]`` is at ``start - edge / src``
    on the timeline; no audio there is zeros), and the timeline time where the audio ends
    (``inf`` when it goes on past the buffer)."""
    import av

    with _open_media(path, "audio") as container:
        if not container.streams.audio:
            raise _DecodeFailure(STATUS_NO_AUDIO, f"{path}: no audio track")
        st = container.streams.audio[0]
        src = int(st.codec_context.sample_rate or st.rate or 0)
        if src <= 0:
            raise _DecodeFailure(STATUS_UNREADABLE, f"{path}: the audio stream has no sample rate")
        zero = _timeline_zero(container)
        edge = int(round(AUDIO_EDGE * src))
        buf_t0 = start - edge / src
        n_buf = edge + int(math.ceil(num_samples * src / rate)) + edge
        buf = np.zeros(n_buf, dtype=np.float32)
        tb = st.time_base
        tbf = float(tb)  # float arithmetic per frame: Fractions cost more than decoding
        st_start = _seconds(st.start_time, tb)
        first = (st_start - zero) if st_start is not None else 0.0  # the stream's start on the timeline
        target = start - AUDIO_SEEK_MARGIN
        pos = None  # timeline time just after the last decoded sample
        mono = None
        try:
            seeked = seek and _seek(container, st, target + zero, st_start)
            for packet in container.demux(st):
                for frame in packet.decode():
                    pts = frame.pts
                    t = pts * tbf - zero if pts is not None else (pos if pos is not None else first)
                    if seeked and pos is None and t > max(target, first) + 0.05:
                        raise _SeekOvershoot
                    if mono is None:
                        mono = _mixer(frame)
                    x = mono(frame)
                    pos = t + x.size / src
                    i = int(round((t - buf_t0) * src))
                    if i >= n_buf:
                        return buf, src, edge, math.inf
                    lo, hi = max(i, 0), min(i + x.size, n_buf)
                    if hi > lo:
                        buf[lo:hi] = x[lo - i:hi - i]
        except (_SeekOvershoot, _DecodeFailure):
            raise
        except (av.error.FFmpegError, ValueError) as e:
            raise _DecodeFailure(STATUS_UNREADABLE, f"{path}: decoding audio failed ({_first_line(e)})") from None
    if pos is None:
        if seeked:
            raise _DecodeFailure(STATUS_EMPTY, f"{path}: window starts at {start:g}s, past the end of the audio")
        raise _DecodeFailure(STATUS_EMPTY, f"{path}: the audio track has no samples")
    if start >= pos:
        raise _DecodeFailure(STATUS_EMPTY, f"{path}: window starts at {start:g}s, the audio ends at {pos:g}s")
    return buf, src, edge, pos


# -- public --------------------------------------------------------------------
def decode_clip(
    path: str | os.PathLike | None,
    preprocess: Preprocess,
    start: float | None = None,
    end: float | None = None,
    *,
    frames: str | os.PathLike | None = None,
    audio_path: str | os.PathLike | None = None,
    frame_decoder: str | None = None,
) -> DecodedClip:
    """Decode the window ``[start, start + clip_seconds)`` of a clip as ``preprocess`` asks.

    Frames come from ``frames`` (a glob pattern or folder of images, see
    :func:`avcl_core.manifest.image_sequence`) when given, else from the video at
    ``path`` with ``frame_decoder`` (one of :data:`FRAME_DECODERS`, default
    :data:`DEFAULT_FRAME_DECODER`); audio from ``audio_path`` (e.g. a wav) when given,
    else from ``path``. Returns ``frames`` uint8 (T, S, S, 3) when
    ``preprocess.num_frames > 0`` and ``audio`` float32 (num_samples,) when
    ``preprocess.audio_rate > 0``, padded by the rule in the module docstring; a failure
    comes back as a status code and reason (never raised), with ``frames``/``audio``
    None and ``valid_len`` 0.
    """
    quiet_decoder_logs()
    frame_decoder = frame_decoder or DEFAULT_FRAME_DECODER
    if frame_decoder not in FRAME_DECODERS:
        raise ValueError(f"frame decoder {frame_decoder!r} is not one of {FRAME_DECODERS}")
    start = float(start or 0.0)
    window_end = start + float(preprocess.clip_seconds)
    limit_end = min(window_end, float(end)) if end is not None else window_end
    needs_video = preprocess.num_frames > 0
    needs_audio = preprocess.num_samples > 0
    if not (needs_video or needs_audio):
        raise ValueError(f"preprocess asks for neither frames nor audio: {preprocess}")
    if end is not None and float(end) <= start:
        where = frames or path or audio_path
        return DecodedClip(None, None, 0.0, STATUS_EMPTY, f"{where}: empty window start={start:g}s end={float(end):g}s")
    content_end = limit_end
    out_frames = audio = None
    try:
        if needs_video:
            times = sample_times(preprocess, start)
            sink = _FrameSink(len(times), preprocess.image_size, preprocess.resize, str(frames or path))
            if frames is not None:
                vend = _read_image_folder(Path(frames), times, start, end, limit_end, sink)
            else:
                if path is None:
                    raise ValueError("decode_clip: frames are needed but neither path nor frames is given")
                reader = _read_video if frame_decoder == "decord" else _read_video_pyav
                vend = reader(Path(path), times, start, limit_end, sink)
            content_end = min(content_end, vend)
            out_frames = sink.result()
        if needs_audio:
            src = audio_path if audio_path is not None else path
            if src is None:
                raise ValueError("decode_clip: audio is needed but neither path nor audio_path is given")
            audio, aend = _read_audio(Path(src), preprocess.audio_rate, preprocess.num_samples, start, limit_end)
            content_end = min(content_end, aend)
    except _DecodeFailure as f:
        return DecodedClip(None, None, 0.0, f.status, f.reason)
    return DecodedClip(out_frames, audio, float(max(0.0, content_end - start)), STATUS_OK, "")


def row_paths(row: dict, root: str | os.PathLike) -> dict:
    """Absolute ``path`` / ``frames`` / ``audio_path`` of a manifest row under ``root``."""
    root = Path(root)

    def resolve(p):
        return None if p in (None, "") else (Path(p) if os.path.isabs(p) else root / p)

    return {"path": resolve(row.get("video")), "frames": resolve(row.get("frames")),
            "audio_path": resolve(row.get("audio"))}


def decode_row(row: dict, root: str | os.PathLike, preprocess: Preprocess,
               frame_decoder: str | None = None) -> DecodedClip:
    """:func:`decode_clip` for a manifest row (paths relative to ``root``; ``start``/``end`` from the row)."""
    return decode_clip(preprocess=preprocess, start=row.get("start"), end=row.get("end"),
                       frame_decoder=frame_decoder, **row_paths(row, root))
