"""``avcl-extract``: extract frozen-encoder features of a dataset into the feature cache."""
from __future__ import annotations

import functools
import inspect
import json
import logging
import sys
from pathlib import Path

import click

from avcl_core.manifest import Manifest, ManifestError
from avcl_core.paths import default_cache_root

EXAMPLES = """\b
Examples:
  avcl-extract --dataset synth --root data/synth --encoder signal
  avcl-extract --dataset ave --root /data/AVE_Dataset --encoder vit-b16 \\
      --checkpoint vit_base_patch16_224.augreg_in21k/model.safetensors --device cuda
  avcl-extract --dataset synth --root data/synth --encoder pann-cnn14 --variant tiny --random-init
  avcl-extract --manifest my.jsonl --root /data/mine --encoder signal -o frames_per_clip=4
  avcl-extract --dataset vggsound --root /data/vggsound --encoder sam-audio --checkpoint checkpoint.pt \\
      --device cuda -o precision=fp32
  avcl-extract --dataset vggsound --root /data/vggsound --encoder sam-audio \\
      --checkpoint sam-audio-large/checkpoint.pt --device cuda --scheduler tcp://head:8786
  avcl-extract --repair cache/synth/signal-0a1b2c3d4e5f.zarr --shards 3,7
"""


def _parse_options(items: tuple[str, ...]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--option")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def load_manifest(dataset: str | None, root: str, manifest_path: str | None) -> tuple[Manifest, str, str | None]:
    """``(manifest, dataset name, manifest file or None)`` from ``--manifest`` or ``--dataset``.

    ``synth`` (and any dataset without a builder) reads ``<root>/manifest.jsonl``; the
    others are built from the dataset folder by :func:`avcl_core.builders.build_manifest`.
    """
    if manifest_path:
        m = Manifest.load(manifest_path)
        return m, dataset or m.dataset, str(Path(manifest_path).resolve())
    if not dataset:
        raise click.UsageError("give --dataset NAME --root DIR, or --manifest PATH --root DIR")
    from avcl_core.builders import BUILDERS, BuildError, build_manifest

    if dataset in BUILDERS:
        try:
            m, report = build_manifest(dataset, root)
        except BuildError as e:
            raise click.ClickException(str(e)) from None
        if report.problems:
            click.echo(report.format(), err=True)
        return m, dataset, None
    path = Path(root) / "manifest.jsonl"
    if not path.exists():
        raise click.ClickException(
            f"{path}: no manifest for dataset {dataset!r} (datasets with builders: {', '.join(BUILDERS)}; "
            "synth reads <root>/manifest.jsonl, written by `avcl-data synth`)")
    m = Manifest.load(path)
    return m, dataset, str(path.resolve())


def encoder_options(name: str, variant, checkpoint, random_init: bool, seed: int, device: str, extra: dict) -> dict:
    """Keyword options for ``build_encoder(name, ...)``, only those its ``build`` takes."""
    from extract.encoders import encoder_module

    params = inspect.signature(encoder_module(name).build).parameters
    takes_weights = "checkpoint" in params
    opts: dict = {}
    if variant is not None:
        opts["variant"] = variant
    if checkpoint and random_init:
        raise click.UsageError("--checkpoint and --random-init exclude each other")
    if takes_weights:
        if checkpoint:
            opts["checkpoint"] = str(Path(checkpoint).resolve())
        elif random_init:
            opts["random_init_seed"] = seed
        else:
            raise click.UsageError(
                f"{name} needs weights: pass --checkpoint PATH (a local weights file), or --random-init "
                "for random weights (tests and benchmarks only)")
    elif checkpoint:
        raise click.UsageError(f"{name} takes no weights file (--checkpoint)")
    if "device" in params:
        opts["device"] = device
    extra = dict(extra)
    if "precision" in extra:
        opts["amp"] = precision_amp(name, extra.pop("precision"), "amp" in params)
    opts.update(extra)
    return opts


#: ``-o precision=…`` → the encoders' ``amp`` option (autocast dtype on CUDA; none = float32).
PRECISIONS = {"fp32": None, "float32": None, "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
              "float16": "float16"}


def precision_amp(name: str, precision, takes_amp: bool) -> str | None:
    """The ``amp`` option for ``-o precision=P``: ``fp32`` computes in float32 as the upstream
    models do (no autocast; TF32 follows torch's switches, recorded in the key), ``bf16`` /
    ``fp16`` autocast on CUDA. CPU runs are float32 whatever the choice."""
    if not takes_amp:
        raise click.UsageError(f"{name} has no precision option (it computes in float32)")
    if str(precision).lower() not in PRECISIONS:
        raise click.BadParameter(f"precision={precision!r}; choose one of {', '.join(PRECISIONS)}",
                                 param_hint="--option")
    return PRECISIONS[str(precision).lower()]


def _setup_logging(verbose: bool) -> None:
    from tqdm import tqdm

    class _TqdmHandler(logging.Handler):
        def emit(self, record):
            tqdm.write(self.format(record), file=sys.stderr)

    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("avcl.extract")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog=EXAMPLES)
@click.option("--dataset", help="Dataset name (ave, ks, vs100, vggsound, avsbench-s4, …, synth); "
              "the manifest is built from --root, synth reads <root>/manifest.jsonl.")
@click.option("--root", type=click.Path(file_okay=False), help="Dataset folder; manifest paths are relative to it.")
@click.option("--manifest", "manifest_path", type=click.Path(exists=True, dir_okay=False),
              help="Your own manifest (.jsonl/.csv) instead of a dataset builder.")
@click.option("--encoder", help="Encoder: sam-audio, pann-cnn14, vit-b16, signal, or one an installed plugin "
              "declares (entry-point group avcl.encoders; `avcl-train --list` shows them all).")
@click.option("--variant", default=None, help="Encoder variant (e.g. base, tiny).")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), help="Local weights file of the encoder.")
@click.option("--random-init", is_flag=True, help="Random weights (seeded by --seed): for tests and benchmarks.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --random-init weights.")
@click.option("-o", "--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Extra encoder option (repeatable), value parsed as JSON, e.g. -o frames_per_clip=4 -o dense=false; "
                   "-o mask_size=N sets the side of the stored ground-truth masks (segmentation datasets).")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Clips per encoder call.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Decoding processes (0: decode in the encoding process, no overlap).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads while encoding (fix it for bit-identical reruns).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Keep the first N manifest rows. This is another manifest, hence another store key.")
@click.option("--cache-dir", default=None, help="Cache root (default: $AVCL_CACHE or the repository's cache/).")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Run shard tasks on a dask.distributed scheduler (tcp://host:8786), or local:N for a local "
                   "cluster of N worker processes. One worker per GPU.")
@click.option("--rows-per-shard", type=click.IntRange(min=1), default=None,
              help="Rows per shard of a new store (default: shards of about 24 MB).")
@click.option("--repair", "repair_store", type=click.Path(exists=True, file_okay=False), default=None,
              metavar="STORE", help="Re-extract shards of an existing store with the settings it records.")
@click.option("--shards", default=None, help="With --repair: shards to redo, e.g. 3,7 or 2-5 "
              "(default: those that fail verification).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="tqdm progress bar.")
@click.option("-v", "--verbose", is_flag=True, help="Log every shard written.")
def cli(dataset, root, manifest_path, encoder, variant, checkpoint, random_init, seed, options, device, batch_size,
        workers, threads, limit, cache_dir, scheduler, rows_per_shard, repair_store, shards, progress, verbose):
    """Extract features of every clip of a dataset with a frozen encoder into a feature store.

    The store is <cache-dir>/<dataset>/<encoder>-<key12>.zarr, keyed by the encoder's
    weights, options and preprocessing and by the manifest. Rerunning a finished
    extraction does nothing; rerunning an interrupted one redoes only unfinished
    shards; several extractors may work on one store at once. Clips that cannot be
    decoded (missing, unreadable, no audio track, empty) get a status code in the
    store and are listed in the summary; the run goes on.
    """
    from avcl_core.cache import StoreError
    from avcl_core.cli_cache import parse_shards
    from extract.encoders import CheckpointError, build_encoder, encoder_module
    from extract.runner import extract, repair

    _setup_logging(verbose)
    try:
        if repair_store:
            if encoder or dataset or manifest_path:
                raise click.UsageError("--repair takes the store's own settings; drop --dataset/--manifest/--encoder")
            # without --device the recorded device is used: it is part of the key (compute precision)
            summary = repair(repair_store, parse_shards(shards), root=root, device=device, batch_size=batch_size,
                             workers=workers, scheduler=scheduler, progress=progress, threads=threads)
        else:
            if shards:
                raise click.UsageError("--shards goes with --repair STORE")
            if not encoder:
                raise click.UsageError("--encoder is required")
            try:
                encoder_module(encoder)  # a plugin encoder is imported here; its import error is named
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="--encoder") from None
            if not root:
                raise click.UsageError("--root is required (the folder the manifest's paths are relative to)")
            device = device or _default_device()
            manifest, name, source = load_manifest(dataset, root, manifest_path)
            if limit is not None and limit < len(manifest):
                manifest = Manifest.from_rows(manifest.rows[:limit], source=manifest.source)
            extra_opts = _parse_options(options)
            mask_size = extra_opts.pop("mask_size", None)  # a store option (extract.masks), not the encoder's
            opts = encoder_options(encoder, variant, checkpoint, random_init, seed, device, extra_opts)
            try:
                enc = build_encoder(encoder, **opts)
            except TypeError as e:
                raise click.UsageError(f"encoder {encoder}: {e}") from None
            info = {"dataset": name, "root": str(Path(root).resolve()), "manifest": source, "limit": limit,
                    "encoder": encoder, "encoder_options": opts}
            summary = extract(manifest, root, enc, cache_dir or default_cache_root(), batch_size=batch_size,
                              workers=workers, device=device, scheduler=scheduler, progress=progress, dataset=name,
                              rows_per_shard=rows_per_shard, threads=threads, info=info,
                              encoder_factory=functools.partial(build_encoder, encoder, **opts),
                              mask_size=mask_size)
    except (StoreError, ManifestError, CheckpointError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # e.g. the cache disk is full before the first shard
        raise click.ClickException(f"{cache_dir or default_cache_root()}: {e}; run the same command again once "
                                   "fixed (finished shards are kept)") from None
    click.echo(summary.format())
    if summary.task_errors:
        sys.exit(1)
    if summary.all_failed:
        n = sum(summary.store_counts.values()) if summary.already_complete else summary.clips
        click.echo(f"avcl-extract: error: every one of the {n} rows failed; the store has no usable row "
                   "(see the reasons above)", err=True)
        sys.exit(1)
    return summary


def main(argv: list[str] | None = None):
    """Console entry point; ``main([...])`` runs with those arguments."""
    return cli.main(args=argv, prog_name="avcl-extract")


if __name__ == "__main__":
    main()
