"""Shard reading into the training loop, reader by reader: ``python -m bench.bench_ingest``.

The synthetic set (``--small`` images of ``--small-size`` px and ``--large`` of ``--large-size`` px; the train
split, 3/4 of each) is sharded with ``wsss shard`` (``jobs.shard.shard_dataset``) to a local folder and to a local
moto S3 server (started here as a separate process and stopped at the end). Each reader of ``cluster.ingest``
then delivers the rows to a consumer that iterates them as the training loop does (``iter_batches``, batch 8):

- ``items``: the hand-made reader (``from_items`` over the manifest's paths + ``map_batches`` with
  ``pyarrow.parquet.read_table``);
- ``parquet-v1``: ``ray.data.read_parquet`` with ``DataContext.use_datasource_v2 = False`` (ParquetDatasource);
- ``parquet``: ``ray.data.read_parquet`` on Ray 2.60's default DataSource V2 path (ListFiles -> ReadFiles).

Columns: seconds to the first batch (planning + first read), wall seconds for all rows (from building the
dataset to the last batch), rows/s over that wall time. With ``--decode`` a second table runs the whole training
input of ``jobs.train`` (``cluster.ingest.train_dataset``: read + decode + augmentation in ``map_batches``, through
``iter_torch_batches(prefetch_batches=2)``) for the local small set. Every configuration runs ``--repeats`` times in
rotating order; the table shows the median and the best. Writes ``bench/results/ingest.md``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import write_table

RESULTS = Path(__file__).resolve().parent / "results" / "ingest.md"
# bench label -> (cluster.ingest reader, footer_actors)
READERS = {"items": ("items", None), "parquet-v1": ("parquet-v1", None), "parquet-v2": ("parquet", None),
           "parquet-v2-fit": ("parquet", "auto")}


def time_read(uri: str, reader: str, batch_size: int = 8) -> dict:
    """Build the dataset and iterate it twice (two epochs): the second pass shows what each epoch costs again."""
    from cluster.ingest import read_shards

    name, footer_actors = READERS[reader]
    t0 = time.perf_counter()
    ds = read_shards(uri, columns=["id", "image", "labels"], reader=name, footer_actors=footer_actors)
    first = None
    n = 0
    for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        if first is None:
            first = time.perf_counter() - t0
        n += len(b["id"])
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    n2 = sum(len(b["id"]) for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"))
    again = time.perf_counter() - t1
    if n2 != n:
        raise RuntimeError(f"{reader} on {uri}: {n} rows in the first pass, {n2} in the second")
    return {"first_s": first, "wall_s": wall, "rows": n, "rows_per_s": n / wall, "again_s": again}


def time_ingest(uri: str, reader: str, cfg, batch_size: int = 8) -> dict:
    from cluster.ingest import train_dataset

    t0 = time.perf_counter()
    ds = train_dataset(uri, cfg.data, seed=0, reader=READERS[reader][0], footer_actors=READERS[reader][1])
    first = None
    n = 0
    for b in ds.iter_torch_batches(batch_size=batch_size, prefetch_batches=2, dtypes=None,
                                   collate_fn=_collate):
        if first is None:
            first = time.perf_counter() - t0
        n += int(b["ok"].sum())
    wall = time.perf_counter() - t0
    return {"first_s": first, "wall_s": wall, "rows": n, "rows_per_s": n / wall, "again_s": None}


def _collate(batch: dict) -> dict:
    import torch

    return {"image": torch.from_numpy(batch["image"]), "ok": batch["ok"]}


def _row(label: str, runs: list[dict], again: bool = True) -> str:
    med = {k: statistics.median(r[k] for r in runs) for k in ("first_s", "wall_s", "rows_per_s")}
    best = max(r["rows_per_s"] for r in runs)
    cells = [label, str(runs[0]["rows"]), f"{med['first_s']:.2f}", f"{med['wall_s']:.2f}"]
    if again:
        cells.append(f"{statistics.median(r['again_s'] for r in runs):.2f}")
    cells += [f"{med['rows_per_s']:.0f}", f"{best:.0f}"]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_ingest", description=__doc__.splitlines()[0])
    p.add_argument("--small", type=int, default=2000, help="images of the small-image set")
    p.add_argument("--small-size", type=int, default=64)
    p.add_argument("--large", type=int, default=200, help="images of the large-image set")
    p.add_argument("--large-size", type=int, default=192)
    p.add_argument("--shard-size", type=int, default=100, help="images per shard file")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    p.add_argument("--readers", default=",".join(READERS), help=f"comma-separated, of {', '.join(READERS)}")
    p.add_argument("--no-s3", action="store_true", help="local folders only")
    p.add_argument("--decode", action="store_true", help="also time the whole training input (decode + augment)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    readers = [r for r in args.readers.split(",") if r]
    bad = [r for r in readers if r not in READERS]
    if bad:
        p.error(f"unknown reader(s) {bad}; choose from {', '.join(READERS)}")

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import ray.data

    from infra.local_s3 import LocalS3
    from jobs.shard import shard_dataset
    from wsss.config import from_dict
    from wsss.data.synth import make_synthetic

    work = Path(tempfile.mkdtemp(prefix="wsss-bench-ingest-"))
    s3 = None
    sets: list[tuple[str, str, str]] = []  # (set label, storage, uri)
    try:
        if not args.no_s3:
            s3 = LocalS3(state_dir=work / "s3", bucket="wsss-bench").start()
            os.environ.update(s3.env())
        for n, size in ((args.small, args.small_size), (args.large, args.large_size)):
            if n <= 0:
                continue
            src = str(work / f"synth-{size}")
            make_synthetic(src, num_images=n, size=size, seed=0)
            label = f"{size} px"
            local = str(work / f"shards-{size}")
            m = shard_dataset(src, local, shard_size=args.shard_size, split="train", progress=False)
            label = f"{m['n_images']} × {size} px, {len(m['shards'])} files"
            sets.append((label, "local", local))
            if s3 is not None:
                remote = f"s3://{s3.bucket}/shards-{size}"
                shard_dataset(src, remote, shard_size=args.shard_size, split="train", progress=False)
                sets.append((label, "S3 (moto)", remote))

        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        for reader in readers:  # warm-up (untimed): worker processes and imports, once per reader
            time_read(sets[0][2], reader)
        runs: dict[tuple, list] = {}
        for rep in range(args.repeats):
            order = readers[rep % len(readers):] + readers[:rep % len(readers)]
            for label, storage, uri in sets:
                for reader in order:
                    r = time_read(uri, reader)
                    runs.setdefault((label, storage, reader), []).append(r)
                    print(f"[bench] rep {rep} {label} {storage} {reader}: first {r['first_s']:.2f}s, "
                          f"wall {r['wall_s']:.2f}s, {r['rows_per_s']:.0f} rows/s", file=sys.stderr)
        ingest_runs: dict[str, list] = {}
        if args.decode:
            cfg = from_dict({"data": {"crop": 48, "resize_long": [48, 64]}})
            uri = sets[0][2]
            for rep in range(args.repeats):
                for reader in readers:
                    r = time_ingest(uri, reader, cfg)
                    ingest_runs.setdefault(reader, []).append(r)
                    print(f"[bench] rep {rep} ingest {reader}: wall {r['wall_s']:.2f}s, {r['rows_per_s']:.0f} "
                          f"rows/s", file=sys.stderr)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if s3 is not None:
            s3.stop()

    lines = [
        "# Shard reading into the training loop (Ray 2.60)",
        "",
        f"Synthetic train split sharded with `wsss shard --shard-size {args.shard_size}`; each reader of "
        f"`cluster.ingest.read_shards` feeds `iter_batches(batch_size=8)` on the driver of a local Ray cluster "
        f"({args.num_cpus} logical CPUs). First batch: seconds from building the dataset to the first batch "
        f"(planning, listing, first read); wall: to the last batch; again: a second pass over the same dataset "
        f"(the next epoch); rows/s over the first pass's wall time. `parquet-v2` is `read_parquet` as Ray 2.60 "
        f"ships it (DataSource V2, 32 FooterReader actors started per listing); `parquet-v2-fit` the same with "
        f"`RAY_DATA_PARQUET_FOOTER_NUM_ACTORS` = one per 10 files (`cluster.ingest`'s default). Median of "
        f"{args.repeats} runs (rotating order, after one untimed warm-up read per reader), best rows/s beside it. Machine: {os.cpu_count()} cores "
        f"({platform.processor() or platform.machine()}) shared with other work (load average "
        f"{os.getloadavg()[0]:.1f} at the end).",
        "",
        "| set | storage | reader | rows | first batch (s) | wall (s) | again (s) | rows/s (median) | rows/s (best) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (label, storage, reader), rs in runs.items():
        lines.append(_row(f"{label} | {storage} | {reader}", rs))
    if ingest_runs:
        lines += ["", f"Whole training input (`cluster.ingest.train_dataset`: read + decode + TrainTransform in "
                      f"`map_batches`, `iter_torch_batches(prefetch_batches=2)`, crop 48) on {sets[0][0]}, local:",
                  "", "| reader | rows | first batch (s) | wall (s) | rows/s (median) | rows/s (best) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for reader, rs in ingest_runs.items():
            lines.append(_row(reader, rs, again=False))
    lines.append("")
    write_table(lines, args.out, "bench.bench_ingest", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
