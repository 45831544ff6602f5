"""afc / afc-nme / afc-lsc: LSC classifier, NCA, imprinting, frozen old proxies, CBF, importance."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avcl_core.protocols import load_protocol
from train_fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from train_fixtures import make_toy
from train.features import FeatureSet
from train.methods import build_method
from train.methods.afc import CosineProxyClassifier, nca_loss
from train.methods.presets import resolve_options
from train.trainer import Trainer

TINY = {"epochs": 3, "batch_size": 16, "lr": 3e-3, "K": 3, "cbf_epochs": 2}
HEAD = {"d_model": 16, "n_heads": 2}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    t = make_toy(tmp_path_factory.mktemp("toy"), n_classes=6, classes_per_task=2, memory=12, visual=(4, 12))
    return t, FeatureSet.from_stores([t.store]), load_protocol(t.protocol)


def _trainer(toy, name="afc", head=None, head_config=HEAD, run_dir=None, **opts):
    _, fs, proto = toy
    return Trainer(fs, proto, build_method(name, {**TINY, **opts}), head=head, head_config=head_config, seed=0,
                   run_dir=run_dir)


def test_nca_loss_is_the_codebases_formula_and_its_margin_cancels():
    s = torch.tensor([[-0.5, -1.0, -0.2], [-1.5, -0.1, -0.3]])
    y = torch.tensor([0, 2])
    z = 2.0 * (s.numpy().astype(np.float64) - 0.6)
    z -= z.max(1, keepdims=True)
    want = np.mean([-(z[i, y[i]] - np.log(1 + sum(np.exp(z[i, j]) for j in range(3) if j != y[i]))) for i in range(2)])
    assert nca_loss(s, y, 2.0, 0.6).item() == pytest.approx(want, rel=1e-6)
    assert nca_loss(s, y, 2.0, 0.0).item() == pytest.approx(want, rel=1e-6)


def test_lsc_similarity_merges_proxies_and_grow_freezes_the_old_ones():
    torch.manual_seed(0)
    clf = CosineProxyClassifier(5, 2, K=3)
    f = torch.randn(4, 5)
    sim = -((F.normalize(f, dim=1)[:, None] - F.normalize(clf.weight, dim=1)[None]) ** 2).sum(-1)  # (4, 6)
    s = sim.view(4, 2, 3)
    torch.testing.assert_close(clf(f), (torch.softmax(s, -1) * s).sum(-1))
    old = clf.weight.detach().clone()
    clf.grow(1)
    assert clf.n_classes == 3 and clf.weight.shape == (3, 5) and torch.equal(clf.frozen, old)
    assert not clf.frozen.requires_grad and [n for n, _ in clf.named_parameters()] == ["weight", "factor"]
    again = CosineProxyClassifier(5, 3, K=3)  # a checkpoint restores the frozen / current split
    again.load_state_dict(clf.state_dict())
    assert again.frozen.shape == (6, 5) and torch.equal(again(f), clf(f))


def test_imprinting_old_proxies_frozen_and_cbf_trains_only_the_classifier(toy):
    tr = _trainer(toy, K=12, cbf=True)  # 12 training samples per class: the centres are the samples
    snaps = {}
    orig_before, orig_after = tr.method.before_task, tr.method.after_task

    def before(t):
        orig_before(t)
        feats = {c: F.normalize(tr.features_of(tr.train_indices_of_class(c)), dim=1) for c in range(tr.n_old, tr.n_seen)}
        snaps[("start", t)] = (tr.model.classifier.proxies().detach().clone(), feats)

    def after(t):
        snaps[("trained", t)] = tr.model.classifier.proxies().detach().clone()
        head = {k: v.clone() for k, v in tr.model.head.state_dict().items()}
        orig_after(t)
        snaps[("done", t)] = tr.model.classifier.proxies().detach().clone()
        assert all(torch.equal(v, tr.model.head.state_dict()[k]) for k, v in head.items())  # CBF: classifier only

    tr.method.before_task, tr.method.after_task = before, after
    tr.fit()
    P1, feats1 = snaps[("start", 1)]
    clf = tr.model.classifier
    # imprinting: the new classes' proxies are their normalised features x the mean old-proxy norm
    norm = snaps[("done", 0)].norm(dim=1).mean()
    for c in (2, 3):
        rows = P1[c * 12:(c + 1) * 12]
        d = torch.cdist(rows, feats1[c] * norm)
        assert d.min(dim=1).values.max() < 1e-4 * norm
    # during the main phase old proxies do not move; CBF then adjusts every proxy
    assert torch.equal(snaps[("trained", 1)][:24], P1[:24])
    assert not torch.equal(snaps[("done", 1)][:24], P1[:24])
    assert clf.n_classes == 6 and len(tr.memory) == 12


def test_task_importance_weights_the_distillation(toy, tmp_path):
    tr = _trainer(toy, head="avcil", head_config={"d_model": 16, "frames": 2}, run_dir=tmp_path)
    res = tr.fit()
    imp = tr.method.importance
    assert set(imp) == {"pooled", "audio", "visual"}
    for g, v in imp.items():
        assert torch.all(v >= 0) and v.mean().item() == pytest.approx(1.0, rel=1e-5)
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert ["disc" in e for e in log] == [e["task"] > 0 for e in log]
    assert np.all(np.isfinite(res.acc_matrix))


def test_port_importance_and_the_av_cil_preset(toy, tmp_path):
    hp, head, _ = resolve_options("afc-nme", "avcil", "av-cil", "ave-4x7")
    assert (hp.importance, hp.cbf, hp.lambda_disc, hp.epochs, hp.classifier, hp.drop_last) == \
        ("port", False, 0.5, 150, "nme", True)
    tr = _trainer(toy, "afc-nme", head="avcil", head_config={"d_model": 16, "frames": 2}, run_dir=tmp_path,
                  importance="port", cbf=False)
    tr.fit()
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(e["disc"] >= 0 for e in log if e["task"] > 0)
    # NME: nearest mean of normalised exemplar features
    test = np.concatenate(tr.split_idx["test"])
    phi = F.normalize(tr.features_of(test), dim=1)
    np.testing.assert_array_equal(tr.predict(test), torch.cdist(phi, tr.method.means).argmin(1).numpy())
    tr2 = _trainer(toy, "afc-lsc", cbf=False)
    tr2.fit()
    logits = tr2.model.classifier(tr2.features_of(test))
    np.testing.assert_array_equal(tr2.predict(test), logits.argmax(1).numpy())
