"""Distributed mIoU of label PNGs against the masks in a shard set: ``python -m jobs.evaluate --pred OUT --data SHARDS``.

Ray Data reads the shards (id, mask, width, height; local or s3://); each block reads its predictions
``<pred>/_labels/<id>.png`` (a pseudo-label output prefix; a plain folder of ``<id>.png`` works too) and accumulates a confusion matrix (``wsss.metrics.ConfusionMatrix``, 255 ignored); the driver
sums the per-block matrices and computes the IoUs with ``wsss.metrics.iou_from_confusion`` and the manifest's
class names. Integer sums: the result equals ``wsss evaluate`` (``wsss.metrics.evaluate_folder``) on the same data.

JSON (same keys as ``wsss evaluate``): ``{"miou", "per_class", "absent", "pixel_accuracy", "n_images", "split",
"missing", "rejects", "pred_dir", "data_root"}``; ``missing`` = ids without a prediction, ``rejects`` =
``[id, reason]``: the shard set's own rejects, ids the pseudo-labelling rejected (its ``_rejects.parquet``, reason
prefixed ``pseudolabel: ``), no ground-truth mask, unreadable or mis-sized prediction; so ``n_images`` + rejects +
missing = the ids listed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from jobs import common
from wsss.metrics import json_safe  # NaN -> null, the same JSON as `wsss evaluate`

SHARD_COLUMNS = ["id", "mask", "width", "height"]


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def confusion_block(batch: dict, pred_uri: str, num_classes: int, pred_rejects: dict | None = None) -> dict:
    """One block: read each row's prediction, update a confusion matrix. Returns a one-row batch with the
    (C, C+1) matrix as int64 bytes, the image count, and JSON lists of missing ids and rejects."""
    from wsss.data import fs
    from wsss.data.io import IGNORE, BadItem, decode_mask
    from wsss.metrics import ConfusionMatrix

    cm = ConfusionMatrix(num_classes)
    missing: list[str] = []
    rejects: list[list[str]] = []
    n = 0
    for k, item_id in enumerate(batch["id"]):
        item_id = str(item_id)
        mask = batch["mask"][k]
        uri = fs.join(pred_uri, f"{item_id}.png")
        if pred_rejects and item_id in pred_rejects and not fs.exists(uri):
            rejects.append([item_id, f"pseudolabel: {pred_rejects[item_id]}"])
            continue
        if mask is None:
            rejects.append([item_id, f"id {item_id}: no ground-truth mask"])
            continue
        try:
            data = fs.read_bytes(uri)
        except FileNotFoundError:
            missing.append(item_id)
            continue
        try:
            gt = decode_mask(bytes(mask), f"{item_id} mask", num_classes=num_classes)
            pred = decode_mask(data, uri)
            if pred.shape != gt.shape:
                raise BadItem(f"{uri}: prediction is {pred.shape[1]}x{pred.shape[0]} (WxH) but the mask is "
                              f"{gt.shape[1]}x{gt.shape[0]}")
            bad = np.unique(pred[(pred >= num_classes) & (pred != IGNORE)])
            if bad.size:
                raise BadItem(f"{uri}: prediction has class index {int(bad[0])} (dataset has {num_classes})")
        except (BadItem, ValueError) as e:
            rejects.append([item_id, _one_line(e)])
            continue
        cm.update(gt, pred)
        n += 1
    conf = np.empty(1, dtype=object)
    conf[0] = np.ascontiguousarray(cm.extended, dtype=np.int64).tobytes()
    return {"conf": conf, "n": np.asarray([n], np.int64),
            "missing": np.asarray([json.dumps(missing)], dtype=object),
            "rejects": np.asarray([json.dumps(rejects)], dtype=object)}


def run_evaluate(pred_uri: str, shards_uri: str, json_path: str | None = None, address: str | None = None,
                 num_cpus: int | None = None, batch_size: int | None = None) -> dict:
    """mIoU of ``<pred_uri>/<id>.png`` against the masks of the shards at ``shards_uri`` (both local or s3://),
    computed by Ray Data tasks. Returns (and writes to ``json_path``) the ``wsss evaluate`` result dict."""
    import ray

    from wsss.data import fs, layout
    from wsss.data.shards import read_manifest
    from wsss.metrics import iou_from_confusion

    manifest = read_manifest(shards_uri)
    class_names = list(manifest["class_names"])
    c = len(class_names)
    try:
        pred_names = set(fs.listdir(pred_uri))
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"prediction folder not found: {pred_uri}") from None
    label_dir = layout.label_dir(pred_uri, pred_names)
    pred_rejects = layout.read_rejects(pred_uri, pred_names)

    if not ray.is_initialized():
        try:
            from jobs.common import init_ray

            init_ray(address=address, num_cpus=num_cpus)
        except ImportError:  # pragma: no cover
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", num_cpus=num_cpus)

    from cluster.storage import read_shards_ray

    ds = read_shards_ray(shards_uri, columns=SHARD_COLUMNS)
    ds = ds.map_batches(confusion_block, batch_format="numpy", batch_size=batch_size,
                        fn_kwargs={"pred_uri": label_dir, "num_classes": c, "pred_rejects": pred_rejects})
    total = np.zeros((c, c + 1), np.int64)
    n = 0
    missing: list[str] = []
    rejects: list[list[str]] = []
    try:  # items the sharding itself rejected (evaluate_folder lists the dataset's rejects the same way)
        from wsss.data.shards import read_rejects

        rejects.extend([str(i), str(r)] for i, r in read_rejects(shards_uri))
    except FileNotFoundError:
        pass
    shard_rejected = {r[0] for r in rejects}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for conf, k, miss, rej in zip(batch["conf"], batch["n"], batch["missing"], batch["rejects"]):
            total += np.frombuffer(conf, dtype=np.int64).reshape(c, c + 1)
            n += int(k)
            missing.extend(json.loads(miss))
            rejects.extend(r for r in json.loads(rej) if r[0] not in shard_rejected)
    res = iou_from_confusion(total, class_names)
    src = manifest.get("source") or {}
    out = {"miou": res["miou"], "per_class": res["per_class"], "absent": res["absent"],
           "pixel_accuracy": res["pixel_accuracy"], "n_images": n,
           "split": src.get("split") if isinstance(src, dict) else None,
           "missing": sorted(missing), "rejects": sorted(rejects), "pred_dir": str(pred_uri),
           "data_root": str(shards_uri), "confusion": total.tolist()}
    if json_path is not None:
        fs.write_bytes(json_path, (json.dumps(json_safe(out), indent=2) + "\n").encode())
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate",
                                description="Distributed mIoU of label PNGs against the masks in a shard set.")
    p.add_argument("--pred", required=True, help="folder / s3:// prefix with <id>.png predictions")
    p.add_argument("--data", required=True, help="shard folder (_manifest.json + Parquet shards), local or s3://")
    p.add_argument("--json", default=None, help="write the result JSON here (local or s3://)")
    common.add_cluster_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = args.address
    if address is None and args.cluster:
        address = os.environ.get("RAY_ADDRESS") or "auto"
    try:
        res = run_evaluate(args.pred, args.data, json_path=args.json, address=address, num_cpus=args.num_cpus)
    except (FileNotFoundError, ValueError) as e:
        try:
            from cluster.storage import redact
        except ImportError:  # pragma: no cover
            def redact(x):
                return str(x)
        print(f"evaluate: error: {redact(_one_line(e))}", file=sys.stderr)
        return 2
    try:
        from wsss.metrics import format_table

        print(format_table(res, title=f"mIoU of {args.pred} ({res['n_images']} images)"), file=sys.stderr)
    except ImportError:  # pragma: no cover
        pass
    if res["missing"]:
        print(f"missing predictions: {len(res['missing'])} (first: {', '.join(res['missing'][:5])})", file=sys.stderr)
    summary = {k: v for k, v in res.items() if k != "confusion"}
    print(json.dumps(json_safe(summary), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
