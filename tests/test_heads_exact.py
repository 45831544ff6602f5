"""The heads' cheaper arithmetic computes the same function of the same parameters as the plain definition."""
from __future__ import annotations

import pytest
import torch

from train_fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from train.heads import build_head
from train.heads.base import standardize_tokens


def _inputs(b, ta, da, tv, dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # features off-centre and of unequal scale, as frozen encoder outputs are
    a = torch.randn(b, ta, da, generator=g, dtype=dtype) * 3.0 + 1.5
    v = torch.randn(b, tv, dv, generator=g, dtype=dtype) * 0.2 - 0.1
    return {"audio": a, "visual": v}


def _perturb(head, seed=1):
    """Move LayerNorm scales/shifts and biases off their initial values so every folded term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def test_standardize_tokens_is_layernorm_without_affine():
    x = _inputs(3, 5, 7, 1, 1, torch.float64)["audio"]
    ln = torch.nn.LayerNorm(7).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2.0)
        ln.bias.uniform_(-1.0, 1.0)
    torch.testing.assert_close(standardize_tokens(x) * ln.weight + ln.bias, ln(x), rtol=0, atol=1e-12)
    # hand-computed: biased variance
    m = x.mean(-1, keepdim=True)
    var = ((x - m) ** 2).mean(-1, keepdim=True)
    torch.testing.assert_close(standardize_tokens(x), (x - m) / torch.sqrt(var + 1e-5), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("shape", [(3, 40, 16, 4, 24, 32, 4), (2, 1, 8, 1, 8, 16, 2), (2, 25, 12, 8, 10, 48, 8)])
def test_guided_forward_and_gradients_equal_the_plain_computation(dtype, tol, shape):
    b, ta, da, tv, dv, d, heads = shape
    torch.manual_seed(0)
    head = build_head("guided", {"audio": (ta, da), "visual": (tv, dv)},
                      {"d_model": d, "n_heads": heads, "dropout": 0.1}).to(dtype).eval()
    _perturb(head)
    x = _inputs(b, ta, da, tv, dv, dtype)
    x = {k: v.requires_grad_(True) for k, v in x.items()}
    fast, plain = head(x), head.forward_plain(x)
    assert fast.shape == (b, d)
    torch.testing.assert_close(fast, plain, rtol=tol, atol=tol)
    w = torch.randn(fast.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    params = [p for _, p in head.named_parameters()]
    g_fast = torch.autograd.grad((fast * w).sum(), params + [x["audio"], x["visual"]], allow_unused=True)
    g_plain = torch.autograd.grad((plain * w).sum(), params + [x["audio"], x["visual"]], allow_unused=True)
    names = [n for n, _ in head.named_parameters()] + ["input audio", "input visual"]
    for name, gf, gp in zip(names, g_fast, g_plain):
        # the key bias shifts every score of a query equally: its exact gradient is zero in both forms
        gf = torch.zeros_like(gp) if gf is None else gf
        gp = torch.zeros_like(gf) if gp is None else gp
        scale = max(float(gp.abs().max()), 1.0)
        torch.testing.assert_close(gf / scale, gp / scale, rtol=tol, atol=tol, msg=f"gradient of {name}")


def test_guided_attention_dropout_keeps_the_expectation_and_is_active_only_in_training():
    torch.manual_seed(0)
    head = build_head("guided", {"audio": (30, 8), "visual": (4, 12)},
                      {"d_model": 16, "n_heads": 2, "dropout": 0.3}).double()
    _perturb(head)
    # dropout only in the attention: the other dropouts are identities here
    head.cross.drop.p = head.refine.drop.p = 0.0
    for blk in (head.cross, head.refine):
        blk.ffn.net[2].p = 0.0
    head.refine.attn.dropout = 0.0
    x = _inputs(2, 30, 8, 4, 12, torch.float64)
    head.eval()
    torch.testing.assert_close(head(x), head.forward_plain(x), rtol=1e-10, atol=1e-10)
    head.train()
    a, b = head(x), head(x)
    assert not torch.equal(a, b)  # random masks in training
    # the two forms draw different masks; over many draws they estimate the same expectation
    with torch.no_grad():
        fast = torch.stack([head(x) for _ in range(400)]).mean(0)
        plain = torch.stack([head.forward_plain(x) for _ in range(400)]).mean(0)
    assert float((fast - plain).abs().max()) < 0.05 * float(plain.abs().max())


def test_guided_trains_the_same_with_fast_and_plain_forward():
    """A few Adam steps from the same start reach the same parameters (no dropout)."""
    dims = {"audio": (20, 8), "visual": (3, 10)}
    x = _inputs(16, 20, 8, 3, 10, torch.float64)
    y = torch.arange(16) % 4
    runs = []
    for plain in (False, True):
        torch.manual_seed(0)
        head = build_head("guided", dims, {"d_model": 16, "n_heads": 4, "dropout": 0.0}).double()
        cls = torch.nn.Linear(16, 4).double()
        opt = torch.optim.Adam([*head.parameters(), *cls.parameters()], lr=1e-2)
        for _ in range(5):
            f = head.forward_plain(x) if plain else head(x)
            loss = torch.nn.functional.cross_entropy(cls(f), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        runs.append((float(loss.detach()), torch.cat([p.detach().flatten() for p in head.parameters()])))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-9)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-7, atol=1e-9)
