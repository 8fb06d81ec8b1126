"""Ray Data ingest of wsss shard folders: reading (``read_shards``) and the training input pipeline
(``train_dataset``: read -> decode + augmentation in ``map_batches`` on CPU workers).

Readers (``reader=``), all over exactly the shard files listed in the folder's manifest (never its side files):

- ``"parquet"``: ``ray.data.read_parquet`` through Ray 2.60's default DataSource V2 path (ListFiles -> ReadFiles);
- ``"parquet-v1"``: the same call with ``DataContext.use_datasource_v2 = False`` (the ParquetDatasource V1 path);
- ``"items"``: the older hand-made reader (``from_items`` over the paths + a ``map_batches`` that calls
  ``pyarrow.parquet.read_table``), one read task per file.

``"auto"`` (``DEFAULT_READER``) is ``"parquet-v1"`` on every kind of storage. bench/bench_ingest.py measured the
readers side by side (table in bench/results/ingest.md): the V1 path was the fastest locally and from S3, the
hand-made reader was not faster than it, and the V2 path pays a fixed cost on every execution (every epoch): its
listing starts a pool of FooterReader actors (32 by default) and kills it afterwards, 10-25 s on the 2-core
development machine whatever the data size. When a later Ray drops the V1 flag, ``parquet-v1`` reads through V2.

Files are shuffled per execution (i.e. per training epoch) with ``FileShuffleConfig(seed)``, whose seed Ray derives
from (seed, execution index); with ``ExecutionOptions(preserve_order=True)`` (``ingest_options``) the blocks reach
the consumers in file order and Ray Train's ``streaming_split`` hands them out greedily by row count, so a seeded run
gives every rank the same rows in the same order each time.

Augmentation randomness: :class:`DecodeAugment` seeds a numpy Generator per row from (seed, crc32(id), the row's
``ray.data.expressions.random`` draw). That column is reseeded by Ray per execution, so an image is augmented
differently every epoch and identically in a rerun; the random draws depend on the read task and block index,
which a seeded, order-preserving read fixes.
"""
from __future__ import annotations

import math
import os
import zlib

import numpy as np

__all__ = ["READERS", "DEFAULT_READER", "AUG_SEED_COLUMN", "shard_paths", "read_shards", "DecodeAugment",
           "decode_augment", "train_dataset", "ingest_options", "TrainCollate", "take_good"]

READERS = ("parquet", "parquet-v1", "items")
DEFAULT_READER = "parquet-v1"
AUG_SEED_COLUMN = "_aug"  # per-row random draw (float64 in [0, 1)) from ray.data.expressions.random
# Ray 2.60's V2 Parquet listing reads file footers on a pool of FooterReader actors that it starts and kills on
# every execution: RAY_DATA_PARQUET_FOOTER_NUM_ACTORS of them (default 32), FOOTER_BATCH_SIZE files each (10).
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
_RAY_FOOTER_ACTORS = 32
_FOOTER_BATCH = 10
_SHARD_COLUMNS = ("id", "image", "labels", "mask", "width", "height")


def shard_paths(uri: str) -> tuple[object, list[str]]:
    """(pyarrow filesystem, filesystem paths) of the shard files listed in the manifest of ``uri``, in order.
    Raises ValueError when the manifest lists none."""
    from cluster.storage import pyarrow_fs
    from wsss.data import shards

    files = shards.shard_files(uri)
    if not files:
        raise ValueError(f"{uri}: the shard manifest lists no shard files")
    fs, _ = pyarrow_fs(uri)
    return fs, [pyarrow_fs(f)[1] for f in files]


class _ReadShardFiles:
    """map_batches function of the ``items`` reader: a batch of shard paths -> the rows of those files."""

    def __init__(self, filesystem, columns):
        self.filesystem = filesystem
        self.columns = list(columns) if columns else None

    def __call__(self, batch):
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = [pq.read_table(p, filesystem=self.filesystem, columns=self.columns)
                  for p in batch["path"].to_pylist()]
        return pa.concat_tables(tables)


def _footer_actors(n_files: int) -> int:
    """FooterReader actors worth starting for ``n_files`` files: one per batch of files the V2 indexer hands out,
    at most Ray's default."""
    return max(1, min(_RAY_FOOTER_ACTORS, math.ceil(n_files / _FOOTER_BATCH)))


def read_shards(uri: str, columns: list[str] | None = None, reader: str = "auto", shuffle_seed: int | None = None,
                override_num_blocks: int | None = None, footer_actors: int | str | None = "auto", **read_kwargs):
    """A ``ray.data.Dataset`` over the shard files of ``uri`` (local or s3://) with the rows of
    ``wsss.data.shards.SHARD_SCHEMA`` (or ``columns``). ``reader``: one of READERS or ``"auto"``.
    ``shuffle_seed``: shuffle the file order per execution (``FileShuffleConfig(seed)``; None: manifest order).
    ``footer_actors`` (V2 only): FooterReader actors its listing starts per execution (each epoch): ``"auto"``
    one per 10 files (at most 32), an int, or None for Ray's default (32, ``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS``;
    a value set in the environment always wins). ``read_kwargs`` go to ``read_parquet`` (e.g. ``num_cpus``) or,
    for ``items``, to its ``map_batches``."""
    import ray.data

    reader = DEFAULT_READER if reader == "auto" else reader
    if reader not in READERS:
        raise ValueError(f"unknown shard reader {reader!r} (choose from {', '.join(READERS)} or auto)")
    bad = [c for c in columns or () if c not in _SHARD_COLUMNS]
    if bad:
        raise ValueError(f"{uri}: unknown shard column(s) {bad} (shards have {', '.join(_SHARD_COLUMNS)})")
    fs, paths = shard_paths(uri)
    if reader == "items":
        if shuffle_seed is not None:
            order = np.random.default_rng(int(shuffle_seed)).permutation(len(paths))
            paths = [paths[i] for i in order]
        items = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
        read_kwargs.setdefault("batch_size", 1)
        return items.map_batches(_ReadShardFiles(fs, columns), batch_format="pyarrow", **read_kwargs)

    ctx = ray.data.DataContext.get_current()
    saved = getattr(ctx, "use_datasource_v2", None), os.environ.get(FOOTER_ACTORS_ENV)
    if hasattr(ctx, "use_datasource_v2"):  # read at call time: the Dataset keeps the path it was built with
        ctx.use_datasource_v2 = reader == "parquet"
    if reader == "parquet" and footer_actors is not None and saved[1] is None:
        n = _footer_actors(len(paths)) if footer_actors == "auto" else int(footer_actors)
        os.environ[FOOTER_ACTORS_ENV] = str(max(1, n))  # read by the V2 indexer's constructor, inside this call
    try:
        shuffle = ray.data.FileShuffleConfig(seed=int(shuffle_seed)) if shuffle_seed is not None else None
        v1 = reader == "parquet-v1" and saved[0] is not None
        if v1 and columns:  # V1 pushes the projection into the file scan (V2 deprecates columns=)
            read_kwargs["columns"] = list(columns)
        ds = ray.data.read_parquet(paths, filesystem=fs, partitioning=None, shuffle=shuffle,
                                   override_num_blocks=override_num_blocks, **read_kwargs)
    finally:
        if saved[0] is not None:
            ctx.use_datasource_v2 = saved[0]
        if saved[1] is None:
            os.environ.pop(FOOTER_ACTORS_ENV, None)
    if columns and not v1:
        ds = ds.select_columns(list(columns))
    return ds


def _row_seed(seed: int, item_id: str, draw: float) -> list[int]:
    return [int(seed) & 0xFFFFFFFF, zlib.crc32(item_id.encode("utf-8")), int(draw * 2 ** 53)]


class DecodeAugment:
    """``map_batches`` function (numpy batches): shard rows (id, image bytes, labels, AUG_SEED_COLUMN) ->
    ``image`` float32 (B, 3, crop, crop) after ``wsss.data.transforms.TrainTransform`` (the single-process loop's
    augmentation), ``labels`` float32 (B, K), ``id``, ``ok`` (bool) and ``reason`` (str). A row whose image does not
    decode is kept with ``ok=False``, a zero image and the one-line reason, so the consumer records it as a reject
    (the dataset's rows per rank stay what the split planned)."""

    def __init__(self, data_cfg: dict, seed: int = 0, source: str = "shards"):
        from wsss.config import DataConfig
        from wsss.data.transforms import TrainTransform

        cfg = DataConfig(**data_cfg) if isinstance(data_cfg, dict) else data_cfg
        self.transform = TrainTransform(cfg, seed=seed)
        self.seed = int(seed)
        self.source = source

    def __call__(self, batch: dict) -> dict:
        from wsss.data.io import BadItem, decode_image

        crop = self.transform.crop
        ids = [str(i) for i in batch["id"]]
        draws = batch.get(AUG_SEED_COLUMN)
        images = np.zeros((len(ids), 3, crop, crop), np.float32)
        ok = np.ones(len(ids), bool)
        reasons = [""] * len(ids)
        for k, (item_id, data) in enumerate(zip(ids, batch["image"])):
            draw = float(draws[k]) if draws is not None else 0.0
            try:
                img = decode_image(bytes(data), f"{self.source}:{item_id}")
            except BadItem as e:
                ok[k] = False
                reasons[k] = (str(e).splitlines() or [type(e).__name__])[0]
                continue
            rng = np.random.default_rng(_row_seed(self.seed, item_id, draw))
            images[k] = self.transform(img, rng).numpy()
        labels = np.stack([np.asarray(v, np.float32) for v in batch["labels"]]) if ids else \
            np.zeros((0, 0), np.float32)
        return {"id": np.asarray(ids, dtype=object), "image": images, "labels": labels, "ok": ok,
                "reason": np.asarray(reasons, dtype=object)}


_TRANSFORMS: dict = {}


def decode_augment(batch: dict, data_cfg: dict, seed: int = 0, source: str = "shards") -> dict:
    """Task form of :class:`DecodeAugment` for ``map_batches`` (read, decode and augmentation fuse into one task
    per read block; no actor pool to start). One DecodeAugment per worker process and settings."""
    key = (repr(sorted(data_cfg.items())), int(seed), source)
    fn = _TRANSFORMS.get(key)
    if fn is None:
        fn = _TRANSFORMS[key] = DecodeAugment(data_cfg, seed, source)
    return fn(batch)


def train_dataset(uri: str, data_cfg, seed: int, reader: str = "auto", decode_batch_size: int = 16,
                  decode_num_cpus: float = 1.0, decode_concurrency: int | None = None,
                  footer_actors: int | str | None = "auto"):
    """The training input of ``jobs.train``: shard files shuffled per epoch (seeded), a per-row random draw, then
    decode + augmentation (:class:`DecodeAugment`) in ``map_batches`` on CPU workers (tasks of
    ``decode_num_cpus`` CPUs, at most ``decode_concurrency`` at once; None: Ray Data decides)."""
    from ray.data.expressions import random as ray_random

    ds = read_shards(uri, columns=["id", "image", "labels"], reader=reader, shuffle_seed=int(seed),
                     footer_actors=footer_actors)
    ds = ds.with_column(AUG_SEED_COLUMN, ray_random(seed=int(seed)))
    import dataclasses

    d = dict(data_cfg) if isinstance(data_cfg, dict) else dataclasses.asdict(data_cfg)
    kwargs = {"num_cpus": float(decode_num_cpus)}
    if decode_concurrency is not None:
        kwargs["concurrency"] = decode_concurrency
    return ds.map_batches(decode_augment, fn_kwargs={"data_cfg": d, "seed": int(seed), "source": str(uri)},
                          batch_size=int(decode_batch_size), batch_format="numpy", **kwargs)


def ingest_options():
    """``ExecutionOptions`` for the training dataset: Ray Train's defaults plus ``preserve_order=True`` (blocks in
    file order, so the split per rank is reproducible)."""
    from ray.train import DataConfig

    opts = DataConfig.default_ingest_options()
    opts.preserve_order = True
    return opts


def _collate_base():
    try:
        from ray.data.collate_fn import NumpyBatchCollateFn

        return NumpyBatchCollateFn
    except ImportError:  # older Ray: a plain callable works (with a deprecation warning)
        return object


class TrainCollate(_collate_base()):
    """``iter_torch_batches(collate_fn=...)`` for :class:`DecodeAugment` rows: ``image`` and ``labels`` as torch
    tensors (on the CPU; the training step moves them), ``id`` and ``reason`` as lists, ``ok`` as a bool array."""

    def __call__(self, batch: dict) -> dict:
        import torch

        return {"image": torch.from_numpy(np.ascontiguousarray(batch["image"])),
                "labels": torch.from_numpy(np.ascontiguousarray(batch["labels"], dtype=np.float32)),
                "id": [str(i) for i in batch["id"]], "ok": np.asarray(batch["ok"], bool),
                "reason": [str(r) for r in batch["reason"]]}


def take_good(batch: dict, rejects: list) -> dict | None:
    """The usable rows of a :class:`TrainCollate` batch as ``{"image", "labels", "id"}``; the others are appended to
    ``rejects`` as (id, reason). None when no row is usable."""
    ok = batch["ok"]
    for item_id, reason, good in zip(batch["id"], batch["reason"], ok):
        if not good:
            rejects.append((item_id, reason))
    if ok.all():
        return {"image": batch["image"], "labels": batch["labels"], "id": list(batch["id"])}
    if not ok.any():
        return None
    import torch

    keep = np.flatnonzero(ok)
    idx = torch.from_numpy(keep)
    return {"image": batch["image"][idx], "labels": batch["labels"][idx], "id": [batch["id"][i] for i in keep]}
