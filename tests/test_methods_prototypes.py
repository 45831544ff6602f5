"""simplecil / ranpac / fecam: closed-form classifiers on a frozen embedding, no SGD after task 0."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train_fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from train_fixtures import toy  # noqa: F401 (module fixture: 6 classes, 3 tasks)
from train.methods import build_method
from train.methods.fecam import correlation, shrink_covariance
from train.methods.ranpac import RIDGE_GRID, ridge_grid_scores, ridge_solve
from train.trainer import Trainer

TINY = {"epochs": 4, "batch_size": 16, "lr": 3e-3}
HEAD = {"d_model": 16, "n_heads": 2}


class Recorder:
    """Keeps, after every task, the method's scores of all test samples and the head's parameters."""

    def __init__(self, tr):
        self.scores, self.params = [], []
        orig = tr.method.after_task

        def after_task(t):
            orig(t)
            idx = np.concatenate(tr.split_idx["test"])
            x = tr.fs.batch(torch.as_tensor(idx), tr._head_streams)
            with torch.no_grad():
                tr.model.eval()
                out = tr.model(x)
            self.scores.append(tr.method.predict({"idx": torch.as_tensor(idx), "x": x}, out))
            self.params.append({k: v.clone() for k, v in tr.model.head.state_dict().items()})

        tr.method.after_task = after_task


def _run(toy, name, run_dir=None, **opts):
    _, fs, proto = toy
    tr = Trainer(fs, proto, build_method(name, {**TINY, **opts}), head_config=HEAD, seed=0, run_dir=run_dir)
    rec = Recorder(tr)
    return tr, tr.fit(), rec


@pytest.mark.parametrize("name,opts", [("simplecil", {}), ("fecam", {}), ("simplecil", {"backbone": "raw"}),
                                       ("fecam", {"backbone": "raw"})])
def test_old_class_scores_are_identical_after_new_tasks(toy, tmp_path, name, opts):
    tr, res, rec = _run(toy, name, tmp_path, **opts)
    # no SGD after the first task (none at all on the raw embedding): the head never changes
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {e["task"] for e in log} == (set() if opts else {0})
    for p in rec.params[1:]:
        for k, v in p.items():
            assert torch.equal(v, rec.params[0][k])
    # every old class's score of every sample is unchanged, so predictions among old classes are too
    for t in (1, 2):
        old = rec.scores[t - 1].shape[1]
        assert torch.equal(rec.scores[t][:, :old], rec.scores[t - 1])
        np.testing.assert_array_equal(rec.scores[t][:, :old].argmax(1), rec.scores[t - 1].argmax(1))
    assert res.metrics["mean_accuracy"] > 0.5 and len(tr.memory) == 0


def test_simplecil_prototypes_are_class_means_and_scores_are_cosines(toy):
    tr, _, rec = _run(toy, "simplecil")
    protos = tr.method.prototypes
    for c in range(6):
        torch.testing.assert_close(protos[c], tr.features_of(tr.train_indices_of_class(c)).double().mean(0))
    idx = np.concatenate(tr.split_idx["test"])
    want = F.normalize(tr.features_of(idx).double(), dim=1) @ F.normalize(protos, dim=1).T
    torch.testing.assert_close(rec.scores[-1], want.float())


def test_fecam_scores_are_negative_mahalanobis_distances(toy):
    tr, _, rec = _run(toy, "fecam", tukey=1.0)
    c = 3
    x = tr.features_of(tr.train_indices_of_class(c)).double()
    mu = x.mean(0)
    S = torch.from_numpy(np.cov(x.numpy(), rowvar=False))
    V1, V2 = np.mean(np.diag(S.numpy())), (S.sum() - S.trace()).item() / (16 * 15)
    eye = torch.eye(16, dtype=torch.float64)
    S2 = S + V1 * eye + V2 * (1 - eye)
    torch.testing.assert_close(shrink_covariance(S, 1.0, 1.0), S2)
    R = S2 / torch.sqrt(torch.diag(S2)[:, None] * torch.diag(S2)[None, :])
    torch.testing.assert_close(correlation(S2), R)
    idx = np.concatenate(tr.split_idx["test"])[:5]
    u = F.normalize(tr.features_of(idx).double(), dim=1) - F.normalize(mu, dim=0)
    want = -torch.einsum("bd,de,be->b", u, torch.linalg.inv(R), u)
    torch.testing.assert_close(rec.scores[-1][:5, c].double(), want, rtol=1e-4, atol=1e-4)


def test_ranpac_sequential_fit_equals_the_joint_ridge_regression(toy):
    tr, res, rec = _run(toy, "ranpac", M=96, ridge=0.5)
    m = tr.method
    # the joint solution on all training data at once, with the same random projection
    idx = np.concatenate(tr.split_idx["train"])
    h = torch.relu(tr.features_of(idx).double() @ m.W_r)
    Y = F.one_hot(torch.as_tensor(tr.y_np[idx]), 6).double()
    W = torch.linalg.solve(h.T @ h + 0.5 * torch.eye(96, dtype=torch.float64), h.T @ Y)
    torch.testing.assert_close(m.W_o, W, rtol=1e-6, atol=1e-8)
    test = np.concatenate(tr.split_idx["test"])
    ht = torch.relu(tr.features_of(test).double() @ m.W_r)
    np.testing.assert_array_equal(tr.predict(test), (ht @ W).argmax(1).numpy())
    assert res.metrics["mean_accuracy"] > 0.5
    # lambda chosen on held-out samples when not fixed: one grid value per task
    tr2, res2, _ = _run(toy, "ranpac", M=96)
    assert len(tr2.method.ridges) == 3 and all(10.0 ** -8 <= r <= 10.0 ** 8 for r in tr2.method.ridges)


def test_prototype_state_survives_a_checkpoint(toy, tmp_path):
    tr, res, _ = _run(toy, "fecam", tmp_path)
    state = torch.load(tmp_path / "ckpt_task2.pt", weights_only=True)["method"]
    again = build_method("fecam", TINY)
    again.load_state_dict(state)
    assert again.n_fitted == 6 and torch.equal(again.precisions, tr.method.precisions)


def test_ridge_grid_from_one_eigendecomposition_equals_direct_solves():
    gen = torch.Generator().manual_seed(0)
    h = torch.relu(torch.randn(40, 24, generator=gen, dtype=torch.float64))
    C = h.T @ F.one_hot(torch.arange(40) % 3, 3).double()
    hv = torch.relu(torch.randn(7, 24, generator=gen, dtype=torch.float64))
    grid = RIDGE_GRID[4:13]  # 1e-4 .. 1e4: well conditioned enough to compare closely
    for lam, got in zip(grid, ridge_grid_scores(h.T @ h, C, hv, grid)):
        torch.testing.assert_close(got, hv @ ridge_solve(h.T @ h, C, lam), rtol=1e-6, atol=1e-8)
