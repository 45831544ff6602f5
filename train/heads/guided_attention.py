"""``guided``: audio-guided attention (the fusion block of "Listen, Look, and Learn").

With visual tokens ``V`` (B, Tv, Dv) and audio tokens ``A`` (B, Ta, Da), both
projected to ``d_model`` by LayerNorm + Linear (:class:`TokenProjection`):

    H = LN(V + MHA(Q=V, K=A, V=A));    H = LN(H + FFN(H))      (audio guides the frames)
    Z = LN(H + MHSA(H));               Z = LN(Z + FFN(Z))      (refinement)
    feature = mean_t Z[:, t]                                   (B, d_model)

MHA/MHSA are multi-head attention with ``n_heads`` heads, FFN is
Linear(d, ffn_mult*d) -> GELU -> Linear(ffn_mult*d, d), dropout ``dropout`` after
attention and FFN. The pooled ``feature`` is the attended feature the ``lll``
method distils. The block is permutation invariant over tokens (no positional
encoding): clips are recognised from what is seen and heard, not when.

How the cross-attention is computed (:meth:`GuidedAttentionHead.forward`): the
audio tokens enter only as keys and values, through three affine maps in a row
(LayerNorm's scale/shift, the input projection, the key/value projection), so
their product ``M = W_kv W_in diag(gamma)`` (2d x Da) and offset ``c`` are applied
instead, and per head the key map is moved onto the few queries:
``S_h = (Q_h M_k,h) Â^T / sqrt(d_h)`` and ``O_h = (P_h Â) M_v,h^T + c_v,h`` with
``Â`` the standardised audio tokens (LayerNorm without its affine part). The key
offset adds the same number to every score of a query, which the softmax
ignores, and the rows of ``P_h`` sum to one (their dropped-out sums are used
when attention dropout is on). This is the same function of the same
parameters as :meth:`GuidedAttentionHead.forward_plain` (outputs and gradients
agree to float rounding; ``tests/test_heads_exact.py``), at a cost linear in
``Tv*Ta*Da`` instead of ``Ta*Da*d + Ta*d*2d``: with SAM-Audio shapes (Ta=250,
Da=128, Tv=8, d=256) the audio side shrinks about 16-fold. The standardisation of the
frozen audio features is done per batch: measured at about 1% of a training
step (``benchmarks/bench_train_heads.py``), it does not pay to keep a
standardised copy of the store's features next to the raw ones.

With a single audio token (e.g. AV-CIL's AudioMAE clip vector, ``audio`` of
shape (1, Da)) the cross-attention has one key, its softmax is identically 1
and W_q / W_k get no gradient: the block reduces to LN(V + W_o W_v a). The head
warns then; the ``film`` head (:mod:`train.heads.film`) uses one audio vector
by modulating the visual tokens with it instead.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from train.heads.base import (
    AttentionBlock, Head, TokenProjection, check_attention_width, register_head, standardize_tokens,
)

log = logging.getLogger("avcl.train")


@register_head("guided")
class GuidedAttentionHead(Head):
    streams = ("audio", "visual")

    @dataclass(frozen=True)
    class Config:
        d_model: int = 256
        n_heads: int = 4
        ffn_mult: int = 2
        dropout: float = 0.1

        def check(self, what: str) -> None:
            check_attention_width(what, self.d_model, self.n_heads)

    def __init__(self, dims, cfg: Config) -> None:
        super().__init__(dims, cfg)
        d = cfg.d_model
        if dims["audio"][0] == 1:
            log.warning("head 'guided': the audio stream has a single token per clip, so its cross-attention has "
                        "one key (softmax = 1; query/key weights get no gradient). Use several audio tokens "
                        "(e.g. --stream audio=audio_dense) or --head film, which conditions the visual tokens "
                        "on one audio vector")
        self.audio_in = TokenProjection(dims["audio"][1], d)
        self.visual_in = TokenProjection(dims["visual"][1], d)
        self.cross = AttentionBlock(d, cfg.n_heads, cfg.ffn_mult, cfg.dropout)
        self.refine = AttentionBlock(d, cfg.n_heads, cfg.ffn_mult, cfg.dropout)
        self.out_dim = d

    def forward_plain(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The definition, step by step (the reference :meth:`forward` is tested against)."""
        a = self.audio_in(batch["audio"])
        v = self.visual_in(batch["visual"])
        h = self.cross(v, a)
        z = self.refine(h)
        return z.mean(dim=1)

    def _audio_keys_values(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(M_k (h, d_h, Da), M_v (h, d_h, Da), c_v (h, d_h)): the audio path's affine maps composed."""
        norm, proj, kv = self.audio_in.norm, self.audio_in.proj, self.cross.attn.kv
        d, h = self.cfg.d_model, self.cfg.n_heads
        w_in = proj.weight * norm.weight[None, :]          # (d, Da): LayerNorm's scale folded in
        b_in = proj.weight @ norm.bias + proj.bias         # (d,)
        m = kv.weight @ w_in                                # (2d, Da)
        c_v = kv.weight[d:] @ b_in + kv.bias[d:]            # the key offset is dropped: softmax ignores it
        m_k, m_v = m[:d].view(h, d // h, -1), m[d:].view(h, d // h, -1)
        return m_k, m_v, c_v.view(h, d // h)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        a_std = standardize_tokens(batch["audio"], self.audio_in.norm.eps)
        vp = self.visual_in(batch["visual"])                # (B, Tv, d)
        blk, attn = self.cross, self.cross.attn
        B, Tv, d = vp.shape
        h = self.cfg.n_heads
        dh = d // h
        m_k, m_v, c_v = self._audio_keys_values()
        q = attn.q(vp).view(B, Tv, h, dh).transpose(1, 2)  # (B, h, Tv, dh)
        # queries mapped into the audio channel space: (B, h*Tv, Da)
        qa = torch.einsum("bhtk,hkc->bhtc", q, m_k * (1.0 / math.sqrt(dh))).reshape(B, h * Tv, -1)
        p = torch.softmax(torch.bmm(qa, a_std.transpose(1, 2)), dim=-1)    # (B, h*Tv, Ta)
        if self.training and attn.dropout > 0:
            p = F.dropout(p, attn.dropout)
            mass = p.sum(dim=-1).view(B, h, Tv, 1)
        else:
            mass = 1.0
        u = torch.bmm(p, a_std).view(B, h, Tv, -1)          # (B, h, Tv, Da)
        o = torch.einsum("bhtc,hkc->bhtk", u, m_v) + mass * c_v[None, :, None, :]
        o = attn.out(o.transpose(1, 2).reshape(B, Tv, d))
        x = blk.norm1(vp + blk.drop(o))
        x = blk.norm2(x + blk.drop(blk.ffn(x)))
        z = self.refine(x)
        return z.mean(dim=1)
