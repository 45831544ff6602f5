"""Pretrained-encoder implementations: shapes, determinism, upstream checkpoint layouts,
front-end maths and (where the reference packages are installed) parity with them.

All fast tests use the ``tiny`` variants, which run the same code paths as ``base``.
"""
from __future__ import annotations

import copy
import csv
import functools
import math
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from extract.encoders import ENCODERS, build_encoder
from extract.encoders.base import CheckpointError, file_sha256
from extract.encoders.dacvae import DACVAE_VARIANTS, DacVaeEncoder
from extract.encoders.loading import compute_precision, seeded
from extract.encoders.pann import VARIANTS as PANN_VARIANTS
from extract.encoders.pann import Cnn14, dft_kernels, hz_to_mel, mel_to_hz, slaney_mel_matrix

SECONDS = 1.0


def _frames(b, t, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t, size, size, 3), dtype=torch.uint8, generator=g)


def _audio(b, rate, seconds=SECONDS, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(round(rate * seconds)) / rate
    tone = 0.3 * torch.sin(2 * math.pi * 440.0 * t)
    return (tone + 0.1 * torch.randn(b, t.numel(), generator=g)).float()


def _build(name, **kw):
    opts = {
        "sam-audio": dict(variant="tiny", frames_per_clip=3, clip_seconds=0.4, dense=True, dense_grid=2),
        "pann-cnn14": dict(variant="tiny", clip_seconds=SECONDS),
        "vit-b16": dict(variant="tiny", frames_per_clip=2, clip_seconds=SECONDS),
    }[name]
    return build_encoder(name, **{**opts, **kw})


@functools.lru_cache(maxsize=None)
def _shared_cached(name, items):
    return _build(name, **dict(items))


def _shared(name, **kw):
    """Like :func:`_build`, but one instance per configuration for the whole module (encoders are
    frozen and ``encode`` is pure, so tests that only read may share them)."""
    return _shared_cached(name, tuple(sorted(kw.items())))


def _inputs(enc, b=2, seed=0):
    p = enc.preprocess
    frames = _frames(b, p.num_frames, p.image_size, seed) if p.num_frames else None
    audio = _audio(b, p.audio_rate, p.clip_seconds, seed) if p.audio_rate else None
    return frames, audio


def _run(enc, seed=0):
    return enc.encode(*_inputs(enc, seed=seed))


def _assert_same(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=f"stream {k}")


PRETRAINED = ["sam-audio", "pann-cnn14", "vit-b16"]


# --- registry, shapes, determinism, key material ---------------------------------------------

def test_registry_names_and_errors():
    assert set(ENCODERS) == {"sam-audio", "pann-cnn14", "vit-b16", "signal"}
    with pytest.raises(ValueError, match="no-such-encoder"):
        build_encoder("no-such-encoder")
    with pytest.raises(TypeError, match="frames_per_clp"):
        build_encoder("vit-b16", variant="tiny", frames_per_clp=3)
    with pytest.raises(ValueError, match="huge"):
        build_encoder("pann-cnn14", variant="huge")


@pytest.mark.parametrize("name", PRETRAINED)
def test_stream_shapes_dtypes_and_frozen(name):
    enc = _build(name)
    out = _run(enc)
    streams = enc.streams()
    assert set(out) == set(streams)
    for k, shape in streams.items():
        assert tuple(out[k].shape) == (2, *shape), k
        assert out[k].dtype == torch.float32, k
        assert torch.isfinite(out[k]).all(), k
    assert not enc.training
    assert not any(p.requires_grad for p in enc.parameters())


def test_expected_stream_shapes_per_encoder():
    sam = _shared("sam-audio").streams()
    # 0.4 s at 48 kHz → 10 latent frames; tiny PE projects to 512, patch width 192
    assert sam == {"audio": (10, 16), "visual": (3, 512), "visual_dense": (3, 4, 192)}
    pann = _shared("pann-cnn14").streams()
    # 1 + 32000 // 320 = 101 frames, halved 5 times → 3
    assert pann == {"audio": (1, 128), "audio_dense": (3, 128)}
    assert _shared("pann-cnn14", clip_seconds=10.0).streams()["audio_dense"] == (31, 128)
    assert _shared("vit-b16").streams() == {"visual": (2, 192), "visual_dense": (2, 196, 192)}
    assert _shared("vit-b16", dense=False).streams() == {"visual": (2, 192)}


def test_sam_audio_visual_is_unit_norm_and_dense_grid_is_patch_average():
    enc = _shared("sam-audio")
    frames, audio = _inputs(enc)
    out = enc.encode(frames, audio)
    torch.testing.assert_close(out["visual"].norm(dim=-1), torch.ones(2, 3))
    # the 4×4 patch grid of the tiny PE, averaged over 2×2 cells, row-major
    x = (frames.flatten(0, 1).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.inference_mode():
        tokens = enc.vision.forward_features(x)[:, 1:].reshape(6, 4, 4, -1)
    cell01 = tokens[:, 0:2, 2:4].mean(dim=(1, 2)).reshape(2, 3, -1)
    torch.testing.assert_close(out["visual_dense"][:, :, 1], cell01, atol=1e-5, rtol=1e-5)


def test_vit_outputs_are_cls_and_patch_tokens_of_half_normalised_frames():
    enc = _shared("vit-b16")
    frames, _ = _inputs(enc)
    out = enc.encode(frames, None)
    x = (frames.flatten(0, 1).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.inference_mode():
        tokens = enc.model.forward_features(x)
    torch.testing.assert_close(out["visual"].flatten(0, 1), tokens[:, 0])
    torch.testing.assert_close(out["visual_dense"].flatten(0, 1), tokens[:, 1:])


def test_bad_inputs_are_named():
    enc = _shared("vit-b16")
    with pytest.raises(ValueError, match=r"\(B, T, 224, 224, 3\)"):
        enc.encode(_frames(1, 2, 112), None)
    with pytest.raises(ValueError, match="frames=None"):
        enc.encode(None, None)
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        _shared("pann-cnn14").encode(None, torch.zeros(1, 2, 32000))


@pytest.mark.parametrize("name", PRETRAINED)
def test_random_init_is_deterministic_per_seed(name):
    a, b, c = _build(name), _build(name), _build(name, random_init_seed=1)
    assert a.weights == "random-init:0" and c.weights == "random-init:1"
    out_a, out_b, out_c = _run(a), _run(b), _run(c)
    for k in out_a:
        assert torch.equal(out_a[k], out_b[k]), k
        assert not torch.allclose(out_a[k], out_c[k]), k


def test_cpu_runs_in_float32_and_amp_choice_is_checked():
    assert _shared("vit-b16").key_material()["compute"] == "float32"  # autocast only on CUDA
    assert compute_precision(torch.device("cuda"), "bfloat16") == "bfloat16-autocast"
    with pytest.raises(ValueError, match="amp='bf16'"):
        _build("vit-b16", amp="bf16")


def test_random_init_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _build("pann-cnn14")
    assert torch.equal(torch.rand(3), expected)


def test_key_material_tracks_variant_weights_and_options(tmp_path):
    base = _shared("vit-b16").key_material()
    assert base["encoder"] == "vit-b16" and base["variant"] == "tiny"
    assert base["weights"] == "random-init:0"
    assert base["preprocess"]["image_size"] == 224 and base["preprocess"]["frames_per_clip"] == 2
    codec = dict(frames_per_clip=0, clip_seconds=0.2)  # the base codec alone is cheap to build
    assert _shared("sam-audio", variant="base", **codec).key_material() != _shared("sam-audio", **codec).key_material()
    changed = {
        "seed": _shared("vit-b16", random_init_seed=3).key_material(),
        "frames": _shared("vit-b16", frames_per_clip=4).key_material(),
        "dense": _shared("vit-b16", dense=False).key_material(),
    }
    for what, km in changed.items():
        assert km != base, what
    sam = _shared("sam-audio").key_material()
    assert _shared("sam-audio", dense_grid=1).key_material() != sam
    assert _shared("sam-audio", fps=4.0).key_material()["preprocess"]["fps"] == 4.0
    # weights loaded from a file are identified by its hash
    path = tmp_path / "vit.safetensors"
    save_file(_shared("vit-b16").model.state_dict(), str(path))
    loaded = _build("vit-b16", checkpoint=str(path))
    assert loaded.weights == f"sha256:{file_sha256(path)}"
    assert loaded.key_material()["weights"] != base["weights"]


@pytest.mark.slow  # builds the full PE-L (317 M parameters)
def test_sam_audio_fps_25_warns_about_pe_l_cost():
    with pytest.warns(UserWarning, match="352 GFLOPs"):
        enc = build_encoder("sam-audio", variant="base", fps=25, audio=False, clip_seconds=0.2)
    assert enc.preprocess.num_frames == 5 and enc.streams() == {"visual": (5, 1024)}


def test_sam_audio_fps_option_samples_frames_at_that_rate():
    enc = _shared("sam-audio", fps=25.0)  # 0.4 s at 25 fps
    assert enc.preprocess.num_frames == 10 and enc.streams()["visual"] == (10, 512)
    out = _run(enc)
    assert out["visual"].shape == (2, 10, 512) and out["audio"].shape == (2, 10, 16)


def test_sam_audio_modalities_can_be_skipped():
    audio_only = _shared("sam-audio", frames_per_clip=0)
    assert audio_only.vision is None and set(audio_only.streams()) == {"audio"}
    assert audio_only.preprocess.image_size == 0
    visual_only = _shared("sam-audio", audio=False)
    assert visual_only.audio_codec is None and visual_only.preprocess.audio_rate == 0


# --- DACVAE --------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [48000, 48000 + 7, 3 * 1920 - 1, 1000])
def test_dacvae_hop_gives_ceil_frames_with_right_reflect_padding(length):
    with seeded(0):
        codec = DacVaeEncoder(DACVAE_VARIANTS["tiny"]).eval()
    wav = _audio(1, 48000, length / 48000)
    with torch.inference_mode():
        out = codec(wav)
        assert out.shape == (1, math.ceil(length / 1920), 16)
        padded = torch.nn.functional.pad(wav[:, None], (0, (-length) % 1920), mode="reflect")[:, 0]
        torch.testing.assert_close(codec(padded), out)


def test_dacvae_too_short_input_is_refused():
    with seeded(0):
        codec = DacVaeEncoder(DACVAE_VARIANTS["tiny"]).eval()
    with pytest.raises(ValueError, match="too short"):
        codec(torch.zeros(1, 100))


# --- SAM-Audio checkpoint layout -----------------------------------------------------------

def _timm_pe_to_upstream(sd):
    """timm EVA keys → Perception Encoder's own ``visual.*`` layout (inverse of timm's filter)."""
    out = {}
    for k, v in sd.items():
        if k == "cls_token":
            out["class_embedding"] = v.reshape(-1)
        elif k == "pos_embed":
            out["positional_embedding"] = v[0]
        elif k == "head.weight":
            out["proj"] = v.t().contiguous()
        elif k == "head.bias":
            assert torch.count_nonzero(v) == 0  # PE's projection has no bias
        elif k in ("attn_pool.q.weight", "attn_pool.q.bias"):
            kind = k.rsplit(".", 1)[1]
            out[f"attn_pool.attn.in_proj_{kind}"] = torch.cat([v, sd[f"attn_pool.kv.{kind}"]])
        elif k.startswith("attn_pool.kv."):
            continue
        else:
            k = (k.replace("attn_pool.latent", "attn_pool.probe")
                  .replace("attn_pool.proj", "attn_pool.attn.out_proj")
                  .replace("attn_pool.norm", "attn_pool.layernorm")
                  .replace("patch_embed.proj", "conv1").replace("norm_pre", "ln_pre")
                  .replace("blocks.", "transformer.resblocks.").replace("attn.qkv.", "attn.in_proj_")
                  .replace("attn.proj", "attn.out_proj").replace("mlp.fc1", "mlp.c_fc")
                  .replace("mlp.fc2", "mlp.c_proj"))
            k = re.sub(r"\.norm([12])\.", r".ln_\1.", k)
            k = "ln_post" + k[4:] if k.startswith("norm.") else k
            out[k] = v
    return {"visual." + k: v for k, v in out.items()}


def _weight_normed(module, form):
    """State dict of a copy of ``module`` with every conv re-expressed in weight-norm form."""
    module = copy.deepcopy(module)
    for m in module.modules():
        if isinstance(m, torch.nn.Conv1d):
            if form == "old":  # the deprecated form is the one upstream checkpoints were saved in
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    torch.nn.utils.weight_norm(m)
            else:
                torch.nn.utils.parametrizations.weight_norm(m)
    return module.state_dict()


def _sam_audio_checkpoint(enc, path, form="old", codec_prefix="audio_codec."):
    state = {codec_prefix + k: v for k, v in _weight_normed(enc.audio_codec, form).items()}
    # parts of SAM-Audio the encoder does not use, in the same file
    state[codec_prefix + "quantizer.out_proj.weight_g"] = torch.ones(64, 1, 1)
    state[codec_prefix + "decoder.model.0.bias"] = torch.zeros(8)
    state["transformer.layers.0.attention.wq.weight"] = torch.zeros(4, 4)
    state["vision_encoder.model.transformer.resblocks.0.ln_1.weight"] = torch.ones(4)  # text tower
    state["vision_encoder.model.logit_scale"] = torch.tensor(1.0)
    state.update({"vision_encoder.model." + k: v
                  for k, v in _timm_pe_to_upstream(enc.vision.state_dict()).items()})
    torch.save(state, path)
    return state


@pytest.mark.parametrize("form,prefix", [("old", "audio_codec."), ("parametrizations", "audio_codec."),
                                         ("old", "audio_codec.model.")])
def test_sam_audio_checkpoint_in_upstream_layout_reproduces_outputs(tmp_path, form, prefix):
    src = _shared("sam-audio", random_init_seed=7)
    path = tmp_path / "checkpoint.pt"
    state = _sam_audio_checkpoint(src, path, form, prefix)
    assert any(k.endswith(("weight_g", "original0")) for k in state)
    loaded = _build("sam-audio", checkpoint=str(path))
    assert loaded.weights == f"sha256:{file_sha256(path)}"
    _assert_same(_run(loaded), _run(src))
    # a hub-style directory holding checkpoint.pt works too
    assert _build("sam-audio", checkpoint=str(tmp_path)).weights == loaded.weights


def test_sam_audio_partial_or_foreign_checkpoint_names_keys(tmp_path):
    src = _shared("sam-audio")
    path = tmp_path / "checkpoint.pt"
    state = _sam_audio_checkpoint(src, path)
    del state["audio_codec.encoder.block.6.weight_g"]
    state["vision_encoder.model.visual.transformer.resblocks.99.ln_1.weight"] = torch.ones(192)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing.*encoder\.block\.6\.weight") as err:
        _build("sam-audio", checkpoint=str(path))
    assert "encoder.block.6.weight_v" in str(err.value) and str(path) in str(err.value)
    with pytest.raises(CheckpointError, match=r"unexpected.*blocks\.99\.norm1\.weight"):
        _build("sam-audio", checkpoint=str(path), audio=False)
    _sam_audio_checkpoint(src, path)  # tiny weights into the base codec
    with pytest.raises(CheckpointError, match=r"encoder\.block\.0\.weight \(4, 1, 7\) != \(64, 1, 7\)"):
        _build("sam-audio", variant="base", frames_per_clip=0, checkpoint=str(path))
    torch.save({"model.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="audio_codec.encoder"):
        _build("sam-audio", checkpoint=str(path))
    with pytest.raises(CheckpointError, match="vision_encoder.model.visual"):
        _build("sam-audio", checkpoint=str(path), audio=False)


# --- PANN ----------------------------------------------------------------------------------

class _NumpyOnePickler(pickle._Pickler):
    """Writes numpy globals under their numpy 1.x module names, as in files saved years ago."""

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", None) or ""
        if module.startswith("numpy._core"):
            name = name or obj.__qualname__
            self.write(pickle.GLOBAL + f"{module.replace('numpy._core', 'numpy.core')}\n{name}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


class _NumpyOnePickle:
    """A ``pickle_module`` for ``torch.save`` that pickles with :class:`_NumpyOnePickler`."""

    Pickler = _NumpyOnePickler
    Unpickler = pickle.Unpickler
    load = staticmethod(pickle.load)

    @staticmethod
    def dump(obj, f, protocol=2):
        _NumpyOnePickler(f, protocol=protocol).dump(obj)


def _pann_file(model_state, path):
    sampler = {"indexes_per_class": [np.arange(5, dtype=np.int64), np.array([3, 1], dtype=np.int64)],
               "queue": [4, 2, 0], "pointers_of_classes": [np.int64(1), 0]}
    torch.save({"iteration": 600000, "model": model_state, "sampler": sampler}, path,
               pickle_module=_NumpyOnePickle, _use_new_zipfile_serialization=False)


def test_pann_upstream_file_with_numpy_sampler_reproduces_outputs(tmp_path):
    src = _build("pann-cnn14", random_init_seed=5)
    path = tmp_path / "Cnn14_mAP=0.431.pth"
    _pann_file(src.model.state_dict(), path)
    assert b"numpy.core.multiarray" in path.read_bytes()
    with pytest.raises(pickle.UnpicklingError):  # plain weights_only refuses the file...
        torch.load(path, weights_only=True)
    loaded = _build("pann-cnn14", checkpoint=str(path))  # ...the encoder reads it safely
    assert loaded.weights == f"sha256:{file_sha256(path)}"
    _assert_same(_run(loaded), _run(src))
    assert not torch.equal(_run(loaded)["audio"], _run(_build("pann-cnn14"))["audio"])


class _Opaque:
    pass


def test_pann_file_with_arbitrary_objects_needs_explicit_trust(tmp_path):
    src = _build("pann-cnn14", random_init_seed=5)
    path = tmp_path / "cnn14.pth"
    torch.save({"model": src.model.state_dict(), "sampler": _Opaque()}, path)
    with pytest.raises(CheckpointError, match="trust_checkpoint=True") as err:
        _build("pann-cnn14", checkpoint=str(path))
    assert str(path) in str(err.value)
    _assert_same(_run(_build("pann-cnn14", checkpoint=str(path), trust_checkpoint=True)), _run(src))


def test_pann_partial_or_wrong_checkpoint_names_keys(tmp_path):
    state = _shared("pann-cnn14").model.state_dict()
    with torch.device("meta"):  # shapes only: the full model's key set, without its 80 M weights
        base = Cnn14(PANN_VARIANTS["base"]).state_dict()
    assert len(state) == 84 and sorted(base) == sorted(state)
    assert base["fc1.weight"].shape == (2048, 2048) and base["conv_block6.conv2.weight"].shape == (2048, 2048, 3, 3)
    path = tmp_path / "cnn14.pth"
    partial = {k: v for k, v in state.items() if k != "fc1.weight"}
    partial["fc2.weight"] = torch.zeros(1)
    torch.save({"model": partial}, path)
    names = r"missing keys \(e\.g\. fc1\.weight\).*unexpected keys \(e\.g\. fc2\.weight\)"
    with pytest.raises(CheckpointError, match=names):
        _build("pann-cnn14", checkpoint=str(path))
    wrong = dict(state, **{"conv_block1.conv1.weight": torch.zeros(64, 1, 3, 3)})  # a base-sized tensor
    torch.save({"model": wrong}, path)
    with pytest.raises(CheckpointError, match=r"conv_block1\.conv1\.weight \(64, 1, 3, 3\) != \(4, 1, 3, 3\)"):
        _build("pann-cnn14", checkpoint=str(path))


def test_pann_front_end_is_deterministic_and_not_random():
    a = _shared("pann-cnn14", random_init_seed=0).model.state_dict()
    b = _shared("pann-cnn14", random_init_seed=9).model.state_dict()
    for k in ("spectrogram_extractor.stft.conv_real.weight", "spectrogram_extractor.stft.conv_imag.weight",
              "logmel_extractor.melW"):
        assert torch.equal(a[k], b[k]), k
    assert a["spectrogram_extractor.stft.conv_real.weight"].shape == (513, 1, 1024)
    assert a["logmel_extractor.melW"].shape == (513, 64)
    assert not torch.equal(a["fc1.weight"], b["fc1.weight"])


def test_slaney_mel_scale_constants():
    # linear 200/3 Hz per mel below 1 kHz; 27 mels per factor 6.4 above
    assert hz_to_mel(1000.0) == pytest.approx(15.0)
    assert hz_to_mel(500.0) == pytest.approx(7.5)
    assert hz_to_mel(6400.0) == pytest.approx(42.0)
    f = np.array([50.0, 700.0, 1000.0, 3000.0, 14000.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(f)), f)


def test_mel_matrix_matches_hand_slaney_formula_and_has_unit_area():
    melw = slaney_mel_matrix(32000, 1024, 64, 50.0, 14000.0)
    assert melw.shape == (513, 64) and melw.dtype == np.float32
    # 50 Hz is below 1 kHz (linear part); 14 kHz is in the log part
    m_lo, m_hi = 50.0 * 3 / 200, 15 + 27 * math.log(14000 / 1000) / math.log(6.4)
    edge = [m_lo + j * (m_hi - m_lo) / 65 for j in range(66)]
    hz = [m * 200 / 3 if m < 15 else 1000 * 6.4 ** ((m - 15) / 27) for m in edge]
    for i, k in [(0, 2), (10, 12), (30, 60), (40, 110), (63, 440), (63, 447)]:
        f = k * 32000 / 1024
        tri = max(0.0, min((f - hz[i]) / (hz[i + 1] - hz[i]), (hz[i + 2] - f) / (hz[i + 2] - hz[i + 1])))
        assert melw[k, i] == pytest.approx(tri * 2 / (hz[i + 2] - hz[i]), rel=1e-5, abs=1e-9), (i, k)
    # nothing below 50 Hz or above 14 kHz
    assert melw[:2].sum() == 0 and melw[449:].sum() == 0  # bin 1 = 31.25 Hz, bin 449 = 14031 Hz
    # Slaney normalisation: each triangle has unit area in Hz (checked where it spans ≥ 8 bins)
    widths = np.array(hz[2:]) - np.array(hz[:-2])
    wide = widths >= 8 * 31.25
    assert wide.sum() >= 30
    np.testing.assert_allclose(melw[:, wide].sum(axis=0) * 31.25, 1.0, rtol=0.02)


def test_stft_kernels_match_numpy_fft_of_hann_windowed_frames():
    enc = _shared("pann-cnn14")
    x = _audio(1, 32000, 0.25, seed=3)
    with torch.inference_mode():
        power = enc.model.spectrogram_extractor(x)[0].numpy()
    assert power.shape == (1 + x.shape[1] // 320, 513)
    padded = np.pad(x[0].numpy().astype(np.float64), 512, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(1024) / 1024)  # periodic Hann
    for t in (0, 7, power.shape[0] - 1):
        spec = np.fft.rfft(padded[t * 320: t * 320 + 1024] * window)
        np.testing.assert_allclose(power[t], np.abs(spec) ** 2, rtol=1e-3, atol=1e-3 * np.abs(spec).max() ** 2)
    real, imag = dft_kernels(1024)
    np.testing.assert_allclose(real[3, 0, :4], np.cos(2 * np.pi * 3 * np.arange(4) / 1024) * window[:4], atol=1e-7)
    assert imag[0].max() == 0 and imag[0].min() == 0


def test_pann_log_mel_is_10log10_with_floor():
    enc = _shared("pann-cnn14")
    with torch.inference_mode():
        silent = enc.model.logmel(torch.zeros(1, 3200))
        loud = enc.model.logmel(_audio(1, 32000, 0.1))
        power = enc.model.spectrogram_extractor(_audio(1, 32000, 0.1))
    assert torch.all(silent == -100.0)  # 10·log10(1e-10)
    expected = 10 * torch.log10(torch.clamp(power @ enc.model.logmel_extractor.melW, min=1e-10))
    torch.testing.assert_close(loud, expected)


# --- ViT -----------------------------------------------------------------------------------

def test_vit_timm_safetensors_reproduces_outputs_and_ignores_head(tmp_path):
    src = _build("vit-b16", random_init_seed=4)
    state = dict(src.model.state_dict())
    state["head.weight"] = torch.zeros(10, 192)  # an in21k-style classifier the encoder does not use
    state["head.bias"] = torch.zeros(10)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    loaded = _build("vit-b16", checkpoint=str(path))
    _assert_same(_run(loaded), _run(src))
    pth = tmp_path / "model.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, pth)
    _assert_same(_run(_build("vit-b16", checkpoint=str(pth))), _run(src))


def test_vit_wrong_checkpoint_names_keys(tmp_path):
    path = tmp_path / "pann.pth"
    torch.save({"model": _shared("pann-cnn14").model.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"missing keys \(e\.g\. .*blocks\.0\.attn") as err:
        _build("vit-b16", checkpoint=str(path))
    assert "unexpected keys (e.g. bn0.bias" in str(err.value)
    with pytest.raises(CheckpointError, match="not found"):
        _build("vit-b16", checkpoint=str(tmp_path / "absent.safetensors"))


# --- parity with reference implementations (only where they are installed) ------------------

def _dacvae_to_transformers(sd, n_blocks):
    """Our DACVAE encoder keys → transformers' ``PeAudioDacEncoder`` keys."""
    out = {}
    for k, v in sd.items():
        if not k.startswith("encoder.block."):
            continue
        i, rest = k[len("encoder.block."):].split(".", 1)
        i = int(i)
        if i == 0:
            out["conv1." + rest] = v
        elif i == n_blocks + 1:
            out["snake1." + rest] = v
        elif i == n_blocks + 2:
            out["conv2." + rest] = v
        else:
            j, tail = rest[len("block."):].split(".", 1)
            j = int(j)
            if j < 3:
                layer, leaf = tail[len("block."):].split(".", 1)
                name = ("snake1", "conv1", "snake2", "conv2")[int(layer)]
                out[f"block.{i - 1}.res_unit{j + 1}.{name}.{leaf}"] = v
            else:
                out[f"block.{i - 1}.{'snake1' if j == 3 else 'conv1'}.{tail}"] = v
    return out


def test_dacvae_matches_transformers_pe_audio_dac_encoder():
    pytest.importorskip("transformers", minversion="5.17")
    from transformers import DacConfig
    from transformers.models.pe_audio.modeling_pe_audio import PeAudioDacEncoder

    cfg = DACVAE_VARIANTS["tiny"]
    with seeded(0):
        ours = DacVaeEncoder(cfg).eval()
        for n, p in ours.named_parameters():
            if n.endswith("alpha"):
                p.data.uniform_(0.5, 1.5)
    ref = PeAudioDacEncoder(DacConfig(encoder_hidden_size=cfg.encoder_dim, downsampling_ratios=list(cfg.rates),
                                      hidden_size=cfg.latent_dim, codebook_dim=cfg.codebook_dim)).eval()
    ref.load_state_dict(_dacvae_to_transformers(ours.state_dict(), len(cfg.rates)), strict=True)
    bottleneck = torch.nn.Conv1d(cfg.latent_dim, cfg.codebook_dim, 1)
    bottleneck.weight.data = ours.quantizer.in_proj.weight.data[: cfg.codebook_dim].clone()
    bottleneck.bias.data = ours.quantizer.in_proj.bias.data[: cfg.codebook_dim].clone()
    wav = _audio(2, 48000, 0.8)
    with torch.inference_mode():
        torch.testing.assert_close(ours(wav), bottleneck(ref(wav[:, None])).transpose(1, 2), atol=1e-6, rtol=1e-6)


def test_pann_matches_panns_inference_cnn14(tmp_path, monkeypatch):
    pytest.importorskip("torchlibrosa")
    pytest.importorskip("librosa")
    (tmp_path / "panns_data").mkdir()
    with open(tmp_path / "panns_data" / "class_labels_indices.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "mid", "display_name"])
        w.writerows([i, f"/m/{i}", f"class {i}"] for i in range(527))
    monkeypatch.setenv("HOME", str(tmp_path))  # panns_inference downloads this file at import otherwise
    models = pytest.importorskip("panns_inference.models")
    enc = build_encoder("pann-cnn14", variant="base", clip_seconds=SECONDS)
    ref = models.Cnn14(sample_rate=32000, window_size=1024, hop_size=320, mel_bins=64, fmin=50, fmax=14000,
                       classes_num=527).eval()
    ref_state, ours = ref.state_dict(), enc.model.state_dict()
    assert sorted(ref_state) == sorted(ours)
    for k in ("spectrogram_extractor.stft.conv_real.weight", "logmel_extractor.melW"):
        torch.testing.assert_close(ours[k], ref_state[k], atol=1e-6, rtol=1e-5)  # librosa-built front end
    ref.load_state_dict(ours, strict=True)
    wav = _audio(2, 32000)
    with torch.inference_mode():
        expected = ref(wav)["embedding"]
    torch.testing.assert_close(enc.encode(None, wav)["audio"][:, 0], expected, atol=1e-6, rtol=1e-5)
