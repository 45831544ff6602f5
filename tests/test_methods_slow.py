"""The seed tables' methods on real synth clips (signal-encoder features), 3 seeds, ``--preset synth``.

Same data and protocol as ``tests/test_train_slow.py`` (12 classes, 4 tasks of 3
in class order, 36 exemplars). AV-CIL trains on the dense visual grid
(``--stream visual=visual_dense``, 8 frames of 8 x 8 cells). Claims, chosen to
hold with margin on this data:

* every method trains end to end on every seed and beats chance (1/12) clearly;
* the exemplar-free closed-form methods (SimpleCIL, FeCAM) forget less than
  fine-tuning, since nothing old changes after the first task;
* the replay / distillation methods (AV-CIL, AFC, CIGN) forget less than fine-tuning.

Run with ``pytest -m slow tests/test_methods_slow.py`` (about 15 minutes on 2 busy cores).
"""
from __future__ import annotations

import numpy as np
import pytest

from test_train_slow import synth_store  # noqa: F401 (fixture)
from train.cli import main

pytestmark = pytest.mark.slow
SEEDS = "0,1,2"
METHODS = "finetune,simplecil,ranpac,fecam,afc-nme,afc-lsc,cign,l2p,dualprompt"


def _sweep(store, out, *extra):
    res = main(["--cache", store, "--class-order", ",".join(str(i) for i in range(12)), "--classes-per-task", "3",
                "--memory", "36", "--protocol", "synth-4x3-ordered", "--preset", "synth", "--seeds", SEEDS,
                "--out", str(out), "--jobs", "2", "-q", *extra])
    assert all(r["status"] == "ok" for r in res), [r.get("error") for r in res]
    table = {}
    for m in dict.fromkeys(r["method"] for r in res):
        rs = [r for r in res if r["method"] == m]
        assert len(rs) == 3
        table[m] = {k: float(np.mean([r["metrics"][k] for r in rs])) for k in ("mean_accuracy", "average_forgetting")}
    return table


def test_seed_table_methods_on_synth(synth_store, capsys):  # noqa: F811
    store, root = synth_store
    t = _sweep(store, root / "runs-methods", "--method", METHODS)
    t.update(_sweep(store, root / "runs-methods", "--method", "avcil", "--stream", "visual=visual_dense",
                    "--set", "head.frames=8"))
    with capsys.disabled():
        print("\nsynth, 4 x 3 classes in class order, 3 seeds, mean accuracy / average forgetting (%):")
        for k, v in t.items():
            print(f"  {k:12s} {100 * v['mean_accuracy']:5.1f} / {100 * v['average_forgetting']:5.1f}")
    acc = {k: v["mean_accuracy"] for k, v in t.items()}
    forg = {k: v["average_forgetting"] for k, v in t.items()}
    assert all(a > 3 / 12 for a in acc.values()), acc
    for m in ("simplecil", "fecam", "avcil", "afc-nme", "afc-lsc", "cign"):
        assert forg[m] < forg["finetune"], m
