"""cign: class-token grouping, product of modality probabilities, its losses, token distillation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train_fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from train_fixtures import toy  # noqa: F401 (module fixture: 6 classes, 3 tasks)
from train.heads import build_head
from train.heads.cign import CIGNGrouping
from train.methods import build_method
from train.methods.cign import continual_grouping_contrastive, token_distillation
from train.trainer import Trainer

TINY = {"epochs": 4, "batch_size": 16, "lr": 3e-3}
HEAD = {"d_model": 16, "n_heads": 2, "depth": 1, "dropout": 0.0}


def test_grouping_predicts_the_product_of_audio_and_visual_probabilities():
    torch.manual_seed(0)
    dims = {"audio": (1, 8), "visual": (5, 12)}
    head = build_head("cign", dims, HEAD).eval()
    clf = CIGNGrouping(head, 3).eval()
    x = {"audio": torch.randn(4, 1, 8), "visual": torch.randn(4, 5, 12)}
    logits = clf(head(x))
    pa, pv = torch.sigmoid(clf.last["p_audio"]), torch.sigmoid(clf.last["p_visual"])
    torch.testing.assert_close(logits.exp(), pa * pv)
    assert clf.last["g_visual"].shape == (4, 3, 16)
    # the grouping: g_i = c^_i + W_o (sum_p A[p, i] W_v f^_p) / sum_p A[p, i], softmax over classes
    old = clf.tokens.detach().clone()
    clf.grow(2)
    assert clf.n_classes == 5 and torch.equal(clf.tokens[:3].detach(), old) and clf.token_logits().shape == (5, 5)
    # single-modality variants predict with one probability
    ha = build_head("cign", dims, {**HEAD, "modality": "audio"}).eval()
    ca = CIGNGrouping(ha, 3).eval()
    torch.testing.assert_close(ca(ha(x)), F.logsigmoid(ca.last["p_audio"]))
    assert "p_visual" not in ca.last


def test_loss_terms_against_hand_computed_values():
    old = torch.tensor([[1.0, 0.0, -1.0]])
    new = torch.tensor([[0.5, 0.5, 0.0]])
    p, q = F.softmax(old, 1)[0], F.softmax(new, 1)[0]
    assert token_distillation(new, old).item() == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-5)
    assert token_distillation(old, old).item() == pytest.approx(0.0, abs=1e-7)
    g = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # B=1, C=3 (1 old class, 2 new)
    g_old = torch.tensor([[[1.0, 0.2]]])
    a = F.normalize(g_old[0, 0], dim=0)
    c = F.normalize(g[0], dim=1)
    want = -(a @ c[0] / 0.5) + torch.logsumexp(c[1:] @ a / 0.5, 0)
    assert continual_grouping_contrastive(g, g_old, 1, 0.5).item() == pytest.approx(want.item(), rel=1e-5)


def _fit(toy, run_dir=None, head=HEAD, **opts):
    _, fs, proto = toy
    tr = Trainer(fs, proto, build_method("cign", {**TINY, **opts}), head_config=head, seed=0, run_dir=run_dir)
    snaps = []
    orig = tr.method.after_task
    tr.method.after_task = lambda t: (orig(t), snaps.append(tr.model.classifier.tokens.detach().clone()))
    return tr, tr.fit(), snaps


def test_cign_trains_with_its_terms_from_the_second_task(toy, tmp_path):
    tr, res, snaps = _fit(toy, tmp_path)
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all({"tok_ce", "bce"} <= set(e) and not {"tok_kl", "ctl"} & set(e) for e in log if e["task"] == 0)
    assert all({"tok_ce", "bce", "tok_kl", "ctl"} <= set(e) for e in log if e["task"] > 0)
    assert np.all(np.isfinite(res.acc_matrix)) and len(tr.memory) == 12 and len(snaps) == 3


def test_token_distillation_keeps_old_tokens_close():
    """New-task training moves the old class tokens; the distillation term holds them near the old ones."""
    torch.manual_seed(0)
    dims = {"audio": (1, 8), "visual": (5, 12)}
    x = {"audio": torch.randn(32, 1, 8), "visual": torch.randn(32, 5, 12)}
    y = torch.randint(3, 5, (32,))  # labels of the new classes only

    def drift(with_kl: bool) -> float:
        torch.manual_seed(1)
        head = build_head("cign", dims, HEAD)
        clf = CIGNGrouping(head, 3)
        old = clf.tokens.detach().clone()
        clf.grow(2)
        opt = torch.optim.Adam([*head.parameters(), *clf.parameters()], lr=0.03)
        for _ in range(40):
            clf(head(x))
            loss = sum(F.binary_cross_entropy_with_logits(clf.last[f"p_{m}"], F.one_hot(y, 5).float(),
                                                          reduction="sum") for m in ("audio", "visual")) / 32
            if with_kl:
                loss = loss + token_distillation(clf.tokens[:3], old)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(token_distillation(clf.tokens[:3].detach(), old))

    assert drift(True) < 0.5 * drift(False)


def test_cign_restores_from_a_checkpoint(toy, tmp_path):
    tr, res, _ = _fit(toy, tmp_path, epochs=1)
    again = Trainer(toy[1], toy[2], build_method("cign", {**TINY, "epochs": 1}), head_config=HEAD, seed=0,
                    run_dir=tmp_path)
    again._restore(torch.load(tmp_path / "ckpt_task2.pt", weights_only=True))
    test = np.concatenate(tr.split_idx["test"])
    np.testing.assert_array_equal(again.predict(test), tr.predict(test))
