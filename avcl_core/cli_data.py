"""``avcl-data``: list protocols, build and check dataset manifests, render the synth dataset."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from avcl_core.builders import BUILDERS, BuildError, build_manifest, check_manifest
from avcl_core.manifest import SPLITS, Manifest, ManifestError
from avcl_core.protocols import Protocol, ProtocolError, list_protocols, load_protocol


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Datasets and protocols of avcl.

    \b
    Examples:
      avcl-data protocols
      avcl-data show ave-4x7
      avcl-data check --dataset ave --root /data/AVE_Dataset --out manifests/ave.jsonl
      avcl-data synth --out data/synth --classes 12 --clips-per-class 20 --seed 0
    """


def _memory_text(p: Protocol) -> str:
    if p.memory_per_class:
        return f"{p.memory_per_class}/class"
    return str(p.memory)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i < 3 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*r) for r in [header, *rows])


@main.command()
@click.option("--dataset", default=None, help="Only protocols of this dataset (e.g. ave, ks, vs100, avss).")
def protocols(dataset: str | None) -> None:
    """List the shipped protocols.

    Columns: name, dataset, setting, number of classes, task layout (4x7 = 4 tasks
    of 7 classes; 11+6x2 = 11 base classes then 6 tasks of 2), samples listed per
    split (- when the protocol uses every manifest row), memory budget (total
    exemplars, or per class).

    \b
    Example:
      avcl-data protocols --dataset ave
    """
    rows = []
    for name in list_protocols():
        try:
            p = load_protocol(name)
        except ProtocolError as e:
            click.echo(f"warning: {e}", err=True)
            continue
        if dataset and p.dataset != dataset:
            continue
        counts = p.split_counts() or {}
        rows.append([
            p.name, p.dataset, p.setting + (" *" if p.derived else ""), str(p.num_classes), p.task_shape(),
            *[str(counts[s]) if s in counts else "-" for s in SPLITS], _memory_text(p),
        ])
    if not rows:
        known = sorted({load_protocol(n).dataset for n in list_protocols()})
        raise click.ClickException(f"no protocol for dataset {dataset!r}; datasets with protocols: {', '.join(known)}")
    click.echo(_table(rows, ["name", "dataset", "setting", "classes", "tasks", "train", "val", "test", "memory"]))
    if any(r[2].endswith("*") for r in rows):
        click.echo("* derived: class order or stream generated from a recorded seed (see `avcl-data show NAME`)")


@main.command()
@click.argument("protocol")
def show(protocol: str) -> None:
    """Print one protocol: provenance, tasks with their class names, memory.

    PROTOCOL is a shipped name or a path to a protocol .json file.

    \b
    Example:
      avcl-data show s4-11-2-cil
    """
    try:
        p = load_protocol(protocol)
    except ProtocolError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{p.name}: dataset {p.dataset}, {p.kind}, {p.setting}, {p.num_classes} classes, "
               f"tasks {p.task_shape()}, memory {_memory_text(p)}")
    if p.derived:
        click.echo(f"derived (seed {p.seed})")
    click.echo(f"provenance: {p.provenance}")
    counts = p.split_counts()
    if counts:
        click.echo("listed samples: " + "  ".join(f"{s} {n}" for s, n in counts.items()))
    if not p.classes:
        click.echo("classes: taken from the manifest when bound (sorted names permuted by the seed)")
        return
    for t, members in enumerate(p.tasks):
        if p.setting == "task-free":
            click.echo(f"{p.num_tasks} stream chunks of the training clips over class(es): "
                       + ", ".join(p.classes[c] for c in members))
            break
        click.echo(f"task {t}: " + ", ".join(f"{c}:{p.classes[c]}" for c in members))


CHECK_HELP = "\n".join([
    "Build (or check) a manifest against a real dataset folder and report what is usable.",
    "",
    "Prints rows per split, then every kind of problem (missing files, unreadable files, malformed",
    "annotation lines, duplicate ids, ...) with its count and the first examples. Exits 1 only when",
    "no usable row was found (or the annotation file itself is missing).",
    "",
    "\b",
    "Datasets and the root each expects:",
    *(f"  {k:<16} {v[1]}" for k, v in BUILDERS.items()),
    "",
    "\b",
    "Examples:",
    "  avcl-data check --dataset ave --root /data/AVE_Dataset --out ave.jsonl",
    "  avcl-data check --dataset vs100 --root /data/vggsound --protocol vs100-10x10",
    "  avcl-data check --manifest my_clips.csv --root /data/my_clips",
])


@main.command(help=CHECK_HELP)
@click.option("--dataset", type=click.Choice(sorted(BUILDERS)), default=None,
              help="Build the manifest of this dataset from its official files under --root.")
@click.option("--manifest", "manifest_path", type=click.Path(dir_okay=False), default=None,
              help="Check your own manifest file (.jsonl or .csv, schema in manifests/README.md) instead.")
@click.option("--root", type=click.Path(file_okay=False), required=True,
              help="Dataset folder; manifest paths are relative to it.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the manifest of the usable rows here (.jsonl, or .csv).")
@click.option("--protocol", default=None, help="Also report how many of this protocol's listed samples are usable.")
@click.option("--deep", is_flag=True, help="Decode every file (PyAV/Pillow), not just its header: slow.")
@click.option("--examples", default=5, show_default=True, help="Examples shown per problem kind.")
@click.option("--report-json", type=click.Path(dir_okay=False), default=None,
              help="Also write the full report (every problem) as JSON.")
def check(dataset, manifest_path, root, out, protocol, deep, examples, report_json) -> None:
    if (dataset is None) == (manifest_path is None):
        raise click.UsageError("give exactly one of --dataset NAME or --manifest PATH")
    try:
        if dataset is not None:
            manifest, report = build_manifest(dataset, root, deep=deep)
        else:
            manifest, report = check_manifest(Manifest.load(manifest_path), root, deep=deep)
    except (BuildError, ManifestError, ProtocolError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    click.echo(report.format(examples=examples))
    if protocol:
        try:
            p = load_protocol(protocol).bind(manifest) if len(manifest) else load_protocol(protocol)
            _coverage(p, manifest)
        except ProtocolError as e:
            click.echo(f"protocol: {e}", err=True)
    if report_json:
        Path(report_json).parent.mkdir(parents=True, exist_ok=True)
        Path(report_json).write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
    if not report.usable:
        click.echo("error: no usable row — nothing written", err=True)
        sys.exit(1)
    if out:
        path = manifest.save(out)
        click.echo(f"wrote {path} ({len(manifest)} rows, sha256 {manifest.hash()[:12]})")


def _coverage(p: Protocol, manifest: Manifest) -> None:
    parts = []
    for s in SPLITS:
        have = len(p.select(manifest, s)) if len(manifest) and p.classes else 0
        listed = (p.split_counts() or {}).get(s)
        parts.append(f"{s} {have}/{listed}" if listed is not None else f"{s} {have}")
    click.echo(f"protocol {p.name}: usable samples " + "  ".join(parts))


@main.command()
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output folder.")
@click.option("--classes", type=int, default=12, show_default=True, help="Number of classes.")
@click.option("--clips-per-class", type=int, default=20, show_default=True, help="Clips rendered per class.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed: the same seed gives the same files.")
@click.option("--workers", type=int, default=None, help="Worker processes (default: the CPUs available).")
@click.option("--force", is_flag=True, help="Render again even if OUT already holds this exact render.")
@click.option("--multi", type=float, default=0.0, show_default=True,
              help="Fraction of clips with a second sounding object (class-map masks; synth-sem protocols).")
def synth(out, classes, clips_per_class, seed, workers, force, multi) -> None:
    """Render the synthetic audio-visual dataset (mp4 clips, masks, manifest, protocols).

    \b
    Example:
      avcl-data synth --out data/synth --classes 12 --clips-per-class 20 --seed 0
    """
    from avcl_core import synth as synth_mod  # imported here: rendering pulls in PyAV only when asked

    import time

    t0, wall0 = time.perf_counter(), time.time()
    try:
        manifest_path = synth_mod.render(out, classes, clips_per_class, seed, workers, force=force, multi=multi)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if manifest_path.stat().st_mtime < wall0 and not force:
        click.echo(f"already rendered with these parameters: {manifest_path} (--force renders again)")
    else:
        click.echo(f"wrote {classes * clips_per_class} clips and {manifest_path} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
