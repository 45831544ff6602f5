"""``avcl-train``: class-incremental training from feature stores.

Example (12-class synth data, two methods, three seeds)::

    avcl-train --cache cache/synth/signal-0123456789ab.zarr --protocol synth-4x3 \\
        --method finetune --method lll --seeds 0,1,2 --preset synth --out runs

Each run (method x head x seed) writes ``RUNDIR/<protocol>/<method>[-<head>]/seed<k>/``:
``config.json``, ``acc_matrix.csv``, ``metrics.json``, ``log.jsonl``,
``ckpt_task<t>.pt``. A finished run with the same configuration is skipped
(``--force`` retrains); ``--resume`` continues an interrupted run from its last
task checkpoint. A one-screen summary (mean accuracy / average forgetting per
method and seed) is printed at the end.

``main(argv)`` returns the list of per-run result dicts when given ``argv``
(tests, scripts); as the console script (no argv) it returns the exit status
(0 when no run failed).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Sequence

from train.sweep import RunSpec, protocol_name, run_sweep, summary_table

EPILOG = """\
examples:
  avcl-train --cache cache/synth/signal-0123456789ab.zarr --protocol synth-4x3 \\
      --method finetune,ssil,lll,joint --seeds 0,1,2 --preset synth --out runs
  avcl-train --cache audio.zarr --cache visual.zarr --protocol ave-4x7 --method lll \\
      --set feat_kd=false --set head.d_model=128 --out runs
  avcl-train --cache my.zarr --class-order sorted --classes-per-task 5 --memory 200 \\
      --protocol my-4x5 --method ssil --out runs          (bring your own protocol)
  avcl-train ... --scheduler local:4                       (spread runs over 4 processes)

--set keys are the method's hyper-parameters (e.g. lr, epochs, lambda_kd) or head
options prefixed by 'head.' (e.g. head.d_model); an unknown key is an error that
lists the valid ones. Presets: see train/presets/*.json (--preset av-cil, synth).
"""


def _parser() -> argparse.ArgumentParser:
    from train.heads import head_names
    from train.methods import method_names
    from train.methods.presets import preset_names

    p = argparse.ArgumentParser(
        prog="avcl-train", description="Train class-incremental audio-visual classifiers from feature stores.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", action="append", required=True, metavar="STORE",
                   help="feature store (path or fsspec URL); repeat to take streams from several stores "
                        "(matched by sample_id); STORE@KEY requires that key (prefix)")
    p.add_argument("--stream", action="append", default=[], metavar="NAME=STORE_STREAM",
                   help="map a head input to a store stream, e.g. visual=visual_dense (default audio=audio, visual=visual)")
    p.add_argument("--protocol", help="protocol name (manifests/protocols) or .json file; with --class-order: "
                                      "the name of the new protocol")
    p.add_argument("--class-order", help="bring your own protocol: 'sorted', a file, names (a,b,c or a|b|c) or class ids")
    p.add_argument("--classes-per-task", type=int, help="with --class-order: classes per task")
    p.add_argument("--base", type=int, help="with --class-order: classes of the first task (default: classes per task)")
    p.add_argument("--memory", type=int, help="total exemplar budget (overrides the protocol's)")
    p.add_argument("--method", action="append", required=True,
                   help=f"method(s), repeat or comma-separate: {', '.join(method_names())}")
    p.add_argument("--head", action="append", help=f"head(s) (default: the method's): {', '.join(head_names())}")
    p.add_argument("--seeds", default="0", help="seeds, e.g. 0,1,2 or 0-4 (default 0)")
    p.add_argument("--epochs", type=int, help="epochs per task for every method (overrides preset and defaults)")
    p.add_argument("--set", action="append", default=[], metavar="K=V", dest="overrides",
                   help="set a hyper-parameter (method key or head.key); repeatable")
    p.add_argument("--preset", help=f"option preset: {', '.join(preset_names())} (default: the papers' settings)")
    p.add_argument("--select", choices=["last", "val-seen"], default="last",
                   help="model selection per task: last epoch (default) or best val accuracy on all seen classes "
                        "(AV-CIL's; uses old-class val data, flagged in config.json)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--scheduler", metavar="ADDRESS", help="dask.distributed scheduler address, or local:N")
    p.add_argument("--jobs", type=int, default=1, help="local worker processes when no --scheduler (default 1: in-process)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per run (default: 1 for small heads, more for large ones, "
                        "at most cores / parallel runs); runs repeat bit-exactly for the same count, "
                        "recorded in config.json as torch_threads")
    p.add_argument("--resume", action="store_true", help="continue interrupted runs from their last task checkpoint")
    p.add_argument("--force", action="store_true", help="retrain runs that are already done")
    p.add_argument("--out", required=True, metavar="RUNDIR", help="root of the run directories")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-task progress lines")
    return p


class CliError(ValueError):
    pass


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise CliError(f"--seeds {text!r}: expected integers like 0,1,2 or 0-4") from None
    if not out:
        raise CliError("--seeds: no seed given")
    return list(dict.fromkeys(out))


def _pairs(items: Sequence[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        if "=" not in item:
            raise CliError(f"{flag} {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out.append((k.strip(), v.strip()))
    return out


def _split_list(values: Sequence[str] | None) -> list[str]:
    return [x.strip() for v in values or [] for x in v.split(",") if x.strip()]


def _check_own_protocol(spec: RunSpec) -> None:
    """Resolve a bring-your-own protocol against the first store's manifest (cheap: no features read)."""
    from avcl_core.cache import open_store
    from train.features import _manifest_from_arrays, load_store_manifest
    from train.sweep import resolve_protocol_for

    store = open_store(spec.caches[0], key=spec.keys[0] if spec.keys else None)
    manifest = load_store_manifest(store) or _manifest_from_arrays(store)
    resolve_protocol_for(spec, manifest)


def build_specs(args: argparse.Namespace) -> list[RunSpec]:
    """One :class:`RunSpec` per (method, head, seed); names, stores, protocol and options checked first."""
    from avcl_core.cache import open_store
    from avcl_core.protocols import ProtocolError
    from train.heads import head_names
    from train.heads.base import OptionError, head_class, option_names
    from train.methods import method_class, method_names
    from train.methods.presets import load_preset, resolve_options, split_overrides

    methods = _split_list(args.method)
    bad = [m for m in methods if m not in method_names()]
    if bad:
        raise CliError(f"unknown method(s) {bad}; available: {', '.join(method_names())}")
    heads = _split_list(args.head) or [None]
    bad = [h for h in heads if h is not None and h not in head_names()]
    if bad:
        raise CliError(f"unknown head(s) {bad}; available: {', '.join(head_names())}")
    if args.class_order is None and not args.protocol:
        raise CliError("give --protocol NAME, or --class-order with --classes-per-task (bring your own protocol)")
    if args.class_order is not None and not args.classes_per_task:
        raise CliError("--class-order needs --classes-per-task")
    caches, keys = [], []
    for c in args.cache:
        path, key = c, None
        if "@" in c:
            left, tail = c.rsplit("@", 1)
            if re.fullmatch(r"[0-9a-f]{6,64}", tail):
                path, key = left, tail
        caches.append(path if "://" in path else str(Path(path).resolve()))
        keys.append(key)
    overrides = tuple(_pairs(args.overrides, "--set"))
    streams = tuple(_pairs(args.stream, "--stream")) or None
    load_preset(args.preset)  # fail early on an unknown preset
    for path, key in zip(caches, keys):
        open_store(path, key=key)  # fail early on a missing, incomplete or mismatched store
    if "avcil" in methods:  # dense visual tokens: refuse before loading streams that would not fit
        from train.methods.avcil import check_dense_memory

        check_dense_memory(caches, dict(streams) if streams else None, args.device)
    seeds = _seeds(args.seeds)
    protocol = args.protocol
    if protocol and args.class_order is None and (protocol.endswith((".json", ".json.gz")) or "/" in protocol):
        protocol = str(Path(protocol).resolve())  # workers may run elsewhere
    specs = [
        RunSpec(caches=tuple(caches), keys=tuple(keys) if any(keys) else None, streams=streams, method=m, head=h,
                seed=s, out=str(Path(args.out).resolve()), protocol=protocol, class_order=args.class_order,
                classes_per_task=args.classes_per_task, memory=args.memory, base=args.base, preset=args.preset,
                overrides=overrides, epochs=args.epochs, select=args.select, device=args.device, force=args.force,
                resume=args.resume, threads=args.threads, verbose=not args.quiet)
        for m in methods for h in heads for s in seeds
    ]
    # validate names, protocol, presets and --set keys before any training starts
    try:
        proto = protocol_name(specs[0])
        if args.class_order is not None:
            _check_own_protocol(specs[0])
    except ProtocolError as e:
        raise CliError(str(e)) from None
    _, head_keys = split_overrides(dict(overrides))
    # a head key must be valid for some head of the sweep (methods may bring different default heads)
    used = list(dict.fromkeys(h or method_class(m).default_head for m in methods for h in heads))
    valid = {k for h in used for k in option_names(head_class(h).Config)}
    bad = sorted(set(head_keys) - valid)
    if bad:
        raise OptionError(f"--set: unknown key(s) {', '.join('head.' + b for b in bad)}; valid head keys for "
                          f"{', '.join(used)}: {', '.join('head.' + k for k in sorted(valid))}")
    for m in methods:
        for h in heads:
            resolve_options(m, h, args.preset, proto, dict(overrides), args.epochs, strict_head=False)
    return specs


def main(argv: Sequence[str] | None = None):
    """Entry point; see the module docstring for the return value."""
    console = argv is None
    parser = _parser()
    args = parser.parse_args(argv)
    from avcl_core.cache import StoreError
    from train.features import FeatureSetError
    from train.heads.base import OptionError
    from train.methods.presets import PresetError

    try:
        specs = build_specs(args)
    except (CliError, OptionError, PresetError, StoreError, FeatureSetError) as e:
        if console:
            parser.exit(2, f"avcl-train: error: {e}\n")
        raise
    results = run_sweep(specs, scheduler=args.scheduler, jobs=args.jobs)
    print(summary_table(results), file=sys.stdout)
    if console:
        return 1 if any(r["status"] == "failed" for r in results) else 0
    return results


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
