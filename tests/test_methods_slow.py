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

import pytest

from test_train_slow import show_table, sweep_table, synth_store  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow
METHODS = "finetune,simplecil,ranpac,fecam,afc-nme,afc-lsc,cign,l2p,dualprompt"


def test_seed_table_methods_on_synth(synth_store, capsys):  # noqa: F811
    store, root = synth_store
    t = sweep_table(store, root / "runs-methods", "--method", METHODS)
    t.update(sweep_table(store, root / "runs-methods", "--method", "avcil", "--stream", "visual=visual_dense",
                         "--set", "head.frames=8"))
    acc, forg = show_table(t, capsys)
    assert all(a > 3 / 12 for a in acc.values()), acc
    for m in ("simplecil", "fecam", "avcil", "afc-nme", "afc-lsc", "cign"):
        assert forg[m] < forg["finetune"], m
