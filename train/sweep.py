"""Runs of (method x head x seed) and the executors that spread them.

:func:`run_one` is the unit of work: it resolves one :class:`RunSpec` into a
FeatureSet, protocol, method and head, writes ``config.json`` into the run's own
directory, trains, and returns a plain result dict. It never raises: a failed run
writes its traceback to ``<run dir>/error.txt`` and returns ``status='failed'``,
so the other runs of a sweep finish.

Executors (:func:`run_sweep`): in-process and sequential (default); local
processes (``jobs > 1``); or a dask.distributed cluster (``scheduler`` = an
address, or ``local:N`` for a LocalCluster of N single-threaded worker
processes). Each run directory is written by exactly one task, because every
spec has its own directory and specs are deduplicated.

Run directory: ``<out>/<protocol>/<method>[-<head>]/seed<k>/`` (the head is
named only when it is not the method's default head).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import socket
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

log = logging.getLogger("avcl.train")

class RunRefused(RuntimeError):
    """A finished run of another configuration is in the run directory."""


# FeatureSets already loaded in this process, reused by the runs of a sweep
_FEATURE_SETS: dict[tuple, Any] = {}


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs; picklable, so it can travel to a worker process."""

    caches: tuple[str, ...]
    method: str
    seed: int
    out: str
    protocol: str | None = None
    class_order: str | None = None
    classes_per_task: int | None = None
    memory: int | None = None
    base: int | None = None
    head: str | None = None
    keys: tuple[str | None, ...] | None = None
    streams: tuple[tuple[str, str], ...] | None = None
    preset: str | None = None
    overrides: tuple[tuple[str, str], ...] = ()
    epochs: int | None = None
    select: str = "last"
    device: str = "auto"
    force: bool = False
    resume: bool = False
    threads: int = 0  # torch threads; 0 = auto_threads
    parallel: int = 1  # runs sharing this machine's cores at once
    verbose: bool = False
    # ("method" | "head", "/abs/file.py:Class" or "module:Class") to load before the run, so
    # that a worker process knows the one-off classes the sweep was given
    plugins: tuple[tuple[str, str], ...] = ()
    feature_memory: str | None = None  # FeatureSet memory budget (size text); None: half the free memory
    amp: str = "none"  # 'bf16': bfloat16 autocast of the training step


# -- helpers ---------------------------------------------------------------------------
def git_hash() -> str | None:
    """Commit of the code that runs (``git rev-parse HEAD`` beside this file), or None."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def canonical_hash(obj: Any) -> str:
    from avcl_core.manifest import canonical_hash as ch

    return ch(obj)


def protocol_name(spec: RunSpec) -> str:
    """Name of the protocol a spec runs (cheap: reads no feature store)."""
    if spec.class_order is not None:
        return spec.protocol or "custom"
    from avcl_core.protocols import load_protocol

    return load_protocol(spec.protocol).name


def run_label(method: str, head: str | None) -> str:
    """``<method>`` or ``<method>-<head>`` when the head is not the method's default."""
    from train.methods import method_class

    default = method_class(method).default_head
    return method if head in (None, default) else f"{method}-{head}"


def run_dir(spec: RunSpec, proto_name: str | None = None) -> Path:
    return Path(spec.out) / (proto_name or protocol_name(spec)) / run_label(spec.method, spec.head) / f"seed{spec.seed}"


#: Streams of a segmentation run when ``--stream`` gives none: the dense visual tokens.
SEG_STREAMS = (("visual", "visual_dense"),)


def protocol_kind(spec: RunSpec) -> str:
    """``classification`` or ``segmentation`` (cheap: reads no feature store)."""
    if spec.class_order is not None:
        return "classification"
    from avcl_core.protocols import load_protocol

    return load_protocol(spec.protocol).kind


def load_features(spec: RunSpec, device, default_streams=None):
    from train.features import FeatureSet

    streams = spec.streams or default_streams
    key = (spec.caches, spec.keys, streams, str(device), spec.feature_memory)
    if key not in _FEATURE_SETS:
        _FEATURE_SETS.clear()  # keep one set in memory per process
        _FEATURE_SETS[key] = FeatureSet.from_stores(
            list(spec.caches), streams=dict(streams) if streams else None, device=device,
            keys=list(spec.keys) if spec.keys else None, memory_budget=spec.feature_memory)
    return _FEATURE_SETS[key]


def load_plugins(spec: RunSpec) -> None:
    """Load (once per process) the ``file.py:Class`` / ``module:Class`` references the spec names."""
    from train.heads.base import resolve_head
    from train.methods.base import resolve_method

    for kind, ref in spec.plugins:
        (resolve_method if kind == "method" else resolve_head)(ref)


def resolve_protocol_for(spec: RunSpec, manifest):
    from avcl_core.protocols import resolve_protocol

    return resolve_protocol(spec.protocol, manifest=manifest, class_order=spec.class_order,
                            classes_per_task=spec.classes_per_task, memory=spec.memory or 0, base=spec.base)


def build_config(spec: RunSpec, fs, protocol, hp, head: str, head_cfg) -> dict:
    """The run's ``config.json``; ``config_hash`` covers everything that changes the results."""
    from train.heads.base import head_origin, options_dict
    from train.methods.base import method_origin
    from train.methods.presets import hparams_dict

    identity = {
        "method": spec.method,
        "head": head,
        "head_config": options_dict(head_cfg),
        "hparams": hparams_dict(hp),
        "seed": spec.seed,
        "select": spec.select,
        "protocol": protocol.name,
        "protocol_info": {
            "dataset": protocol.dataset,
            "setting": protocol.setting,
            "classes": list(protocol.classes),
            "tasks": [list(t) for t in protocol.tasks],
            "memory": protocol.memory,
            "memory_per_class": protocol.memory_per_class,
            "splits": protocol.split_counts(),
        },
        "caches": [{"key": s.key, "streams": s.streams} for s in fs.sources],
    }
    # only where they change the results, so that earlier runs keep their hashes
    if fs.shuffle_blocks is not None:
        identity["epoch_order"] = {"block_rows": fs.block_rows, "shuffle_blocks": fs.shuffle_blocks}
    if spec.amp != "none":
        identity["amp"] = spec.amp
    cfg = dict(identity)
    cfg.update({
        "config_hash": canonical_hash(identity),
        "classes_per_task": [len(t) for t in protocol.tasks],
        "class_order": [protocol.classes[c] for t in protocol.tasks for c in t],
        "leaks_old_class_val": spec.select == "val-seen",
        "preset": spec.preset,
        "overrides": dict(spec.overrides),
        "epochs_override": spec.epochs,
        "cache_paths": [s.as_dict() for s in fs.sources],
        "excluded_rows": fs.excluded,
        "n_rows": len(fs),
        "features": fs.order_info(),
        "feature_memory": spec.feature_memory,
        "amp": spec.amp,
        "device": spec.device,
        "git": git_hash(),
        "host": socket.gethostname(),
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "protocol_provenance": protocol.provenance,
        "origins": {"method": method_origin(spec.method), "head": head_origin(head)},  # built-in or which plugin
    })
    if spec.select == "val-seen":
        cfg["select_note"] = ("model selection on the val split of all seen classes uses old-class "
                              "data beyond the exemplar memory (AV-CIL's protocol)")
    return cfg


def _configure_logging(verbose: bool) -> None:
    root = logging.getLogger("avcl")
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(h)
    root.setLevel(logging.INFO if verbose else logging.WARNING)


WORK_PER_THREAD = 2_000_000


def auto_threads(fs, hp, head_cfg, parallel: int = 1) -> int:
    """torch threads for one run: one per ``WORK_PER_THREAD`` units of per-step work, at most
    cores // parallel runs.

    Work = samples per step x tokens per sample x head width. Small heads (the
    synth demo: ~1e5) run fastest on one thread, where thread synchronisation
    would cost more than it saves; real features (~1e7 and up) use every core.
    """
    tokens = sum(t for t, _ in fs.dims.values())
    width = getattr(head_cfg, "d_model", 256)
    work = (hp.batch_size + hp.exemplar_batch_size) * tokens * width
    cores = max(1, (os.cpu_count() or 1) // max(1, parallel))
    return int(min(cores, max(1, work // WORK_PER_THREAD)))


# -- the unit of work ------------------------------------------------------------------
def prepare_trainer(spec: RunSpec, result: dict):
    """The :class:`~train.trainer.Trainer` of ``spec`` with its run directory and ``config.json`` ready,
    or None when the run is already done (``result`` updated to ``skipped``). Fills ``result``'s
    ``protocol``, ``run_dir`` and ``head``; raises on any error (:func:`run_one` catches)."""
    import torch

    from train.methods import build_method, method_class
    from train.methods.presets import resolve_options
    from train.trainer import Trainer, _device

    load_plugins(spec)
    proto_name = protocol_name(spec)
    result["protocol"] = proto_name
    rdir = run_dir(spec, proto_name)
    result["run_dir"] = str(rdir)
    device = _device(spec.device)
    kind = protocol_kind(spec)
    seg = kind in ("segmentation", "semantic")
    fs = load_features(spec, device, SEG_STREAMS if seg else None)
    protocol = resolve_protocol_for(spec, fs.manifest).bind(fs.manifest)
    if spec.memory is not None and spec.class_order is None:
        protocol = dataclasses.replace(protocol, memory=int(spec.memory), memory_per_class=0)
    head_name = spec.head or (method_class(spec.method).default_seg_head if seg else None)
    hp, head, head_cfg = resolve_options(spec.method, head_name, spec.preset, protocol.name,
                                         dict(spec.overrides), spec.epochs, strict_head=False)
    result["head"] = head if spec.head is not None or not seg else None  # labelled as its run directory
    torch.set_num_threads(spec.threads or auto_threads(fs, hp, head_cfg, spec.parallel))
    cfg = build_config(spec, fs, protocol, hp, head, head_cfg)
    # Float sums differ with the thread count, so runs repeat bit-exactly for the same
    # count; it is recorded (outside the config hash, which says what is trained).
    cfg["torch_threads"] = torch.get_num_threads()
    if seg:
        cfg.update(problem=kind, primary_metric="miou" if kind == "semantic" else "map")
    cfg_path, met_path = rdir / "config.json", rdir / "metrics.json"
    if met_path.is_file() and not spec.force:
        old = _read_json(cfg_path)
        if old.get("config_hash") == cfg["config_hash"]:
            result.update(status="skipped", metrics=_read_json(met_path), message="already done")
            return None
        raise RunRefused(
            f"{rdir} holds a finished run with a different configuration "
            f"(config_hash {str(old.get('config_hash'))[:12]} vs {cfg['config_hash'][:12]}); "
            "pass --force to overwrite it or choose another --out")
    resume = spec.resume and not spec.force
    if rdir.exists() and not resume:
        for p in list(rdir.glob("ckpt_task*.pt")) + [rdir / n for n in
                                                      ("log.jsonl", "acc_matrix.csv", "metrics.json", "error.txt")]:
            if p.is_file():
                p.unlink()
    rdir.mkdir(parents=True, exist_ok=True)
    (rdir / "error.txt").unlink(missing_ok=True)
    tmp = rdir / "config.json.tmp"
    tmp.write_text(json.dumps(cfg, indent=2))
    tmp.replace(cfg_path)
    method = build_method(spec.method, hp)
    label = f"[{proto_name} {run_label(spec.method, spec.head)} seed{spec.seed}] "
    trainer = Trainer(fs, protocol, method, head=head, head_config=head_cfg, seed=spec.seed,
                      select=spec.select, device=device, run_dir=rdir, config_hash=cfg["config_hash"],
                      progress=lambda msg: log.info(label + msg),
                      progress_bar=spec.verbose and spec.parallel == 1, amp=spec.amp)
    trainer.progress_label = label.strip()
    return trainer


def run_one(spec: RunSpec) -> dict:
    """Train one (method, head, seed) run; never raises (see the module docstring)."""
    _configure_logging(spec.verbose)
    result: dict[str, Any] = {"method": spec.method, "head": spec.head, "seed": spec.seed, "status": "failed",
                              "run_dir": None, "protocol": spec.protocol}
    try:
        trainer = prepare_trainer(spec, result)
        if trainer is None:
            return result
        resume = spec.resume and not spec.force
        res = trainer.fit(resume=resume)
        result.update(status="ok", metrics=res.metrics, acc_matrix=res.acc_matrix.tolist(),
                      seconds=round(res.seconds, 3), resumed_from=res.resumed_from)
    except RunRefused as e:  # the finished run stays as it is, without an error.txt
        result.update(status="failed", error=str(e))
    except Exception as e:  # noqa: BLE001 - one failed run must not stop a sweep
        tb = traceback.format_exc()
        result.update(status="failed", error=f"{type(e).__name__}: {e}")
        rdir = Path(result["run_dir"]) if result.get("run_dir") else None
        if rdir is not None:
            try:
                rdir.mkdir(parents=True, exist_ok=True)
                (rdir / "error.txt").write_text(tb)
                result["error_file"] = str(rdir / "error.txt")
            except OSError:
                pass
        result["traceback"] = tb
    return result


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# -- executors -------------------------------------------------------------------------------
def run_sweep(specs: Sequence[RunSpec], scheduler: str | None = None, jobs: int = 1,
              batch_seeds: bool = False) -> list[dict]:
    """Run every spec; results in spec order. See the module docstring for the executors.

    ``batch_seeds``: the seeds of each (method, head) configuration train as one
    batched model in this process where that is sound (:mod:`train.batched`),
    the other runs as usual."""
    # each run directory is written by exactly one task: one spec per (out, protocol, run label, seed)
    unique: dict[tuple, RunSpec] = {}
    for s in specs:
        key = (s.out, s.protocol, s.class_order, run_label(s.method, s.head), s.seed)
        unique.setdefault(key, s)
    specs = list(unique.values())
    if batch_seeds:
        from train.batched import run_seed_groups

        return run_seed_groups(specs, lambda rest: run_sweep(rest, scheduler=scheduler, jobs=jobs))
    if scheduler:
        return _run_dask(specs, scheduler)
    if jobs <= 1 or len(specs) <= 1:
        return [run_one(s) for s in specs]
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    specs = [dataclasses.replace(s, parallel=min(jobs, len(specs))) for s in specs]
    out: list[dict] = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as ex:
        futures = [ex.submit(run_one, s) for s in specs]
        for s, f in zip(specs, futures):
            out.append(_collect(s, f.result))
    return out


def _collect(spec: RunSpec, get) -> dict:
    try:
        return get()
    except Exception as e:  # noqa: BLE001 - the worker itself died
        tb = traceback.format_exc()
        res = {"method": spec.method, "head": spec.head, "seed": spec.seed, "status": "failed",
               "error": f"worker failed: {type(e).__name__}: {e}", "traceback": tb}
        try:
            d = run_dir(spec)
            d.mkdir(parents=True, exist_ok=True)
            (d / "error.txt").write_text(tb)
            res["run_dir"] = str(d)
        except Exception:  # noqa: BLE001
            pass
        return res


def _run_dask(specs: list[RunSpec], scheduler: str) -> list[dict]:
    from distributed import Client, LocalCluster

    cluster = None
    if scheduler.startswith("local"):
        n = int(scheduler.split(":", 1)[1]) if ":" in scheduler else (os.cpu_count() or 1)
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
        parallel = n
    else:
        client = Client(scheduler)
        parallel = 1  # remote workers: each machine's own cores
    try:
        specs2 = [dataclasses.replace(s, parallel=parallel) for s in specs]
        futures = client.map(run_one, specs2, pure=False)
        return [_collect(s, f.result) for s, f in zip(specs, futures)]
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# -- summary ---------------------------------------------------------------------------------
def summary_table(results: Iterable[dict]) -> str:
    """One screen: per protocol, rows = method[-head], columns = seeds, cells 'mean acc / avg forgetting' (%)."""
    results = list(results)
    lines: list[str] = []
    by_proto: dict[str, list[dict]] = {}
    for r in results:
        by_proto.setdefault(str(r.get("protocol")), []).append(r)
    for proto, rs in by_proto.items():
        seeds = sorted({r["seed"] for r in rs})
        labels = list(dict.fromkeys(run_label(r["method"], r.get("head")) if _known(r["method"]) else r["method"]
                                    for r in rs))
        head = ["run"] + [f"seed{s}" for s in seeds] + ["mean ± std"]
        rows = []
        for lab in labels:
            cells, accs, forgs = [], [], []
            for s in seeds:
                match = [r for r in rs if r["seed"] == s and
                         (run_label(r["method"], r.get("head")) if _known(r["method"]) else r["method"]) == lab]
                if not match:
                    cells.append("")
                    continue
                r = match[0]
                if r["status"] == "failed":
                    cells.append("FAILED")
                    continue
                m = r.get("metrics") or {}
                # metrics read back from metrics.json hold null where a metric is undefined
                a, f = (100 * v if v is not None else np.nan
                        for v in (m.get("mean_accuracy"), m.get("average_forgetting")))
                accs.append(a)
                forgs.append(f)
                cells.append(f"{a:5.1f} / {f:5.1f}" + ("*" if r["status"] == "skipped" else ""))
            if accs:
                sd = (lambda v: np.std(v, ddof=1) if len(v) > 1 else 0.0)
                fin = [v for v in forgs if np.isfinite(v)]
                f_mean = np.mean(fin) if fin else np.nan
                cells.append(f"{np.mean(accs):5.1f}±{sd(accs):.1f} / {f_mean:5.1f}±{sd(fin):.1f}")
            else:
                cells.append("")
            rows.append([lab] + cells)
        widths = [max(len(str(x[i])) for x in [head] + rows) for i in range(len(head))]
        lines.append(f"protocol {proto}: mean accuracy / average forgetting (%)  (* = already done, skipped)")
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        for row in rows:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    failed = [r for r in results if r["status"] == "failed"]
    for r in failed:
        where = r.get("error_file") or r.get("run_dir") or ""
        lines.append(f"FAILED {r['method']} seed{r['seed']}: {r.get('error')} {('(' + where + ')') if where else ''}")
    return "\n".join(lines)


def _known(method: str) -> bool:
    from train.methods import METHODS

    return method in METHODS  # registered already (this process ran it); no plugin import for a label
