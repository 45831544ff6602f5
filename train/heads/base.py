"""Head registry, the :class:`Head` base class, shared layers and typed options.

Options of heads and methods are frozen dataclasses; :func:`coerce_options`
builds one from ``{name: value}`` pairs (values may be the strings of a
``--set k=v`` command line) and rejects unknown names with the list of valid ones.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from avcl_core.plugins import Registry


class HeadError(ValueError):
    """An unknown head or head option; the message lists the valid ones."""


class OptionError(ValueError):
    """An unknown option name or a value of the wrong type; the message lists the valid names."""


def check_attention_width(what: str, d_model: int, n_heads: int) -> None:
    """:class:`HeadError` unless ``d_model`` is a positive multiple of ``n_heads`` (multi-head
    attention splits ``d_model`` into ``n_heads`` equal parts)."""
    if d_model <= 0 or n_heads <= 0 or d_model % n_heads:
        raise HeadError(f"{what}: d_model ({d_model}) must be a positive multiple of n_heads ({n_heads})")


# -- typed options -------------------------------------------------------------------
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _coerce(value: Any, typ: Any, key: str, what: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key, what)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.replace("|", ",").split(",") if v.strip()]
        (inner, *_) = typing.get_args(typ) or (str,)
        return tuple(_coerce(v, inner, key, what) for v in value)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError(value)
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
    except (TypeError, ValueError):
        raise OptionError(f"{what}: option {key}={value!r} is not a valid {getattr(typ, '__name__', typ)}") from None
    return value


def option_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def coerce_options(cls, options: Mapping[str, Any] | None, what: str, base=None):
    """``cls(**defaults | options)`` with values converted to the field types.

    ``base`` (an instance of ``cls``) supplies the values not in ``options``.
    Unknown names raise :class:`OptionError` naming ``what`` and listing the valid keys.
    """
    options = dict(options or {})
    hints = typing.get_type_hints(cls)
    names = option_names(cls)
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise OptionError(f"{what}: unknown option(s) {', '.join(unknown)}; valid keys: {', '.join(names)}")
    values = {k: _coerce(v, hints[k], k, what) for k, v in options.items()}
    obj = dataclasses.replace(base, **values) if base is not None else cls(**values)
    check = getattr(obj, "check", None)
    if check is not None:
        check(what)
    return obj


def options_dict(obj) -> dict:
    """JSON-ready dict of a frozen options dataclass (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


# -- heads ---------------------------------------------------------------------------
class Head(nn.Module):
    """Base class: ``forward(batch) -> (B, out_dim)`` clip features.

    Subclasses set :attr:`streams` (the batch keys they read), :attr:`Config`
    (a frozen dataclass of options) and :attr:`out_dim` in ``__init__``.
    """

    name: str = ""
    streams: tuple[str, ...] = ()

    @dataclasses.dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, dims: Mapping[str, tuple[int, int]], cfg) -> None:
        super().__init__()
        missing = [s for s in self.streams if s not in dims]
        if missing:
            raise HeadError(
                f"head {self.name!r} needs stream(s) {missing}; the feature set has {sorted(dims)}"
            )
        self.cfg = cfg
        self.out_dim = 0


HEADS: dict[str, type[Head]] = {}


#: built-in heads, entry points of group ``avcl.heads`` (loaded on first lookup) and
#: ``file.py:Class`` / ``module:Class`` references (see :mod:`avcl_core.plugins`)
REGISTRY = Registry("head", Head, HeadError, HEADS)

#: ``@register_head(name)``: class decorator registering a :class:`Head` subclass under ``name``
#: (sets ``cls.name``; where it came from is recorded for ``avcl-train --list``)
register_head = REGISTRY.register
#: ``head_names(plugins=True)``: every registered head name, sorted (``plugins``: import the entry points first)
head_names = REGISTRY.names
#: ``resolve_head(name)``: the registered name of a head given by name, entry-point name or
#: ``file.py:Class`` / ``module:Class`` reference (loaded and registered now); HeadError when unusable
resolve_head = REGISTRY.resolve
#: ``head_origin(name)``: ``built-in``, ``plugin <distribution> <version> (<module:attr>)``,
#: ``file <path>`` or ``module <name>``
head_origin = REGISTRY.origin
#: ``head_class(name)``: the class of head ``name`` (anything :func:`resolve_head` accepts)
head_class = REGISTRY.get


def head_config(name: str, options: Mapping[str, Any] | None = None):
    """The options dataclass of head ``name`` with ``options`` applied."""
    cls = head_class(name)
    return coerce_options(cls.Config, options, f"head {name!r}")


def build_head(name: str, dims: Mapping[str, tuple[int, int]], options: Mapping[str, Any] | Any = None) -> Head:
    """Instantiate head ``name`` for streams of per-sample shapes ``dims`` ({stream: (T, D)})."""
    cls = head_class(name)
    cfg = options if isinstance(options, cls.Config) else head_config(name, options)
    return cls(dims, cfg)


# -- shared layers -------------------------------------------------------------------
def standardize_tokens(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm without its affine part: per token, (x - mean) / sqrt(var + eps) over the last axis.

    The biased variance is used, as ``nn.LayerNorm`` does (it is the same kernel),
    so ``LN(x) == standardize_tokens(x) * gamma + beta`` exactly.
    """
    return F.layer_norm(x, x.shape[-1:], None, None, eps)


class TokenProjection(nn.Module):
    """LayerNorm over input channels, then Linear: (B, T, D_in) -> (B, T, d).

    The LayerNorm puts streams of very different scales (log-mel statistics,
    L2-normalised image embeddings) on one footing without using any data
    statistics (which, computed over all training data, would leak future classes).
    """

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_in)
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


class FeedForward(nn.Module):
    """Linear(d, m*d) -> GELU -> Dropout -> Linear(m*d, d)."""

    def __init__(self, d: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, mult * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(mult * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MultiHeadAttention(nn.Module):
    """Multi-head attention (Vaswani et al.): softmax(Q K^T / sqrt(d_h)) V per head, heads concatenated.

    Q = q W_q, [K, V] = kv W_kv (fused), output projection W_o; q (B, Tq, d),
    kv (B, Tk, d) -> (B, Tq, d). Uses ``scaled_dot_product_attention``, which
    is markedly faster on CPU than ``nn.MultiheadAttention``'s training path.
    """

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        if d % heads:
            raise HeadError(f"d_model={d} is not divisible by n_heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        B, Tq, d = q.shape
        Tk, h = kv.shape[1], self.heads
        Q = self.q(q).view(B, Tq, h, d // h).transpose(1, 2)
        K, V = self.kv(kv).view(B, Tk, 2, h, d // h).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(Q, K, V, dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(B, Tq, d))


class AttentionBlock(nn.Module):
    """Post-norm transformer block with queries ``q`` and keys/values ``kv``.

    h = LN(q + Dropout(MHA(q, kv, kv)));  out = LN(h + Dropout(FFN(h))).
    With ``kv = q`` it is a self-attention block. Shapes: q (B, Tq, d),
    kv (B, Tk, d) -> (B, Tq, d).
    """

    def __init__(self, d: int, heads: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(d, heads, dropout)
        self.norm1 = nn.LayerNorm(d)
        self.ffn = FeedForward(d, ffn_mult, dropout)
        self.norm2 = nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
        kv = q if kv is None else kv
        h = self.norm1(q + self.drop(self.attn(q, kv)))
        return self.norm2(h + self.drop(self.ffn(h)))
