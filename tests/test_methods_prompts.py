"""l2p / dualprompt: prompt selection by keys, frozen transformer after task 0, per-task E-prompts."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train_fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from train_fixtures import toy  # noqa: F401 (module fixture: 6 classes, 3 tasks)
from train.heads import build_head
from train.methods import build_method
from train.trainer import Trainer

TINY = {"epochs": 3, "batch_size": 16, "lr": 3e-3}
HEAD = {"d_model": 16, "n_heads": 2, "depth": 3, "pool_size": 4, "top_k": 2, "prompt_length": 2,
        "g_length": 2, "e_length": 2, "g_layers": "0", "e_layers": "1,2"}


def test_l2p_prepends_the_prompts_whose_keys_are_closest_to_the_query():
    torch.manual_seed(0)
    head = build_head("l2p", {"audio": (2, 8), "visual": (3, 12)}, HEAD).eval()
    x = {"audio": torch.randn(5, 2, 8), "visual": torch.randn(5, 3, 12)}
    f = head(x)
    q = head.run(head.tokens(x))[:, 0]
    sim = F.normalize(q, dim=1) @ F.normalize(head.keys, dim=1).T
    top = sim.topk(2, dim=1)
    assert torch.equal(head.last["selected"], top.indices) and f.shape == (5, 16)
    torch.testing.assert_close(head.last["key_distance"], (1 - top.values).sum(1).mean())
    # the feature is the mean output at the prompt positions: it changes with the chosen prompts
    with torch.no_grad():
        head.prompts[top.indices[0, 0]] += torch.randn(2, 16)
    g = head(x)
    assert not torch.allclose(g[0], f[0])
    others = [b for b in range(1, 5) if top.indices[0, 0] not in top.indices[b]]  # samples not using that prompt
    torch.testing.assert_close(g[others], f[others])


def _fit(toy, name, run_dir=None):
    _, fs, proto = toy
    tr = Trainer(fs, proto, build_method(name, TINY), head_config=HEAD, seed=0, run_dir=run_dir)
    snaps = []
    orig = tr.method.after_task
    tr.method.after_task = lambda t: (orig(t), snaps.append({k: v.clone() for k, v in tr.model.head.state_dict().items()}))
    return tr, tr.fit(), snaps


@pytest.mark.parametrize("name", ["l2p", "dualprompt"])
def test_only_prompts_keys_and_classifier_learn_after_the_first_task(toy, tmp_path, name):
    tr, res, snaps = _fit(toy, name, tmp_path)
    prompt_names = tuple(tr.model.head.prompt_parameter_names())
    for t in (1, 2):
        moved = {k for k, v in snaps[t].items() if not torch.equal(v, snaps[t - 1][k])}
        assert moved and all(k.startswith(prompt_names) or k == "_task" for k in moved), moved
        if name == "dualprompt":  # only the current task's E-prompt and key, and the shared G-prompt
            assert {k for k in moved if k.startswith("e_")} == {f"e_prompts.{t}", f"e_keys.{t}"}
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all({"ce", "pull"} <= set(e) for e in log)
    assert np.all(np.isfinite(res.acc_matrix)) and len(tr.memory) == 0


def test_dualprompt_predicts_with_the_e_prompt_of_the_closest_seen_key(toy):
    tr, _, _ = _fit(toy, "dualprompt")
    head = tr.model.head.eval()
    assert head.task == 2
    idx = torch.as_tensor(np.concatenate(tr.split_idx["test"]))
    x = tr.fs.batch(idx, head.streams)
    head(x)
    q = head.run(head.tokens(x))[:, 0]
    keys = torch.stack(list(head.e_keys[:3]))
    want = (F.normalize(q, dim=1) @ F.normalize(keys, dim=1).T).argmax(1)
    assert torch.equal(head.last["selected"], want)
    head.train()
    head(x)
    assert torch.all(head.last["selected"] == 2)  # training uses the current task's E-prompt
