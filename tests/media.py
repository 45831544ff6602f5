"""Media files with known content for decoder tests, written with PyAV.

``write_av`` writes an H.264 + AAC mp4 from arrays (any channel count, either stream
may start late); ``write_long_mp4`` writes hours of media in a second by muxing the
packets of one short encoded segment again and again with shifted timestamps.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np


def grey_frames(n: int, size: int = 32) -> np.ndarray:
    """uint8 (n, size, size, 3): frame ``k`` is flat grey ``(10 + 20 k) % 250`` (frames tell their index)."""
    return np.stack([np.full((size, size, 3), (10 + 20 * k) % 250, np.uint8) for k in range(n)])


def moving_frames(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size, 3): drifting gradients, a moving square and noise (content an encoder
    codes with B-frames)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    out = []
    for k in range(n):
        img = np.stack([(x * 4 + 3 * k) % 256, (y * 4 + 2 * k) % 256, (x + y + 5 * k) % 256], -1).astype(np.int16)
        c = (3 * k) % (size - 12)
        img[c:c + 12, c:c + 12] = (240, 40, 40)
        img += rng.integers(-4, 5, img.shape, dtype=np.int16)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def tone(seconds: float, rate: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    """float32 (n,) sine of ``amp`` at ``freq`` Hz."""
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_av(path, frames: np.ndarray | None, fps: int, audio: np.ndarray | None = None, rate: int = 48000,
             audio_start: float = 0.0, video_start: float = 0.0, gop: int | None = None,
             x264: dict | None = None) -> Path:
    """An mp4 with ``frames`` (uint8 (T, H, W, 3), H.264 lossless, at ``fps``) and ``audio``
    (float32 (C, n) in [-1, 1], AAC at ``rate``, C = 1 or 2), the audio stream's first
    sample at ``audio_start`` seconds and the first frame at ``video_start`` seconds of
    the container's clock (the streams' ``start_time``). ``x264`` replaces the encoder
    options (default lossless, no B-frames)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        v = a = None
        if frames is not None:
            v = c.add_stream("libx264", rate=Fraction(fps))
            v.height, v.width = frames.shape[1:3]
            v.pix_fmt = "yuv420p"
            v.options = {**(x264 or {"qp": "0", "preset": "ultrafast"}), **({"g": str(gop)} if gop else {})}
        if audio is not None:
            audio = np.atleast_2d(np.asarray(audio, dtype=np.float32))
            a = c.add_stream("aac", rate=rate)
            a.layout = "mono" if audio.shape[0] == 1 else "stereo"
        if v is not None:
            first = int(round(video_start * fps))
            for k, img in enumerate(frames):
                f = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                f.pts = first + k
                for p in v.encode(f):
                    c.mux(p)
            for p in v.encode():
                c.mux(p)
        if a is not None:
            first = int(round(audio_start * rate))
            for s in range(0, audio.shape[1], 1024):
                f = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[:, s:s + 1024]), format="fltp",
                                               layout=a.layout.name)
                f.sample_rate = rate
                f.pts = first + s
                for p in a.encode(f):
                    c.mux(p)
            for p in a.encode():
                c.mux(p)
    return path


def write_long_mp4(path, seconds: float, segment: Path) -> Path:
    """An mp4 of ``seconds`` made of the packets of ``segment`` (an mp4 written by :func:`write_av`
    whose every stream is a whole number of segment lengths and whose video GOPs start on
    keyframes) repeated back to back: each repeat is a copy of the segment on the timeline."""
    import av

    path = Path(path)
    with av.open(str(segment)) as src:
        length = src.duration / 1e6  # seconds of one segment
        streams = []
        for s in src.streams:
            pkts = [(bytes(p), p.pts, p.dts, p.duration, p.is_keyframe) for p in src.demux(s) if p.size]
            src.seek(0)
            streams.append((s, pkts))
        with av.open(str(path), "w") as out:
            outs = [out.add_stream_from_template(s) for s, _ in streams]
            reps = int(round(seconds / length))
            for r in range(reps):
                for (s, pkts), o in zip(streams, outs):
                    shift = int(round(r * length / s.time_base))
                    for data, pts, dts, dur, key in pkts:
                        p = av.Packet(data)
                        p.stream = o
                        p.time_base = s.time_base
                        p.pts = None if pts is None else pts + shift
                        p.dts = None if dts is None else dts + shift
                        p.duration = dur
                        p.is_keyframe = key
                        out.mux(p)
    return path
