"""``avcil``: AV-CIL (Pian et al., "Audio-Visual Class-Incremental Learning", ICCV 2023).

Head ``avcil`` (:mod:`train.heads.avcil`: audio-guided per-channel spatial and
temporal attention over dense visual tokens). Each batch of current samples is
joined by a batch of random exemplars (``'paired'`` replay). Task 0 trains with
plain cross-entropy; from task 1 on, with a' / v' the head's audio / visual
features, L2-normalised (â, v̂), alpha / beta its attention maps and *_old those of
the previous task's model:

    L = CE_sep(z, y)                                              separated softmax (SS-IL)
        + sum_{k<t} T^2 KL(softmax(z_old[:, task k]/T) || softmax(z[:, task k]/T))    task-wise KD, T = 2
        + lambda_I * mean_i -log softmax_j(â_i . v̂_j / tau_I)[i]                     instance-aware (audio -> visual)
        + lambda_C * mean_i mean_j -[y_i = y_j] log softmax_j(â_i . v̂_j / tau_C)     class-aware
        + lambda   * sum_{e, f, d} KL(alpha_old[e, f, :, d] || alpha[e, f, :, d]) / E   spatial VAD
        + (1 - lambda) * sum_{e, d} KL(beta_old[e, :, d] || beta[e, :, d]) / E        temporal VAD

with i, j over the whole batch (current samples and exemplars), e over its E
exemplars only, and CE_sep / KD as in :mod:`train.methods.losses` (KD on every
sample). These are the released code's terms (``train_incremental_ours.py``; the
paper's equations could not be checked). Two facts of that code kept here: the
class-aware term averages over all j, not over the positives as the paper's
Eq. 7 does (``class_norm='positives'`` gives the paper's form), and exemplars
are chosen at random.

Weights: ``lambda_C`` 1, ``lambda`` 0.5, ``tau_I`` = ``tau_C`` = 0.05;
``lambda_I`` = -1 (default) takes AV-CIL's per-dataset value, 0.5 on AVE and
0.1 on Kinetics-Sounds and VGGSound-100 (and on any other dataset). Optimiser:
the shared defaults (AV-CIL's Adam, lr 1e-3, weight decay 1e-4, 200 epochs,
256 + 128 exemplars per step), last partial batch dropped as its loaders do.

Departure: the released code trains step 1 of AVE with 4 classes per step with
plain CE (a special case of its script); here every step from 1 on uses CE_sep.

Memory: dense VideoMAE tokens are large (8 x 196 x 768 per clip: 2.4 MB as the
float16 the feature set holds; AVE 9 GiB, K-S 52 GiB, VGGSound-100 137 GiB).
Streams larger than ``--feature-memory`` are streamed from the store's shards
(:mod:`train.features`; epochs then shuffle within windows of blocks, as for
every method) and AV-CIL trains from them: nothing here needs every sample
resident (see :func:`check_dense_memory`, called by
``avcl-train``, which refuses only a run whose resident part would not fit).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from train.heads.base import OptionError
from train.methods import losses
from train.methods.base import Hparams, Method, register_method

LAMBDA_I = {"ave": 0.5, "ks": 0.1, "vs100": 0.1}
LAMBDA_I_OTHER = 0.1


@dataclass(frozen=True)
class AVCILHparams(Hparams):
    lambda_I: float = -1.0  # < 0: AV-CIL's per-dataset value (see the module docstring)
    lambda_C: float = 1.0
    lam: float = 0.5  # spatial vs temporal attention distillation
    tau_I: float = 0.05
    tau_C: float = 0.05
    T: float = 2.0
    drop_last: bool = True
    class_norm: str = "all"  # all (released code) | positives (paper Eq. 7)
    instance: bool = True
    class_aware: bool = True
    vad: bool = True
    choices = {"class_norm": ("all", "positives")}

    def check(self, what: str) -> None:
        super().check(what)
        if not 0 <= self.lam <= 1 or self.tau_I <= 0 or self.tau_C <= 0:
            raise OptionError(f"{what}: need 0 <= lam <= 1 and tau_I, tau_C > 0")


def instance_contrastive(a: torch.Tensor, v: torch.Tensor, tau: float) -> torch.Tensor:
    """mean_i -log softmax_j(a_i . v_j / tau)[i] for unit rows a, v (B, D): audio i must find its own clip's visual."""
    return F.cross_entropy(a @ v.T / tau, torch.arange(a.shape[0], device=a.device))


def class_contrastive(a: torch.Tensor, v: torch.Tensor, y: torch.Tensor, tau: float, norm: str = "all") -> torch.Tensor:
    """Class-aware term: -mean_i [ sum_j [y_i = y_j] log softmax_j(a_i . v_j / tau) ] / n_i, with
    n_i = B (``norm='all'``, the released code) or the number of positives of i (``'positives'``, paper Eq. 7)."""
    logp = F.log_softmax(a @ v.T / tau, dim=1)
    pos = (y[:, None] == y[None, :]).to(logp.dtype)
    n = pos.sum(dim=1) if norm == "positives" else torch.full_like(pos[:, 0], pos.shape[1])
    return -((logp * pos).sum(dim=1) / n).mean()


def attention_distillation(p: torch.Tensor, p_old: torch.Tensor) -> torch.Tensor:
    """Sum over every attention distribution of KL(p_old || p), divided by the number of samples (axis 0)."""
    kl = p_old * (torch.log(p_old.clamp_min(1e-30)) - torch.log(p.clamp_min(1e-30)))
    return kl.sum() / p.shape[0]


@register_method("avcil")
class AVCIL(Method):
    Hparams = AVCILHparams
    replay = "paired"
    uses_teacher = True
    default_head = "avcil"

    def lambda_I(self) -> float:
        if self.hp.lambda_I >= 0:
            return self.hp.lambda_I
        return LAMBDA_I.get(self.trainer.protocol.dataset, LAMBDA_I_OTHER)

    def before_task(self, task: int) -> None:
        from train.heads.avcil import AVCILHead

        if not isinstance(self.trainer.model.head, AVCILHead):
            raise OptionError(f"method 'avcil' needs head 'avcil' (its attention maps and audio/visual "
                              f"features), got head {self.trainer.head_name!r}")

    def loss(self, batch, out):
        hp, y, n_old = self.hp, batch["y"], self.n_old
        old = self.teacher(batch)
        if old is None:
            return {"ce": F.cross_entropy(out["logits"], y)}
        terms = {"ce": losses.task_separated_ce(out["logits"], y, n_old),
                 "kd": losses.task_wise_kd(out["logits"], old["logits"], self.trainer.offsets_old, hp.T)}
        last = self.trainer.model.head.last
        a, v = F.normalize(last["audio"], dim=1), F.normalize(last["visual"], dim=1)
        if hp.instance:
            terms["inst"] = self.lambda_I() * instance_contrastive(a, v, hp.tau_I)
        if hp.class_aware:
            terms["cls"] = hp.lambda_C * class_contrastive(a, v, y, hp.tau_C, hp.class_norm)
        ex = y < n_old
        if hp.vad and ex.any():
            old_model = self.trainer.old_model
            with torch.no_grad():
                old_model.head({k: t[ex] for k, t in batch["x"].items()})
            old_last = old_model.head.last
            terms["vad_s"] = hp.lam * attention_distillation(last["spatial"][ex], old_last["spatial"])
            terms["vad_t"] = (1 - hp.lam) * attention_distillation(last["temporal"][ex], old_last["temporal"])
        return terms


# -- memory check for dense streams -------------------------------------------------------------
def available_memory(device: str | torch.device) -> int:
    """Bytes free for the feature set on ``device`` (``"auto"``: CUDA when present), as
    :func:`train.features.available_memory` measures them."""
    from train.features import available_memory as free_bytes

    return free_bytes(_device(device))


def _device(device) -> str | torch.device:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass(frozen=True)
class DenseMemoryPlan:
    """How the FeatureSet of a run will hold its streams.

    ``need``: bytes of each stream when resident ({'name=stream (store)': bytes});
    ``rows``: the rows the set holds; ``block_rows``: rows per streamed block;
    ``budget``: the FeatureSet's memory budget (``--feature-memory``, default half
    of ``free``); ``free``: the free memory of the training device.
    """

    need: dict[str, int]
    rows: int
    block_rows: int
    budget: int
    free: int

    @property
    def total(self) -> int:
        return sum(self.need.values())

    @property
    def streamed(self) -> bool:
        """True when the set streams its blocks from the store (the streams exceed the budget)."""
        return self.total > self.budget

    @property
    def resident(self) -> int:
        """Bytes the set holds: every stream, or (streamed) the blocks that fit the budget, at least two."""
        if not self.streamed:
            return self.total
        block = self.total * self.block_rows // max(1, self.rows)
        return max(2, self.budget // max(1, block)) * block


def dense_stream_bytes(stores, streams: dict[str, str] | None) -> tuple[dict[str, int], int, int]:
    """Bytes each FeatureSet stream takes when resident, as :class:`train.features.FeatureSet` holds it:
    ({stream: bytes}, rows, block rows).

    Rows are those of the primary (first) store with status ok (the set drops the
    rest; a sample missing from another store is counted, so this is an upper
    bound); each row is (T, D) in the resident dtype (float16 stores: 2 bytes a
    value, others 4). A block is what the FeatureSet streams by default
    (:func:`train.features.default_block_rows`: the primary store's rows per inner chunk).
    """
    from avcl_core.cache import STATUS_OK, open_store
    from train.features import DEFAULT_STREAMS, _normalised_dims, _resident_dtype, default_block_rows

    wanted = {**DEFAULT_STREAMS, **dict(streams or {})}
    opened = [open_store(s) if isinstance(s, str) else s for s in stores]
    rows = int((opened[0].row_status() == STATUS_OK).sum())
    out: dict[str, int] = {}
    for name, stream in wanted.items():
        for st in opened:
            if stream in st.streams:
                arr = st.group[stream]
                t, d = _normalised_dims(tuple(arr.shape), stream, st.path)
                item = 2 if _resident_dtype(arr.dtype) == torch.float16 else 4
                out[f"{name}={stream} ({st.path})"] = rows * t * d * item
                break
    return out, rows, default_block_rows(opened[0], rows)


class DenseMemoryError(OptionError):
    """The dense streams of a run do not fit in memory; the message names the bytes needed."""


def check_dense_memory(stores, streams, device="auto", available: int | None = None,
                       feature_memory: str | int | None = None, margin: float = 0.8) -> DenseMemoryPlan:
    """How the run's FeatureSet will hold its streams; :class:`DenseMemoryError` when that cannot fit.

    Streams larger than the budget (``feature_memory``, as ``--feature-memory``;
    default half the free memory, as the FeatureSet's) are streamed from the
    store's shards, and AV-CIL trains from them as from a resident set: every
    step reads one batch of current samples and one of exemplars (kept resident
    by the trainer), the teacher's outputs and attention maps are computed per
    batch, and exemplars are drawn at random, so no pass needs every sample
    in memory at once. The run is refused only when what the set would hold
    (every stream, or at least two blocks when streamed) exceeds ``margin`` x the
    free memory ``available`` (default: measured on ``device``); the message
    names the streams, the bytes and the ``--feature-memory`` to set.
    """
    from train.features import parse_size

    need, rows, block_rows = dense_stream_bytes(stores, streams)
    free = available_memory(device) if available is None else int(available)
    budget = parse_size(feature_memory) if feature_memory is not None else free // 2
    plan = DenseMemoryPlan(need, rows, block_rows, budget, free)
    if plan.resident <= margin * free:
        return plan
    gib = 1024 ** 3
    parts = ", ".join(f"{k}: {v / gib:.1f} GiB" for k, v in need.items())
    where = f"only {free / gib:.1f} GiB is free on {_device(device)}"
    if not plan.streamed:
        raise DenseMemoryError(
            f"method 'avcil': the feature streams need {plan.total / gib:.1f} GiB in memory ({parts}) and "
            f"--feature-memory {feature_memory} holds them all, but {where}; set --feature-memory below "
            f"{margin * free / gib:.1f}G (e.g. --feature-memory {max(1, int(free / 2 / 2**20))}M) to stream them "
            "from the store's shards")
    block = plan.total * block_rows // max(1, rows)
    raise DenseMemoryError(
        f"method 'avcil': streamed, the feature streams ({parts}) still need {plan.resident / gib:.1f} GiB resident "
        f"(blocks of {block_rows} rows, {block / gib:.2f} GiB each, at least two) but {where}; lower "
        f"--feature-memory (now {budget / gib:.1f} GiB) or write the store with fewer rows per shard")
