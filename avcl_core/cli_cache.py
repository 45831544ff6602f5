"""``avcl-cache``: list, describe, verify, pack/unpack feature stores and import AV-CIL's features.

Every STORE and ROOT may be a local path or an fsspec URL (``file://``,
``memory://``, ``s3://`` and ``gs://`` with ``pip install avcl[remote]``).
"""
from __future__ import annotations

import json
import sys

import click

from .cache import RETRYABLE_CODES, STATUS_OK, FeatureStore, StoreError, find_stores, open_store
from .manifest import ManifestError
from .paths import default_cache_root
from .verify import check_store, corrupt_shards, plan_repair, run_repair

_STORAGE_HELP = "JSON dict of fsspec storage options for URLs, e.g. '{\"anon\": true}'."


def _storage_options(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not JSON ({e.msg})", param_hint="--storage-options") from None
    if not isinstance(opts, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--storage-options")
    return opts


_REMOTE_HINT = "; remote stores need the optional extra: pip install 'avcl[remote]'"


def _open(path: str, storage_options: str | None, **kw) -> FeatureStore:
    try:
        return open_store(path, storage_options=_storage_options(storage_options), **kw)
    except StoreError as e:
        raise click.ClickException(str(e) + (_REMOTE_HINT if "ImportError" in str(e) else "")) from None


def human_bytes(n: int) -> str:
    """``1536`` → ``1.5 KiB``; negative (unknown) → ``?``."""
    if n < 0:
        return "?"
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} TiB"


def row_counts(store: FeatureStore) -> tuple[int, int, int]:
    """(ok, failed, pending) rows: from the counts of a complete store, else from the done-markers."""
    if store.status == "complete" and "counts" in store.attrs:
        counts = store.attrs["counts"]
        ok = int(counts.get("ok", 0))
        pending = int(counts.get("pending", 0))
        return ok, store.n_rows - ok - pending, pending
    ok = failed = done_rows = 0
    for i in store.done_shards():
        m = store.done_marker(i) or {}
        ok += int(m.get("ok", 0))
        failed += len(m.get("failed", []))
        lo, hi = m.get("rows", [0, 0])
        done_rows += hi - lo
    return ok, failed, store.n_rows - done_rows


def describe(store: FeatureStore) -> dict:
    """Everything ``info`` shows: identity, provenance, progress and arrays (JSON-ready)."""
    a = store.attrs
    arrays = {}
    for name in [*store.streams, "status", "valid_len", "labels", "labels_multi", "sample_id"]:
        if name in store.group:
            arr = store.group[name]
            arrays[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "chunks": list(arr.chunks),
                            "shards": list(arr.shards) if arr.shards else None}
    ok, failed, pending = row_counts(store)
    return {
        "path": store.path,
        "key": store.key,
        "status": store.status,
        "dataset": store.dataset,
        "encoder": store.encoder,
        "key_material": store.key_material,
        "schema": a.get("schema"),
        "versions": a.get("versions", {}),
        "host": a.get("host", ""),
        "created": a.get("created", ""),
        "completed": a.get("completed", ""),
        "rows": store.n_rows,
        "rows_ok": ok,
        "rows_failed": failed,
        "rows_pending": pending,
        "counts": a.get("counts", {}),
        "classes": len(a.get("classes") or _manifest_classes(store)),
        "rows_per_shard": store.rows_per_shard,
        "shards": store.n_shards,
        "shards_done": len(store.done_shards()),
        "arrays": arrays,
        "provenance": a.get("provenance"),
        "extract": a.get("extract"),
        "size_bytes": store.size_bytes(),
    }


def _manifest_classes(store: FeatureStore) -> list[str]:
    try:
        m = store.manifest()
    except (ManifestError, OSError):
        return []
    return m.classes() if m is not None else []


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Inspect, check and share feature stores.

    \b
    Example:
      avcl-cache ls
      avcl-cache info cache/ave/audiomae-1a2b3c4d5e6f.zarr
      avcl-cache verify cache/ave/audiomae-1a2b3c4d5e6f.zarr
    """


@main.command("ls")
@click.argument("root", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per store instead of a table.")
@click.option("--storage-options", help=_STORAGE_HELP)
def ls_cmd(root: str | None, as_json: bool, storage_options: str | None) -> None:
    """List every store under a cache ROOT (default: $AVCL_CACHE or the repository's cache/).

    Columns: dataset, encoder, key prefix, rows ok / failed, size on disk, status.

    \b
    Example:
      avcl-cache ls /data/avcl-cache
      avcl-cache ls s3://lab-bucket/avcl-cache
    """
    root = root or default_cache_root()
    try:
        paths = find_stores(root)
    except ImportError as e:
        raise click.ClickException(f"{root}: {e}{_REMOTE_HINT}") from None
    rows = []
    for p in paths:
        try:
            st = open_store(p, allow_incomplete=True, storage_options=_storage_options(storage_options))
            ok, failed, pending = row_counts(st)
            status = st.status if st.status == "complete" else f"{st.status} {len(st.done_shards())}/{st.n_shards} shards"
            rows.append({"path": p, "dataset": st.dataset, "encoder": st.encoder, "key": st.key[:12],
                         "rows_ok": ok, "rows_failed": failed, "rows_pending": pending,
                         "size_bytes": st.size_bytes(), "status": status})
        except Exception as e:  # noqa: BLE001 - one broken store must not hide the others
            rows.append({"path": p, "dataset": "?", "encoder": "?", "key": "?", "rows_ok": 0, "rows_failed": 0,
                         "rows_pending": 0, "size_bytes": -1, "status": f"unreadable ({e})"})
    if as_json:
        for r in rows:
            click.echo(json.dumps(r, sort_keys=True))
        return
    if not rows:
        click.echo(f"no stores under {root}")
        return
    head = ("dataset", "encoder", "key", "ok", "failed", "size", "status", "path")
    table = [head] + [(r["dataset"], r["encoder"], r["key"], str(r["rows_ok"]), str(r["rows_failed"]),
                       human_bytes(r["size_bytes"]), r["status"], r["path"]) for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(head) - 1)]
    for t in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(t, widths)) + "  " + t[-1])


@main.command("info")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
@click.option("--failures", is_flag=True, help="List every failed row: sample id, status and reason.")
@click.option("--storage-options", help=_STORAGE_HELP)
def info_cmd(store: str, as_json: bool, failures: bool, storage_options: str | None) -> None:
    """Show a STORE's key material, provenance and arrays (shapes, dtypes, chunking).

    \b
    Example:
      avcl-cache info cache/ave/videomae-0f1e2d3c4b5a.zarr --json
      avcl-cache info --failures cache/vggsound/vit-b16-0a1b2c3d4e5f.zarr
    """
    st = _open(store, storage_options, allow_incomplete=True)
    if failures:
        from .cache import STATUS_NAMES

        rows = st.failures()
        if as_json:
            click.echo(json.dumps(rows, indent=2, sort_keys=True))
            return
        for f in rows:
            click.echo(f"{f['sample_id']}\t{STATUS_NAMES.get(f['code'], f['code'])}\t{f['reason']}")
        click.echo(f"{len(rows)} failed rows in {st.path}", err=True)
        return
    d = describe(st)
    if as_json:
        click.echo(json.dumps(d, indent=2, sort_keys=True))
        return
    click.echo(f"store     {d['path']}")
    click.echo(f"key       {d['key']}")
    click.echo(f"status    {d['status']}  ({d['shards_done']}/{d['shards']} shards done)")
    click.echo(f"dataset   {d['dataset']}  ({d['rows']} rows, {d['classes']} classes)")
    click.echo(f"rows      {d['rows_ok']} ok, {d['rows_failed']} failed, {d['rows_pending']} pending"
               + (f"  {d['counts']}" if d["counts"] else ""))
    click.echo(f"size      {human_bytes(d['size_bytes'])}")
    click.echo(f"created   {d['created']} on {d['host']}" + (f"; completed {d['completed']}" if d["completed"] else ""))
    click.echo("versions  " + ", ".join(f"{k} {v}" for k, v in sorted(d["versions"].items())))
    click.echo("key material:")
    for line in json.dumps(d["key_material"], indent=2, sort_keys=True).splitlines():
        click.echo(f"  {line}")
    for section in ("provenance", "extract"):
        if d[section]:
            click.echo(f"{section}:")
            for line in json.dumps(d[section], indent=2, sort_keys=True).splitlines():
                click.echo(f"  {line}")
    click.echo("arrays:")
    for name, a in d["arrays"].items():
        shards = f" shards {tuple(a['shards'])}" if a["shards"] else ""
        click.echo(f"  {name:<13} {str(tuple(a['shape'])):<22} {a['dtype']:<14} chunks {tuple(a['chunks'])}{shards}")


def parse_shards(text: str | None) -> list[int] | None:
    """Shard numbers of a ``--shards`` value such as ``3,7`` or ``2-5`` (None when empty);
    :class:`click.BadParameter` naming the value otherwise."""
    if not text:
        return None
    out: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",")):
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise click.BadParameter(f"{text!r}: write shard numbers like 3,7 or 2-5", param_hint="--shards") from None
    return out


@main.command("unclaim")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--shards", default=None, help="Shards whose claims to remove, e.g. 3,7 or 2-5 (default: every claim).")
def unclaim_cmd(store: str, shards: str | None) -> None:
    """Remove the claims on shards of STORE, whoever holds them, so that a rerun redoes those shards.

    A claim tells other extractors that a writer is working on a shard. Claims of
    writers that died are taken over on their own once stale (their heartbeat is
    older than their lease, or their process is gone on this host); this clears
    them at once, e.g. after a cluster was torn down. Each claim is listed with its
    host, pid, heartbeat age and whether it still looked live: removing a live
    writer's claim lets a second writer redo its shard (same bytes, wasted work).

    \b
    Example:
      avcl-cache unclaim cache/vggsound/vit-b16-0a1b2c3d4e5f.zarr
      avcl-cache unclaim cache/vggsound/vit-b16-0a1b2c3d4e5f.zarr --shards 3,7
    """
    import zarr

    st = _open(store, None, allow_incomplete=True)
    st = FeatureStore(st.path, zarr.open_group(st.path, mode="r+"), writable=True)
    removed = st.unclaim(parse_shards(shards))
    if not removed:
        click.echo(f"{st.path}: no claim" + (f" on shards {shards}" if shards else "") + " to remove")
        return
    for i, (holder, age, state) in sorted(removed.items()):
        who = f"{holder.get('host', '?')} pid {holder.get('pid', '?')}" if holder else "an empty claim"
        click.echo(f"removed claim on shard {i}: {who}, heartbeat {age:.0f} s ago ({state})")
    live = [i for i, (_, _, state) in removed.items() if state == "live"]
    if live:
        click.echo(f"note: shards {','.join(map(str, sorted(live)))} looked live; if their writer is still running it "
                   "finishes them too (same bytes)", err=True)
    click.echo(f"{len(removed)} claims removed; run the same avcl-extract command again to finish the store")


@main.command("verify")
@click.argument("store")
@click.option("--repair", is_flag=True,
              help="Re-extract the corrupt shards with `avcl-extract --repair` (needs the videos on this machine).")
@click.option("--storage-options", help=_STORAGE_HELP)
def verify_cmd(store: str, repair: bool, storage_options: str | None) -> None:
    """Re-read every chunk of STORE and check checksums, shapes and its key; exit 1 on any problem.

    Each corrupt shard is named with the array at fault. Rows the encoder failed
    on (a transient error such as running out of device memory) are counted. With
    --repair, the corrupt shards and those rows' shards are re-extracted from the videos by
    `avcl-extract --repair STORE --shards i,j` (settings from the store's
    attributes), then the store is checked again.

    \b
    Example:
      avcl-cache verify cache/ave/audiomae-1a2b3c4d5e6f.zarr
      avcl-cache verify --repair cache/synth/signal-0a1b2c3d4e5f.zarr
    """
    st = _open(store, storage_options, allow_incomplete=True)
    problems = _report(st)
    retry = st.retryable_shards()
    if retry:
        n = sum(1 for i in retry for f in st.done_marker(i).get("failed", []) if f.get("code") in RETRYABLE_CODES)
        click.echo(f"{n} rows in shards {','.join(map(str, retry))} failed to encode (e.g. out of device memory); "
                   + ("--repair retries them" if not repair else "retrying them"))
    if not problems and not (repair and retry):
        return
    if not repair:
        sys.exit(1)
    shards = sorted(set(corrupt_shards(problems)) | set(retry))
    try:
        plan = plan_repair(st, shards)
        click.echo(f"re-extracting shards {','.join(map(str, shards))}: {' '.join(plan.command)}")
        run_repair(plan)
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    click.echo("checking again after the repair")
    if _report(_open(store, storage_options, allow_incomplete=True)):
        sys.exit(1)


def _report(st: FeatureStore) -> list:
    click.echo(f"verifying {st.path} (key {st.key[:12]}…, {st.status}, {st.n_shards} shards)")
    problems = check_store(st)
    if not problems:
        ok = int((st.row_status() == STATUS_OK).sum())
        click.echo(f"ok: {st.n_shards} shards, {st.n_rows} rows ({ok} ok), every chunk verified")
        if st.status != "complete":
            click.echo(f"note: the store is {st.status}")
        return []
    for shard, reason in problems:
        where = f"shard {shard} (rows {st.shard_rows(shard).start}-{st.shard_rows(shard).stop - 1})" if shard >= 0 \
            else "store"
        click.echo(f"CORRUPT {where}: {reason}", err=True)
    shards = corrupt_shards(problems)
    parts = [f"corrupt shards {','.join(map(str, shards))}"] if shards else []
    whole = sum(1 for i, _ in problems if i < 0)
    if whole:
        parts.append(f"{whole} whole-array or attribute problem{'s' * (whole > 1)} (not repairable by shard)")
    click.echo(f"{st.path}: FAILED: " + "; ".join(parts), err=True)
    return problems


@main.command("pack")
@click.argument("store")
@click.argument("out", type=click.Path())
@click.option("--no-verify", is_flag=True, help="Skip checking every chunk before packing.")
@click.option("--storage-options", help=_STORAGE_HELP)
def pack_cmd(store: str, out: str, no_verify: bool, storage_options: str | None) -> None:
    """Pack a complete STORE into one uncompressed tar file OUT (a file, or a directory for the default name).

    The default name is <dataset>-<encoder>-<key12>.tar; the archive starts
    with AVCL-PACK.json holding the full key and key material.

    \b
    Example:
      avcl-cache pack cache/ave/audiomae-1a2b3c4d5e6f.zarr /tmp/
      # → /tmp/ave-audiomae-1a2b3c4d5e6f.tar
    """
    from .archive import pack_store

    try:
        res = pack_store(store, out, check=not no_verify, storage_options=_storage_options(storage_options))
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"packed {store} (key {res.key[:12]}…, {res.files} files, {human_bytes(res.bytes)}) → {res.archive}")


@main.command("unpack")
@click.argument("archive", type=click.Path(exists=True, dir_okay=False))
@click.argument("root", required=False)
@click.option("--no-verify", is_flag=True, help="Skip checking every chunk after unpacking.")
def unpack_cmd(archive: str, root: str | None, no_verify: bool) -> None:
    """Unpack ARCHIVE (from `avcl-cache pack`) into cache ROOT (default: $AVCL_CACHE or cache/).

    The key is recomputed from the archived key material and must match; a
    different store already at the destination is never overwritten; every
    chunk is verified before the store appears under its final name.

    \b
    Example:
      avcl-cache unpack ave-audiomae-1a2b3c4d5e6f.tar /data/avcl-cache
    """
    from .archive import unpack_store

    root = root or default_cache_root()
    try:
        res = unpack_store(archive, root, check=not no_verify)
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    if res.already_present:
        click.echo(f"{res.store}: already holds this store (key {res.key[:12]}…); nothing to do")
    else:
        click.echo(f"unpacked {archive} → {res.store} (key {res.key[:12]}…, {res.files} files, verified)")


@main.command("import-avcil")
@click.option("--protocol", required=True,
              help="Protocol whose split lists give the rows: a name (ave-4x7, ks-5x6, vs100-10x10) or a JSON file.")
@click.option("--audio", "audio", type=click.Path(exists=True, dir_okay=False),
              help="audio_pretrained_feature_dict.npy (pickled dict id → 768-d AudioMAE vector), or .h5.")
@click.option("--visual", "visual", type=click.Path(exists=True, dir_okay=False),
              help="visual_features.h5 (one dataset per id) or visual_pretrained_feature_dict.npy (pickled).")
@click.option("--from", "from_dir", type=click.Path(exists=True, file_okay=False),
              help="A directory laid out as AV-CIL released it; finds the audio and visual files in it.")
@click.option("--root", help="Cache root to write to (default: $AVCL_CACHE or the repository's cache/).")
@click.option("--dataset", type=click.Choice(["ave", "ks", "vs100"]), help="Dataset name (default: the protocol's).")
@click.option("--dense", is_flag=True, help="Also store the VideoMAE tokens as visual_dense (8, 196, 768): ~2.4 MB/clip.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow unpickling .npy/.pkl feature files (unpickling runs code from the file: trusted files only).")
@click.option("--rows-per-shard", type=int, help="Rows per shard (default: planned for ~24 MB shards).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def import_avcil_cmd(protocol, audio, visual, from_dir, root, dataset, dense, trust_pickle, rows_per_shard, quiet):
    """Convert the feature files released with AV-CIL into complete stores (audiomae / videomae).

    Rows are the protocol's published sample ids; ids missing from a file are
    kept with status missing-file ("not in released features") and listed.

    \b
    Example:
      avcl-cache import-avcil --protocol ave-4x7 --trust-pickle \\
          --audio AVE/audio_pretrained_feature/audio_pretrained_feature_dict.npy \\
          --visual AVE/visual_pretrained_feature/visual_pretrained_feature_dict.npy
      avcl-cache import-avcil --protocol ks-5x6 --from kinetics-sounds/ --trust-pickle
    """
    from .avcil_import import AvcilImportError, find_release_files, import_avcil
    from .protocols import ProtocolError

    if from_dir:
        found = find_release_files(from_dir)
        audio = audio or found.get("audio")
        visual = visual or found.get("visual")
        if not audio and not visual:
            raise click.ClickException(f"{from_dir}: holds neither audio_pretrained_feature_dict.npy nor "
                                       "visual_features.h5 / visual_pretrained_feature_dict.npy")
    if not audio and not visual:
        raise click.UsageError("give --audio and/or --visual (or --from DIR)")
    try:
        results = import_avcil(protocol, audio=audio, visual=visual, cache_root=root or default_cache_root(),
                               dataset=dataset, dense=dense, trust_pickle=trust_pickle,
                               rows_per_shard=rows_per_shard, progress=not quiet)
    except (AvcilImportError, StoreError, ProtocolError, ManifestError) as e:
        raise click.ClickException(str(e)) from None
    for role, r in results.items():
        state = "already present" if r.already_present else "imported"
        click.echo(f"{role}: {state} {r.path} (key {r.key[:12]}…): {r.ok}/{r.rows} rows ok, "
                   f"{len(r.missing)} not in released features, {len(r.bad)} unusable")
        if r.missing:
            shown = ", ".join(r.missing[:20]) + (" …" if len(r.missing) > 20 else "")
            click.echo(f"  not in released features: {shown}")
        for sid, reason in r.bad[:20]:
            click.echo(f"  unusable {sid}: {reason}")


if __name__ == "__main__":  # pragma: no cover
    main()
