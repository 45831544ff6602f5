"""Trainer: task loop, growing classifier, accuracy matrix, selection, checkpoints, determinism, resume."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from avcl_core import metrics as M
from avcl_core.protocols import load_protocol
from train_fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from train_fixtures import toy  # noqa: F401 (module fixture: 6 classes, 3 tasks)
from train_fixtures import Interrupted, interrupt_before_task, make_toy, write_protocol
from train.features import FeatureSet
from train.heads import HEADS, HeadError, build_head, head_config
from train.heads.base import MultiHeadAttention
from train.methods import build_method
from train.methods.base import Method
from train.trainer import GrowingClassifier, Trainer, TrainError, read_acc_matrix

TINY = {"epochs": 3, "batch_size": 16, "exemplar_batch_size": 8, "lr": 3e-3}
HEAD = {"d_model": 16, "n_heads": 2}


def trainer(toy, method="finetune", run_dir=None, seed=0, **kw):
    _, fs, proto = toy
    opts = {**TINY, **kw.pop("opts", {})}
    m = method if isinstance(method, Method) else build_method(method, opts)
    return Trainer(fs, proto, m, head_config=HEAD, seed=seed, run_dir=run_dir, **kw)


class ConstantPredictor(Method):
    """Always predicts output class ``k`` (the accuracy matrix is then known in closed form)."""

    def __init__(self, hp, k=0):
        super().__init__(hp)
        self.k = k

    def predict(self, batch, out):
        s = torch.zeros_like(out["logits"])
        s[:, self.k] = 1.0
        return s


class Oracle(Method):
    """Predicts the true label whenever it is a seen class."""

    def predict(self, batch, out):
        n = out["logits"].shape[1]
        y = batch["y"]
        s = torch.zeros_like(out["logits"])
        seen = y < n
        s[seen, y[seen]] = 1.0
        return s


def test_growing_classifier_keeps_old_rows():
    torch.manual_seed(0)
    clf = GrowingClassifier(5, 3)
    w, b = clf.weight.detach().clone(), clf.bias.detach().clone()
    clf.grow(2)
    assert clf.n_classes == 5 and clf(torch.zeros(4, 5)).shape == (4, 5)
    torch.testing.assert_close(clf.weight[:3], w)
    torch.testing.assert_close(clf.bias[:3], b)


def test_accuracy_matrix_and_step_accuracy_hand_computed(toy):
    hp = build_method("finetune", {**TINY, "epochs": 1}).hp
    # always predicting class 0: task 0 (classes 0, 1; 6 test clips each) scores 1/2, others 0
    res = trainer(toy, ConstantPredictor(hp, 0)).fit()
    want = np.zeros((3, 3))
    want[:, 0] = 0.5
    np.testing.assert_array_equal(res.acc_matrix, want)
    np.testing.assert_allclose(res.step_acc, [6 / 12, 6 / 24, 6 / 36])
    # an oracle is right on every seen task and cannot predict an unseen one
    res = trainer(toy, Oracle(hp)).fit()
    np.testing.assert_array_equal(res.acc_matrix, np.tril(np.ones((3, 3))))
    assert res.step_acc == [1.0, 1.0, 1.0]
    assert res.metrics == {"step_acc": [1.0, 1.0, 1.0], **M.summarize(res.acc_matrix, res.step_acc)}


def test_task_incremental_protocol_predicts_within_the_task(toy):
    t, fs, _ = toy
    root = t.root
    proto = load_protocol(write_protocol(root, "toy-til", 6, 2, memory=0, setting="TIL"))
    hp = build_method("finetune", {**TINY, "epochs": 1}).hp
    res = Trainer(fs, proto, ConstantPredictor(hp, 0), head_config=HEAD).fit()
    # the argmax over a task's own classes of a constant score is that task's first class
    np.testing.assert_array_equal(np.tril(res.acc_matrix), np.tril(np.full((3, 3), 0.5)))


def test_runs_are_deterministic_given_the_seed(toy):
    a = trainer(toy, "lll", seed=3).fit()
    b = trainer(toy, "lll", seed=3).fit()
    np.testing.assert_array_equal(a.acc_matrix, b.acc_matrix)
    ta, tb = trainer(toy, "ssil", seed=1), trainer(toy, "ssil", seed=2)
    ta.fit()
    tb.fit()
    assert not torch.equal(ta.model.classifier.weight, tb.model.classifier.weight)


def test_teacher_outputs_are_the_previous_models_outputs(toy):
    seen = {}

    class Probe(Method):
        uses_teacher = True
        replay = "paired"

        def loss(self, batch, out):
            old = self.teacher(batch)
            if old is not None and self.trainer.task not in seen:
                ref = self.trainer.old_model(batch["x"])
                seen[self.trainer.task] = (
                    (old["logits"] - ref["logits"][:, : self.n_old]).abs().max().item(),
                    (old["feature"] - ref["feature"]).abs().max().item(),
                    old["logits"].shape[1], self.n_old, self.trainer.offsets_old)
            return super().loss(batch, out)

    trainer(toy, Probe(build_method("finetune", TINY).hp)).fit()
    assert seen[1][2:] == (2, 2, [0, 2]) and seen[2][2:] == (4, 4, [0, 2, 4])
    assert max(v[0] for v in seen.values()) < 1e-5 and max(v[1] for v in seen.values()) < 1e-5


def test_exemplar_memory_follows_the_quota_rule(toy):
    tr = trainer(toy, "ssil")
    tr.fit()
    per = tr.memory.per_class()
    assert sorted(per) == list(range(6)) and all(v.size == 12 // 6 for v in per.values())
    for c, v in per.items():  # exemplars are training samples of their own class
        assert set(v) <= set(tr.train_indices_of_class(c)) and np.all(tr.y_np[v] == c)


def test_files_and_checkpoints(toy, tmp_path):
    res = trainer(toy, "icarl-nme", run_dir=tmp_path).fit()
    with open(tmp_path / "acc_matrix.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["after_task", "task_0", "task_1", "task_2"] and [r[0] for r in rows[1:]] == ["0", "1", "2"]
    np.testing.assert_array_equal(read_acc_matrix(tmp_path / "acc_matrix.csv"), res.acc_matrix)
    met = json.loads((tmp_path / "metrics.json").read_text())
    assert met["step_acc"] == res.step_acc and met["mean_accuracy"] == pytest.approx(np.mean(res.step_acc))
    assert met["n_test"] == [12, 12, 12]
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(e["task"], e["epoch"]) for e in log] == [(t, e) for t in range(3) for e in range(3)]
    ck = torch.load(tmp_path / "ckpt_task1.pt", weights_only=True)
    assert ck["task"] == 1 and ck["n_classes"] == 4 and "optimizer" not in ck
    assert ck["model"]["classifier.weight"].shape == (4, 16)
    assert len(ck["memory"]["per_class"]) == 4 and ck["method"]["means"].shape == (4, 16)
    assert ck["acc_matrix"] == res.acc_matrix[:2].tolist()


def test_resume_continues_exactly_where_the_run_stopped(toy, tmp_path):
    full = trainer(toy, "lll", run_dir=tmp_path / "full").fit()

    tr = interrupt_before_task(trainer(toy, "lll", run_dir=tmp_path / "cut"), 2)
    with pytest.raises(Interrupted):
        tr.fit()
    assert not (tmp_path / "cut" / "metrics.json").exists()
    res = trainer(toy, "lll", run_dir=tmp_path / "cut").fit(resume=True)
    assert res.resumed_from == 2
    np.testing.assert_array_equal(res.acc_matrix, full.acc_matrix)
    log = [json.loads(x) for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [(e["task"], e["epoch"]) for e in log] == [(t, e) for t in range(3) for e in range(3)]
    # a checkpoint of another configuration is not resumed from
    other = trainer(toy, "lll", run_dir=tmp_path / "cut", config_hash="other").fit(resume=True)
    assert other.resumed_from is None


def test_val_seen_selection_keeps_the_best_epoch(toy, tmp_path):
    tr = trainer(toy, "finetune", run_dir=tmp_path, select="val-seen", opts={"epochs": 4, "lr": 0.05})
    tr.fit()
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    last = [e["val_acc"] for e in log if e["task"] == 2]
    assert len(last) == 4
    val = np.concatenate(tr.split_idx["val"])
    assert float((tr.predict(val) == tr.y_np[val]).mean()) == pytest.approx(max(last))


def test_a_task_without_test_samples_is_an_error(tmp_path):
    t = make_toy(tmp_path, n_classes=4, per_split={"train": 3, "test": 2})
    fs = FeatureSet.from_stores([t.store])
    proto = load_protocol(t.protocol)
    with pytest.raises(TrainError, match=r"task\(s\) \[0, 1\] have no usable val samples"):
        Trainer(fs, proto, build_method("finetune", TINY), head_config=HEAD, select="val-seen")
    bad = load_protocol(write_protocol(tmp_path, "bad", 4, 2, memory=0, dataset="x"))
    import dataclasses

    bad = dataclasses.replace(bad, classes=("class00", "class01", "zz", "yy"))
    with pytest.raises(TrainError, match=r"task\(s\) \[1\] have no usable train samples"):
        Trainer(fs, bad, build_method("finetune", TINY), head_config=HEAD)


# -- heads ------------------------------------------------------------------------------------

DIMS = {"audio": (5, 6), "visual": (4, 10)}


def _batch(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"audio": torch.randn(b, 5, 6, generator=g), "visual": torch.randn(b, 4, 10, generator=g)}


@pytest.mark.parametrize("name", sorted(n for n, c in HEADS.items() if not getattr(c, "segmentation", False)))
def test_every_head_maps_a_batch_to_one_feature_per_clip(name):
    torch.manual_seed(0)
    head = build_head(name, DIMS, {"d_model": 8} if name in ("concat", "sum", "avcil") else {"d_model": 8, "n_heads": 2})
    x = _batch()
    # cign's head passes every projected token on to its class-token grouping classifier
    width = 8 * sum(t for t, _ in DIMS.values()) if name == "cign" else 8
    assert head(x).shape == (3, width) and head.out_dim == width
    only = {k: v for k, v in x.items() if k in head.streams}
    torch.testing.assert_close(head.eval()(only), head.eval()(x))  # reads nothing else


def test_guided_attention_is_audio_guided():
    torch.manual_seed(0)
    head = build_head("guided", DIMS, {"d_model": 8, "n_heads": 2}).eval()
    x = _batch()
    f = head(x)
    # the audio tokens are keys/values: their order does not matter, their content does
    perm = {"audio": x["audio"][:, [4, 2, 0, 1, 3]], "visual": x["visual"]}
    torch.testing.assert_close(head(perm), f)
    other = {"audio": _batch(seed=1)["audio"], "visual": x["visual"]}
    assert (head(other) - f).abs().max() > 1e-3
    with pytest.raises(HeadError, match="d_model .* multiple of n_heads"):
        build_head("guided", DIMS, {"d_model": 10, "n_heads": 4})
    with pytest.raises(HeadError, match=r"needs stream\(s\) \['audio'\]"):
        build_head("guided", {"visual": (4, 10)}, {"d_model": 8, "n_heads": 2})


def test_multi_head_attention_matches_torch_reference():
    torch.manual_seed(0)
    mine = MultiHeadAttention(8, 2, dropout=0.0)
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([mine.q.weight, mine.kv.weight]))
        ref.in_proj_bias.copy_(torch.cat([mine.q.bias, mine.kv.bias]))
        ref.out_proj.weight.copy_(mine.out.weight)
        ref.out_proj.bias.copy_(mine.out.bias)
    q, kv = torch.randn(3, 4, 8), torch.randn(3, 6, 8)
    torch.testing.assert_close(mine(q, kv), ref(q, kv, kv, need_weights=False)[0])


@pytest.mark.parametrize("head", ["guided", "film", "cign", "l2p", "dualprompt", "audio", "visual", "atlas"])
def test_attention_heads_refuse_a_width_their_heads_cannot_split(head):
    with pytest.raises(HeadError, match=rf"head '{head}': d_model \(10\) must be a positive multiple of n_heads \(3\)"):
        build_head(head, {"audio": (1, 4), "visual": (2, 4)}, {"d_model": 10, "n_heads": 3})
    assert head_config(head, {"d_model": 12, "n_heads": 3}).d_model == 12
