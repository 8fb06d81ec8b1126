"""Batch segmentation over shards with Ray Data: ``python -m jobs.predict_seg --checkpoint C --data SHARDS --out OUT``.

Pipeline: read shards (Parquet, local or s3://) -> drop ids whose PNG is already there (resume) -> decode/validate
(CPU tasks, ``jobs.pseudolabel.decode_images``: a bad image becomes a reject row) -> :class:`SegInference` (an
actor pool: the model loads once per actor in ``__init__``; 1 GPU per actor when the cluster has GPUs) -> with
``--crf``, :func:`seg_crf` (CPU tasks, deeplab-pytorch's CRF, ``cfg.crf`` of the checkpoint). The last stage writes
each row's label PNG ``<out>/<id>.png`` (VOC palette, class indices); the driver writes ``<out>/results.parquet``
(id, status, sec_pred, sec_crf) and ``<out>/rejects.parquet`` (id, reason) at the end. The probabilities travel
from the actors to the CRF tasks as float16 (C, H, W).

The computation per image is ``wsss.seg.predict.SegPredictor`` (+ ``crf_labels``), the same as ``wsss predict-seg``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np

from jobs.pseudolabel import SHARD_COLUMNS, _obj, _one_line, decode_images, filter_done, parse_stats, shard_ids


class _PngWriter:
    def __init__(self, out_uri: str):
        self.out_uri = out_uri

    def write(self, ids, status, reason, labels: dict[int, np.ndarray], sec_pred, sec_crf) -> dict:
        from wsss.data import fs
        from wsss.data.io import encode_label_png

        for k, lab in labels.items():
            try:
                fs.write_bytes(fs.join(self.out_uri, f"{ids[k]}.png"), encode_label_png(lab))
            except Exception as e:  # noqa: BLE001 - reject the row, keep the batch
                status[k], reason[k] = "rejected", _one_line(e, "write: ")
        return {"id": _obj(list(ids)), "status": _obj(list(status)), "reason": _obj([str(r) for r in reason]),
                "sec_pred": np.asarray(sec_pred, np.float64), "sec_crf": np.asarray(sec_crf, np.float64)}


class SegInference:
    """Actor: the segmentation checkpoint's network, probabilities at scale 1 or multi-scale + flip."""

    def __init__(self, checkpoint: str, device: str, threads: int | None, multi_scale: bool, out_uri: str | None):
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        from wsss.seg.predict import SegPredictor, load_seg_model

        model, cfg, _ = load_seg_model(checkpoint, device)
        self.pred = SegPredictor(model, cfg, scales=None if multi_scale else [1.0], flip=None if multi_scale else False)
        self.writer = _PngWriter(out_uri) if out_uri else None  # set when this is the last stage

    def __call__(self, batch: dict) -> dict:
        from wsss.data.io import decode_image

        ids = [str(i) for i in batch["id"]]
        n = len(ids)
        status, reason = list(batch["status"]), list(batch["reason"])
        sec = np.full(n, np.nan)
        probs_out, labels = [b""] * n, {}
        for k in range(n):
            if status[k] != "ok":
                continue
            try:
                image = decode_image(bytes(batch["image"][k]), f"{ids[k]} image")
                t0 = time.perf_counter()
                p = self.pred.probs(image)
                sec[k] = time.perf_counter() - t0
                if self.writer is not None:
                    labels[k] = p.argmax(0).astype(np.uint8)
                else:
                    probs_out[k] = np.ascontiguousarray(p.astype(np.float16)).tobytes()
            except Exception as e:  # noqa: BLE001
                status[k], reason[k] = "rejected", _one_line(e, "predict: ")
        if self.writer is not None:
            return self.writer.write(ids, status, reason, labels, sec, np.full(n, np.nan))
        return {"id": _obj(ids), "image": batch["image"], "h": batch["h"], "w": batch["w"], "status": _obj(status),
                "reason": _obj(reason), "probs": _obj(probs_out), "sec_pred": sec}


def seg_crf(batch: dict, crf_cfg, num_classes: int, out_uri: str) -> dict:
    """CPU task: dense CRF on the actors' probabilities, then the label PNGs."""
    from wsss.data.io import decode_image
    from wsss.seg.predict import crf_labels

    ids = [str(i) for i in batch["id"]]
    n = len(ids)
    status, reason = list(batch["status"]), list(batch["reason"])
    sec = np.full(n, np.nan)
    labels = {}
    for k in range(n):
        if status[k] != "ok":
            continue
        try:
            h, w = int(batch["h"][k]), int(batch["w"][k])
            probs = np.frombuffer(batch["probs"][k], np.float16).reshape(num_classes, h, w).astype(np.float32)
            image = np.array(decode_image(bytes(batch["image"][k]), f"{ids[k]} image"))
            t0 = time.perf_counter()
            labels[k] = crf_labels(image, probs, crf_cfg)
            sec[k] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            status[k], reason[k] = "rejected", _one_line(e, "crf: ")
    return _PngWriter(out_uri).write(ids, status, reason, labels, batch["sec_pred"], sec)


def _done(out_uri: str) -> set[str]:
    from wsss.data import fs

    try:
        return {n[:-4] for n in fs.listdir(out_uri) if n.endswith(".png")}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _parquet(rows: list[dict], cols: dict, uri: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from wsss.data import fs

    table = pa.table({c: pa.array([r.get(c) for r in rows], t) for c, t in cols.items()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.write_bytes(uri, buf.getvalue())


def run_predict_seg(checkpoint: str, shards_uri: str, out_uri: str, multi_scale: bool = False, crf: bool = False,
                    actors: int = 1, crf_tasks: int | None = None, batch_size: int = 4, use_gpu: bool | None = None,
                    gpus_per_actor: float = 1.0, actor_threads: int | None = 1, address: str | None = None,
                    num_cpus: int | None = None, progress: bool = False) -> dict:
    """Label PNGs for every not-yet-done image of a shard set (Ray is initialised here when it is not)."""
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from cluster.storage import read_shards_ray
    from jobs.common import init_ray
    from wsss.data import fs
    from wsss.data.shards import read_manifest

    meta = json.loads(fs.read_bytes(fs.join(checkpoint, "meta.json")) or b"{}")
    if meta.get("kind") != "seg":
        raise ValueError(f"checkpoint {checkpoint}: kind is {meta.get('kind')!r}, expected a segmentation checkpoint")
    class_names = list(read_manifest(shards_uri)["class_names"])
    if class_names != list(meta.get("class_names") or []):
        raise ValueError(f"checkpoint {checkpoint}: its classes do not match the {len(class_names)} classes of "
                         f"the shards at {shards_uri}")
    if not ray.is_initialized():
        init_ray(address=address, num_cpus=num_cpus or max(os.cpu_count() or 1, actors + 3))
    has_gpu = ray.cluster_resources().get("GPU", 0) > 0 if use_gpu is None else bool(use_gpu)
    ray.data.DataContext.get_current().enable_progress_bars = bool(progress)
    t0 = time.perf_counter()
    fs.makedirs(out_uri)
    done = _done(out_uri) & set(shard_ids(shards_uri))
    ds = read_shards_ray(shards_uri, columns=SHARD_COLUMNS)
    if done:
        ds = ds.map_batches(filter_done, batch_format="pyarrow", batch_size=None, fn_kwargs={"done": frozenset(done)})
    ds = ds.map_batches(decode_images, batch_format="numpy", batch_size=batch_size,
                        fn_kwargs={"num_fg": len(class_names) - 1})
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    gpu_kw = {"num_gpus": gpus_per_actor, "num_cpus": 1} if has_gpu else {"num_cpus": 1}
    ds = ds.map_batches(SegInference, batch_format="numpy", batch_size=batch_size,
                        compute=ActorPoolStrategy(size=int(actors)),
                        fn_constructor_kwargs={"checkpoint": checkpoint, "device": "cuda" if has_gpu else "cpu",
                                               "threads": None if has_gpu else actor_threads,
                                               "multi_scale": multi_scale, "out_uri": None if crf else out_uri},
                        **gpu_kw)
    if crf:
        import yaml

        from wsss.seg.config import seg_from_dict

        cfg = seg_from_dict(yaml.safe_load(fs.read_bytes(fs.join(checkpoint, "config.yaml"))) or {})
        ds = ds.map_batches(seg_crf, batch_format="numpy", batch_size=batch_size, num_cpus=1,
                            compute=TaskPoolStrategy(size=crf_tasks) if crf_tasks else TaskPoolStrategy(),
                            fn_kwargs={"crf_cfg": cfg.crf, "num_classes": len(class_names), "out_uri": out_uri})
    rows = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k in range(len(batch["id"])):
            rows.append({"id": str(batch["id"][k]), "status": str(batch["status"][k]),
                         "reason": str(batch["reason"][k]) or None,
                         "sec_pred": _num(batch["sec_pred"][k]), "sec_crf": _num(batch["sec_crf"][k])})
    import pyarrow as pa

    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["id"])
    rej = sorted((r for r in rows if r["status"] != "ok"), key=lambda r: r["id"])
    _parquet(ok, {"id": pa.string(), "status": pa.string(), "sec_pred": pa.float64(), "sec_crf": pa.float64()},
             fs.join(out_uri, "results.parquet"))
    _parquet(rej, {"id": pa.string(), "reason": pa.string()}, fs.join(out_uri, "rejects.parquet"))
    dt = time.perf_counter() - t0
    return {"out": out_uri, "n_done_before": len(done), "n_ok": len(ok), "n_rejected": len(rej),
            "rejects": [(r["id"], r["reason"]) for r in rej], "seconds": dt,
            "images_per_s": len(rows) / dt if rows else 0.0, "multi_scale": multi_scale, "crf": crf,
            "stage_stats": parse_stats(ds.stats()), "gpu": has_gpu}


def _num(v):
    v = float(v)
    return None if v != v else v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.predict_seg", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="segmentation checkpoint folder (local or s3://)")
    p.add_argument("--data", required=True, help="shard folder (manifest.json + Parquet shards), local or s3://")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--multi-scale", action="store_true", help="eval.scales x flip of the checkpoint's config")
    p.add_argument("--crf", action="store_true", help="dense CRF (CPU tasks) after the network")
    p.add_argument("--actors", type=int, default=1, help="inference actor pool size (1 GPU each when GPUs exist)")
    p.add_argument("--crf-tasks", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--gpus-per-actor", type=float, default=1.0)
    p.add_argument("--actor-threads", type=int, default=1)
    p.add_argument("--cpu", action="store_true", help="do not use GPUs even if the cluster has them")
    p.add_argument("--address", default=None)
    p.add_argument("--cluster", action="store_true", help="join the running cluster (RAY_ADDRESS or auto)")
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--json", default=None, help="write the summary JSON here too")
    return p


def main(argv: list[str] | None = None) -> int:
    from jobs.common import redact, resolve_address, setup_logging

    args = _parser().parse_args(argv)
    setup_logging()
    try:
        res = run_predict_seg(args.checkpoint, args.data, args.out, multi_scale=args.multi_scale, crf=args.crf,
                              actors=args.actors, crf_tasks=args.crf_tasks, batch_size=args.batch_size,
                              use_gpu=False if args.cpu else None, gpus_per_actor=args.gpus_per_actor,
                              actor_threads=args.actor_threads, address=resolve_address(args.cluster, args.address),
                              num_cpus=args.num_cpus)
    except (FileNotFoundError, ValueError) as e:
        print(f"predict-seg: error: {redact(_one_line(e))}", file=sys.stderr)
        return 2
    text = json.dumps({k: v for k, v in res.items() if k != "rejects"}, indent=2, default=float)
    print(redact(text))
    if args.json:
        from wsss.data import fs

        fs.write_bytes(args.json, (text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
