"""Extraction shard tasks on a dask.distributed cluster (``avcl-extract --scheduler``).

One task per pending shard. A task opens the store, claims its shard (so a task on a
shard that is already done, or held by another extractor, does nothing and returns
None), decodes and encodes it with :func:`extract.runner.run_shards` and writes it.
The encoder is built once per worker process and kept in :data:`_ENCODERS`, keyed
by the hash of its key material: from a picklable factory (e.g.
``functools.partial(build_encoder, "vit-b16", checkpoint=..., device="cuda")``), so
each worker loads the weights itself, or else from the submitting process's encoder,
scattered once to every worker. Run one worker per GPU, each seeing its own GPU.

The scheduler is an address (``tcp://host:8786``) or ``local:N``, which starts a
``LocalCluster`` of N worker processes with one thread each for the run.
"""
from __future__ import annotations

import os
import uuid
from typing import Callable, Sequence

from avcl_core.manifest import canonical_hash

#: Encoders built in this (worker) process, by key-material hash.
_ENCODERS: dict = {}


def connect(scheduler: str):
    """``(client, cluster or None)`` for a scheduler address or ``local:N``."""
    from distributed import Client, LocalCluster

    if scheduler.startswith("local:"):
        try:
            n = int(scheduler.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"--scheduler {scheduler!r}: write local:N, N = number of worker processes") from None
        if n < 1:
            raise ValueError(f"--scheduler {scheduler!r}: need at least one worker")
        cluster = LocalCluster(n_workers=n, processes=True, threads_per_worker=1, dashboard_address=None)
        return Client(cluster), cluster
    return Client(scheduler), None


def _encoder(encoder_id: str, source):
    from extract.encoders.base import FeatureEncoder

    enc = _ENCODERS.get(encoder_id)
    if enc is None:
        enc = source if isinstance(source, FeatureEncoder) else source()
        enc.eval()
        _ENCODERS[encoder_id] = enc
    return enc


def shard_task(store_path: str, key: str, shard: int, rows: dict, root: str, encoder_id: str, encoder_source,
               batch_size: int, workers: int, threads: int | None):
    """Extract one shard on a worker; the :class:`~extract.runner.ShardResult`, or None if the
    shard was done or claimed by another writer."""
    from extract.runner import deterministic_torch, encoder_device, open_writable, run_shards

    encoder = _encoder(encoder_id, encoder_source)
    store = open_writable(store_path, key)
    with deterministic_torch(encoder_device(encoder), threads):
        results = run_shards(store, rows, root, encoder, batch_size=batch_size, workers=workers, shards=[shard])
    return results[0] if results else None


def run_on_cluster(
    scheduler: str,
    store,
    manifest,
    root,
    encoder,
    shards: Sequence[int],
    *,
    batch_size: int,
    workers: int,
    threads: int | None,
    encoder_factory: Callable | None = None,
    on_rows: Callable[[int], None] | None = None,
):
    """Run :func:`shard_task` for every shard in ``shards``; ``(results, errors)``.

    A failed task is reported as ``"shard i: <error>"`` in ``errors`` and does not stop
    the others.
    """
    from distributed import as_completed

    client, cluster = connect(scheduler)
    try:
        encoder_id = canonical_hash(encoder.key_material())
        source = encoder_factory if encoder_factory is not None else client.scatter(encoder, broadcast=True)
        run = uuid.uuid4().hex[:8]
        futures = {}
        for i in shards:
            rng = store.shard_rows(i)
            rows = {r: manifest[r] for r in range(rng.start, rng.stop)}
            fut = client.submit(shard_task, store.path, store.key, int(i), rows, str(os.path.abspath(root)), encoder_id,
                                source, batch_size, workers, threads, key=f"avcl-shard-{run}-{i}", pure=False)
            futures[fut] = i
        results, errors = [], []
        for fut in as_completed(list(futures)):
            i = futures[fut]
            try:
                res = fut.result()
            except Exception as e:  # noqa: BLE001 - one failed shard must not lose the others
                errors.append(f"shard {i}: {type(e).__name__}: {e}")
                continue
            if res is not None:
                results.append(res)
                if on_rows is not None:
                    on_rows(res.rows)
        return results, errors
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
