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

Methods and heads are built-in names, names that installed plugins declare
(entry-point groups ``avcl.methods`` / ``avcl.heads``), or one-off
``path/to/file.py:ClassName`` / ``package.module:ClassName`` references;
``--list`` shows them all. The command line is a thin layer over
:mod:`train.api` (``make_specs`` then ``run_specs``), which scripts can call directly.

``main(argv)`` returns the list of per-run result dicts when given ``argv``
(tests, scripts); as the console script (no argv) it returns the exit status
(0 when no run failed). ``main(["--list"])`` returns the listing's text.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from train.api import SpecError, catalog, format_catalog, make_specs, run_specs
from train.sweep import RunSpec, summary_table

EPILOG = """\
examples:
  avcl-train --cache cache/synth/signal-0123456789ab.zarr --protocol synth-4x3 \\
      --method finetune,ssil,lll,joint --seeds 0,1,2 --preset synth --out runs
  avcl-train --cache audio.zarr --cache visual.zarr --protocol ave-4x7 --method lll \\
      --set feat_kd=false --set head.d_model=128 --out runs
  avcl-train --cache my.zarr --class-order sorted --classes-per-task 5 --memory 200 \\
      --protocol my-4x5 --method ssil --out runs          (bring your own protocol)
  avcl-train ... --scheduler local:4                       (spread runs over 4 processes)
  avcl-train ... --method my_methods.py:MyDistill --set beta=2   (a method from your own file)
  avcl-train --list                     (every method, head, encoder: options, defaults, origin)

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
    p.add_argument("--list", action="store_true",
                   help="list every method, head and encoder (built-in and plugins) with its description, "
                        "hyper-parameters and defaults, and exit")
    p.add_argument("--cache", action="append", metavar="STORE",
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
    # built-in names only in the help: building the parser must not import plugins (--list shows them)
    p.add_argument("--method", action="append",
                   help=f"method(s), repeat or comma-separate: {', '.join(method_names(plugins=False))}, a plugin's "
                        "(see --list), or path/to/file.py:ClassName / package.module:ClassName")
    p.add_argument("--head", action="append",
                   help=f"head(s) (default: the method's): {', '.join(head_names(plugins=False))}, a plugin's, "
                        "or path/to/file.py:ClassName / package.module:ClassName")
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
    p.add_argument("--out", metavar="RUNDIR", help="root of the run directories (required)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no per-task progress lines")
    p.add_argument("--feature-memory", metavar="SIZE",
                   help="memory for the feature streams, e.g. 8G or 512M (default: half the free memory of the "
                        "device); larger streams are read from the store shard by shard while training")
    p.add_argument("--batch-seeds", action="store_true",
                   help="train the seeds of each method as one batched model in this process where that is "
                        "sound (no dropout, no gradient clipping; see train/batched.py); the others run as usual")
    p.add_argument("--amp", choices=["none", "bf16"], default="none",
                   help="bfloat16 autocast of the training step (GPU; recorded in config.json)")
    return p


CliError = SpecError  # arguments that do not describe a runnable sweep (the message says what to do)


def _pairs(items: Sequence[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        if "=" not in item:
            raise CliError(f"{flag} {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out.append((k.strip(), v.strip()))
    return out


def build_specs(args: argparse.Namespace) -> list[RunSpec]:
    """One :class:`RunSpec` per (method, head, seed) through :func:`train.api.make_specs` (the API's code path)."""
    if not args.cache:
        raise CliError("give at least one --cache STORE")
    if not args.method:
        raise CliError("give --method NAME (avcl-train --list shows them)")
    if not args.out:
        raise CliError("give --out RUNDIR (the root of the run directories)")
    return make_specs(
        args.cache, args.method, out=args.out, protocol=args.protocol, seeds=args.seeds, heads=args.head,
        options=_pairs(args.overrides, "--set"), preset=args.preset, epochs=args.epochs,
        streams=dict(_pairs(args.stream, "--stream")) or None, class_order=args.class_order,
        classes_per_task=args.classes_per_task, base=args.base, memory=args.memory, select=args.select,
        device=args.device, force=args.force, resume=args.resume, threads=args.threads, verbose=not args.quiet,
        feature_memory=args.feature_memory, amp=args.amp)


def main(argv: Sequence[str] | None = None):
    """Entry point; see the module docstring for the return value."""
    console = argv is None
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list:
        text = format_catalog(catalog())
        print(text)
        return 0 if console else text
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
    results = run_specs(specs, scheduler=args.scheduler, jobs=args.jobs, batch_seeds=args.batch_seeds)
    print(summary_table(results), file=sys.stdout)
    if console:
        return 1 if any(r["status"] == "failed" for r in results) else 0
    return results


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
