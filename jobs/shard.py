"""Shard a dataset into Parquet (local or S3): ``python -m jobs.shard SRC DST --shard-size N [--split S]``.

Runs as a plain process or as a Ray job (``ray job submit --working-dir . -- python -m jobs.shard ...``). Sharding
is I/O: the driver reads and validates items with a few threads and writes shards with single PUTs; it does not
need Ray workers. The output format is described in ``wsss.data.shards``.

Ray Data reader of the result: ``read_shards_ray(uri)`` (defined in ``cluster.storage``, re-exported here).
"""
from __future__ import annotations

import argparse
import json
import sys

from cluster.storage import read_shards_ray, redact
from wsss.data import shards as _shards

__all__ = ["shard_dataset", "read_shards_ray", "main"]


def shard_dataset(src: str, dst: str, shard_size: int = 1000, split: str | None = None, layout: str = "auto",
                  progress: bool = True, num_threads: int = 4) -> dict:
    """Open the dataset at ``src`` (VOC or generic layout, local or s3://) and write shards to ``dst``.
    Returns the manifest dict."""
    from wsss.data import open_dataset

    ds = open_dataset(src, split=split, layout=layout)
    source = {"root": str(src), "split": split, "layout": type(ds).__name__}
    return _shards.write_shards(ds, dst, shard_size=shard_size, progress=progress, num_threads=num_threads,
                                source=source)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.shard", description=__doc__.splitlines()[0])
    p.add_argument("src", help="dataset root (VOC or generic layout), local path or s3://bucket/prefix")
    p.add_argument("dst", help="output folder for the shards, local path or s3://bucket/prefix")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard file (default 1000)")
    p.add_argument("--split", default=None, help="split name (e.g. train, val); default: all ids")
    p.add_argument("--layout", default="auto", choices=["auto", "voc", "generic"])
    p.add_argument("--threads", type=int, default=4, help="reader threads (I/O bound on S3)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verify", action="store_true", help="re-read the shards and check their checksums")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        m = shard_dataset(args.src, args.dst, shard_size=args.shard_size, split=args.split, layout=args.layout,
                          progress=not args.no_progress, num_threads=args.threads)
    except (FileNotFoundError, ValueError) as e:
        print(f"shard: error: {redact(e)}", file=sys.stderr)
        return 2
    summary = {"dst": args.dst, "n_images": m["n_images"], "n_rejects": m["n_rejects"],
               "n_shards": len(m["shards"]), "num_classes": m["num_classes"]}
    if m["n_rejects"]:
        for item_id, reason in _shards.read_rejects(args.dst)[:20]:
            print(f"rejected {item_id}: {redact(reason)}", file=sys.stderr)
    if args.verify:
        v = _shards.verify_shards(args.dst, deep=True)
        summary["verified"] = v["ok"]
        for err in v["errors"]:
            print(f"verify: {redact(err)}", file=sys.stderr)
        if not v["ok"]:
            print(json.dumps(summary))
            return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
