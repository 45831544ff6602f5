"""Presets (``--preset NAME``) and the resolution of every option of one run.

A preset is data: ``train/presets/<name>.json``::

    {
      "description": "...",
      "methods":   {"*": {base hyper-parameters}, "<method or family>": {...}},
      "heads":     {"*": {...}, "<head>": {...}},
      "protocols": {"<glob on the protocol name>": {"methods": {...}, "heads": {...}}}
    }

Method options are applied in this order (later wins): the method's dataclass
defaults (the paper's), ``methods["*"]``, ``methods[family]``,
``methods[name]``, then the same from every ``protocols`` entry whose glob
matches the protocol name (in file order), then ``--epochs``, then ``--set``.
``methods["*"]`` may only hold keys every method has (:class:`~train.methods.base.Hparams`);
``heads["*"]`` keys a head does not have are skipped (heads differ in options).

``--set`` keys: a method hyper-parameter (``lr=0.01``) or a head option
prefixed by ``head.`` (``head.d_model=64``). Unknown keys are an error that
lists the valid ones.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
from pathlib import Path
from typing import Any, Mapping

from train.heads.base import OptionError, head_class, head_config, option_names
from train.methods.base import Hparams, method_class, method_hparams

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"


class PresetError(ValueError):
    """An unknown or malformed preset; the message names the file."""


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_preset(name: str | None) -> dict:
    """The preset dict of ``name`` (a name in ``train/presets`` or a path to a .json file); ``{}`` for None/'none'."""
    if not name or name == "none":
        return {}
    path = Path(name) if name.endswith(".json") else PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        raise PresetError(f"unknown preset {name!r}; available: {', '.join(preset_names()) or '(none)'}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PresetError(f"preset file {path}: not valid JSON ({e})") from None
    unknown = set(d) - {"description", "source", "methods", "heads", "protocols"}
    if unknown:
        raise PresetError(f"preset file {path}: unknown top-level keys {sorted(unknown)}")
    d["_path"] = str(path)
    return d


def _layers(preset: Mapping, protocol: str | None) -> list[Mapping]:
    layers = [preset]
    for pattern, sub in (preset.get("protocols") or {}).items():
        if protocol is not None and fnmatch.fnmatchcase(protocol, pattern):
            layers.append(sub)
    return layers


def split_overrides(overrides: Mapping[str, Any] | None) -> tuple[dict, dict]:
    """``--set`` pairs split into (method options, head options without the ``head.`` prefix)."""
    method, head = {}, {}
    for k, v in (overrides or {}).items():
        if k.startswith("head."):
            head[k[5:]] = v
        else:
            method[k] = v
    return method, head


def resolve_options(
    method: str,
    head: str | None = None,
    preset: str | Mapping | None = None,
    protocol: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    epochs: int | None = None,
    strict_head: bool = True,
) -> tuple[Any, str, Any]:
    """(method hyper-parameters, head name, head config) of one run; see the module docstring.

    With ``strict_head=False``, ``head.`` keys this head does not have are ignored
    (a sweep over several heads validates them against all its heads instead).
    """
    cls = method_class(method)
    p = load_preset(preset) if not isinstance(preset, Mapping) else dict(preset)
    where = p.get("_path", "preset")
    head = head or cls.default_head
    hcls = head_class(head)
    m_over, h_over = split_overrides(overrides)
    valid_msg = (f"valid keys for method {method!r}: {', '.join(option_names(cls.Hparams))}; "
                 f"for head {head!r}: {', '.join('head.' + k for k in option_names(hcls.Config))}")
    bad = sorted(set(m_over) - set(option_names(cls.Hparams)))
    if bad:
        raise OptionError(f"--set: unknown key(s) {', '.join(bad)}; {valid_msg}")
    bad = sorted(set(h_over) - set(option_names(hcls.Config)))
    if bad and not strict_head:
        h_over = {k: v for k, v in h_over.items() if k not in bad}
    elif bad:
        raise OptionError(f"--set: unknown key(s) {', '.join('head.' + b for b in bad)}; {valid_msg}")

    base_keys = set(option_names(Hparams))
    method_opts: dict[str, Any] = {}
    head_opts: dict[str, Any] = {}
    for layer in _layers(p, protocol):
        methods = layer.get("methods") or {}
        star = methods.get("*", {})
        extra = sorted(set(star) - base_keys)
        if extra:
            raise PresetError(f"{where}: methods['*'] may only set shared keys; {extra} are not ({sorted(base_keys)})")
        method_opts.update(star)
        for key in (cls.family, method):
            if key and key in methods:
                unknown = sorted(set(methods[key]) - set(option_names(cls.Hparams)))
                if unknown:
                    raise PresetError(f"{where}: methods[{key!r}] has unknown keys {unknown}; {valid_msg}")
                method_opts.update(methods[key])
        heads = layer.get("heads") or {}
        head_fields = set(option_names(hcls.Config))
        head_opts.update({k: v for k, v in heads.get("*", {}).items() if k in head_fields})
        if head in heads:
            unknown = sorted(set(heads[head]) - head_fields)
            if unknown:
                raise PresetError(f"{where}: heads[{head!r}] has unknown keys {unknown}")
            head_opts.update(heads[head])
    if epochs is not None:
        method_opts["epochs"] = epochs
    method_opts.update(m_over)
    head_opts.update(h_over)
    hp = method_hparams(method, method_opts)
    return hp, head, head_config(head, head_opts)


def hparams_dict(hp) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(hp)))
