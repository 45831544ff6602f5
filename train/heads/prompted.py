"""``l2p`` / ``dualprompt``: a small audio-visual fusion transformer prompted from a prompt pool.

L2P (Wang et al., CVPR 2022) and DualPrompt (Wang et al., ECCV 2022) prompt a
frozen pre-trained ViT. Here the encoders are frozen and cached, so the
prompted network is a small fusion transformer over the cached tokens, trained
(with its prompts) on the first task and then frozen by the methods, after
which only prompts, keys and the classifier learn (see :mod:`train.methods.l2p`).

Input sequence: [CLS; LN-Linear(audio tokens) + e_audio; LN-Linear(visual tokens) + e_visual]
(e_* learnt modality embeddings), ``depth`` pre-norm self-attention blocks, final LayerNorm.
The query of an input is q(x) = the CLS output of the un-prompted transformer
(computed without gradient), as both papers use the frozen model's [CLS] feature.

* ``l2p``: a pool of ``pool_size`` prompts P_j (``prompt_length`` tokens each) with keys k_j.
  The ``top_k`` prompts with the largest cos(q(x), k_j) are prepended to the input
  sequence (prompt tuning); feature = mean of the transformer outputs at the prompt
  positions (L2P's classifier input).
* ``dualprompt``: a G-prompt (``g_length`` tokens) shared by all tasks, inserted at
  ``g_layers``, and one E-prompt per task (``e_length`` tokens, keys k_t) inserted at
  ``e_layers``; training uses the current task's E-prompt, prediction the one whose key
  is closest to q(x) among the tasks seen. A prompt enters a block as extra tokens and
  its outputs are dropped after the block, so it acts as extra keys/values of that
  block's attention (DualPrompt's prefix tuning derives keys and values separately from
  its prompt: a simplification). Feature = the CLS output.

Every forward leaves ``self.last['key_distance']`` = mean over the batch of the summed
1 - cos(q(x), k) of the keys used, the methods' key-pulling term.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from train.heads.base import Head, HeadError, TokenProjection, check_attention_width, register_head
from train.heads.cign import PreNormBlock


@dataclass(frozen=True)
class PromptConfig:
    d_model: int = 256
    n_heads: int = 4
    depth: int = 5
    ffn_mult: int = 2
    dropout: float = 0.0
    pool_size: int = 10
    prompt_length: int = 5
    top_k: int = 5
    g_length: int = 5
    e_length: int = 5
    g_layers: tuple[int, ...] = (0, 1)
    e_layers: tuple[int, ...] = (2, 3, 4)

    def check(self, what: str) -> None:
        check_attention_width(what, self.d_model, self.n_heads)
        if self.depth < 1 or self.pool_size < 1 or not 1 <= self.top_k <= self.pool_size:
            raise HeadError(f"{what}: need depth >= 1, pool_size >= 1 and 1 <= top_k <= pool_size")
        bad = [i for i in (*self.g_layers, *self.e_layers) if not 0 <= i < self.depth]
        if bad:
            raise HeadError(f"{what}: prompt layers {bad} outside 0..{self.depth - 1}")


class PromptedTransformer(Head):
    streams = ("audio", "visual")
    Config = PromptConfig

    def __init__(self, dims, cfg: PromptConfig) -> None:
        super().__init__(dims, cfg)
        d = cfg.d_model
        self.audio_in = TokenProjection(dims["audio"][1], d)
        self.visual_in = TokenProjection(dims["visual"][1], d)
        self.modality = nn.Parameter(torch.randn(2, d) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.blocks = nn.ModuleList(PreNormBlock(d, cfg.n_heads, cfg.ffn_mult, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d)
        self.out_dim = d
        # the task being trained, set by the method (DualPrompt: its E-prompt at training, the keys
        # of tasks 0..task at prediction); a buffer, so that checkpoints keep it
        self.register_buffer("_task", torch.zeros((), dtype=torch.long))
        self.last: dict[str, torch.Tensor] = {}

    @property
    def task(self) -> int:
        return int(self._task)

    @task.setter
    def task(self, t: int) -> None:
        self._task.fill_(int(t))

    def prompt_parameter_names(self) -> list[str]:
        raise NotImplementedError

    def tokens(self, batch) -> torch.Tensor:
        a = self.audio_in(batch["audio"]) + self.modality[0]
        v = self.visual_in(batch["visual"]) + self.modality[1]
        return torch.cat([self.cls.expand(a.shape[0], -1, -1), a, v], dim=1)

    def run(self, x: torch.Tensor, inserts: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Blocks over x (B, T, d); ``inserts[l]`` (B, L, d) joins block l's input and is dropped after it."""
        for i, blk in enumerate(self.blocks):
            p = (inserts or {}).get(i)
            if p is None:
                x = blk(x)
            else:
                x = blk(torch.cat([p, x], dim=1))[:, p.shape[1]:]
        return self.norm(x)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.run(x)[:, 0]


def _pull(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """cos(q, k) for q (B, d) and k (B, n, d) -> (B, n)."""
    return (F.normalize(q, dim=-1)[:, None] * F.normalize(k, dim=-1)).sum(-1)


@register_head("l2p")
class L2PHead(PromptedTransformer):
    def __init__(self, dims, cfg: PromptConfig) -> None:
        super().__init__(dims, cfg)
        d = cfg.d_model
        self.prompts = nn.Parameter(torch.empty(cfg.pool_size, cfg.prompt_length, d).uniform_(-1, 1))
        self.keys = nn.Parameter(torch.empty(cfg.pool_size, d).uniform_(-1, 1))

    def prompt_parameter_names(self) -> list[str]:
        return ["prompts", "keys"]

    def forward(self, batch):
        x = self.tokens(batch)
        q = self.query(x)
        sim = F.normalize(q, dim=1) @ F.normalize(self.keys, dim=1).T  # (B, pool)
        idx = sim.topk(self.cfg.top_k, dim=1).indices  # (B, N)
        chosen = self.prompts[idx].flatten(1, 2)  # (B, N * L, d)
        self.last = {"key_distance": (1 - _pull(q, self.keys[idx])).sum(dim=1).mean(), "selected": idx}
        n_p = chosen.shape[1]
        out = self.run(torch.cat([x[:, :1], chosen, x[:, 1:]], dim=1))
        return out[:, 1: 1 + n_p].mean(dim=1)


@register_head("dualprompt")
class DualPromptHead(PromptedTransformer):
    def __init__(self, dims, cfg: PromptConfig) -> None:
        super().__init__(dims, cfg)
        d = cfg.d_model
        self.g_prompt = nn.Parameter(torch.empty(len(cfg.g_layers), cfg.g_length, d).uniform_(-1, 1))
        # one parameter per task, so that tasks not trained get no gradient (nor weight decay)
        self.e_prompts = nn.ParameterList(
            nn.Parameter(torch.empty(len(cfg.e_layers), cfg.e_length, d).uniform_(-1, 1)) for _ in range(cfg.pool_size))
        self.e_keys = nn.ParameterList(nn.Parameter(torch.empty(d).uniform_(-1, 1)) for _ in range(cfg.pool_size))

    def prompt_parameter_names(self) -> list[str]:
        return ["g_prompt", "e_prompts", "e_keys"]

    def forward(self, batch):
        x = self.tokens(batch)
        B = x.shape[0]
        q = self.query(x)
        if self.training:
            e = torch.full((B,), self.task, dtype=torch.long, device=x.device)
        else:
            keys = torch.stack(list(self.e_keys[: self.task + 1]))
            e = (F.normalize(q, dim=1) @ F.normalize(keys, dim=1).T).argmax(dim=1)
        E = torch.stack(list(self.e_prompts))[e]  # (B, n_e_layers, Le, d)
        K = torch.stack(list(self.e_keys))[e]  # (B, d)
        self.last = {"key_distance": (1 - _pull(q, K[:, None])).sum(dim=1).mean(), "selected": e}
        inserts = {layer: self.g_prompt[j][None].expand(B, -1, -1) for j, layer in enumerate(self.cfg.g_layers)}
        for j, layer in enumerate(self.cfg.e_layers):
            inserts[layer] = torch.cat([inserts[layer], E[:, j]], dim=1) if layer in inserts else E[:, j]
        return self.run(x, inserts)[:, 0]
