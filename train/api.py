"""Python API of stage 2, for notebooks and scripts: the code path of ``avcl-train``.

Example::

    from train import api

    fs = api.load_features(["cache/synth/signal-0123456789ab.zarr"])    # a FeatureSet, in memory
    run = api.run(fs, "lll", protocol="synth-4x3", seed=0, options={"lambda_kd": 2.0},
                  preset="synth", out="runs")
    run.acc_matrix          # (T, T) numpy array, A[t, i] = accuracy on task i after task t
    run.metrics             # mean_accuracy, average_forgetting, ... (as in metrics.json)
    run.run_dir             # runs/synth-4x3/lll/seed0 (config.json, acc_matrix.csv, ...)

    runs = api.sweep(fs, ["finetune", "lll", "my_methods.py:MyDistill"], protocol="synth-4x3",
                     seeds=[0, 1, 2], preset="synth", out="runs", jobs=2)
    print(api.summary(runs))

``avcl-train`` parses its command line into the keyword arguments of :func:`make_specs`
and calls :func:`run_specs`; :func:`run` and :func:`sweep` do the same, so a run started
here writes the same run directory (and is skipped, resumed or refused the same way) as
the command line with the same options. Methods and heads are names, entry-point
plugin names, or ``path/to/file.py:Class`` / ``package.module:Class`` references
(:mod:`avcl_core.plugins`); ``options`` are ``--set`` pairs (``{"lr": 0.01,
"head.d_model": 64}``).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from train.sweep import RunSpec, protocol_name, run_sweep, summary_table


class SpecError(ValueError):
    """Arguments that do not describe a runnable sweep (unknown name, missing protocol, bad seeds);
    the message says which and what to do. Raised before any training starts."""


@dataclass
class Run:
    """The outcome of one (method, head, seed) run.

    ``status`` is ``ok`` (trained now), ``skipped`` (the run directory already held this
    finished configuration; its metrics are read back) or ``failed`` (``error`` says why;
    ``<run_dir>/error.txt`` holds the traceback when the run got as far as its directory).
    ``acc_matrix[t, i]`` is the accuracy on task ``i`` after training task ``t`` (``None``
    for a skipped or failed run: read ``run_dir/acc_matrix.csv``); ``metrics`` is the
    run's ``metrics.json`` (``mean_accuracy``, ``average_forgetting``, ``step_acc``, ...).
    """

    method: str
    head: str | None
    seed: int
    protocol: str | None
    status: str
    run_dir: Path | None
    metrics: dict = field(default_factory=dict)
    acc_matrix: np.ndarray | None = None
    seconds: float | None = None
    error: str | None = None
    raw: dict = field(default_factory=dict, repr=False)  # the result dict of train.sweep.run_one

    @property
    def ok(self) -> bool:
        """True for a run trained now or found finished (``ok`` or ``skipped``)."""
        return self.status in ("ok", "skipped")

    @classmethod
    def from_result(cls, r: Mapping[str, Any]) -> "Run":
        acc = r.get("acc_matrix")
        return cls(method=r["method"], head=r.get("head"), seed=int(r["seed"]), protocol=r.get("protocol"),
                   status=r["status"], run_dir=Path(r["run_dir"]) if r.get("run_dir") else None,
                   metrics=dict(r.get("metrics") or {}), acc_matrix=None if acc is None else np.asarray(acc),
                   seconds=r.get("seconds"), error=r.get("error"), raw=dict(r))


class RunFailed(RuntimeError):
    """Raised by :func:`run` when its run fails; ``.run`` is the :class:`Run` (with ``error`` and ``run_dir``)."""

    def __init__(self, run: Run) -> None:
        where = f" (traceback in {run.run_dir / 'error.txt'})" if run.run_dir else ""
        super().__init__(f"{run.method} seed{run.seed}: {run.error}{where}")
        self.run = run


# -- features ------------------------------------------------------------------------------------
def load_features(stores: str | Sequence[str], streams: Mapping[str, str] | None = None,
                  keys: Sequence[str | None] | None = None, device: str = "auto"):
    """A :class:`~train.features.FeatureSet` of ``stores`` (paths or fsspec URLs), as ``avcl-train --cache``
    loads it: each stream from the first store that has it, rows matched by sample id.

    ``streams`` maps head inputs to store streams (``{"visual": "visual_dense"}``, as ``--stream``);
    ``keys[i]`` is a key (prefix) store ``i`` must have; ``device`` is ``auto`` (cuda when present),
    ``cpu`` or ``cuda``. Passing the FeatureSet to :func:`run` / :func:`sweep` trains on it
    without loading the stores again.
    """
    from train.sweep import load_features as _load
    from train.trainer import _device

    caches, keys = _stores(stores, keys)
    spec = RunSpec(caches=caches, keys=keys, streams=tuple((streams or {}).items()) or None, method="finetune",
                   seed=0, out="", device=device)
    return _load(spec, _device(device))


def _stores(stores: str | Sequence[str], keys: Sequence[str | None] | None = None
            ) -> tuple[tuple[str, ...], tuple[str | None, ...] | None]:
    """Store paths made absolute (workers may run elsewhere); ``STORE@KEY`` splits off a key (prefix)."""
    if isinstance(stores, (str, Path)):
        stores = [str(stores)]
    if not stores:
        raise SpecError("no feature store given (pass at least one store path)")
    caches, found = [], []
    for c in map(str, stores):
        path, key = c, None
        if "@" in c:
            left, tail = c.rsplit("@", 1)
            if re.fullmatch(r"[0-9a-f]{6,64}", tail):
                path, key = left, tail
        caches.append(path if "://" in path else str(Path(path).resolve()))
        found.append(key)
    if keys is not None:
        if len(keys) != len(caches):
            raise SpecError(f"{len(keys)} keys for {len(caches)} stores")
        found = [k or f for k, f in zip(keys, found)]
    return tuple(caches), (tuple(found) if any(found) else None)


def _from_feature_set(fs, device: str) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...], str]:
    """Stores, stream map and device that rebuild ``fs``; it is put in the sweep's cache under
    that description, so in-process runs use it as it is (worker processes load it again)."""
    from train import sweep as S

    caches = tuple(s.path for s in fs.sources)
    streams = tuple((name, store_stream) for s in fs.sources for name, store_stream in s.streams.items())
    dev = "cuda" if fs.device.type == "cuda" else "cpu"
    if device not in ("auto", dev):
        raise SpecError(f"the FeatureSet is on {fs.device} but device={device!r} was asked for")
    S._FEATURE_SETS.clear()
    S._FEATURE_SETS[(caches, None, streams, str(fs.device), None)] = fs  # sweep.load_features' key
    return caches, streams, dev


# -- specs -----------------------------------------------------------------------------------------
def _names(values: str | Sequence[str] | None) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [x.strip() for v in values for x in str(v).split(",") if x.strip()]


def _option_text(value: Any) -> str:
    """An option value as ``--set`` would write it (run configs record the text)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def parse_seeds(seeds: int | str | Iterable[int]) -> list[int]:
    """Seeds from ``3``, ``"0,1,2"``, ``"0-4"`` or an iterable of ints; duplicates dropped, order kept."""
    if isinstance(seeds, int):
        return [seeds]
    out: list[int] = []
    if isinstance(seeds, str):
        try:
            for part in seeds.split(","):
                part = part.strip()
                if not part:
                    continue
                if "-" in part[1:]:
                    lo, hi = part.split("-", 1)
                    out.extend(range(int(lo), int(hi) + 1))
                else:
                    out.append(int(part))
        except ValueError:
            raise SpecError(f"--seeds {seeds!r}: expected integers like 0,1,2 or 0-4") from None
    else:
        out = [int(s) for s in seeds]
    if not out:
        raise SpecError("--seeds: no seed given")
    return list(dict.fromkeys(out))


def _check_own_protocol(spec: RunSpec) -> None:
    """Resolve a bring-your-own protocol against the first store's manifest (cheap: no features read)."""
    from avcl_core.cache import open_store
    from train.features import _manifest_from_arrays, load_store_manifest
    from train.sweep import resolve_protocol_for

    store = open_store(spec.caches[0], key=spec.keys[0] if spec.keys else None)
    manifest = load_store_manifest(store) or _manifest_from_arrays(store)
    resolve_protocol_for(spec, manifest)


def make_specs(stores, methods: str | Sequence[str], *, out: str | Path, protocol: str | None = None,
               seeds: int | str | Iterable[int] = 0, heads: str | Sequence[str] | None = None,
               options: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None, preset: str | None = None,
               epochs: int | None = None, streams: Mapping[str, str] | None = None,
               class_order: str | None = None, classes_per_task: int | None = None, base: int | None = None,
               memory: int | None = None, select: str = "last", device: str = "auto", force: bool = False,
               resume: bool = False, threads: int = 0, verbose: bool = False,
               feature_memory: str | None = None, amp: str = "none") -> list[RunSpec]:
    """One :class:`~train.sweep.RunSpec` per (method, head, seed), every name and option checked first.

    ``stores``: a store path (or fsspec URL, ``PATH@KEY`` to require a key prefix), a list of
    them, or a FeatureSet from :func:`load_features`. ``methods`` / ``heads``: names (a list,
    or comma-separated), entry-point plugin names, or ``file.py:Class`` / ``module:Class``
    references, which are loaded here and recorded in the specs so that worker processes
    load them too. ``heads=None`` trains each method's default head. ``options``: ``--set``
    pairs (method hyper-parameters, ``head.``-prefixed head options; values may be strings).
    ``protocol``: a protocol name (shipped, or in an ``AVCL_PROTOCOLS`` folder) or a file; or,
    with ``class_order`` + ``classes_per_task`` (+ ``base``), the name of a new protocol over
    the first store's manifest. ``feature_memory``: the FeatureSet's memory budget (size text,
    e.g. ``"8G"``; larger streams are streamed from the store). The other arguments are those of
    ``avcl-train``.

    Raises :class:`SpecError`, :class:`~train.heads.base.OptionError`,
    :class:`~train.methods.presets.PresetError` or a store error before anything is trained.
    """
    from avcl_core.cache import open_store
    from avcl_core.plugins import is_reference, reference_key
    from avcl_core.protocols import ProtocolError
    from train.features import FeatureSet
    from train.heads.base import REGISTRY as HEAD_REGISTRY
    from train.heads.base import HeadError, OptionError, head_class, option_names
    from train.methods.base import REGISTRY as METHOD_REGISTRY
    from train.methods.base import MethodError, method_class
    from train.methods.presets import load_preset, resolve_options, split_overrides

    plugins: list[tuple[str, str]] = []

    def resolve(kind: str, names: list[str]) -> list[str]:
        registry = METHOD_REGISTRY if kind == "method" else HEAD_REGISTRY
        out, unknown = [], []
        for n in names:
            try:
                out.append(registry.resolve(n))
            except (MethodError, HeadError) as e:
                if is_reference(n) or registry.plugins.failure(n):
                    raise SpecError(str(e)) from None  # names the file or plugin and its error
                unknown.append(n)
            if is_reference(n):
                plugins.append((kind, reference_key(n)))
        if unknown:
            raise SpecError(f"unknown {kind}(s) {unknown}; available: {', '.join(registry.names())} "
                            "(or path/to/file.py:ClassName, package.module:ClassName)")
        return out

    method_list = resolve("method", _names(methods))
    if not method_list:
        raise SpecError("no method given")
    head_list: list[str | None] = list(resolve("head", _names(heads))) or [None]
    if class_order is None and not protocol:
        raise SpecError("give --protocol NAME, or --class-order with --classes-per-task (bring your own protocol)")
    if class_order is not None and not classes_per_task:
        raise SpecError("--class-order needs --classes-per-task")
    if isinstance(stores, FeatureSet):
        caches, stream_pairs, device = _from_feature_set(stores, device)
        keys = None
    else:
        caches, keys = _stores(stores)
        stream_pairs = tuple((streams or {}).items()) or None
    if isinstance(options, Mapping):
        options = list(options.items())
    overrides = tuple((str(k), _option_text(v)) for k, v in (options or ()))
    load_preset(preset)  # fail early on an unknown preset
    if feature_memory is not None:
        from train.features import parse_size

        parse_size(feature_memory)  # fail early on a malformed size
    for path, key in zip(caches, keys or [None] * len(caches)):
        open_store(path, key=key)  # fail early on a missing, incomplete or mismatched store
    if "avcil" in method_list:  # dense visual tokens: refuse before loading streams that would not fit
        from train.methods.avcil import check_dense_memory

        check_dense_memory(list(caches), dict(stream_pairs) if stream_pairs else None, device,
                           feature_memory=feature_memory)
    seed_list = parse_seeds(seeds)
    if protocol and class_order is None and (str(protocol).endswith((".json", ".json.gz")) or "/" in str(protocol)):
        protocol = str(Path(protocol).resolve())  # workers may run elsewhere
    specs = [
        RunSpec(caches=caches, keys=keys, streams=stream_pairs, method=m, head=h, seed=s,
                out=str(Path(out).resolve()), protocol=protocol, class_order=class_order,
                classes_per_task=classes_per_task, memory=memory, base=base, preset=preset, overrides=overrides,
                epochs=epochs, select=select, device=device, force=force, resume=resume, threads=threads,
                verbose=verbose, plugins=tuple(dict.fromkeys(plugins)), feature_memory=feature_memory, amp=amp)
        for m in method_list for h in head_list for s in seed_list
    ]
    # validate the protocol, presets and --set keys before any training starts
    try:
        proto = protocol_name(specs[0])
        if class_order is not None:
            _check_own_protocol(specs[0])
    except ProtocolError as e:
        raise SpecError(str(e)) from None
    _, head_keys = split_overrides(dict(overrides))
    # a head key must be valid for some head of the sweep (methods may bring different default heads)
    used = list(dict.fromkeys(h or method_class(m).default_head for m in method_list for h in head_list))
    valid = {k for h in used for k in option_names(head_class(h).Config)}
    bad = sorted(set(head_keys) - valid)
    if bad:
        raise OptionError(f"--set: unknown key(s) {', '.join('head.' + b for b in bad)}; valid head keys for "
                          f"{', '.join(used)}: {', '.join('head.' + k for k in sorted(valid))}")
    for m in method_list:
        for h in head_list:
            resolve_options(m, h, preset, proto, dict(overrides), epochs, strict_head=False)
    return specs


def run_specs(specs: Sequence[RunSpec], jobs: int = 1, scheduler: str | None = None,
              batch_seeds: bool = False) -> list[dict]:
    """Run the specs (in this process; in ``jobs`` local processes; or on a dask ``scheduler``
    address / ``local:N``) and return :func:`train.sweep.run_one`'s result dicts in spec order.
    ``batch_seeds``: train the seeds of a configuration as one batched model where that is sound
    (:mod:`train.batched`)."""
    return run_sweep(list(specs), scheduler=scheduler, jobs=jobs, batch_seeds=batch_seeds)


# -- one call --------------------------------------------------------------------------------------
def sweep(stores, methods: str | Sequence[str], *, out: str | Path, seeds: int | str | Iterable[int] = 0,
          jobs: int = 1, scheduler: str | None = None, **kwargs) -> list[Run]:
    """Train every (method, head, seed) and return one :class:`Run` each, in that order.

    Arguments as :func:`make_specs` (``protocol``, ``heads``, ``options``, ``preset``, ``epochs``,
    ...); ``jobs`` / ``scheduler`` as ``avcl-train --jobs`` / ``--scheduler``. A failed run is
    returned with ``status='failed'`` and the others still run (as on the command line).
    """
    specs = make_specs(stores, methods, out=out, seeds=seeds, **kwargs)
    return [Run.from_result(r) for r in run_specs(specs, jobs=jobs, scheduler=scheduler)]


def run(stores, method: str, *, out: str | Path, protocol: str | None = None, seed: int = 0,
        head: str | None = None, options: Mapping[str, Any] | None = None, **kwargs) -> Run:
    """Train one method (one head, one seed) in this process and return its :class:`Run`.

    ``stores``, ``method``, ``head``, ``options`` and the other keyword arguments are those of
    :func:`make_specs`. Raises :class:`RunFailed` when the run fails (the error is also in
    ``<run_dir>/error.txt``); a run already finished with the same configuration is not
    trained again (``status='skipped'``, ``force=True`` retrains).
    """
    specs = make_specs(stores, method, out=out, protocol=protocol, seeds=seed, heads=head, options=options, **kwargs)
    if len(specs) != 1:
        raise SpecError(f"run() trains one method with one head; got {len(specs)} runs (use sweep())")
    result = Run.from_result(run_specs(specs)[0])
    if not result.ok:
        raise RunFailed(result)
    return result


def summary(runs: Iterable[Run | Mapping]) -> str:
    """The table ``avcl-train`` prints at the end: mean accuracy / average forgetting (%) per run and seed."""
    return summary_table([r.raw if isinstance(r, Run) else r for r in runs])


# -- what is available -------------------------------------------------------------------------------
def _description(cls) -> str:
    import sys

    from avcl_core.plugins import first_line

    doc = cls.__dict__.get("__doc__") or getattr(sys.modules.get(cls.__module__), "__doc__", None)
    return first_line(doc)


def _defaults(dc) -> dict[str, Any]:
    return {f.name: (f.default if f.default is not dataclasses.MISSING else
                     f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            for f in dataclasses.fields(dc)}


def catalog(encoders: bool = True) -> dict[str, list[dict]]:
    """Every method, head and (with ``encoders``) encoder, with what a listing shows.

    ``{"methods": [...], "heads": [...], "encoders": [...], "failed": [...]}``; a method entry
    has ``name``, ``origin`` (``built-in``, ``plugin <dist> <version> (<module:attr>)``, ``file
    <path>``, ``module <name>``), ``description`` (the class docstring's first line, else its
    module's), ``default_head``, ``replay`` and ``hparams`` (the method's own hyper-parameters
    and the shared ones whose default it changes, ``{name: default}``); a head entry has
    ``streams`` and ``options``; an encoder entry has ``options`` (``build`` keywords). Plugins
    that failed to load are in ``failed`` (``kind``, ``name``, ``error``), not in the lists.
    """
    from train.heads.base import HEADS, REGISTRY as HEAD_REGISTRY, head_names
    from train.methods.base import METHODS, Hparams, REGISTRY as METHOD_REGISTRY, method_names

    shared = _defaults(Hparams)
    for reg in (METHOD_REGISTRY, HEAD_REGISTRY):
        reg.plugins.load_all(warn=False)  # failures are listed below, not warned about
    methods = []
    for name in method_names(plugins=False):
        cls = METHODS[name]
        own = {k: v for k, v in _defaults(cls.Hparams).items() if k not in shared or shared[k] != v}
        methods.append({"name": name, "origin": METHOD_REGISTRY.origin(name), "description": _description(cls),
                        "default_head": cls.default_head, "replay": cls.replay, "hparams": own})
    heads = []
    for name in head_names(plugins=False):
        cls = HEADS[name]
        heads.append({"name": name, "origin": HEAD_REGISTRY.origin(name), "description": _description(cls),
                      "streams": list(cls.streams), "options": _defaults(cls.Config)})
    failed = [{"kind": kind, "name": n, "error": err}
              for kind, reg in (("method", METHOD_REGISTRY), ("head", HEAD_REGISTRY))
              for n, err in sorted(reg.plugins.failures.items())]
    out = {"methods": methods, "heads": heads, "encoders": [], "failed": failed, "shared_hparams": shared}
    if encoders:
        # Listing is the one place that shows stage 1's registry next to stage 2's; training
        # itself never imports extract.
        from extract.encoders import encoder_catalog

        for e in encoder_catalog():
            if "error" in e and "options" not in e:
                failed.append({"kind": "encoder", "name": e["name"], "error": f"{e['origin']}: {e['error']}"})
            else:
                out["encoders"].append(e)
    return out


def _fmt_values(d: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items()) or "(none)"


def format_catalog(cat: Mapping[str, list]) -> str:
    """The text of ``avcl-train --list``."""
    lines = ["methods (--method NAME; --set KEY=VALUE sets a hyper-parameter):"]
    for m in cat["methods"]:
        lines.append(f"  {m['name']}  [{m['origin']}]  {m['description']}")
        lines.append(f"      default head {m['default_head']}, replay {m['replay']}; {_fmt_values(m['hparams'])}")
    lines.append("  shared by every method: " + _fmt_values(cat.get("shared_hparams", {})))
    lines.append("heads (--head NAME; --set head.KEY=VALUE sets an option):")
    for h in cat["heads"]:
        lines.append(f"  {h['name']}  [{h['origin']}]  {h['description']}")
        lines.append(f"      streams {', '.join(h['streams']) or '-'}; {_fmt_values(h['options'])}")
    if cat.get("encoders"):
        lines.append("encoders (avcl-extract --encoder NAME; -o KEY=VALUE sets an option):")
        for e in cat["encoders"]:
            lines.append(f"  {e['name']}  [{e['origin']}]  {e.get('description', '')}")
            lines.append(f"      {_fmt_values(e.get('options', {}))}")
    if cat.get("failed"):
        lines.append("plugins that failed to load (their names are unavailable; everything else works):")
        for f in cat["failed"]:
            lines.append(f"  {f['kind']} {f['name']}: {f['error']}")
    lines.append("Also: --method path/to/file.py:ClassName or package.module:ClassName (same for --head).")
    return "\n".join(lines)


__all__ = ["Run", "RunFailed", "SpecError", "catalog", "format_catalog", "load_features", "make_specs",
           "parse_seeds", "run", "run_specs", "summary", "sweep"]
