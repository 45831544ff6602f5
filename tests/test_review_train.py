"""Training-stage regressions: resume of herding + NME state, uneven task sizes, val-seen never reads test rows."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from avcl_core.protocols import load_protocol
from train_fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from train_fixtures import toy  # noqa: F401 (module fixture: 6 classes, 3 tasks)
from train_fixtures import Interrupted, interrupt_before_task
from train.methods import build_method
from train.methods.base import Method
from train.trainer import Trainer

TINY = {"epochs": 2, "batch_size": 16, "exemplar_batch_size": 8, "lr": 3e-3}
HEAD = {"d_model": 16, "n_heads": 2}


def _trainer(fs, proto, method, run_dir=None, **kw):
    m = method if isinstance(method, Method) else build_method(method, TINY)
    return Trainer(fs, proto, m, head_config=HEAD, seed=0, run_dir=run_dir, **kw)


def test_icarl_resume_restores_herded_memory_and_class_means(toy, tmp_path):
    t, fs, _ = toy
    proto = load_protocol(t.protocol)
    full = _trainer(fs, proto, "icarl-nme", tmp_path / "full")
    res_full = full.fit()

    cut = interrupt_before_task(_trainer(fs, proto, "icarl-nme", tmp_path / "cut"), 2)
    with pytest.raises(Interrupted):
        cut.fit()
    again = _trainer(fs, proto, "icarl-nme", tmp_path / "cut")
    res = again.fit(resume=True)
    assert res.resumed_from == 2
    np.testing.assert_array_equal(res.acc_matrix, res_full.acc_matrix)
    assert {c: v.tolist() for c, v in again.memory.per_class().items()} == \
        {c: v.tolist() for c, v in full.memory.per_class().items()}
    assert torch.equal(again.method.means, full.method.means)


def test_uneven_tasks_distil_within_each_old_task_and_rebalance_memory(toy):
    t, fs, _ = toy
    root = t.root
    p = json.loads(open(t.protocol).read())
    p.update(name="toy-3-1-2", tasks=[[4, 1, 0], [5], [2, 3]])
    path = root / "uneven.json"
    path.write_text(json.dumps(p))
    proto = load_protocol(str(path))
    seen = {}

    class Probe(Method):
        uses_teacher = True
        replay = "paired"

        def loss(self, batch, out):
            tr = self.trainer
            if tr.task not in seen:
                old = self.teacher(batch)
                seen[tr.task] = (tr.offsets_old, None if old is None else old["logits"].shape[1],
                                 out["logits"].shape[1], sorted(set(tr.y_np[tr.memory.indices()].tolist())))
            return super().loss(batch, out)

    tr = _trainer(fs, proto, Probe(build_method("finetune", TINY).hp))
    tr.fit()
    # output units follow the protocol's class order: protocol class 4 is unit 0, 5 is unit 3
    assert tr.class_order == [4, 1, 0, 5, 2, 3]
    for cls_idx, unit in [(4, 0), (1, 1), (0, 2), (5, 3), (2, 4), (3, 5)]:
        rows = [i for i in range(len(fs)) if fs.class_ids[i] == cls_idx]
        assert set(tr.y_np[rows]) == {unit}
    assert seen[0] == ([0], None, 3, [])
    assert seen[1] == ([0, 3], 3, 4, [0, 1, 2])
    assert seen[2] == ([0, 3, 4], 4, 6, [0, 1, 2, 3])
    assert {c: v.size for c, v in tr.memory.per_class().items()} == {c: 12 // 6 for c in range(6)}


def test_val_seen_selection_reads_only_val_rows_of_seen_tasks(toy, tmp_path):
    t, fs, _ = toy
    proto = load_protocol(t.protocol)
    tr = _trainer(fs, proto, "finetune", tmp_path, select="val-seen")
    calls = []
    orig = tr.predict

    def spy(idx):
        calls.append((tr.task, np.asarray(idx).copy()))
        return orig(idx)

    tr.predict = spy
    tr.fit()
    test = set(np.concatenate(tr.split_idx["test"]).tolist())
    val_calls = [(task, idx) for task, idx in calls if not set(idx.tolist()) & test]
    assert len(val_calls) == 3 * TINY["epochs"] and len(calls) == len(val_calls) + 3  # + one evaluation per task
    for task, idx in val_calls:
        assert set(idx.tolist()) == set(np.concatenate(tr.split_idx["val"][: task + 1]).tolist())
    split = fs.split_of()
    assert all(set(split[idx]) == {"val"} for _, idx in val_calls)
