"""Review fixes of the training stage: single-token audio, NME model selection, drop_last,
resume past other configurations' checkpoints, training accuracy and near-chance warnings."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train_fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from train_fixtures import toy  # noqa: F401 (module fixture: 6 classes, 3 tasks)
from train_fixtures import Interrupted, interrupt_before_task
from train.heads import build_head
from train.methods import build_method
from train.methods.presets import resolve_options
from train.trainer import Trainer

TINY = {"epochs": 3, "batch_size": 16, "exemplar_batch_size": 8, "lr": 3e-3}
HEAD = {"d_model": 16, "n_heads": 2}


def _trainer(toy, name, run_dir=None, head=None, head_config=HEAD, config_hash="", **opts):
    _, fs, proto = toy
    m = build_method(name, {**TINY, **opts.pop("hp", {})})
    return Trainer(fs, proto, m, head=head, head_config=head_config, seed=0, run_dir=run_dir,
                   config_hash=config_hash, **opts)


def _log(d):
    return [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]


def test_guided_head_warns_on_one_audio_token_and_film_uses_it(caplog):
    dims = {"audio": (1, 8), "visual": (3, 12)}
    with caplog.at_level(logging.WARNING, logger="avcl.train"):
        build_head("guided", dims, HEAD)
    assert "single token" in caplog.text and "--head film" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="avcl.train"):
        build_head("guided", {"audio": (4, 8), "visual": (3, 12)}, HEAD)
    assert "single token" not in caplog.text
    # the one-key attention: query/key weights of the guided head get exactly zero gradient
    torch.manual_seed(0)
    g = build_head("guided", dims, HEAD)
    x = {"audio": torch.randn(5, 1, 8), "visual": torch.randn(5, 3, 12)}
    g(x).pow(2).sum().backward()
    assert g.cross.attn.q.weight.grad.abs().max() == 0
    # film: the audio vector changes the feature through every visual token, and its modulation learns
    h = build_head("film", dims, HEAD)
    h.eval()
    f1 = h(x)
    x2 = {"audio": x["audio"] + 1.0, "visual": x["visual"]}
    assert f1.shape == (5, 16) and not torch.allclose(f1, h(x2))
    h.train()
    h(x).pow(2).sum().backward()
    assert h.gamma.weight.grad.abs().max() > 0 and h.beta.weight.grad.abs().max() > 0


def test_val_seen_selects_icarl_nme_epochs_by_nme_accuracy(toy, tmp_path):
    tr = _trainer(toy, "icarl-nme", run_dir=tmp_path, select="val-seen", hp={"epochs": 3})
    seen = []
    orig = tr.predict

    def predict(idx):
        pred = orig(idx)
        val = np.concatenate(tr.split_idx["val"][: tr.task + 1])
        if np.array_equal(np.sort(idx), np.sort(val)):  # the val scoring inside the epoch loop
            means = tr.method.means
            assert means is not None and means.shape[0] == tr.n_seen
            phi = F.normalize(tr.features_of(idx), dim=1)
            np.testing.assert_array_equal(pred, torch.cdist(phi, means).argmin(1).numpy())
            seen.append(float((pred == tr.y_np[idx]).mean()))
        return pred

    tr.predict = predict
    tr.fit()
    # every epoch of every task was scored by nearest-mean prediction, and that is what was logged
    assert seen == [e["val_acc"] for e in _log(tmp_path)] and len(seen) == 9
    # after the task the means are the exemplar means again (as without selection)
    ex = tr.memory.per_class()[5]
    f = F.normalize(tr.features_of(ex), dim=1).mean(0)
    torch.testing.assert_close(tr.method.means[5], f / f.norm())


def test_drop_last_skips_the_partial_batch_and_av_cil_preset_sets_it(toy):
    counts = {}
    for drop in (False, True):
        tr = _trainer(toy, "finetune", hp={"batch_size": 10, "drop_last": drop})
        calls = []
        orig = tr.method.loss
        tr.method.loss = lambda b, o: (calls.append(b["idx"].numel()), orig(b, o))[1]
        tr.fit()
        counts[drop] = calls
    # 24 training samples per task: batches 10, 10, 4 -> 10, 10
    assert counts[False] == [10, 10, 4] * 9 and counts[True] == [10, 10] * 9
    # a task smaller than one batch still trains on its one partial batch
    tr = _trainer(toy, "finetune", hp={"batch_size": 64, "drop_last": True, "epochs": 1})
    calls = []
    orig = tr.method.loss
    tr.method.loss = lambda b, o: (calls.append(b["idx"].numel()), orig(b, o))[1]
    tr.fit()
    assert calls == [24, 24, 24]
    assert resolve_options("ssil", None, "av-cil", "ave-4x7")[0].drop_last is True
    assert resolve_options("ssil", None, None, "ave-4x7")[0].drop_last is False


def test_resume_skips_checkpoints_of_another_configuration(toy, tmp_path):
    d = tmp_path / "run"
    _trainer(toy, "finetune", run_dir=d, config_hash="A").fit()  # leaves ckpt_task0..2 of configuration A
    full = _trainer(toy, "finetune", run_dir=tmp_path / "full", config_hash="B", hp={"lr": 1e-2}).fit()
    tr = interrupt_before_task(_trainer(toy, "finetune", run_dir=d, config_hash="B", hp={"lr": 1e-2}), 1)
    with pytest.raises(Interrupted):
        tr.fit(resume=True)  # nothing of B yet: starts at task 0 and checkpoints it
    res = _trainer(toy, "finetune", run_dir=d, config_hash="B", hp={"lr": 1e-2}).fit(resume=True)
    # ckpt_task2/1 of A are skipped, B's ckpt_task0 is resumed from, not task 0 retrained
    assert res.resumed_from == 1
    np.testing.assert_array_equal(res.acc_matrix, full.acc_matrix)
    assert all(torch.load(d / f"ckpt_task{t}.pt", weights_only=True)["config_hash"] == "B" for t in range(3))


def test_training_accuracy_is_logged_and_a_head_near_chance_is_reported(toy, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="avcl.train"):
        _trainer(toy, "finetune", run_dir=tmp_path / "ok", hp={"epochs": 15, "lr": 1e-2}).fit()
    log = _log(tmp_path / "ok")
    assert all(0.0 <= e["train_acc"] <= 1.0 for e in log)
    assert log[-1]["train_acc"] > 0.6 and "near chance" not in caplog.text
    caplog.clear()
    # lll's paper optimiser (SGD, lr 5e-5) with large batches barely moves a head on small data
    with caplog.at_level(logging.WARNING, logger="avcl.train"):
        _trainer(toy, "lll", hp={"optimizer": "sgd", "lr": 5e-5, "scheduler": "cosine", "epochs": 2,
                                 "batch_size": 256, "exemplar_batch_size": 128}).fit()
    assert "near chance" in caplog.text and "lr 5e-05" in caplog.text
