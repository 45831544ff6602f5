"""Continual audio-visual segmentation: masks in the cache, the segmentation problem of the
shared trainer, ATLAS, and the parameter regularisers written once for both problems."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from avcl_core import seg_metrics as S
from avcl_core import synth
from avcl_core.cache import open_store, verify_store
from avcl_core.manifest import Manifest
from avcl_core.protocols import load_protocol
from extract.decode import frame_indices, sample_times
from extract.encoders import build_encoder
from extract.runner import extract
from train.cli import main as train_main
from train.features import FeatureSet
from train.methods import build_method
from train.trainer import Trainer, read_acc_matrix

SIGNAL = dict(frames_per_clip=4, image_size=32, clip_seconds=1.0, dense_grid=4)
TINY = ["--epochs", "2", "--set", "batch_size=8", "--set", "head.d_model=32", "-q"]
METRICS = ("map", "maxf1", "fscore", "miou", "dice")


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
    """A synth render (4 classes x 5 clips: 3 train, 1 val, 1 test each), its signal store with
    masks, and the synth-seg protocols for 4 classes."""
    root = tmp_path_factory.mktemp("synthseg")
    m = synth.render(root, classes=4, clips_per_class=5, seed=0, workers=1, size=32, seconds=1.0, fps=8,
                     audio_rate=16000)
    protos = synth.write_seg_protocols(root / "segp", 4)
    enc = build_encoder("signal", **SIGNAL)
    s = extract(Manifest.load(m), root, enc, root / "cache", workers=0, progress=False)
    return {"root": root, "store": s.store, "protocols": {p.stem.split("-")[-1]: str(p) for p in protos},
            "manifest": Manifest.load(m)}


def test_masks_are_stored_aligned_with_the_sampled_frames(seg_data):
    st = open_store(seg_data["store"])
    assert st.extras == {"masks": ((4, 32, 32), "uint8"), "mask_valid": ((4,), "uint8")}
    assert st.key_material["masks"] == {"size": 32, "frames": 4, "format": "binary-nearest/1"}
    masks, valid = st.read("masks"), st.read("mask_valid")
    assert valid.min() == 1 and masks.max() == 1
    enc = build_encoder("signal", **SIGNAL)
    times = sample_times(enc.preprocess)
    for r, row in enumerate(seg_data["manifest"]):
        video = np.load(seg_data["root"] / row["masks"])["masks"]  # one mask per video frame at 8 fps
        idx = frame_indices(times, np.arange(video.shape[0]) / 8.0, 1.0)
        np.testing.assert_array_equal(masks[r], video[idx])
    assert verify_store(st) == []


@pytest.mark.parametrize("setting,other", [("cil", "finetune"), ("til", "lwf"), ("dil", "ewc"),
                                           ("taskfree", "si")])
def test_seg_protocol_trains_end_to_end_and_writes_the_run_directory(seg_data, tmp_path, setting, other):
    proto = seg_data["protocols"][setting]
    res = train_main(["--cache", seg_data["store"], "--protocol", proto, "--method", f"atlas,{other}",
                      "--out", str(tmp_path), *TINY])
    assert [r["status"] for r in res] == ["ok", "ok"], [r.get("traceback") for r in res]
    T = load_protocol(proto).num_tasks
    for r in res:
        d = Path(r["run_dir"])
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["problem"] == "segmentation" and cfg["primary_metric"] == "map" and cfg["head"] == "atlas"
        mats = {m: read_acc_matrix(d / "matrices" / f"{m}.csv") for m in METRICS}
        for m, A in mats.items():
            assert A.shape == (T, T) and np.all(np.isfinite(A)) and np.all((A >= 0) & (A <= 1)), m
        np.testing.assert_array_equal(read_acc_matrix(d / "acc_matrix.csv"), mats["map"])
        met = json.loads((d / "metrics.json").read_text())
        assert met["primary_metric"] == "map" and set(met["per_metric"]) == set(METRICS)
        assert met["average_accuracy"] == pytest.approx(met["per_metric"]["map"]["average_accuracy"])
        assert met["per_metric"]["miou"]["average_accuracy"] == pytest.approx(mats["miou"][-1].mean())
        ov = np.load(d / "overlays.npz")
        assert ov["prob"].dtype == np.float16 and ov["prob"].shape == (4, 32, 32) and ov["gt"].dtype == np.uint8
        assert list(ov["sample_id"]) == sorted(ov["sample_id"]) and (ov["frame"] == 0).all()
        st = open_store(seg_data["store"])
        rows = st.rows_for(list(ov["sample_id"]))
        np.testing.assert_array_equal(ov["gt"], st.read("masks")[rows, 0])
        assert 0 <= ov["prob"].min() and ov["prob"].max() <= 1


def _trainer(seg_data, setting, method="finetune", run_dir=None, **hp):
    fs = FeatureSet.from_stores([seg_data["store"]], streams={"visual": "visual_dense"})
    p = load_protocol(seg_data["protocols"][setting])
    m = build_method(method, {"epochs": 2, "batch_size": 8, **hp})
    return Trainer(fs, p, m, head="atlas", head_config={"d_model": 32}, seed=0, run_dir=run_dir)


def test_metric_rows_equal_the_metric_functions_on_the_final_model(seg_data):
    tr = _trainer(seg_data, "cil")
    res = tr.fit()
    A = {m: v for m, v in res.extra["matrices"].items()}
    prob_model = tr.problem
    masks = open_store(seg_data["store"]).read("masks")
    rows_of = tr.fs.rows
    for k, idx in enumerate(tr.split_idx["test"]):
        probs = np.concatenate([p for _, p in prob_model.probabilities(idx)])
        gt = masks[rows_of[idx]]
        flat_p, flat_g = probs.reshape(-1, 32, 32), gt.reshape(-1, 32, 32)
        assert A["map"][-1, k] == pytest.approx(S.pixel_map(flat_p, flat_g, from_logits=False))
        assert A["dice"][-1, k] == pytest.approx(S.frame_dice(flat_p, flat_g, from_logits=False).mean())
        per_video_iou = [S.avsbench_miou(p, g, from_logits=False) for p, g in zip(probs, gt)]
        assert A["miou"][-1, k] == pytest.approx(np.mean(per_video_iou))
        for name, beta2 in (("fscore", 0.3), ("maxf1", 1.0)):
            per_video = [np.nan_to_num(S.avsbench_fscore(p, g, from_logits=False, beta2=beta2))
                         for p, g in zip(probs, gt)]
            assert A[name][-1, k] == pytest.approx(np.mean(per_video)), name


def test_settings_cut_tasks_and_choose_mask_outputs(seg_data):
    til = _trainer(seg_data, "til")
    assert til.problem.mask_channels == 2 and til.offsets == [0, 0, 0]  # one mask output per task, no class head
    til.model = til._build_model(0)
    logits = torch.arange(2 * 4 * 2 * 32 * 32, dtype=torch.float32).view(2, 4, 2, 32, 32)
    picked = til.problem.select_channel(logits, torch.tensor([1, 0]))
    torch.testing.assert_close(picked[0], logits[0, :, 1])
    torch.testing.assert_close(picked[1], logits[1, :, 0])
    cil = _trainer(seg_data, "cil")
    assert cil.problem.mask_channels == 1 and cil.offsets == [0, 2, 4] and cil.problem.use_class_head
    tf = _trainer(seg_data, "taskfree")
    p = load_protocol(seg_data["protocols"]["taskfree"])
    chunks = p.stream_chunks(tf.fs.manifest)
    for t, idx in enumerate(tf.split_idx["train"]):
        assert set(tf.fs.rows[idx]) == set(np.flatnonzero(chunks == t))
    test = np.concatenate(tf.split_idx["test"])
    assert sorted(test) == sorted(np.flatnonzero(tf.fs.split_of() == "test")) and len(set(test)) == test.size


def test_atlas_freezes_lora_bases_after_the_first_task_and_anchors_adapters_and_decoder(seg_data, tmp_path):
    tr = _trainer(seg_data, "cil", method="atlas", epochs=1)
    tr.fit()
    m = tr.model
    # anchored: LoRA matrices and decoder weights only, with a finite importance each
    assert tr.method.anchor and all("lora_" in n or n.startswith("head.decoder.") for n in tr.method.anchor)
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in tr.method.importance.values())
    assert not m.head.q.base.weight.requires_grad and m.head.q.lora_A.requires_grad
    # a frozen base weight is the one trained in the first task
    tr0 = _trainer(seg_data, "cil", method="atlas", epochs=1)
    tr0.task = -1
    tr0._train_task(0, None)
    torch.testing.assert_close(tr0.model.head.q.base.weight, m.head.q.base.weight)
    # the anchor penalty is zero at the anchor and (c/2) sum Omega d^2 after a shift d
    assert float(tr.method.penalty().detach()) == 0.0
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n in tr.method.anchor:
                p.add_(0.1)
    expect = 0.5 * 0.3 * sum(float((tr.method.importance[n] * 0.01).sum()) for n in tr.method.anchor)
    assert float(tr.method.penalty().detach()) == pytest.approx(expect, rel=1e-4)


def test_a_classification_head_or_store_without_masks_is_refused(seg_data, tmp_path):
    from train.trainer import TrainError

    fs = FeatureSet.from_stores([seg_data["store"]], streams={"visual": "visual_dense"})
    p = load_protocol(seg_data["protocols"]["cil"])
    with pytest.raises(TrainError, match="classification head"):
        Trainer(fs, p, build_method("finetune", {"epochs": 1}), head="guided", seed=0).fit()
    fs2 = FeatureSet.from_stores([seg_data["store"]])  # pooled visual stream: not dense tokens
    with pytest.raises(TrainError, match="visual_dense"):
        Trainer(fs2, p, build_method("finetune", {"epochs": 1}), head="atlas", seed=0)


def test_ewc_si_mas_serve_classification_and_ewc_penalty_grows_with_drift(seg_data, tmp_path):
    """``avcl-train --method ewc,si,mas`` on a synth classification protocol, then EWC's penalty by hand."""
    from avcl_core.protocols import save_protocol, protocol_from_dict

    proto = save_protocol(protocol_from_dict(synth.protocols(4)[0]), tmp_path / "synth-2x2.json")
    res = train_main(["--cache", seg_data["store"], "--protocol", str(proto), "--method", "ewc,si,mas",
                      "--epochs", "2", "--set", "batch_size=8", "--set", "head.d_model=16", "--set", "head.n_heads=2",
                      "--out", str(tmp_path / "runs"), "-q"])
    assert [r["status"] for r in res] == ["ok"] * 3, [r.get("traceback") for r in res]
    for r in res:
        A = np.asarray(r["acc_matrix"])
        assert A.shape == (2, 2) and np.isfinite(A).all()
        assert not (Path(r["run_dir"]) / "matrices").exists()  # classification: one accuracy matrix
    fs = FeatureSet.from_stores([seg_data["store"]])
    tr = Trainer(fs, load_protocol(str(proto)), build_method("ewc", {"epochs": 1, "batch_size": 8}),
                 head_config={"d_model": 16, "n_heads": 2}, seed=0)
    tr.fit()
    ewc = tr.method
    assert ewc.anchor and float(ewc.penalty().detach()) == 0.0  # zero at the anchor
    fisher = ewc.importance
    assert all((v >= 0).all() for v in fisher.values()) and any(v.sum() > 0 for v in fisher.values())
    values = []
    for step in (0.01, 0.02, 0.04):
        with torch.no_grad():
            for n, p in tr.model.named_parameters():
                if n in ewc.anchor:
                    p.copy_(ewc.anchor[n] + step)
        values.append(float(ewc.penalty().detach()))
        expect = 0.5 * 5000.0 * sum(float((fisher[n] * step ** 2).sum()) for n in ewc.anchor)
        assert values[-1] == pytest.approx(expect, rel=1e-4)
    assert values[0] < values[1] < values[2]


def test_si_path_integral_by_hand():
    """omega = sum -g * dtheta over the steps; Omega = max(0, omega / (total shift^2 + xi))."""
    from train.methods.param_reg import PathIntegral

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    path = PathIntegral({"w": p})
    grads = [torch.tensor([0.5, -1.0]), torch.tensor([0.25, 2.0])]
    shifts = [torch.tensor([-0.1, 0.2]), torch.tensor([-0.05, -0.3])]
    for g, d in zip(grads, shifts):
        path.step({"w": g})
        with torch.no_grad():
            p.add_(d)
    omega = -(grads[0] * shifts[0] + grads[1] * shifts[1])
    total = shifts[0] + shifts[1]
    expect = torch.clamp(omega / (total ** 2 + 1e-3), min=0)
    torch.testing.assert_close(path.importance(1e-3)["w"], expect, rtol=1e-5, atol=1e-6)


def test_pann_per_second_tokens_pool_the_frame_map():
    enc = build_encoder("pann-cnn14", variant="tiny", clip_seconds=5.0, per_second=True, amp=None)
    assert enc.streams()["audio_seconds"] == (5, 128)
    wav = torch.from_numpy(np.random.default_rng(0).normal(0, 0.1, (2, 32000 * 5)).astype(np.float32))
    out = enc.encode(None, wav)
    dense, sec = out["audio_dense"], out["audio_seconds"]
    T = dense.shape[1]
    for s in range(5):  # adaptive average pooling bins: [floor(s T / 5), ceil((s + 1) T / 5))
        lo, hi = (s * T) // 5, -(-((s + 1) * T) // 5)
        torch.testing.assert_close(sec[:, s], dense[:, lo:hi].mean(dim=1))
    assert "audio_seconds" not in build_encoder("pann-cnn14", variant="tiny", clip_seconds=5.0).streams()


@pytest.mark.parametrize("method", ["atlas", "lwf"])
def test_an_interrupted_segmentation_run_resumes_to_the_same_matrices(seg_data, tmp_path, method):
    from train_fixtures import Interrupted, interrupt_before_task

    full = _trainer(seg_data, "cil", method=method, run_dir=tmp_path / "full", epochs=1).fit()
    tr = interrupt_before_task(_trainer(seg_data, "cil", method=method, run_dir=tmp_path / "cut", epochs=1), 1)
    with pytest.raises(Interrupted):
        tr.fit()
    res = _trainer(seg_data, "cil", method=method, run_dir=tmp_path / "cut", epochs=1).fit(resume=True)
    assert res.resumed_from == 1
    for m in METRICS:
        np.testing.assert_array_equal(res.extra["matrices"][m], full.extra["matrices"][m])
        np.testing.assert_array_equal(read_acc_matrix(tmp_path / "cut" / "matrices" / f"{m}.csv"),
                                      full.extra["matrices"][m])
