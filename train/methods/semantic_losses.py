"""Loss pieces of the continual semantic segmentation methods (MiB, PLOP, CMR), pure functions.

Tensors: pixel logits ``z`` (n, C, H, W) over the seen channels (0 = background),
labels ``y`` (n, H, W) int64 with 255 = ignore, old-model logits ``z_old`` (n, C_old, H, W).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = 255


def unbiased_ce(z: torch.Tensor, y: torch.Tensor, n_old: int) -> torch.Tensor:
    """MiB's unbiased cross-entropy (Cermelli et al., CVPR 2020, Eq. 3).

    A pixel labelled background may belong to any old class, so its probability is
    that of "background or an old class": ``log p(bg) = logsumexp(z[:n_old]) - logsumexp(z)``;
    new classes keep ``log p(c) = z_c - logsumexp(z)``. Labels of old classes count as
    background. Mean over the pixels that are not ignored.
    """
    den = torch.logsumexp(z, dim=1, keepdim=True)
    bg = torch.logsumexp(z[:, :n_old], dim=1, keepdim=True) - den
    lp = torch.cat([bg, z[:, 1:] - den], dim=1)
    y = torch.where((y < n_old) & (y != IGNORE), torch.zeros_like(y), y)
    return F.nll_loss(lp, y, ignore_index=IGNORE)


def unbiased_kd(z: torch.Tensor, z_old: torch.Tensor) -> torch.Tensor:
    """MiB's unbiased distillation (Eq. 5): the old model's background probability is
    matched by the new model's "background or a new class":

        L = -(1 / C_old) mean_pixels [ q_0 log(p_0 + sum_new p_c) + sum_{c=1}^{C_old-1} q_c log p_c ]

    with ``q = softmax(z_old)`` and ``p = softmax(z)``."""
    n_old = z_old.shape[1]
    den = torch.logsumexp(z, dim=1)
    bg = torch.logsumexp(torch.cat([z[:, :1], z[:, n_old:]], dim=1), dim=1) - den
    old = z[:, 1:n_old] - den.unsqueeze(1)
    q = torch.softmax(z_old, dim=1)
    per_pixel = (q[:, 0] * bg + (q[:, 1:] * old).sum(dim=1)) / n_old
    return -per_pixel.mean()


@torch.no_grad()
def balanced_init(classifier, n_old: int, n_seen: int) -> None:
    """MiB / PLOP initialisation of the new classes' rows: the background row's weights and
    bias ``b_bg - log(n_new + 1)``; the background bias gets the same shift, so that the
    new classes and background share the old background probability at the start."""
    n_new = n_seen - n_old
    if n_new <= 0 or n_old == 0:
        return
    shift = math.log(n_new + 1)
    classifier.weight[n_old:n_seen] = classifier.weight[0]
    classifier.bias[n_old:n_seen] = classifier.bias[0] - shift
    classifier.bias[0] -= shift


def normalized_entropy(prob: torch.Tensor) -> torch.Tensor:
    """``-sum_c p_c log p_c / log C`` over dim 1 (0 for a one-hot, 1 for uniform)."""
    C = prob.shape[1]
    ent = -(prob * torch.log(prob.clamp_min(1e-12))).sum(dim=1)
    return ent / math.log(C) if C > 1 else torch.zeros_like(ent)


def local_pod(a: torch.Tensor, b: torch.Tensor, scales=(1, 2, 4)) -> torch.Tensor:
    """PLOP's Local POD distance between feature maps ``a`` and ``b`` (n, C, H, W).

    Both are squared element-wise; at each scale ``s`` the map is cut into ``s x s``
    windows and each window gives its width-pooled (mean over W) and height-pooled
    (mean over H) strips, divided by ``s^2``; all strips of all scales are
    concatenated, L2-normalised per sample, and the loss is the mean over samples
    of the L2 distance between the two embeddings (Douillard et al., CVPR 2021, Eq. 3-4).
    """
    if a.shape != b.shape:
        raise ValueError(f"local_pod: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    n = a.shape[0]
    if n == 0:
        return a.sum() * 0.0

    def embed(x):
        x = x.pow(2)
        H, W = x.shape[-2:]
        parts = []
        for s in scales:
            kh, kw = max(1, H // s), max(1, W // s)
            for i in range(s):
                for j in range(s):
                    win = x[..., i * kh:(i + 1) * kh, j * kw:(j + 1) * kw]
                    if win.numel() == 0:
                        continue
                    parts.append(win.mean(dim=3).reshape(n, -1) / s ** 2)
                    parts.append(win.mean(dim=2).reshape(n, -1) / s ** 2)
        return F.normalize(torch.cat(parts, dim=1), dim=1, p=2)

    return (embed(a) - embed(b)).norm(dim=1).mean()


def sum_new_into_background(z: torch.Tensor, n_old: int) -> torch.Tensor:
    """(n, C, H, W) -> (n, n_old, H, W): the new channels' logits added to the background's
    (PLOP's ``extra_channels = sum`` for distilling logits of a grown classifier)."""
    bg = z[:, :1] + z[:, n_old:].sum(dim=1, keepdim=True)
    return torch.cat([bg, z[:, 1:n_old]], dim=1)
