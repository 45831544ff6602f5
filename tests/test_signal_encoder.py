"""The weight-free ``signal`` encoder: shapes, hand-computed values, determinism, key
material, errors — and that on rendered synth clips its features make fusion matter."""
from __future__ import annotations

import contextlib
import inspect
import math

import numpy as np
import pytest
import torch

from avcl_core import synth
from avcl_core.manifest import Manifest
from avcl_core.protocols import load_protocol
from extract.decode import decode_row
from extract.encoders import build_encoder
from extract.encoders.signal import SignalEncoder, build, mel_filterbank

S, T = 16, 2  # small frames for the hand-computed checks
K, O, C = 12, 8, 12 + 4 + 8 + 2 + 3  # hue bins, orientation bins, values per region


def _enc(**kw):
    kw = {"frames_per_clip": T, "image_size": S, "grid": 2, "dense_grid": 4, "clip_seconds": 1.0, **kw}
    return build(**kw)


def _clip(img: np.ndarray) -> torch.Tensor:
    """(S, S, 3) uint8 → (1, T, S, S, 3)."""
    return torch.from_numpy(np.ascontiguousarray(np.broadcast_to(img, (1, T, *img.shape))))


def _whole(enc, img):
    """Whole-frame region values (C,) of the first frame."""
    return enc.encode(_clip(img), torch.zeros(1, enc.preprocess.num_samples))["visual"][0, 0, :C]


# -- contract ---------------------------------------------------------------------------
def test_default_streams_shapes_dtype_and_registry():
    enc = build_encoder("signal")
    assert isinstance(enc, SignalEncoder) and enc.name == "signal" and enc.weights == "none"
    pp = enc.preprocess
    assert (pp.clip_seconds, pp.frames_per_clip, pp.image_size, pp.audio_rate) == (2.0, 8, 64, 16000)
    assert enc.streams() == {"visual": (8, C * 5 + K * O), "visual_dense": (8, 64, C), "audio": (8, 128)}
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (2, 8, 64, 64, 3), dtype=torch.uint8, generator=g)
    audio = torch.rand(2, 32000, generator=g) * 2 - 1
    out = enc.encode(frames, audio)
    assert set(out) == set(enc.streams())
    for k, shape in enc.streams().items():
        assert tuple(out[k].shape) == (2, *shape) and out[k].dtype == torch.float32, k
        assert torch.isfinite(out[k]).all(), k
        # stored as float16 by the cache: values must fit it
        assert out[k].abs().max() < 1e4, k
    assert not enc.training and list(enc.parameters()) == []


def test_single_modality_configurations():
    a = build(frames_per_clip=0)
    assert set(a.streams()) == {"audio"}
    assert a.encode(None, torch.zeros(1, 32000))["audio"].shape == (1, 8, 128)
    v = build(audio_rate=0, frames_per_clip=3, image_size=32)
    assert set(v.streams()) == {"visual", "visual_dense"}
    assert v.encode(torch.zeros(1, 3, 32, 32, 3, dtype=torch.uint8), None)["visual_dense"].shape == (1, 3, 64, C)


# -- hand-computed values -------------------------------------------------------------------
def test_flat_colours_give_their_hue_bin_rgb_and_no_edges():
    enc = _enc()
    for rgb, hue_bin in (((255, 0, 0), 0), ((0, 255, 0), 4), ((0, 0, 255), 8), ((255, 255, 0), 2)):
        w = _whole(enc, np.full((S, S, 3), rgb, np.uint8))
        expect_hue = torch.zeros(K)
        expect_hue[hue_bin] = 1.0  # chroma 1, hue exactly on a bin centre
        torch.testing.assert_close(w[:K], expect_hue)
        torch.testing.assert_close(w[K:K + 4], torch.zeros(4))  # no achromatic mass (chroma = 1)
        torch.testing.assert_close(w[K + 4:K + 4 + O + 2], torch.zeros(O + 2))  # no edges, no texture
        torch.testing.assert_close(w[-3:], torch.tensor(rgb, dtype=torch.float32) / 255)


def test_grey_goes_to_the_achromatic_bins_by_value():
    w = _whole(_enc(), np.full((S, S, 3), 128, np.uint8))
    x = 3 * 128 / 255  # value in bin units, between bins 1 and 2
    torch.testing.assert_close(w[:K], torch.zeros(K))
    torch.testing.assert_close(w[K:K + 4], torch.tensor([0.0, 2 - x, x - 1, 0.0]))


def test_edges_land_in_their_orientation_bin_with_sobel_magnitude():
    enc = _enc()
    img = np.zeros((S, S, 3), np.uint8)
    img[:, S // 2:] = 255  # a vertical edge: horizontal gradient, orientation 0
    w = _whole(enc, img)
    # Sobel/8 of a unit step is 0.5 on the two columns beside the edge: mean 2 * S * 0.5 / S^2
    expect = torch.zeros(O)
    expect[0] = 1.0 / S
    torch.testing.assert_close(w[K + 4:K + 4 + O], expect)
    w = _whole(enc, np.ascontiguousarray(img.transpose(1, 0, 2)))  # horizontal edge: orientation pi/2
    expect = torch.zeros(O)
    expect[O // 2] = 1.0 / S
    torch.testing.assert_close(w[K + 4:K + 4 + O], expect)


def test_grid_cells_and_joint_histogram_bind_colour_to_place_and_shape():
    enc = _enc()
    img = np.zeros((S, S, 3), np.uint8)
    img[:, : S // 2] = (255, 0, 0)  # left half red
    img[:, S // 2:] = (0, 0, 255)  # right half blue
    out = enc.encode(_clip(img), torch.zeros(1, enc.preprocess.num_samples))
    v = out["visual"][0, 0]
    cells = v[C:C + 4 * C].reshape(C, 2, 2)  # channel-major, cells row-major
    torch.testing.assert_close(cells[0], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))  # red on the left
    torch.testing.assert_close(cells[8], torch.tensor([[0.0, 1.0], [0.0, 1.0]]))  # blue on the right
    joint = v[5 * C:].reshape(K, O)
    assert joint[0, 0] > 0 and joint[8, 0] > 0  # both colours carry the vertical edge
    assert joint[[k for k in range(K) if k not in (0, 8)]].abs().max() == 0
    dense = out["visual_dense"][0, 0]  # (16, C): 4 x 4 cells, row-major
    torch.testing.assert_close(dense[:, 0], torch.tensor([1.0, 1.0, 0.0, 0.0] * 4))
    torch.testing.assert_close(dense[:, 8], torch.tensor([0.0, 0.0, 1.0, 1.0] * 4))


def test_mel_filterbank_is_triangular_in_mel():
    fb = mel_filterbank(16000, 1024, 64, 60.0, 8000.0)
    assert fb.shape == (64, 513) and fb.max() <= 1.0 and (fb >= 0).all()
    assert (fb.sum(1) > 0).all()  # no empty band at this resolution
    peaks = fb.argmax(1)
    assert (np.diff(peaks) >= 0).all()


def test_audio_tone_peaks_in_its_band_and_silence_is_the_floor():
    enc = _enc()
    n = enc.preprocess.num_samples
    t = torch.arange(n) / 16000
    tone = 0.5 * torch.sin(2 * math.pi * 1000 * t)
    gated = tone * (t < 0.5)
    out = enc.encode(_clip(np.zeros((S, S, 3), np.uint8)), torch.stack([tone, gated, torch.zeros(n)]))["audio"]
    assert out.shape == (3, 4, 128)
    fb = mel_filterbank(16000, 1024, 64, 60.0, 8000.0)
    bin_1k = round(1000 * 1024 / 16000)
    assert out[0, :, :64].mean(0).argmax() == int(fb[:, bin_1k].argmax())
    # full-scale sine has power ~1: a 0.5 sine peaks near log(0.25) in its band
    assert abs(out[0, 1, :64].max().item() - math.log(0.25)) < 0.5
    # the gated tone is on in windows 0-1 only
    assert (out[1, :2, :64].max(1).values > out[1, 2:, :64].max(1).values + 5).all()
    torch.testing.assert_close(out[2, :, :64], torch.full((4, 64), math.log(1e-8)))
    torch.testing.assert_close(out[2, :, 64:], torch.zeros(4, 64))


# -- determinism, key material, errors -------------------------------------------------------
def test_encoding_is_deterministic_across_calls_and_instances():
    g = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (3, T, S, S, 3), dtype=torch.uint8, generator=g)
    audio = torch.randn(3, 16000, generator=g) * 0.3
    a, b = _enc().encode(frames, audio), _enc().encode(frames, audio)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a clip's features do not depend on the rest of its batch
    one = _enc().encode(frames[1:2], audio[1:2])
    for k in a:
        torch.testing.assert_close(one[k][0], a[k][1], rtol=1e-5, atol=1e-6)


OPTION_CHANGES = {
    "clip_seconds": 1.5, "frames_per_clip": 4, "image_size": 48, "audio_rate": 22050, "grid": 3,
    "dense_grid": 6, "hue_bins": 18, "orientation_bins": 6, "n_mels": 40, "n_fft": 512, "hop_length": 200,
    "fmin": 30.0, "fmax": 7000.0, "window_seconds": 0.5,
}


def test_key_material_changes_with_every_option():
    options = [p for p in inspect.signature(SignalEncoder).parameters]
    assert sorted(options) == sorted(OPTION_CHANGES)
    base = build().key_material()
    assert build().key_material() == base
    for key, value in OPTION_CHANGES.items():
        assert build(**{key: value}).key_material() != base, key
    # every option is recorded by value, not only through its effect on the shapes
    assert build(fmin=30.0).key_material()["options"]["fmin"] == 30.0


def test_bad_options_and_inputs_are_named():
    with pytest.raises(TypeError, match="frames_per_clp"):
        build_encoder("signal", frames_per_clp=4)
    with pytest.raises(ValueError, match="variant"):
        build(variant="v2")
    with pytest.raises(ValueError, match="grid"):
        build(grid="two")
    with pytest.raises(ValueError, match="dense_grid"):
        build(image_size=4)
    enc = _enc()
    with pytest.raises(ValueError, match=rf"\(B, {T}, {S}, {S}, 3\)"):
        enc.encode(torch.zeros(1, T, S + 1, S + 1, 3, dtype=torch.uint8), torch.zeros(1, 16000))
    with pytest.raises(ValueError, match="uint8"):
        enc.encode(torch.zeros(1, T, S, S, 3), torch.zeros(1, 16000))
    with pytest.raises(ValueError, match=r"\(B, 16000\)"):
        enc.encode(torch.zeros(1, T, S, S, 3, dtype=torch.uint8), torch.zeros(1, 8000))
    with pytest.raises(ValueError, match="need frames"):
        enc.encode(None, torch.zeros(1, 16000))


# -- co-design with synth: fusion matters, fine-tuning forgets ---------------------------------
def _features(root, enc):
    m = Manifest.load(root / "manifest.jsonl")
    clips = [decode_row(r, root, enc.preprocess) for r in m]
    bad = [(r["sample_id"], c.reason) for r, c in zip(m, clips) if c.status != 1]
    assert not bad, bad[:3]
    out = enc.encode(torch.from_numpy(np.stack([c.frames for c in clips])),
                     torch.from_numpy(np.stack([c.audio for c in clips])))
    out = {k: v.half().float() for k, v in out.items()}  # as the cache stores them
    split = np.array([r["split"] for r in m])
    y = torch.tensor([r["label"] for r in m])
    audio, visual = out["audio"].mean(1), out["visual"].mean(1)  # mean over time
    return {"audio": audio, "visual": visual, "av": torch.cat([audio, visual], 1)}, y, split


def _standardise(x, train):
    return (x - x[train].mean(0)) / (x[train].std(0) + 1e-3)


def _train(lin, x, y, steps, lr=0.01, weight_decay=1e-3):
    opt = torch.optim.Adam(lin.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(x), y).backward()
        opt.step()


def probe_accuracy(x, y, train, test, steps=300) -> float:
    """Test accuracy of a linear softmax probe trained full-batch on ``train``."""
    x = _standardise(x, train)
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    _train(lin, x[train], y[train], steps)
    with torch.no_grad():
        return (lin(x[test]).argmax(1) == y[test]).float().mean().item()


def finetune_matrix(x, y, train, test, tasks, steps=200) -> np.ndarray:
    """A[t, k]: test accuracy on task k's classes after fine-tuning on tasks 0..t in turn."""
    x = _standardise(x, train)
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    acc = np.zeros((len(tasks), len(tasks)))
    for t, classes in enumerate(tasks):
        sel = train & torch.isin(y, torch.tensor(classes))
        _train(lin, x[sel], y[sel], steps, weight_decay=0.0)
        with torch.no_grad():
            pred = lin(x).argmax(1)
        for k, ck in enumerate(tasks):
            s = test & torch.isin(y, torch.tensor(ck))
            acc[t, k] = (pred[s] == y[s]).float().mean().item()
    return acc


def _average_forgetting(acc: np.ndarray) -> float:
    """Mean over tasks k < T-1 of (best accuracy on k before the last task) - (its final accuracy)."""
    t = acc.shape[0]
    return float(np.mean([acc[k:t - 1, k].max() - acc[t - 1, k] for k in range(t - 1)]))


@contextlib.contextmanager
def _one_thread():
    """Tiny full-batch problems: one thread is faster than two on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _codesign(root, enc, clips_per_class):
    feats, y, split = _features(root, enc)
    train, test = torch.from_numpy(split == "train"), torch.from_numpy(split == "test")
    p, names = load_protocol("synth-4x3"), Manifest.load(root / "manifest.jsonl").classes()
    tasks = [[names.index(p.classes[j]) for j in task] for task in p.tasks]  # manifest class ids
    with _one_thread():
        acc = {k: probe_accuracy(x, y, train, test) for k, x in feats.items()}
        forget = finetune_matrix(feats["av"], y, train, test, tasks)
    print(f"\nsynth 12 x {clips_per_class}: linear probe test accuracy", {k: round(v, 3) for k, v in acc.items()})
    print(f"fine-tuning accuracy matrix A[t, k] (synth-4x3), average forgetting "
          f"{_average_forgetting(forget):.2f}:\n", np.round(forget, 2))
    return acc, forget


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth-probe")
    synth.render(out, classes=12, clips_per_class=10, seed=0, workers=2, size=64, seconds=1.0)
    return out


def test_fusion_beats_each_modality_on_a_small_render(small_synth):
    """12 classes x 10 one-second clips (6 train / 2 val / 2 test per class)."""
    acc, forget = _codesign(small_synth, build(clip_seconds=1.0), 10)
    assert acc["av"] >= 0.8
    assert acc["audio"] <= acc["av"] - 0.15 and acc["visual"] <= acc["av"] - 0.15
    assert forget[0, 0] >= 0.8 and _average_forgetting(forget) >= 0.3


@pytest.mark.slow
def test_fusion_beats_each_modality_on_the_default_render(tmp_path):
    """The default render (12 classes x 20 clips of 2 s, 96 px) and default encoder."""
    synth.render(tmp_path, classes=12, clips_per_class=20, seed=0, workers=2)
    acc, forget = _codesign(tmp_path, build(), 20)
    assert acc["av"] >= 0.9
    assert acc["audio"] <= acc["av"] - 0.15 and acc["visual"] <= acc["av"] - 0.15
    assert forget[0, 0] >= 0.9 and _average_forgetting(forget) >= 0.3
