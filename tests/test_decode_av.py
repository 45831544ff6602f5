"""Audio and memory behaviour of the decoder on generated media with known content:
channel mean, a late-starting audio stream, memory over many clips, one window of a
long file, chunked resizing, both frame decoders, and the decoder's identity."""
from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import extract.decode as dec
from avcl_core.cache import STATUS_EMPTY, STATUS_NO_AUDIO, STATUS_NO_VIDEO, STATUS_OK, STATUS_UNREADABLE
from extract.decode import decode_clip, decoder_identity, resize_frames
from extract.encoders.base import Preprocess

from conftest import frame_value
from media import grey_frames, moving_frames, tone, write_av, write_long_mp4

RATE = 48000


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb_during(fn):
    """(fn's result, peak resident memory in MiB while it ran, resident memory before in MiB)."""
    before = rss_mb()
    try:  # Linux: reset the peak ("VmHWM") to the current resident size
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        out = fn()
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))
        return out, peak, before
    except OSError:
        pass
    peak, done = [before], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.002)

    th = threading.Thread(target=watch)
    th.start()
    try:
        out = fn()
    finally:
        done.set()
        th.join()
    return out, max(peak[0], rss_mb()), before


def decoded_channels(path) -> np.ndarray:
    """float32 (C, n): every channel of the first audio stream as FFmpeg decodes it, no mixing."""
    import av

    with av.open(str(path)) as c:
        return np.concatenate([f.to_ndarray() for f in c.decode(c.streams.audio[0])], axis=1)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("av")
    sine = tone(2.0, RATE, 440.0, 0.5)
    click = np.zeros(int(2.5 * RATE), np.float32)
    click[int(0.5 * RATE):int(0.5 * RATE) + 48] = 0.9  # 1.0 s on the timeline once the stream starts at 0.5 s
    return {
        "left": write_av(d / "left.mp4", grey_frames(20), 10, np.stack([sine, np.zeros_like(sine)]), RATE),
        "both": write_av(d / "both.mp4", grey_frames(20), 10, np.stack([sine, sine]), RATE),
        "late": write_av(d / "late.mp4", grey_frames(25), 10, np.stack([click, click]), RATE, audio_start=0.5),
        "dir": d,
    }


# -- channel mean -----------------------------------------------------------------
def test_stereo_is_mixed_by_the_channel_mean(media):
    pp = Preprocess(clip_seconds=2.0, audio_rate=RATE)  # no resampling: the mix alone
    clip = decode_clip(media["left"], pp)
    assert clip.status == STATUS_OK, clip.reason
    ch = decoded_channels(media["left"])
    assert ch.shape[0] == 2
    # what FFmpeg decodes, averaged by hand, sample for sample (the stream starts at 0 on the timeline)
    np.testing.assert_allclose(clip.audio, ch.mean(0)[: clip.audio.size], atol=1e-6)
    # L = 0.5 sine, R = 0: the mix is a 0.25 sine (FFmpeg's default down-mix gives 0.354)
    assert np.abs(clip.audio[RATE // 10: -RATE // 10]).max() == pytest.approx(0.25, abs=0.01)
    # L = R: the mix is the channel itself, at the scale a mono file has
    both = decode_clip(media["both"], Preprocess(clip_seconds=2.0, audio_rate=16000))
    assert np.abs(both.audio[1600:-1600]).max() == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("fmt, layout", [("fltp", "stereo"), ("flt", "stereo"), ("s16", "stereo"), ("s16p", "stereo"),
                                         ("s32", "5.1"), ("u8", "mono"), ("dblp", "stereo"), ("fltp", "mono")])
def test_channel_mean_of_every_sample_format_equals_the_plain_mean(fmt, layout):
    import av

    channels, n = av.AudioLayout(layout).nb_channels, 1000
    dtype = {"flt": np.float32, "s16": np.int16, "s32": np.int32, "u8": np.uint8, "dbl": np.float64}[fmt.rstrip("p")]
    rng = np.random.default_rng(0)
    if np.dtype(dtype).kind == "f":
        data = rng.uniform(-1, 1, (channels, n)).astype(dtype)
        scale, offset = 1.0, 0.0
    else:
        info = np.iinfo(dtype)
        data = rng.integers(info.min, info.max, (channels, n), dtype=dtype, endpoint=True)
        scale, offset = (128.0, 128.0) if dtype == np.uint8 else (info.max + 1.0, 0.0)
    frame = av.AudioFrame.from_ndarray(data if fmt.endswith("p") else np.ascontiguousarray(data.T.reshape(1, -1)),
                                       format=fmt, layout=layout)
    want = (data.astype(np.float64).mean(0) - offset) / scale
    for mix in (dec._mono, dec._mixer(frame)):  # the plain computation and the per-stream fast path
        got = mix(frame)
        assert got.dtype == np.float32 and got.shape == (n,)
        np.testing.assert_allclose(got, want, atol=2e-7)


def test_int16_stereo_wav_is_mixed_by_the_mean(tmp_path):
    import scipy.io.wavfile

    left = (tone(1.0, 16000, 440.0, 0.5) * 32767).astype(np.int16)
    scipy.io.wavfile.write(tmp_path / "st.wav", 16000, np.stack([left, np.zeros_like(left)], 1))
    clip = decode_clip(tmp_path / "st.wav", Preprocess(clip_seconds=1.0, audio_rate=16000))
    np.testing.assert_allclose(clip.audio, left / 32768 / 2, atol=1e-6)


def test_resampled_audio_keeps_frequency_and_phase(media):
    clip = decode_clip(media["both"], Preprocess(clip_seconds=2.0, audio_rate=16000))
    ref = tone(2.0, 16000, 440.0, 0.5)
    # AAC is lossy; a shift of one sample at 16 kHz would already give errors of ~0.09
    assert np.abs(clip.audio[1600:-1600] - ref[1600:-1600]).max() < 0.03


# -- one timeline for both streams ---------------------------------------------------
def test_late_audio_stream_is_silent_at_the_head_and_in_sync(media):
    pp = Preprocess(clip_seconds=2.0, frames_per_clip=4, image_size=8, audio_rate=16000)
    clip = decode_clip(media["late"], pp)
    assert clip.status == STATUS_OK, clip.reason
    # the audio stream starts 0.5 s after the first frame: silence until then (AAC priming aside)
    assert np.all(clip.audio[: int(0.45 * 16000)] == 0)
    assert np.abs(clip.audio[: int(0.5 * 16000)]).max() < 0.01
    # the click written at 1.0 s of the container's clock is at 1.0 s of the window
    assert np.argmax(np.abs(clip.audio)) / 16000 == pytest.approx(1.0, abs=0.002)
    # frames are on the same timeline: times 0.25, 0.75, 1.25, 1.75 s show frames 2, 7, 12, 17
    np.testing.assert_allclose(clip.frames.reshape(4, -1).mean(1), [frame_value(k) for k in (2, 7, 12, 17)],
                               atol=3)
    # a window from 0.7 s has the click 0.3 s in
    later = decode_clip(media["late"], Preprocess(clip_seconds=1.0, audio_rate=16000), start=0.7)
    assert np.argmax(np.abs(later.audio)) / 16000 == pytest.approx(0.3, abs=0.002)


def test_window_inside_a_file_equals_the_same_samples_of_the_whole_file(media):
    whole = decode_clip(media["both"], Preprocess(clip_seconds=2.0, audio_rate=16000)).audio
    part = decode_clip(media["both"], Preprocess(clip_seconds=0.75, audio_rate=16000), start=0.6).audio
    np.testing.assert_allclose(part, whole[9600:9600 + 12000], atol=1e-5)


# -- memory and long files ---------------------------------------------------------------
def test_memory_stays_flat_over_many_clips(tmp_path):
    path = write_av(tmp_path / "ten.mp4", grey_frames(50, 64), 5, np.stack([tone(10.0, RATE), tone(10.0, RATE, 660)]),
                    RATE)
    pp = Preprocess(clip_seconds=10.0, frames_per_clip=4, image_size=32, audio_rate=RATE)
    for _ in range(3):  # warm up allocators and caches
        assert decode_clip(path, pp).ok
    before = rss_mb()
    for _ in range(20):
        decode_clip(path, pp)
    grown = rss_mb() - before
    # one clip's waveform is 1.8 MiB: a leak of one clip per clip would add > 35 MiB
    assert grown < 12, f"resident memory grew by {grown:.1f} MiB over 20 clips"


@pytest.fixture(scope="module")
def long_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("long")
    seg = write_av(d / "seg.mp4", grey_frames(200, 64), 25, tone(8.0, 32000)[None], 32000, gop=50)
    return write_long_mp4(d / "long.mp4", 30 * 60, seg)  # 30 minutes: 225 copies of the 8 s segment


def test_one_window_of_a_long_file_in_bounded_memory_and_time(long_file):
    pp = Preprocess(clip_seconds=10.0, frames_per_clip=8, image_size=32, audio_rate=32000)
    t0 = time.perf_counter()
    head = decode_clip(long_file, pp)
    t_head = time.perf_counter() - t0
    t0 = time.perf_counter()
    late, peak, before = peak_rss_mb_during(lambda: decode_clip(long_file, pp, start=8 * 187))  # at 24:56
    t_late = time.perf_counter() - t0
    assert head.ok and late.ok, (head.reason, late.reason)
    # the file repeats its 8 s segment: the late window shows and plays what the head does
    np.testing.assert_array_equal(late.frames, head.frames)
    np.testing.assert_allclose(late.audio[3200:], head.audio[3200:], atol=3e-3)  # AAC overlap at segment joins
    assert late.valid_len == pytest.approx(10.0)
    # decoding the whole track would hold 30 min x 32 kHz x 4 B = 220 MiB and take seconds
    assert peak - before < 60, f"decoding one window took {peak - before:.0f} MiB"
    assert t_late < 4 * t_head + 0.5, f"window at 24:56 took {t_late:.2f}s, at 0:00 {t_head:.2f}s"


@pytest.mark.slow
def test_one_window_of_a_two_hour_file(tmp_path):
    seg = write_av(tmp_path / "seg.mp4", grey_frames(200, 64), 25, tone(8.0, 48000)[None], 48000, gop=50)
    path = write_long_mp4(tmp_path / "two_hours.mp4", 2 * 3600, seg)
    pp = Preprocess(clip_seconds=10.0, frames_per_clip=8, image_size=32, audio_rate=48000)
    head = decode_clip(path, pp)
    t0 = time.perf_counter()
    late, peak, before = peak_rss_mb_during(lambda: decode_clip(path, pp, start=8 * 800))  # at 1:46:40
    took = time.perf_counter() - t0
    assert late.ok, late.reason
    np.testing.assert_array_equal(late.frames, head.frames)
    assert peak - before < 60 and took < 10, (peak - before, took)


def test_window_past_the_end_of_a_long_file_is_empty(long_file):
    clip = decode_clip(long_file, Preprocess(clip_seconds=10.0, audio_rate=16000), start=1805.0)
    assert clip.status == STATUS_EMPTY and "1805s" in clip.reason and "long.mp4" in clip.reason


# -- frames -------------------------------------------------------------------------------
def plain_resize(frames, size, mode):
    """The one-batch computation: every frame to float32 at once."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    kw = {"antialias": True, "align_corners": False} if mode in ("bicubic", "bilinear") else {}
    y = F.interpolate(x, size=(size, size), mode=mode, **kw)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest", "area"])
def test_chunked_resize_equals_the_one_batch_computation(mode):
    frames = np.random.default_rng(0).integers(0, 256, (7, 37, 53, 3), dtype=np.uint8)
    want = plain_resize(frames, 16, mode)
    for chunk in (1, 2, 3, None):
        np.testing.assert_array_equal(resize_frames(frames, 16, mode, chunk=chunk), want)


@pytest.mark.parametrize("frame_decoder", dec.FRAME_DECODERS)
def test_frames_are_resized_a_chunk_at_a_time(tmp_path, monkeypatch, frame_decoder):
    path = write_av(tmp_path / "f.mp4", grey_frames(40, 96), 20, None)
    seen = []
    real = F.interpolate

    def spy(x, *a, **kw):
        seen.append(x.shape[0])
        return real(x, *a, **kw)

    monkeypatch.setattr(dec.F, "interpolate", spy)
    monkeypatch.setattr(dec, "RESIZE_CHUNK_BYTES", 3 * 96 * 96 * 3 * 4)  # three source frames in float32
    clip = decode_clip(path, Preprocess(clip_seconds=2.0, fps=20.0, image_size=16), frame_decoder=frame_decoder)
    assert clip.ok and clip.frames.shape == (40, 16, 16, 3)
    assert sum(seen) == 40 and max(seen) <= 3
    np.testing.assert_allclose(clip.frames.reshape(40, -1).mean(1), [frame_value(k) for k in range(40)], atol=3)


CASES = [  # (file, preprocess, start, end)
    ("ok.mp4", Preprocess(clip_seconds=1.0, frames_per_clip=5, image_size=16), None, None),
    ("short.mp4", Preprocess(clip_seconds=1.0, frames_per_clip=5, image_size=16), None, None),
    ("ok.mp4", Preprocess(clip_seconds=0.5, fps=4.0, image_size=8), 0.5, None),
    ("ok.mp4", Preprocess(clip_seconds=1.0, fps=4.0, image_size=8), 0.2, 0.6),
    ("ok.mp4", Preprocess(clip_seconds=1.0, fps=10.0, image_size=8), 0.0, None),  # times on frame boundaries
]


@pytest.mark.parametrize("name, pp, start, end", CASES)
def test_pyav_frames_equal_decord_frames(avcl_media_dir, name, pp, start, end):
    a = decode_clip(avcl_media_dir / name, pp, start, end, frame_decoder="decord")
    b = decode_clip(avcl_media_dir / name, pp, start, end, frame_decoder="pyav")
    assert a.ok and b.ok, (a.reason, b.reason)
    np.testing.assert_allclose(b.frames.astype(int), a.frames.astype(int), atol=2)
    assert b.valid_len == pytest.approx(a.valid_len)


def test_pyav_frames_equal_decord_frames_with_b_frames(tmp_path):
    import av

    path = write_av(tmp_path / "b.mp4", moving_frames(75), 25, None, x264={"preset": "medium", "crf": "20"})
    with av.open(str(path)) as c:  # the clip has frames no other frame refers to (skipped when not needed)
        c.streams.video[0].codec_context.skip_frame = "NONREF"
        assert sum(1 for _ in c.decode(video=0)) < 75
    for pp, start in ((Preprocess(clip_seconds=3.0, fps=25.0, image_size=16), 0.0),
                      (Preprocess(clip_seconds=2.0, frames_per_clip=7, image_size=16), 0.9),
                      (Preprocess(clip_seconds=1.0, fps=3.0, image_size=16), 1.37)):
        a = decode_clip(path, pp, start, frame_decoder="decord")
        b = decode_clip(path, pp, start, frame_decoder="pyav")
        assert a.ok and b.ok, (a.reason, b.reason)
        np.testing.assert_array_equal(b.frames, a.frames)
        assert b.valid_len == pytest.approx(a.valid_len)


@pytest.mark.parametrize("name, code", [("noaudio.mp4", STATUS_OK), ("tone.wav", STATUS_NO_VIDEO),
                                        ("truncated.mp4", STATUS_UNREADABLE), ("text.mp4", STATUS_UNREADABLE),
                                        ("zero.mp4", STATUS_EMPTY)])
def test_pyav_frame_reader_status_codes(avcl_media_dir, name, code):
    clip = decode_clip(avcl_media_dir / name, Preprocess(clip_seconds=1.0, frames_per_clip=2, image_size=8),
                       frame_decoder="pyav")
    assert clip.status == code, clip.reason
    assert code == STATUS_OK or name in clip.reason


def test_pyav_frames_past_the_end_and_late_video(avcl_media_dir, tmp_path):
    clip = decode_clip(avcl_media_dir / "ok.mp4", Preprocess(clip_seconds=1.0, frames_per_clip=2, image_size=8),
                       start=3.0, frame_decoder="pyav")
    assert clip.status == STATUS_EMPTY and "3s" in clip.reason
    # no audio track is only an error for an encoder that needs audio
    assert decode_clip(avcl_media_dir / "noaudio.mp4", Preprocess(clip_seconds=1.0, audio_rate=8000)).status \
        == STATUS_NO_AUDIO


# -- identity -----------------------------------------------------------------------------
def test_decoder_identity_names_libraries_and_rules():
    ident = decoder_identity()
    assert json.loads(json.dumps(ident)) == ident
    assert ident["downmix"] == "mean" and ident["audio_decoder"].startswith("pyav ")
    assert ident["frame_decoder"].split()[0] == dec.DEFAULT_FRAME_DECODER
    assert "libswresample" in ident["libav"] and "libswresample" in ident["resampler"]
    assert decoder_identity("pyav")["frame_decoder"].startswith("pyav ")
    assert os.environ.get("AVCL_NEVER_SET") is None  # identity does not depend on the environment
