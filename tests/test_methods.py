"""Methods: loss terms against hand-computed values, options, presets, and each method's behaviour."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train_fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from train_fixtures import toy  # noqa: F401 (module fixture: 6 classes, 3 tasks)
from train.heads.base import OptionError
from train.methods import METHODS, build_method, method_hparams
from train.methods import losses
from train.methods.presets import PresetError, resolve_options
from train.trainer import Trainer

TINY = {"epochs": 3, "batch_size": 16, "exemplar_batch_size": 8, "lr": 3e-3}
HEAD = {"d_model": 16, "n_heads": 2}


# -- loss terms ------------------------------------------------------------------------
def _log_softmax(v):
    v = np.asarray(v, dtype=np.float64)
    return v - np.log(np.exp(v).sum())


def test_task_separated_ce_scores_new_and_old_samples_in_their_own_group():
    z = torch.tensor([[2.0, 0.5, 1.0, -1.0, 0.0], [0.3, 1.2, 4.0, 0.0, 2.0]])
    y = torch.tensor([3, 1])  # a new-task sample (classes 2..4) and an exemplar (classes 0..1)
    got = losses.task_separated_ce(z, y, n_old=2).item()
    want = (-_log_softmax([1.0, -1.0, 0.0])[1] - _log_softmax([0.3, 1.2])[1]) / 2
    assert got == pytest.approx(want, rel=1e-6)
    # old logits of the new sample and new logits of the exemplar get no gradient
    z.requires_grad_(True)
    losses.task_separated_ce(z, y, n_old=2).backward()
    assert torch.all(z.grad[0, :2] == 0) and torch.all(z.grad[1, 2:] == 0)
    assert losses.task_separated_ce(z, y, n_old=0).item() == pytest.approx(F.cross_entropy(z, y).item())


def _kl(p_logits, q_logits, T):
    p = np.exp(_log_softmax(np.asarray(p_logits) / T))
    return float(np.sum(p * (np.log(p) - _log_softmax(np.asarray(q_logits) / T)))) * T * T


def test_task_wise_kd_is_a_sum_of_per_task_kl_divergences():
    z = torch.tensor([[1.0, 0.0, 2.0, 1.0, 5.0]])
    old = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    got = losses.task_wise_kd(z, old, [0, 2, 4], T=2.0).item()
    want = _kl([0.0, 1.0], [1.0, 0.0], 2.0) + _kl([3.0, 0.0], [2.0, 1.0], 2.0)
    assert got == pytest.approx(want, rel=1e-6)
    # one softmax over all old classes would give another number
    assert losses.kd_kl(z[:, :4], old, T=2.0).item() == pytest.approx(
        _kl([0.0, 1.0, 3.0, 0.0], [1.0, 0.0, 2.0, 1.0], 2.0), rel=1e-6)
    assert _kl([0.0, 1.0, 3.0, 0.0], [1.0, 0.0, 2.0, 1.0], 2.0) != pytest.approx(got)


def test_icarl_distillation_applies_the_sigmoid_once():
    z = torch.tensor([[2.0, -1.0, 0.5]])
    old = torch.tensor([[1.0, -2.0]])
    s = lambda v: 1 / (1 + np.exp(-np.asarray(v)))  # noqa: E731
    p, q = s([2.0, -1.0]), s([1.0, -2.0])
    want = float(np.mean(-(q * np.log(p) + (1 - q) * np.log(1 - p))))
    assert losses.sigmoid_distillation(z, old).item() == pytest.approx(want, rel=1e-6)
    # the reference code's double sigmoid gives another number
    double = F.binary_cross_entropy_with_logits(torch.sigmoid(z[:, :2]), torch.sigmoid(old)).item()
    assert abs(double - want) > 0.1


def test_feature_distillation_is_the_mean_squared_difference():
    f = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    g = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    assert losses.feature_distillation(f, g).item() == pytest.approx((1 + 0 + 1 + 4) / 4)


# -- options ------------------------------------------------------------------------------
def test_registry_has_every_method():
    assert {"finetune", "joint", "lwf", "icarl", "icarl-nme", "icarl-fc", "ssil", "lll"} <= set(METHODS)


def test_options_are_typed_and_unknown_keys_list_the_valid_ones():
    hp = method_hparams("lll", {"feat_kd": "false", "lr": "1e-2", "epochs": "7", "milestones": "3,5"})
    assert hp.feat_kd is False and hp.lr == 0.01 and hp.epochs == 7 and hp.milestones == (3, 5)
    # the paper's optimiser settings are lll's defaults
    d = method_hparams("lll")
    assert (d.optimizer, d.lr, d.weight_decay, d.scheduler, d.epochs) == ("sgd", 5e-5, 1e-4, "cosine", 200)
    with pytest.raises(OptionError, match=r"unknown option\(s\) feat_dk.*valid keys:.*feat_kd"):
        method_hparams("lll", {"feat_dk": "false"})
    with pytest.raises(OptionError, match="epochs='many' is not a valid int"):
        method_hparams("ssil", {"epochs": "many"})
    with pytest.raises(OptionError, match="optimizer 'rmsprop' is not one of"):
        method_hparams("finetune", {"optimizer": "rmsprop"})
    with pytest.raises(OptionError, match="classifier must be 'nme' or 'fc'"):
        method_hparams("icarl", {"classifier": "svm"})
    assert method_hparams("icarl-fc").classifier == "fc" and method_hparams("icarl-nme").classifier == "nme"
    assert method_hparams("icarl").selection == "herding"


def test_preset_layers_apply_in_order():
    preset = {
        "methods": {"*": {"lr": 0.1, "epochs": 5}, "icarl": {"lamb": 2.0}, "icarl-fc": {"lamb": 3.0}},
        "heads": {"*": {"d_model": 32, "n_heads": 2}, "concat": {"dropout": 0.0}},
        "protocols": {"ave-*": {"methods": {"*": {"epochs": 9}}}, "ks-*": {"methods": {"*": {"epochs": 99}}}},
    }
    hp, head, cfg = resolve_options("icarl-fc", "concat", preset, "ave-4x7", {"lr": "0.5"})
    assert (hp.lr, hp.epochs, hp.lamb) == (0.5, 9, 3.0)  # --set > protocol entry > method > family > '*'
    assert head == "concat" and (cfg.d_model, cfg.dropout) == (32, 0.0)  # n_heads skipped: concat has none
    hp, head, cfg = resolve_options("icarl", None, preset, "synth-4x3", None, epochs=4)
    assert (hp.lr, hp.epochs, hp.lamb) == (0.1, 4, 2.0) and head == "guided" and cfg.n_heads == 2
    with pytest.raises(PresetError, match="may only set shared keys"):
        resolve_options("lll", None, {"methods": {"*": {"feat_kd": False}}}, "x")
    with pytest.raises(OptionError, match="head.d_modle.*valid keys.*head.d_model"):
        resolve_options("lll", None, None, "x", {"head.d_modle": "8"})


def test_shipped_presets():
    hp, _, _ = resolve_options("lll", None, "av-cil", "ave-4x7")
    assert (hp.optimizer, hp.lr, hp.scheduler, hp.epochs, hp.batch_size, hp.exemplar_batch_size) == \
        ("adam", 1e-3, "none", 200, 256, 128)
    assert resolve_options("icarl-nme", None, "av-cil", "ave-4x7")[0].epochs == 150
    assert resolve_options("ssil", None, "av-cil", "ks-5x6")[0].epochs == 100
    hp, _, cfg = resolve_options("lll", None, "synth", "synth-4x3")
    assert hp.optimizer == "adam" and cfg.d_model == 64
    with pytest.raises(PresetError, match="unknown preset 'nope'"):
        resolve_options("lll", None, "nope", "x")


# -- behaviour of each method ----------------------------------------------------------------
# per-method options that keep a run tiny on the toy data (RanPAC's paper width M=10000 is not)
TINY_EXTRA = {"ranpac": {"M": 64}}


def _fit(toy, name, tmp_path=None, head=None, **opts):
    _, fs, proto = toy
    m = build_method(name, {**TINY, **TINY_EXTRA.get(name, {}), **opts})
    used = head or METHODS[name].default_head
    tr = Trainer(fs, proto, m, head=head, head_config=HEAD if used == "guided" else {"d_model": 16},
                 seed=0, run_dir=tmp_path)
    return tr, tr.fit()


def _log(tmp_path):
    return [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", sorted(n for n, c in METHODS.items() if not getattr(c, "segmentation_only", False)))
def test_every_method_trains_and_fills_the_accuracy_matrix(toy, name):
    tr, res = _fit(toy, name)
    assert res.acc_matrix.shape == (3, 3) and np.all(np.isfinite(res.acc_matrix))
    assert np.all(res.acc_matrix[np.triu_indices(3, 1)] == 0)  # unseen tasks cannot be predicted
    assert len(res.step_acc) == 3 and 0 <= res.metrics["mean_accuracy"] <= 1
    uses_memory = METHODS[name].replay in ("mixed", "paired")
    assert len(tr.memory) == (12 if uses_memory else 0)


def test_lll_loss_terms_and_ablation_switches(toy, tmp_path):
    _fit(toy, "lll", tmp_path / "a")
    log = _log(tmp_path / "a")
    assert all(set(e) >= {"ce", "loss", "lr", "time"} for e in log)
    assert not any("feat_kd" in e or "logit_kd" in e for e in log if e["task"] == 0)
    assert all("feat_kd" in e and "logit_kd" in e for e in log if e["task"] > 0)
    _fit(toy, "lll", tmp_path / "b", feat_kd=False, logit_kd=False)
    assert not any("feat_kd" in e or "logit_kd" in e for e in _log(tmp_path / "b"))


def test_lwf_distils_from_the_second_task_on(toy, tmp_path):
    _fit(toy, "lwf", tmp_path)
    log = _log(tmp_path)
    assert [("kd" in e) for e in log] == [e["task"] > 0 for e in log]
    assert all(math.isfinite(e["loss"]) for e in log)


def test_icarl_nme_predicts_the_nearest_class_mean_of_exemplars(toy):
    tr, res = _fit(toy, "icarl-nme")
    means = tr.method.means
    assert means.shape == (6, 16)
    torch.testing.assert_close(means.norm(dim=1), torch.ones(6))
    # class 4's mean is the normalised mean of its normalised exemplar features
    ex = tr.memory.per_class()[4]
    f = F.normalize(tr.features_of(ex), dim=1).mean(0)
    torch.testing.assert_close(means[4], f / f.norm())
    test = np.concatenate(tr.split_idx["test"])
    phi = F.normalize(tr.features_of(test), dim=1)
    want = torch.cdist(phi, means).argmin(1).numpy()
    np.testing.assert_array_equal(tr.predict(test), want)
    # icarl-fc predicts with the logits instead
    tr_fc, _ = _fit(toy, "icarl-fc")
    logits = tr_fc.model.classifier(tr_fc.features_of(test))
    np.testing.assert_array_equal(tr_fc.predict(test), logits.argmax(1).numpy())


def test_joint_trains_a_fresh_model_on_all_seen_data(toy):
    tr, _ = _fit(toy, "joint")
    pool, ex = tr._pools(2)
    assert sorted(pool.tolist()) == sorted(np.concatenate(tr.split_idx["train"]).tolist()) and ex.size == 0


def test_icarl_memory_is_chosen_by_herding(toy):
    tr, _ = _fit(toy, "icarl")
    assert tr.memory.selection == "herding"
    from train.memory import herding_select

    # exemplars of the last task's classes = herding on the final model's features
    for c in (4, 5):
        cand = tr.train_indices_of_class(c)
        want = cand[herding_select(tr.features_of(cand).numpy(), 2)]
        np.testing.assert_array_equal(tr.memory.per_class()[c], want)
