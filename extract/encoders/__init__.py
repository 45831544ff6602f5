"""Frozen feature encoders, by CLI name.

Each name maps to a module with a ``build(**options)`` function returning a frozen
:class:`~extract.encoders.base.FeatureEncoder`; modules are imported only when used
(timm and the model code are heavy). Example::

    enc = build_encoder("vit-b16", variant="tiny", frames_per_clip=4)
    enc.encode(frames, None)["visual"].shape   # (B, 4, 192)

Other distributions add encoders through the entry-point group ``avcl.encoders``
(``myencoder = "my_lab.encoder"``, a module with ``build``, or ``"my_lab.encoder:build"``,
the function itself); they are imported on first lookup of their name or on a listing
(see :mod:`avcl_core.plugins`). A built-in name cannot be taken by a plugin.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import types
from pathlib import Path
from typing import Any

from avcl_core.plugins import BUILTIN, EntryPoints, PluginError, first_line

from .base import CheckpointError, FeatureEncoder, Preprocess

#: CLI name → module (in this package) holding its ``build``.
ENCODERS = {
    "sam-audio": "sam_audio",
    "pann-cnn14": "pann",
    "vit-b16": "vit",
    "signal": "signal",
}

#: encoders from entry points: name → module (or namespace) with ``build``
PLUGIN_ENCODERS: dict[str, Any] = {}
_ORIGINS: dict[str, str] = {}


def _adopt(name: str, obj: Any, origin: str) -> None:
    if name in ENCODERS:
        raise PluginError(f"the name {name!r} is taken by the built-in encoder {name!r}")
    if isinstance(obj, types.ModuleType):
        if not callable(getattr(obj, "build", None)):
            raise PluginError(f"module {obj.__name__} has no build(**options) function")
        module = obj
    elif callable(obj):
        module = types.SimpleNamespace(build=obj, __doc__=obj.__doc__,
                                       __name__=f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__name__', '?')}")
    else:
        raise PluginError(f"{obj!r} is neither a module with build() nor a build function")
    PLUGIN_ENCODERS[name] = module
    _ORIGINS[name] = origin


PLUGINS = EntryPoints("encoder", _adopt, lambda name: name in ENCODERS or name in PLUGIN_ENCODERS)


def encoder_names(plugins: bool = True) -> list[str]:
    """Every encoder name, sorted; ``plugins`` imports the ``avcl.encoders`` entry points first (failures warn)."""
    if plugins:
        PLUGINS.load_all()
    return sorted({*ENCODERS, *PLUGIN_ENCODERS})


def encoder_module(name: str):
    """The module implementing encoder ``name`` (imported on first use); a ``ValueError`` names
    the available encoders, or the plugin and its import error."""
    if name in ENCODERS:
        return importlib.import_module(f"{__name__}.{ENCODERS[name]}")
    if name in PLUGIN_ENCODERS or PLUGINS.load(name):
        return PLUGIN_ENCODERS[name]
    failure = PLUGINS.failure(name)
    if failure:
        raise ValueError(f"encoder {name!r} cannot be used: {failure}")
    raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(encoder_names())}")


def encoder_origin(name: str) -> str:
    """``built-in`` or ``plugin <distribution> <version> (<module:attr>)``."""
    encoder_module(name)
    return BUILTIN if name in ENCODERS else _ORIGINS[name]


def build_encoder(name: str, **options) -> FeatureEncoder:
    """Build encoder ``name`` with its ``build(**options)``; an unknown option is a ``TypeError``."""
    return encoder_module(name).build(**options)


def _builtin_info(name: str) -> tuple[str, dict[str, str]]:
    """(docstring first line, {build keyword: default source}) of a built-in encoder, read from its
    source file: importing the model code (timm, ...) only to list it would take seconds."""
    path = Path(__file__).with_name(f"{ENCODERS[name]}.py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    build = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build")
    a = build.args
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    pairs = list(zip(positional, defaults)) + list(zip(a.kwonlyargs, a.kw_defaults))
    options = {arg.arg: ("(required)" if d is None else ast.unparse(d)) for arg, d in pairs}
    return first_line(ast.get_docstring(tree)), options


def encoder_catalog() -> list[dict]:
    """One entry per encoder for listings: ``name``, ``origin``, ``description`` (the module
    docstring's first line), ``options`` ({build keyword: default, as source text}); an encoder
    whose module fails to import is listed with ``error`` instead."""
    out = []
    for name in encoder_names():
        entry: dict[str, Any] = {"name": name}
        try:
            if name in ENCODERS:
                entry["origin"] = BUILTIN
                entry["description"], entry["options"] = _builtin_info(name)
            else:
                module = encoder_module(name)
                entry["origin"] = encoder_origin(name)
                entry["description"] = first_line(module.__doc__)
                entry["options"] = {
                    p.name: ("(required)" if p.default is inspect.Parameter.empty else repr(p.default))
                    for p in inspect.signature(module.build).parameters.values()
                    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        except Exception as e:  # noqa: BLE001 - one broken encoder module must not hide the others
            entry.update(origin=BUILTIN if name in ENCODERS else _ORIGINS.get(name, "plugin"),
                         error=f"{type(e).__name__}: {e}")
        out.append(entry)
    for name, failure in sorted(PLUGINS.failures.items()):
        out.append({"name": name, "origin": failure.split(": ", 1)[0], "error": failure.split(": ", 1)[-1]})
    return out


__all__ = ["ENCODERS", "PLUGIN_ENCODERS", "build_encoder", "encoder_catalog", "encoder_module", "encoder_names",
           "encoder_origin", "FeatureEncoder", "Preprocess", "CheckpointError"]
