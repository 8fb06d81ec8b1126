"""Pseudo-label a sharded dataset with Ray Data: ``python -m jobs.pseudolabel --checkpoint C --data SHARDS --out OUT``.

Pipeline (each stage on the resources it needs, all stages streaming at once)::

    read shards (Parquet, local or s3://)  ->  drop ids already done (resume)  ->  decode/validate (CPU tasks;
    a bad image becomes a reject row)  ->  CAM inference (actor pool, 1 GPU per actor with --use-gpu)
    ->  affinity + random walk (actor pool, when "rw" in --stages)  ->  dense CRF (CPU tasks, when "crf")
    ->  each row's label PNG written by the last stage, plus one results part file per batch.

Rows carry the *encoded* image bytes (a JPEG is ~10x smaller than its pixels) and each stage decodes what it
needs (a few ms per image, against ~0.1-2 s of CAM / walk / CRF work). Between stages the CAM travels as float16
planes of the image's positive classes only, keys as int16; the random-walk output as float16 probabilities.

Outputs under ``OUT`` (local folder or s3:// prefix), the same layout as ``wsss.pseudolabel.pseudolabel``
(``wsss.data.layout``: a Parquet dataset whose only visible ``*.parquet`` file is the result table, so
``pyarrow.dataset.dataset(OUT)`` and ``ray.data.read_parquet(OUT)`` yield exactly the result rows):

- ``_labels/<id>.png``: VOC-palette label map (class indices), one atomic write each (os.replace / single PUT);
- ``_parts/part-<time>-<uuid>.parquet``: one file per batch of the last stage (id, classes, sec_cam, sec_rw,
  sec_crf, status, reason, written_at), written right after that batch's PNGs;
- ``part-00000.parquet`` (id, classes, sec_cam, sec_rw, sec_crf, status): compacted at the end of a run from the
  previous table and every part, de-duplicated by id keeping the latest row; merged parts are deleted;
- ``_rejects.parquet`` (id, reason): items that could not be labelled (corrupt image, wrong label count, ...)
  and the shard set's own rejects (reason prefixed ``shard: ``), so results + rejects = the ids listed;
- ``_stage_stats.json``: per-operator throughput parsed from ``ds.stats()``.

An output prefix of the old layout (``<id>.png``, ``results.parquet``, ``rejects.parquet``, ``results/``) is
moved to these names first (``wsss.data.layout.migrate_output``).

Resume: before reading, the job lists ``<out>/_labels/*.png`` and the results (compacted + parts). An id is done
when it has an ``ok`` results row *and* its PNG exists; only the other ids are processed (rejected ids are tried
again unless ``--skip-rejected``). A run killed at any point therefore loses at most the batches in flight; a
rerun finishes them, and compaction keeps exactly one row per id.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

import numpy as np

from cluster import resources as cres

STAGE_NAMES = ("cam", "rw", "crf")
from wsss.data import layout as _layout  # noqa: E402 - output names (wsss/, no Ray)

RESULTS_DIR = _layout.PARTS_DIR  # "_parts"
RESULTS_FILE = _layout.RESULTS  # "part-00000.parquet"
REJECTS_FILE = _layout.REJECTS  # "_rejects.parquet"
STATS_FILE = _layout.STATS  # "_stage_stats.json"
RESULT_COLUMNS = ("id", "classes", "sec_cam", "sec_rw", "sec_crf", "status")
SHARD_COLUMNS = ["id", "image", "labels", "width", "height"]


# ---- small helpers -------------------------------------------------------------------------------------

def _one_line(e: BaseException, prefix: str = "") -> str:
    text = str(e).strip().splitlines()
    msg = f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
    if type(e).__name__ == "BadItem" and text:
        msg = text[0]
    return (prefix + msg)[:500]


def _redact(text: Any) -> str:
    try:
        from cluster.storage import redact

        return redact(text)
    except ImportError:  # pragma: no cover - storage layer missing
        return str(text)


def _pack(arr: np.ndarray, dtype) -> bytes:
    return np.ascontiguousarray(np.asarray(arr).astype(dtype, copy=False)).tobytes()


def _unpack_keys(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.int16).astype(np.int64)


def _unpack_planes(data: bytes, n: int, h: int, w: int) -> np.ndarray:
    return np.frombuffer(data, dtype=np.float16).reshape(n, h, w).astype(np.float32)


def _obj(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _result_schema(with_extra: bool = True):
    import pyarrow as pa

    fields = [("id", pa.string()), ("classes", pa.list_(pa.string())), ("sec_cam", pa.float64()),
              ("sec_rw", pa.float64()), ("sec_crf", pa.float64()), ("status", pa.string())]
    if with_extra:
        fields += [("reason", pa.string()), ("written_at", pa.float64())]
    return pa.schema(fields)


def _parquet_bytes(rows: list[dict], schema) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _read_parquet_rows(uri: str) -> list[dict]:
    """Rows of a Parquet file (local or s3://); [] when missing or torn (a killed writer)."""
    from wsss.data import fs
    from wsss.data.io import read_parquet_bytes

    try:
        # decoded in this thread: Arrow pool threads can abort the driver at exit (wsss.data.io)
        return read_parquet_bytes(fs.read_bytes(uri)).to_pylist()
    except FileNotFoundError:
        return []
    except Exception:  # noqa: BLE001 - unreadable part: its ids are simply processed again
        return []


def _nan_to_none(v):
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


# ---- row stages (run inside Ray tasks / actors) ----------------------------------------------------------

def filter_done(batch, done: frozenset):
    """Drop rows whose id is already done (pyarrow batch)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not done:
        return batch
    mask = pc.invert(pc.is_in(batch.column("id"), value_set=pa.array(sorted(done), type=pa.string())))
    return batch.filter(mask)


def decode_images(batch: dict, num_fg: int) -> dict:
    """Validate each row (id, image decodes, label count, size): ok rows keep their encoded bytes, bad rows
    become ``status="rejected"`` with a one-line reason (never an exception)."""
    from wsss.data.io import BadItem, decode_image, validate_id

    ids = [str(i) for i in batch["id"]]
    n = len(ids)
    images, labels, hs, ws, status, reason = [], [], [], [], [], []
    for k in range(n):
        item_id = ids[k]
        try:
            validate_id(item_id)
            data = batch["image"][k]
            img = decode_image(bytes(data) if data is not None else b"", f"{item_id} image")
            lab = np.asarray(batch["labels"][k], dtype=np.float32).reshape(-1)
            if lab.shape[0] != num_fg:
                raise BadItem(f"{item_id}: labels have {lab.shape[0]} entries, expected {num_fg}")
            h, w = int(img.shape[0]), int(img.shape[1])
            if (int(batch["height"][k]), int(batch["width"][k])) != (h, w):
                raise BadItem(f"{item_id} image: decodes to {w}x{h} but the shard says "
                              f"{int(batch['width'][k])}x{int(batch['height'][k])}")
            images.append(bytes(data))
            labels.append(lab)
            hs.append(h)
            ws.append(w)
            status.append("ok")
            reason.append("")
        except Exception as e:  # noqa: BLE001 - a bad item is a reject row
            images.append(b"")
            labels.append(np.zeros(num_fg, np.float32))
            hs.append(0)
            ws.append(0)
            status.append("rejected")
            reason.append(_one_line(e, "decode: "))
    nan = np.full(n, np.nan)
    return {"id": _obj(ids), "image": _obj(images),
            "labels": np.stack(labels).astype(np.float32) if n else np.zeros((0, num_fg), np.float32),
            "h": np.asarray(hs, np.int32), "w": np.asarray(ws, np.int32), "status": _obj(status),
            "reason": _obj(reason), "sec_cam": nan.copy(), "sec_rw": nan.copy(), "sec_crf": nan.copy()}


class _Writer:
    """The last stage's output: label PNGs (atomic, concurrent for S3) then one results part per batch."""

    def __init__(self, out_uri: str, class_names: list[str], run_id: str):
        from wsss.data import fs

        self.out_uri = out_uri
        self.class_names = list(class_names)
        self.run_id = run_id
        self.remote = fs.is_remote(out_uri)

    def write(self, batch: dict, labels: dict[int, np.ndarray]) -> dict:
        """``labels``: row index -> uint8 label map for the rows that are ok. Returns the small output batch."""
        from wsss.data import fs
        from wsss.data.io import encode_label_png

        ids = [str(i) for i in batch["id"]]
        status = list(batch["status"])
        reason = list(batch["reason"])
        jobs = []
        for k, lab in labels.items():
            try:
                jobs.append((k, _layout.label_uri(self.out_uri, ids[k]), encode_label_png(lab)))
            except Exception as e:  # noqa: BLE001
                status[k], reason[k] = "rejected", _one_line(e, "write: ")
        if jobs:
            if self.remote and len(jobs) > 1:
                with ThreadPoolExecutor(min(8, len(jobs))) as pool:
                    list(pool.map(lambda j: fs.write_bytes(j[1], j[2]), jobs))
            else:
                for _, uri, data in jobs:
                    fs.write_bytes(uri, data)
        now = time.time()
        rows = []
        classes_out = []
        for k, item_id in enumerate(ids):
            ok = status[k] == "ok"
            keys = _unpack_keys(batch["keys"][k]) if ok and "keys" in batch else np.zeros(0, np.int64)
            classes = [self.class_names[int(c)] for c in keys] if ok else None
            classes_out.append(";".join(classes or []))
            rows.append({"id": item_id, "classes": classes, "sec_cam": _nan_to_none(batch["sec_cam"][k]),
                         "sec_rw": _nan_to_none(batch["sec_rw"][k]), "sec_crf": _nan_to_none(batch["sec_crf"][k]),
                         "status": "ok" if ok else "rejected", "reason": None if ok else str(reason[k]),
                         "written_at": now})
        if rows:
            name = f"part-{time.time_ns():020d}-{self.run_id}-{uuid.uuid4().hex[:8]}.parquet"
            fs.write_bytes(fs.join(self.out_uri, RESULTS_DIR, name), _parquet_bytes(rows, _result_schema()))
        return {"id": _obj(ids), "status": _obj(["ok" if s == "ok" else "rejected" for s in status]),
                "reason": _obj([str(r) for r in reason]), "classes": _obj(classes_out),
                "sec_cam": np.asarray(batch["sec_cam"], np.float64), "sec_rw": np.asarray(batch["sec_rw"], np.float64),
                "sec_crf": np.asarray(batch["sec_crf"], np.float64)}


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))


class CamInference:
    """Actor: CAM inference with ``wsss.pseudolabel.CamStage`` (multi-scale + flip, PCM; cfg.infer), batched: the
    rows of one ``map_batches`` call go through the network together, one forward per scale with both flips
    stacked (``CamStage.batch``; ``sec_cam`` is the batch's CAM time per image)."""

    def __init__(self, checkpoint: str, cfg_overrides: list[str], device: str, threads: int | None,
                 final: dict | None, bg_threshold: float):
        _set_threads(threads)
        from wsss.pseudolabel import CamStage

        self.stage = CamStage(checkpoint, device=device, cfg_overrides=cfg_overrides)
        self.bg_threshold = float(bg_threshold)
        self.writer = _Writer(**final) if final else None

    def __call__(self, batch: dict) -> dict:
        from wsss.data.io import decode_image

        n = len(batch["id"])
        status = list(batch["status"])
        reason = list(batch["reason"])
        sec_cam = np.asarray(batch["sec_cam"], np.float64).copy()
        cams, keys_out = [b""] * n, [b""] * n
        labels_final: dict[int, np.ndarray] = {}
        # decode the batch's good rows, then one batched CAM forward per scale (CamStage.batch)
        rows, images, labs = [], [], []
        for k in range(n):
            if status[k] != "ok":
                continue
            try:
                images.append(decode_image(bytes(batch["image"][k]), f"{batch['id'][k]} image"))
                labs.append(np.array(batch["labels"][k], np.float32))
                rows.append(k)
            except Exception as e:  # noqa: BLE001 - reject the item, keep the batch
                status[k], reason[k] = "rejected", _one_line(e, "cam: ")
        outs = self._cams(images, labs)
        for k, (res, sec) in zip(rows, outs):
            try:
                if isinstance(res, BaseException):
                    raise res
                cam, keys = res
                sec_cam[k] = sec
                cams[k] = _pack(cam, np.float16)
                keys_out[k] = _pack(keys, np.int16)
                if self.writer is not None:
                    from wsss.pseudolabel import cam_scores, labels_from_scores

                    labels_final[k] = labels_from_scores(*cam_scores(cam, keys, self.bg_threshold))
            except Exception as e:  # noqa: BLE001 - reject the item, keep the batch
                status[k], reason[k] = "rejected", _one_line(e, "cam: ")
        out = {c: batch[c] for c in ("id", "image", "h", "w", "sec_rw", "sec_crf")}
        out.update(status=_obj(status), reason=_obj(reason), sec_cam=sec_cam, cam=_obj(cams), keys=_obj(keys_out))
        if self.writer is not None:
            return self.writer.write(out, labels_final)
        return out

    def _cams(self, images: list, labels: list) -> list[tuple]:
        """[((cam, keys) or the exception, seconds per image)]: batched; one image at a time if the batch fails."""
        from wsss.pseudolabel import cam_chunk

        return cam_chunk(self.stage, [{"image": im, "labels": lab} for im, lab in zip(images, labels)])


class RandomWalk:
    """Actor: AffinityNet affinities + random walk with ``wsss.pseudolabel.RandomWalkStage`` (cfg.rw)."""

    def __init__(self, affinity: str, cfg, device: str, threads: int | None, final: dict | None):
        _set_threads(threads)
        from wsss.pseudolabel import RandomWalkStage

        self.stage = RandomWalkStage(affinity, cfg, device=device)
        self.writer = _Writer(**final) if final else None

    def __call__(self, batch: dict) -> dict:
        from wsss.data.io import decode_image

        n = len(batch["id"])
        status = list(batch["status"])
        reason = list(batch["reason"])
        sec_rw = np.asarray(batch["sec_rw"], np.float64).copy()
        probs_out = [b""] * n
        labels_final: dict[int, np.ndarray] = {}
        for k in range(n):
            if status[k] != "ok":
                continue
            try:
                h, w = int(batch["h"][k]), int(batch["w"][k])
                keys = _unpack_keys(batch["keys"][k])
                cam = _unpack_planes(batch["cam"][k], len(keys), h, w)
                image = decode_image(bytes(batch["image"][k]), f"{batch['id'][k]} image")
                t0 = time.perf_counter()
                probs, pkeys = self.stage(image, cam, keys)
                sec_rw[k] = time.perf_counter() - t0
                if self.writer is not None:
                    from wsss.pseudolabel import labels_from_scores

                    labels_final[k] = labels_from_scores(probs, pkeys)
                else:
                    probs_out[k] = _pack(probs, np.float16)
            except Exception as e:  # noqa: BLE001
                status[k], reason[k] = "rejected", _one_line(e, "rw: ")
        out = {c: batch[c] for c in ("id", "image", "h", "w", "keys", "sec_cam", "sec_crf")}
        out.update(status=_obj(status), reason=_obj(reason), sec_rw=sec_rw, probs=_obj(probs_out))
        if self.writer is not None:
            return self.writer.write(out, labels_final)
        return out


def dense_crf(batch: dict, crf_cfg, bg_threshold: float, final: dict) -> dict:
    """CPU task: dense CRF (``wsss.pseudolabel.crf_stage``, cfg.crf) on the walk's probabilities, or on the CAM
    scores (background plane = bg_threshold) when there was no walk; then the label PNGs."""
    from wsss.data.io import decode_image
    from wsss.pseudolabel import cam_scores, crf_stage, labels_from_scores

    writer = _Writer(**final)
    n = len(batch["id"])
    status = list(batch["status"])
    reason = list(batch["reason"])
    sec_crf = np.asarray(batch["sec_crf"], np.float64).copy()
    labels_final: dict[int, np.ndarray] = {}
    has_probs = "probs" in batch
    for k in range(n):
        if status[k] != "ok":
            continue
        try:
            h, w = int(batch["h"][k]), int(batch["w"][k])
            keys = _unpack_keys(batch["keys"][k])
            if has_probs:
                probs = _unpack_planes(batch["probs"][k], len(keys) + 1, h, w)
                pkeys = np.concatenate([[0], keys])
            else:
                probs, pkeys = cam_scores(_unpack_planes(batch["cam"][k], len(keys), h, w), keys, bg_threshold)
            # np.array: a writable copy (PIL-backed arrays are read-only and pydensecrf rejects them)
            image = np.array(decode_image(bytes(batch["image"][k]), f"{batch['id'][k]} image"))
            t0 = time.perf_counter()
            probs, pkeys = crf_stage(image, probs, pkeys, crf_cfg)
            sec_crf[k] = time.perf_counter() - t0
            labels_final[k] = labels_from_scores(probs, pkeys)
        except Exception as e:  # noqa: BLE001
            status[k], reason[k] = "rejected", _one_line(e, "crf: ")
    out = {c: batch[c] for c in ("id", "keys", "sec_cam", "sec_rw")}
    out.update(status=_obj(status), reason=_obj(reason), sec_crf=sec_crf)
    return writer.write(out, labels_final)


# ---- resume and compaction (driver) ------------------------------------------------------------------------

def _list(uri: str) -> list[str]:
    from wsss.data import fs

    try:
        return fs.listdir(uri)
    except (FileNotFoundError, NotADirectoryError):
        return []


def shard_ids(shards_uri: str) -> list[str]:
    """All ids of a shard set, reading only the ``id`` column of each shard (ranged reads on S3, never the
    image bytes)."""
    import pyarrow.parquet as pq

    from cluster.storage import pyarrow_fs
    from wsss.data.shards import shard_files

    files = shard_files(shards_uri)

    def one(uri: str) -> list[str]:
        pfs, path = pyarrow_fs(uri)
        with pfs.open_input_file(path) as f:
            return pq.ParquetFile(f).read(columns=["id"], use_threads=False).column("id").to_pylist()

    with ThreadPoolExecutor(min(16, max(1, len(files)))) as pool:
        return [i for ids in pool.map(one, files) for i in ids]


def _result_rows(out_uri: str) -> tuple[list[dict], list[str]]:
    """(rows of results.parquet then of every part in name order, part file names)."""
    from wsss.data import fs

    rows = [dict(r, written_at=r.get("written_at") or 0.0) for r in _read_parquet_rows(fs.join(out_uri, RESULTS_FILE))]
    # rejects of a previous compaction: kept so that they are reported again if not retried
    for r in _read_parquet_rows(fs.join(out_uri, REJECTS_FILE)):
        rows.append({"id": r["id"], "status": "rejected", "reason": r.get("reason"), "written_at": -1.0})
    parts = sorted(n for n in _list(fs.join(out_uri, RESULTS_DIR)) if n.startswith("part-") and n.endswith(".parquet"))
    if parts:
        uris = [fs.join(out_uri, RESULTS_DIR, p) for p in parts]
        with ThreadPoolExecutor(32 if fs.is_remote(out_uri) else 4) as pool:
            for part_rows in pool.map(_read_parquet_rows, uris):
                rows.extend(part_rows)
    return rows, parts


def _latest_by_id(rows: Iterable[dict]) -> dict[str, dict]:
    """One row per id: the latest (written_at, then input order); an ``ok`` row beats an older reject."""
    latest: dict[str, dict] = {}
    for r in rows:
        prev = latest.get(r["id"])
        if prev is None or float(r.get("written_at") or 0.0) >= float(prev.get("written_at") or 0.0):
            latest[r["id"]] = r
    return latest


def done_ids(out_uri: str, retry_rejected: bool = True) -> tuple[set[str], set[str]]:
    """(ids done, ids rejected before). Done = an ``ok`` results row and the PNG present (or a previous reject
    when ``retry_rejected`` is False)."""
    from wsss.data import fs

    pngs = {n[:-4] for n in _list(fs.join(out_uri, _layout.LABELS_DIR)) if n.endswith(".png")}
    rows, _ = _result_rows(out_uri)
    latest = _latest_by_id(rows)
    done = {i for i, r in latest.items() if r.get("status") in ("ok", "resumed") and i in pngs}
    rejected = {i for i, r in latest.items() if r.get("status") == "rejected"}
    if not retry_rejected:
        done |= rejected
    return done, rejected


def compact_results(out_uri: str, shard_rejects: Iterable[tuple[str, str]] = ()) -> dict:
    """Merge the result table, _rejects.parquet and every part into part-00000.parquet (ok rows, sorted by id) and
    _rejects.parquet (id, reason), one row per id (the latest); then delete the merged parts. ``shard_rejects``:
    (id, reason) of the shard set's own rejects (ids that never reached the pipeline), kept as rejects with the
    reason prefixed ``shard: `` unless a later row of the same id exists."""
    from wsss.data import fs

    rows, parts = _result_rows(out_uri)
    shard_rows = []
    for i, r in shard_rejects:
        reason = str(r)
        if not reason.startswith("shard: "):
            reason = "shard: " + reason
        shard_rows.append({"id": str(i), "status": "rejected", "reason": reason, "written_at": -2.0})
    latest = _latest_by_id(shard_rows + rows)
    ok = [r for r in latest.values() if r.get("status") != "rejected"]
    rej = [r for r in latest.values() if r.get("status") == "rejected"]
    ok.sort(key=lambda r: r["id"])
    rej.sort(key=lambda r: r["id"])
    import pyarrow as pa

    fs.write_bytes(fs.join(out_uri, RESULTS_FILE), _parquet_bytes(ok, _result_schema(with_extra=False)))
    fs.write_bytes(fs.join(out_uri, REJECTS_FILE),
                   _parquet_bytes(rej, pa.schema([("id", pa.string()), ("reason", pa.string())])))
    for p in parts:
        try:
            fs.remove(fs.join(out_uri, RESULTS_DIR, p))
        except FileNotFoundError:
            pass
    return {"n_results": len(ok), "n_rejects": len(rej), "parts_merged": len(parts)}


# ---- ds.stats() ----------------------------------------------------------------------------------------

_OP_RE = re.compile(r"^\s*(?:Operator|Suboperator)\s+\d+\s+(.+?):\s", re.M)
_STAGE_OF = (("FromItems", "list"), ("_ReadShardFiles", "read"), ("ReadParquet", "read"), ("filter_done", "filter"), ("decode_images", "decode"),
             ("Repartition", "repartition"), ("CamInference", "cam"), ("RandomWalk", "rw"), ("dense_crf", "crf"))


def parse_stats(text: str) -> list[dict]:
    """Per-operator rows from ``ds.stats()``: operator, stage, rows (output), rows_per_s (Ray Data throughput),
    single_task_rows_per_s, wall_s (sum of remote wall time)."""
    out = []
    heads = list(_OP_RE.finditer(text))
    for i, m in enumerate(heads):
        body = text[m.end(): heads[i + 1].start() if i + 1 < len(heads) else len(text)]
        body = body.split("\nDataset throughput:")[0]
        name = m.group(1).strip()
        row: dict[str, Any] = {"operator": name,
                               "stage": "+".join(s for key, s in _STAGE_OF if key in name) or name}
        g = re.search(r"Total output num rows:\s*([\d.]+)", body) or \
            re.search(r"Output num rows per block:.*?([\d.]+) total", body)
        row["rows"] = int(float(g.group(1))) if g else None
        g = re.search(r"Ray Data throughput:\s*([\d.eE+-]+) rows/s", body)
        row["rows_per_s"] = float(g.group(1)) if g else None
        g = re.search(r"Estimated single (?:task|node) throughput:\s*([\d.eE+-]+) rows/s", body)
        row["single_task_rows_per_s"] = float(g.group(1)) if g else None
        for key, label in (("wall_s", "Remote wall time"), ("cpu_s", "Remote cpu time")):
            g = re.search(label + r":.*?,\s*([\d.]+)(us|ms|s|m|h) total", body)
            row[key] = (float(g.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}[g.group(2)]
                        if g else None)
        if "[execution cached]" in body.split("\n", 1)[0]:
            continue
        out.append(row)
    return out


def format_stats(rows: list[dict]) -> str:
    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    lines = ["| stage | operator | rows | rows/s | rows/s per task | task wall s | task cpu s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['operator'][:60]} | {f(r['rows'], '{}')} | {f(r['rows_per_s'])} | "
                     f"{f(r['single_task_rows_per_s'])} | {f(r['wall_s'])} | {f(r.get('cpu_s'))} |")
    return "\n".join(lines)


# ---- the job --------------------------------------------------------------------------------------------

def _build_pipeline(shards_uri, st, done, max_images, batch_size, class_names, checkpoint, overrides, cfg, affinity,
                    has_gpu, actor_threads, cam_actors, rw_actors, crf_tasks, gpus_per_cam_actor, gpus_per_rw_actor,
                    final):
    """The lazy Ray Data pipeline: read -> filter done -> decode -> small blocks -> CAM -> [RW] -> [CRF]."""
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from cluster.storage import read_shards_ray

    last = st[-1]
    ds = read_shards_ray(shards_uri, columns=SHARD_COLUMNS)
    if done:
        ds = ds.map_batches(filter_done, batch_format="pyarrow", batch_size=None, fn_kwargs={"done": frozenset(done)})
    if max_images is not None:
        ds = ds.limit(int(max_images))
    ds = ds.map_batches(decode_images, batch_format="numpy", batch_size=batch_size,
                        fn_kwargs={"num_fg": len(class_names) - 1})
    # Small blocks downstream: each actor/task call sees about one batch, so stages overlap at a fine grain.
    ds = ds.repartition(target_num_rows_per_block=batch_size)

    def actor_args(gpus: float) -> dict:
        if has_gpu:
            return {"num_gpus": gpus, "num_cpus": 1}
        return {"num_cpus": 1}

    device = "cuda" if has_gpu else "cpu"
    threads = None if has_gpu else actor_threads
    ds = ds.map_batches(CamInference, batch_format="numpy", batch_size=batch_size,
                        compute=ActorPoolStrategy(size=int(cam_actors)),
                        fn_constructor_kwargs={"checkpoint": checkpoint, "cfg_overrides": overrides, "device": device,
                                               "threads": threads, "final": final if last == "cam" else None,
                                               "bg_threshold": cfg.infer.bg_threshold},
                        **actor_args(gpus_per_cam_actor))
    if "rw" in st:
        ds = ds.map_batches(RandomWalk, batch_format="numpy", batch_size=batch_size,
                            compute=ActorPoolStrategy(size=int(rw_actors)),
                            fn_constructor_kwargs={"affinity": affinity, "cfg": cfg, "device": device,
                                                   "threads": threads, "final": final if last == "rw" else None},
                            **actor_args(gpus_per_rw_actor))
    if "crf" in st:
        ds = ds.map_batches(dense_crf, batch_format="numpy", batch_size=batch_size,
                            compute=TaskPoolStrategy(size=crf_tasks) if crf_tasks else TaskPoolStrategy(),
                            num_cpus=1,
                            fn_kwargs={"crf_cfg": cfg.crf, "bg_threshold": cfg.infer.bg_threshold, "final": final})
    return ds


def _read_checkpoint_config(checkpoint: str, overrides: list[str]):
    """(cfg with overrides, class_names) from config.yaml + meta.json only (the weights load in the actors)."""
    import yaml

    from wsss import config as config_mod
    from wsss.data import fs

    try:
        cfg_data = yaml.safe_load(fs.read_bytes(fs.join(checkpoint, "config.yaml"))) or {}
        meta = json.loads(fs.read_bytes(fs.join(checkpoint, "meta.json")) or b"{}")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"checkpoint {checkpoint}: {e} (not a wsss checkpoint folder?)") from None
    cfg = config_mod.from_dict(cfg_data, overrides)
    names = meta.get("class_names")
    if not names:
        raise ValueError(f"checkpoint {checkpoint}: meta.json has no class_names")
    return cfg, list(names)


DEFAULT_GPUS_PER_RW_ACTOR = 0.25  # README: the walk can share the CAM GPUs (0.25-0.5)


def pipeline_plan(stages, cam_actors: int, rw_actors: int, crf_tasks: int | None, use_gpu: bool,
                  gpus_per_cam_actor: float = 1.0, gpus_per_rw_actor: float = DEFAULT_GPUS_PER_RW_ACTOR) -> list:
    """The bundles the pipeline holds at once, as ``(what, count, bundle)`` for ``cluster.resources.check_plan``:
    the actor pools (1 CPU each, plus their GPU share with ``use_gpu``), one decode task, >= 1 CRF task."""
    st = list(stages)
    gpu = (lambda g: {"GPU": float(g)}) if use_gpu else (lambda g: {})
    plan = [("CAM actor", int(cam_actors), {"CPU": 1.0, **gpu(gpus_per_cam_actor)})]
    if "rw" in st:
        plan.append(("random-walk actor", int(rw_actors), {"CPU": 1.0, **gpu(gpus_per_rw_actor)}))
    plan.append(("decode task", 1, {"CPU": 1.0}))
    if "crf" in st:
        plan.append(("CRF task", int(crf_tasks or 1), {"CPU": 1.0}))
    return plan


def run_pseudolabel(checkpoint: str, shards_uri: str, out_uri: str, affinity: str | None = None,
                    stages: Iterable[str] | str = ("cam", "rw", "crf"), cam_actors: int = 1, rw_actors: int = 1,
                    crf_tasks: int | None = None, batch_size: int = 4, cfg_overrides: list[str] | None = None,
                    address: str | None = None, use_gpu: bool = False, gpus_per_cam_actor: float = 1.0,
                    gpus_per_rw_actor: float | None = None, actor_threads: int | None = 1,
                    max_images: int | None = None, retry_rejected: bool = True, actor_wait_s: int = 600,
                    num_cpus: int | None = None, progress: bool = True, verbose: bool = True,
                    max_resources: str | dict | None = None, cluster_config: str | None = None) -> dict:
    """Pseudo-label every image of the shard set at ``shards_uri`` into ``out_uri`` with Ray Data.

    stages: ordered subset of cam, rw, crf starting with cam (rw needs ``affinity``). cam_actors / rw_actors:
    actor pool sizes (with ``use_gpu`` each actor takes 1 CPU and ``gpus_per_*`` GPUs: 1 per CAM actor, 0.25 per
    random-walk actor by default; without, 1 CPU and ``actor_threads`` torch threads); crf_tasks: max concurrent
    CRF tasks (None: as many as CPUs allow). The plan is checked against what the cluster can scale to
    (``max_resources`` / ``cluster_config`` / the launcher's bootstrap config, else the nodes up now; see
    ``cluster.resources.resolve_capacity``) and requested from the autoscaler; only a plan that can never fit
    is an error.
    batch_size: rows per block/batch between stages. cfg_overrides: ``key=value`` overrides of the CAM
    checkpoint's config (infer.*, rw.*, crf.*). max_images: process at most this many not-yet-done images.
    Returns a summary dict with ``stage_stats`` (per-operator rows/s).
    """
    import ray
    from ray.data import DataContext

    from wsss.data import fs
    from wsss.data.shards import read_manifest
    from wsss.pseudolabel import check_stages

    try:
        from jobs.common import init_ray
    except ImportError:  # pragma: no cover - fallback when the shared helpers are absent
        init_ray = None

    st = check_stages(stages, affinity)
    overrides = list(cfg_overrides or [])
    cfg, ckpt_classes = _read_checkpoint_config(checkpoint, overrides)
    manifest = read_manifest(shards_uri)
    class_names = list(manifest["class_names"])
    if class_names != ckpt_classes:
        raise ValueError(f"checkpoint {checkpoint}: its {len(ckpt_classes)} classes {ckpt_classes[:4]}... do not match "
                         f"the {len(class_names)} classes of the shards at {shards_uri}")
    if batch_size < 1 or cam_actors < 1 or rw_actors < 1 or (crf_tasks is not None and crf_tasks < 1):
        raise ValueError("batch_size, cam_actors, rw_actors and crf_tasks must be >= 1")

    n_cpu_actors = int(cam_actors) + (int(rw_actors) if "rw" in st else 0)
    # CPUs the pipeline holds at once when there is no GPU: the actors, one decode task, >= 1 CRF task.
    cpus_needed = n_cpu_actors + 1 + (int(crf_tasks or 1) if "crf" in st else 0)
    if not ray.is_initialized():
        if num_cpus is None:
            # A private local cluster gets enough logical CPUs for every pool (they time-share the cores):
            # with only os.cpu_count() slots, CPU actors could hold them all and starve the decode/CRF tasks.
            num_cpus = max(os.cpu_count() or 1, cpus_needed + 1)
        if init_ray is not None:
            init_ray(address=address, num_cpus=num_cpus)
        else:  # pragma: no cover
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", num_cpus=num_cpus)
    has_gpu = bool(use_gpu)
    if gpus_per_rw_actor is None:
        gpus_per_rw_actor = DEFAULT_GPUS_PER_RW_ACTOR
    # Every bundle the pipeline holds at once must fit what the cluster can scale to (else Ray Data would start
    # the actors and wait forever for a CPU for the decode/CRF tasks); the autoscaler is asked for all of them.
    plan = pipeline_plan(st, cam_actors, rw_actors, crf_tasks, has_gpu, gpus_per_cam_actor, gpus_per_rw_actor)
    capacity = cres.resolve_capacity(max_resources, cluster_config)
    cres.check_plan(plan, capacity)
    requested = capacity.autoscaling and cres.request_bundles(cres.expand(plan))

    t_start = time.perf_counter()
    fs.makedirs(out_uri)
    _layout.migrate_output(out_uri)
    done, _ = done_ids(out_uri, retry_rejected=retry_rejected)
    all_ids = shard_ids(shards_uri)
    n_total = len(all_ids)
    done &= set(all_ids)
    n_done_before = len(done)
    n_todo = n_total - n_done_before if max_images is None else min(int(max_images), n_total - n_done_before)

    ctx = DataContext.get_current()
    ctx.wait_for_min_actors_s = int(actor_wait_s)  # no actors within this time -> fail, not hang
    ctx.enable_progress_bars = bool(progress)

    run_id = uuid.uuid4().hex[:8]
    final = {"out_uri": out_uri, "class_names": class_names, "run_id": run_id}

    n_ok = n_rej = 0
    new_rejects: list[tuple[str, str]] = []
    seen: set[str] = set()
    dup = 0
    t_pipe = time.perf_counter()
    t_first = t_last = None
    n_first = 0
    ds = None
    if n_todo > 0:  # nothing to do: no actors started at all
        ds = _build_pipeline(shards_uri, st, done, max_images, batch_size, class_names, checkpoint, overrides, cfg,
                             affinity, has_gpu, actor_threads, cam_actors, rw_actors, crf_tasks,
                             gpus_per_cam_actor, gpus_per_rw_actor, final)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            t_last = time.perf_counter()
            if t_first is None:
                t_first, n_first = t_last, len(batch["id"])
            for i, s, r in zip(batch["id"], batch["status"], batch["reason"]):
                if i in seen:
                    dup += 1
                seen.add(i)
                if s == "ok":
                    n_ok += 1
                else:
                    n_rej += 1
                    new_rejects.append((str(i), str(r)))
    pipe_s = time.perf_counter() - t_pipe
    if requested:
        cres.release_request()  # the nodes may scale down once idle
    stats_text = ds.stats() if ds is not None else ""
    stage_stats = parse_stats(stats_text)
    try:
        from wsss.data.shards import read_rejects

        shard_rejects = read_rejects(shards_uri)
    except FileNotFoundError:
        shard_rejects = []
    compaction = compact_results(out_uri, shard_rejects)
    elapsed = time.perf_counter() - t_start
    processed = n_ok + n_rej
    summary = {
        "out": out_uri, "shards": shards_uri, "stages": list(st), "run_id": run_id,
        "n_images": n_total, "n_done_before": n_done_before, "n_todo": n_todo, "n_processed": processed, "n_ok": n_ok,
        "n_rejected": n_rej, "rejects": new_rejects, "duplicates_in_run": dup,
        "n_results": compaction["n_results"], "n_rejects_total": compaction["n_rejects"],
        "seconds": elapsed, "pipeline_seconds": pipe_s,
        "images_per_s": processed / pipe_s if pipe_s > 0 and processed else 0.0,
        # start-up (actor processes, model loads, first batch through every stage) vs the rate after it
        "first_output_s": (t_first - t_pipe) if t_first is not None else None,
        "steady_images_per_s": ((processed - n_first) / (t_last - t_first)
                                if t_first is not None and t_last > t_first and processed > n_first else None),
        "resources": {"gpu": has_gpu, "cam_actors": cam_actors, "rw_actors": rw_actors if "rw" in st else 0,
                      "crf_tasks": crf_tasks if "crf" in st else 0, "batch_size": batch_size},
        "stage_stats": stage_stats,
        "results": fs.join(out_uri, RESULTS_FILE), "rejects_uri": fs.join(out_uri, REJECTS_FILE),
    }
    if n_todo > 0:  # a no-op rerun keeps the stats of the run that did the work
        fs.write_bytes(fs.join(out_uri, STATS_FILE), (json.dumps(
            {k: summary[k] for k in ("run_id", "stages", "n_processed", "pipeline_seconds", "images_per_s",
                                     "first_output_s", "steady_images_per_s", "resources", "stage_stats")}
            | {"ray_data_stats": stats_text}, indent=2, default=float) + "\n").encode())
    if verbose:
        print(f"pseudolabel: {processed} processed ({n_ok} ok, {n_rej} rejected), {n_done_before} already done, "
              f"{processed / pipe_s if pipe_s > 0 else 0:.2f} img/s", file=sys.stderr)
        print(format_stats(stage_stats), file=sys.stderr)
        for i, r in new_rejects[:20]:
            print(f"rejected {i}: {_redact(r)}", file=sys.stderr)
    return summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.pseudolabel",
                                description="Pseudo-label a sharded dataset with Ray Data (CAM -> RW -> CRF).")
    p.add_argument("--checkpoint", required=True, help="CAM checkpoint folder (local or s3://)")
    p.add_argument("--affinity", default=None, help="AffinityNet checkpoint folder (needed for stage rw)")
    p.add_argument("--data", required=True, help="shard folder (_manifest.json + Parquet shards), local or s3://")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--stages", default="cam,rw,crf", help="comma list, ordered subset of cam,rw,crf (default all)")
    p.add_argument("--cam-actors", type=int, default=1, help="CAM actor pool size (1 GPU each when GPUs exist)")
    p.add_argument("--rw-actors", type=int, default=1, help="random-walk actor pool size")
    p.add_argument("--crf-tasks", type=int, default=None, help="max concurrent CRF tasks (default: CPUs allow)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per batch/block between stages")
    p.add_argument("--use-gpu", action="store_true",
                   help="CAM and random-walk actors on GPUs (the cluster's GPU nodes may still be scaling up)")
    p.add_argument("--gpus-per-cam-actor", type=float, default=1.0, help="with --use-gpu (default 1)")
    p.add_argument("--gpus-per-rw-actor", type=float, default=None,
                   help=f"with --use-gpu (default {DEFAULT_GPUS_PER_RW_ACTOR}: the walk is cheap, actors share a GPU)")
    p.add_argument("--actor-threads", type=int, default=1, help="torch threads per CPU actor (default 1)")
    p.add_argument("--cpu", action="store_true", help="no GPUs (the default without --use-gpu)")
    p.add_argument("--max-images", type=int, default=None, help="process at most N not-yet-done images")
    p.add_argument("--skip-rejected", action="store_true", help="do not retry ids rejected by an earlier run")
    p.add_argument("--actor-wait-s", type=int, default=600,
                   help="fail when the actor pools cannot start within this many seconds (default 600)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the checkpoint's config (infer.*, rw.*, crf.*), repeatable")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a private local cluster)")
    p.add_argument("--cluster", action="store_true", help="join the running cluster (RAY_ADDRESS or auto)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs of a private local cluster (default: enough for every pool)")
    p.add_argument("--max-resources", default=None, metavar="CPU=N,GPU=N",
                   help="what the cluster can scale to, for the plan check (default: --cluster-config, else the "
                        "launcher's ~/ray_bootstrap_config.yaml, else the nodes up now)")
    p.add_argument("--cluster-config", default=None, help="Ray cluster launcher YAML bounding the plan")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", default=None, help="write the summary JSON here too")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # auth: the cluster's RAY_AUTH_MODE; a private local cluster: jobs.common
    address = args.address
    if address is None and args.cluster:
        address = os.environ.get("RAY_ADDRESS") or "auto"
    try:
        res = run_pseudolabel(args.checkpoint, args.data, args.out, affinity=args.affinity, stages=args.stages,
                              cam_actors=args.cam_actors, rw_actors=args.rw_actors, crf_tasks=args.crf_tasks,
                              batch_size=args.batch_size, cfg_overrides=args.overrides, address=address,
                              use_gpu=args.use_gpu and not args.cpu, gpus_per_cam_actor=args.gpus_per_cam_actor,
                              gpus_per_rw_actor=args.gpus_per_rw_actor, actor_threads=args.actor_threads,
                              max_images=args.max_images, retry_rejected=not args.skip_rejected,
                              actor_wait_s=args.actor_wait_s, num_cpus=args.num_cpus,
                              progress=not args.no_progress, max_resources=args.max_resources,
                              cluster_config=args.cluster_config)
    except (FileNotFoundError, ValueError) as e:
        print(f"pseudolabel: error: {_redact(_one_line(e))}", file=sys.stderr)
        return 2
    text = json.dumps({k: v for k, v in res.items() if k != "rejects"}, indent=2, default=float)
    print(_redact(text))
    if args.json:
        from wsss.data import fs

        fs.write_bytes(args.json, (text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
