"""avcil: per-channel attention, its loss terms, end to end on imported AV-CIL dense features, memory refusal."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avcl_core.avcil_import import import_avcil
from avcl_core.protocols import load_protocol
from train_fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from train_fixtures import make_toy
from train.cli import main
from train.features import FeatureSet
from train.heads import build_head
from train.heads.avcil import avcil_attention
from train.methods import build_method
from train.methods.avcil import DenseMemoryError, check_dense_memory, class_contrastive, instance_contrastive
from train.trainer import Trainer


def test_attention_sums_to_one_over_positions_per_channel_then_over_frames():
    torch.manual_seed(0)
    head = build_head("avcil", {"audio": (1, 6), "visual": (4 * 5, 6)}, {"d_model": 8, "frames": 4})
    x = {"audio": torch.randn(3, 1, 6), "visual": torch.randn(3, 20, 6)}
    f = head(x)
    alpha, beta = head.last["spatial"], head.last["temporal"]
    assert f.shape == (3, 8) and alpha.shape == (3, 4, 5, 6) and beta.shape == (3, 4, 6)
    torch.testing.assert_close(alpha.sum(dim=2), torch.ones(3, 4, 6))  # over positions, per frame and channel
    torch.testing.assert_close(beta.sum(dim=1), torch.ones(3, 6))  # over frames, per channel
    # each channel has its own map (element-wise score), and the maps pool the raw tokens
    a_q = torch.tanh(head.attn_audio(x["audio"][:, 0]))
    v = x["visual"].view(3, 4, 5, 6)
    v_q = torch.tanh(head.attn_visual(v))
    s = v_q[0, 1, :, 2] * a_q[0, 2]
    torch.testing.assert_close(alpha[0, 1, :, 2], torch.softmax(s, 0))
    assert not torch.allclose(alpha[0, 1, :, 2], alpha[0, 1, :, 3])
    v_bar = (beta[:, :, None, :] * alpha * v).sum(dim=(1, 2))
    want = F.relu(head.audio_proj(x["audio"][:, 0])) + F.relu(head.visual_proj(v_bar))
    torch.testing.assert_close(f, want)
    # AV-CIL's 8 x 196 VideoMAE tokens are split into 8 frames by default
    big = build_head("avcil", {"audio": (1, 4), "visual": (1568, 4)}, {"d_model": 4})
    assert (big.frames, big.positions) == (8, 196)


def test_contrastive_terms_against_hand_computed_values():
    a = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=1)
    v = F.normalize(torch.tensor([[0.8, 0.6], [1.0, 0.0], [0.0, 1.0]]), dim=1)
    y = torch.tensor([0, 0, 1])
    S = (a @ v.T / 0.5).numpy().astype(np.float64)
    logp = S - np.log(np.exp(S).sum(1, keepdims=True))
    assert instance_contrastive(a, v, 0.5).item() == pytest.approx(-np.mean(np.diag(logp)), rel=1e-5)
    pos = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=float)
    want_all = -np.mean((logp * pos).sum(1) / 3)  # the released code: mean over all j
    want_pos = -np.mean((logp * pos).sum(1) / pos.sum(1))  # paper Eq. 7: mean over positives
    assert class_contrastive(a, v, y, 0.5).item() == pytest.approx(want_all, rel=1e-5)
    assert class_contrastive(a, v, y, 0.5, "positives").item() == pytest.approx(want_pos, rel=1e-5)


def test_avcil_trains_with_its_terms_from_the_second_task(tmp_path):
    t = make_toy(tmp_path, n_classes=6, classes_per_task=2, memory=12, visual=(6, 12))
    fs, proto = FeatureSet.from_stores([t.store]), load_protocol(t.protocol)
    m = build_method("avcil", {"epochs": 3, "batch_size": 16, "exemplar_batch_size": 8, "lr": 3e-3})
    tr = Trainer(fs, proto, m, head_config={"d_model": 16, "frames": 2}, seed=0, run_dir=tmp_path / "run")
    res = tr.fit()
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(set(e) & {"kd", "inst", "cls", "vad_s", "vad_t"} == set() for e in log if e["task"] == 0)
    assert all({"kd", "inst", "cls", "vad_s", "vad_t"} <= set(e) for e in log if e["task"] > 0)
    assert all(math.isfinite(e["loss"]) and e["vad_s"] >= 0 for e in log if e["task"] > 0)
    assert m.lambda_I() == 0.1 and len(tr.memory) == 12 and res.acc_matrix.shape == (3, 3)
    assert m.hp.drop_last is True


def test_imported_avcil_dense_features_train_avcil_end_to_end(tmp_path):
    """AV-CIL's released format (AudioMAE dict + VideoMAE 1568 x 768 tokens) -> import --dense -> avcl-train."""
    rng = np.random.default_rng(0)
    classes = ["dog", "cat", "car", "bell"]
    splits = {s: [[f"{s}-{c}-{j}" for j in range(n)] for c in range(4)] for s, n in
              (("train", 3), ("val", 1), ("test", 1))}
    ids = [i for per in splits.values() for cls in per for i in cls]
    label = {i: c for per in splits.values() for c, cls in enumerate(per) for i in cls}
    mu_a, mu_v = rng.standard_normal((4, 768)), rng.standard_normal((4, 768))
    audio = {i: (mu_a[label[i]] + 0.5 * rng.standard_normal(768)).astype(np.float32) for i in ids}
    visual = {i: (mu_v[label[i]] + rng.standard_normal((1568, 768))).astype(np.float32) for i in ids}
    np.save(tmp_path / "audio.npy", audio)
    np.save(tmp_path / "visual.npy", visual)
    proto = tmp_path / "tiny-2x2.json"
    proto.write_text(json.dumps({"name": "tiny-2x2", "dataset": "ave", "classes": classes,
                                 "tasks": [[0, 1], [2, 3]], "memory": 4, "splits": splits}))
    out = import_avcil(proto, audio=tmp_path / "audio.npy", visual=tmp_path / "visual.npy",
                       cache_root=tmp_path / "cache", dense=True, trust_pickle=True)
    res = main(["--cache", out["audio"].path, "--cache", out["visual"].path, "--stream", "visual=visual_dense",
                "--protocol", str(proto), "--method", "avcil", "--epochs", "1", "--set", "batch_size=8",
                "--set", "exemplar_batch_size=4", "--set", "head.d_model=32", "--out", str(tmp_path / "runs"), "-q"])
    assert res[0]["status"] == "ok", res[0].get("traceback")
    cfg = json.loads((tmp_path / "runs" / "tiny-2x2" / "avcil" / "seed0" / "config.json").read_text())
    assert cfg["head"] == "avcil" and cfg["hparams"]["lambda_I"] == -1.0
    assert np.array(res[0]["acc_matrix"]).shape == (2, 2)
    log = [json.loads(x) for x in (tmp_path / "runs" / "tiny-2x2" / "avcil" / "seed0" / "log.jsonl").read_text().splitlines()]
    assert {"inst", "vad_s"} <= set(log[-1])
    # sized as the FeatureSet holds them (float16): resident with room, streamed under a small budget
    stores = [out["audio"].path, out["visual"].path]
    plan = check_dense_memory(stores, {"visual": "visual_dense"}, available=1 << 40)
    assert plan.total == 20 * (768 + 1568 * 768) * 2 and not plan.streamed
    fs = FeatureSet.from_stores(stores, {"visual": "visual_dense"})
    assert sum(v.element_size() * v.nelement() for v in fs.streams.values()) == plan.total
    assert check_dense_memory(stores, {"visual": "visual_dense"}, available=1 << 40, feature_memory="1M").streamed
    # refused only when what the set holds cannot fit: all of it (a budget above the free memory) ...
    with pytest.raises(DenseMemoryError, match=r"need 0\.0 GiB in memory.*visual=visual_dense.*--feature-memory 1G "
                                               r"holds them all.*only 0\.0 GiB is free.*set --feature-memory below"):
        check_dense_memory(stores, {"visual": "visual_dense"}, available=1 << 20, feature_memory="1G")
    # ... or, streamed, the two blocks it keeps at least
    with pytest.raises(DenseMemoryError, match=r"streamed.*visual=visual_dense.*at least two.*lower --feature-memory"):
        check_dense_memory(stores, {"visual": "visual_dense"}, available=1 << 20)


def test_avcil_trains_from_a_streamed_feature_set_as_from_a_resident_one(tmp_path):
    """Dense streams over ``--feature-memory``: the same accuracy matrix as resident features in the same order."""
    t = make_toy(tmp_path, n_classes=6, classes_per_task=2, memory=12, visual=(6, 12), rows_per_shard=8)
    hp = {"epochs": 2, "batch_size": 16, "exemplar_batch_size": 8, "lr": 3e-3}
    resident = FeatureSet.from_stores([t.store], shuffle_blocks=1, block_rows=8)
    row = (4 * 8 + 6 * 12) * 2  # float16 audio (4, 8) + visual (6, 12)
    plan = check_dense_memory([t.store], None, available=1 << 30, feature_memory=2 * 8 * row)
    default = FeatureSet.from_stores([t.store], memory_budget=2 * 8 * row)  # the block the set streams by default
    assert plan.streamed and plan.total == len(resident) * row and plan.block_rows == default.block_rows
    default.streamer.close()
    streamed = FeatureSet.from_stores([t.store], memory_budget=2 * 8 * row, block_rows=8)
    assert streamed.streamed and streamed.shuffle_blocks == 1
    res = []
    for fs in (resident, streamed):
        m = build_method("avcil", hp)
        res.append(Trainer(fs, load_protocol(t.protocol), m, head_config={"d_model": 16, "frames": 2}, seed=0).fit())
    streamed.streamer.close()
    np.testing.assert_array_equal(res[0].acc_matrix, res[1].acc_matrix)
    assert res[0].acc_matrix.shape == (3, 3) and res[0].acc_matrix[0, 0] > 0.5
    # avcl-train streams them instead of refusing (a budget of two blocks)
    out = main(["--cache", str(t.store), "--protocol", str(t.protocol), "--method", "avcil", "--epochs", "1",
                "--set", "head.d_model=16", "--set", "head.frames=2", "--feature-memory", str(2 * 8 * row),
                "--out", str(tmp_path / "runs"), "-q"])
    assert out[0]["status"] == "ok", out[0].get("traceback")
    cfg = json.loads((tmp_path / "runs" / t.protocol_name / "avcil" / "seed0" / "config.json").read_text())
    assert cfg["features"]["streamed"] is True
