"""Parquet shards of a wsss dataset (pure pyarrow; local or s3:// through wsss.data.fs; no Ray).

Layout of a shard folder ``DST`` (a Parquet dataset: the shards are its only visible ``*.parquet`` files, the side
files start with ``_`` so pyarrow.dataset / ``ray.data.read_parquet`` / Spark skip them; see wsss.data.layout)::

    DST/shard-00000.parquet ...   one row per image, schema SHARD_SCHEMA
    DST/_rejects.parquet          id, reason: every listed id that is not in the shards (bad item, unsafe id, ...)
    DST/_manifest.json            written last: counts, class names, source, shard files with sha256

Folders of the old layout (``manifest.json``, ``rejects.parquet``) are still read, with a LegacyLayoutWarning.

Row: ``id`` (str), ``image`` (the original encoded bytes, JPEG/PNG, unchanged), ``labels`` (list<float32>,
multi-hot over the K = C-1 foreground classes), ``mask`` (the mask PNG bytes, or null), ``width``, ``height``
(int32, of the decoded image).

Every item is validated before it is written (id, image decodes, mask decodes and matches the image size and the
class count, labels have K entries in {0, 1} with at least one positive); a bad item goes to _rejects.parquet with
a one-line reason and the rest is sharded, so ``n_images + n_rejects`` = the ids listed (the unsafe ids the
dataset reader refused, e.g. ``../x`` in a split file, are rejects too). Shards and the manifest are written atomically; the manifest appears
only when all shards are written, so a folder with a manifest is complete. Re-running into the same folder
rewrites it (idempotent) and removes stale shard files that the new manifest does not list.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io as _io
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from wsss.data import fs, layout

__all__ = [
    "SHARD_SCHEMA",
    "REJECT_SCHEMA",
    "FORMAT",
    "MANIFEST",
    "REJECTS",
    "shard_name",
    "write_shards",
    "read_manifest",
    "shard_files",
    "iter_shard_rows",
    "read_rejects",
    "verify_shards",
    "ShardDataset",
]

FORMAT = "wsss-shards/1"
MANIFEST = layout.MANIFEST  # "_manifest.json"
REJECTS = layout.REJECTS  # "_rejects.parquet"

SHARD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("labels", pa.list_(pa.float32()), nullable=False),
        pa.field("mask", pa.binary(), nullable=True),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ]
)
REJECT_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("reason", pa.string())])

# Encoded images/masks are already compressed: storing them uncompressed saves CPU on both ends.
_COMPRESSION = {"id": "snappy", "image": "none", "labels": "snappy", "mask": "none", "width": "snappy",
                "height": "snappy"}
_ROW_GROUP = 64  # rows per row group: bounded memory when streaming rows


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 300 else msg[:297] + "..."


def _check_item(dataset, item_id, num_fg: int, num_classes: int) -> tuple[dict | None, str | None]:
    """Validate and load one item -> (row, None) or (None, reason)."""
    from wsss.data import io as wio  # decode helpers (owner: data)

    try:
        sid = wio.validate_id(item_id)
    except Exception as e:  # BadItem or a non-string id
        return None, f"bad id: {_one_line(e)}"
    try:
        image = dataset.image_bytes(sid)
        img = wio.decode_image(image, f"{sid} image")
        h, w = int(img.shape[0]), int(img.shape[1])
        del img
        labels = np.asarray(dataset.labels(sid), dtype=np.float32).reshape(-1)
        if labels.shape[0] != num_fg:
            return None, f"labels have {labels.shape[0]} entries, expected {num_fg} foreground classes"
        if not np.all((labels == 0) | (labels == 1)):
            return None, "labels are not multi-hot (values other than 0 and 1)"
        if labels.sum() == 0:
            return None, "empty labels (no foreground class): unusable for image-level supervision"
        mask = dataset.mask_bytes(sid) if getattr(dataset, "has_masks", True) else None
        if mask is not None:
            mask = bytes(mask)
            wio.decode_mask(mask, f"{sid} mask", expected_hw=(h, w), num_classes=num_classes)
    except Exception as e:  # BadItem, FileNotFoundError, decode errors: recorded, never raised
        return None, _one_line(e)
    return {"id": sid, "image": bytes(image), "labels": labels.tolist(), "mask": mask, "width": w,
            "height": h}, None


def _table_bytes(rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    buf = _io.BytesIO()
    pq.write_table(table, buf, compression=_COMPRESSION, row_group_size=_ROW_GROUP)
    return buf.getvalue()


def _rejects_bytes(rejects: list[tuple[str, str]]) -> bytes:
    table = pa.Table.from_pylist([{"id": str(i), "reason": r} for i, r in rejects], schema=REJECT_SCHEMA)
    buf = _io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_shards(dataset, dst_uri: str, shard_size: int = 1000, progress: bool = True,
                 num_threads: int = 4, source: str | None = None) -> dict:
    """Write ``dataset`` (the ``open_dataset`` API: ids, class_names, image_bytes, mask_bytes, labels, has_masks)
    as Parquet shards under ``dst_uri`` (local or s3://). Returns the manifest dict (also written to
    ``<dst>/manifest.json``). ``num_threads`` threads read/validate items (I/O bound on S3); order is kept."""
    if int(shard_size) < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    shard_size = int(shard_size)
    class_names = [str(c) for c in dataset.class_names]
    num_classes = len(class_names)
    num_fg = num_classes - 1
    if num_fg < 1:
        raise ValueError(f"dataset {getattr(dataset, 'root', '?')} has no foreground classes: {class_names}")
    ids = list(dataset.ids)

    fs.makedirs(dst_uri)
    manifest_uri = fs.join(dst_uri, MANIFEST)
    existing = set(_listdir(dst_uri))
    for name in (MANIFEST, layout.LEGACY_MANIFEST):  # invalidate first: a half-rewritten folder must not look complete
        if name in existing:
            fs.remove(fs.join(dst_uri, name))

    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="shard", unit="img", file=sys.stderr)
        except ImportError:  # pragma: no cover
            bar = None

    shards: list[dict] = []
    # ids the reader refused before listing them (unsafe ids in a split file / labels.csv): rejects too
    rejects: list[tuple[str, str]] = [(str(i), _one_line_text(r)) for i, r in getattr(dataset, "rejects", None) or []]
    seen: set[str] = set()
    buffer: list[dict] = []

    def flush():
        data = _table_bytes(buffer)
        name = shard_name(len(shards))
        fs.write_bytes(fs.join(dst_uri, name), data)
        shards.append({"file": name, "rows": len(buffer), "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})
        buffer.clear()

    def work(item_id):
        return item_id, _check_item(dataset, item_id, num_fg, num_classes)

    n_threads = max(1, int(num_threads))
    pool = ThreadPoolExecutor(n_threads) if n_threads > 1 else None
    try:
        # bounded window of in-flight items so memory stays ~ shard_size + window rows
        window = max(1, 4 * n_threads)
        results: Iterator = (
            _windowed_map(pool, work, ids, window) if pool is not None else map(work, ids)
        )
        for item_id, (row, reason) in results:
            if bar is not None:
                bar.update(1)
            if row is not None and row["id"] in seen:
                row, reason = None, "duplicate id"
            if row is None:
                rejects.append((str(item_id), reason))
                continue
            seen.add(row["id"])
            buffer.append(row)
            if len(buffer) >= shard_size:
                flush()
        if buffer:
            flush()
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        if bar is not None:
            bar.close()

    fs.write_bytes(fs.join(dst_uri, REJECTS), _rejects_bytes(rejects))
    # remove shard files of an earlier, larger run into the same folder, and the old layout's rejects file
    keep = {s["file"] for s in shards}
    for name in _listdir(dst_uri):
        if (name.startswith("shard-") and name.endswith(".parquet") and name not in keep) \
                or name == layout.LEGACY_REJECTS:
            fs.remove(fs.join(dst_uri, name))

    manifest = {
        "format": FORMAT,
        "n_images": int(sum(s["rows"] for s in shards)),
        "n_rejects": len(rejects),
        "class_names": class_names,
        "num_classes": num_classes,
        "has_masks": bool(getattr(dataset, "has_masks", False)),
        "source": source if source is not None else _describe_source(dataset),
        "shard_size": shard_size,
        "shards": shards,
        "rejects": REJECTS,
        "columns": [f.name for f in SHARD_SCHEMA],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    fs.write_text(manifest_uri, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _listdir(uri: str) -> list[str]:
    try:
        return fs.listdir(uri)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _one_line_text(text) -> str:
    return _one_line(ValueError(str(text)))


def _windowed_map(pool, fn, items, window):
    """Like pool.map but with at most ``window`` tasks in flight; yields in input order."""
    from collections import deque

    pending: deque = deque()
    it = iter(items)
    for item in it:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _describe_source(dataset) -> dict:
    root = getattr(dataset, "root", None)
    return {"root": str(root) if root is not None else None, "split": getattr(dataset, "split", None),
            "layout": type(dataset).__name__}


# --- readers -----------------------------------------------------------------------------------------------------

def read_manifest(uri: str) -> dict:
    """The manifest of a shard folder (``_manifest.json``, or the old ``manifest.json`` with a
    LegacyLayoutWarning). Missing -> FileNotFoundError naming it; malformed -> ValueError."""
    m_uri = layout.side_file(uri, MANIFEST, layout.LEGACY_MANIFEST)
    try:
        text = fs.read_text(m_uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {MANIFEST} in {uri} (not a shard folder, or sharding did not finish)") from None
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{m_uri}: not valid JSON ({e})") from None
    for key in ("shards", "class_names", "n_images"):
        if key not in m:
            raise ValueError(f"{m_uri}: missing key {key!r}")
    for s in m["shards"]:
        name = s.get("file", "")
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(f"{m_uri}: bad shard file name {name!r}")
    return m


def shard_files(uri: str) -> list[str]:
    """Full URIs of the shard files listed in the manifest, in order."""
    return [fs.join(uri, s["file"]) for s in read_manifest(uri)["shards"]]


def _row_dict(rec: dict) -> dict:
    rec["labels"] = np.asarray(rec["labels"], dtype=np.float32)
    return rec


def iter_shard_rows(uri: str, columns: list[str] | None = None) -> Iterator[dict]:
    """Yield rows (dicts) of every shard in manifest order: id (str), image (bytes), labels (float32 ndarray),
    mask (bytes|None), width, height (int). ``columns`` restricts what is read (e.g. ["id", "labels"])."""
    for f in shard_files(uri):
        from wsss.data.io import iter_parquet_bytes

        for batch in iter_parquet_bytes(fs.read_bytes(f), _ROW_GROUP, columns):
            for rec in batch.to_pylist():
                yield _row_dict(rec) if "labels" in rec else rec


def read_rejects(uri: str) -> list[tuple[str, str]]:
    """(id, reason) pairs from ``<uri>/_rejects.parquet`` (or the old ``rejects.parquet``); [] when there were
    none. A folder without either -> FileNotFoundError."""
    r_uri = layout.side_file(uri, REJECTS, layout.LEGACY_REJECTS)
    from wsss.data.io import read_parquet_bytes

    table = read_parquet_bytes(fs.read_bytes(r_uri))
    return list(zip(table.column("id").to_pylist(), table.column("reason").to_pylist()))


def verify_shards(uri: str, deep: bool = False) -> dict:
    """Check every shard listed in the manifest: present, sha256 matches, row count matches, schema matches
    (and with ``deep``, ids unique across shards). Returns ``{"ok": bool, "n_rows": int, "errors": [str]}``
    with one line per problem naming the file."""
    m = read_manifest(uri)
    errors: list[str] = []
    n_rows = 0
    seen: set[str] = set()
    for s in m["shards"]:
        f = fs.join(uri, s["file"])
        try:
            data = fs.read_bytes(f)
        except FileNotFoundError:
            errors.append(f"{f}: missing")
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest != s.get("sha256"):
            errors.append(f"{f}: sha256 mismatch (manifest {str(s.get('sha256'))[:12]}..., file {digest[:12]}...)")
            continue
        try:
            pf = pq.ParquetFile(pa.BufferReader(data), pre_buffer=False)
        except Exception as e:
            errors.append(f"{f}: unreadable parquet ({_one_line(e)})")
            continue
        if pf.metadata.num_rows != s.get("rows"):
            errors.append(f"{f}: {pf.metadata.num_rows} rows, manifest says {s.get('rows')}")
        if not pf.schema_arrow.equals(SHARD_SCHEMA):
            errors.append(f"{f}: schema differs from {FORMAT}")
        n_rows += pf.metadata.num_rows
        if deep:
            for i in pf.read(columns=["id"], use_threads=False).column("id").to_pylist():
                if i in seen:
                    errors.append(f"{f}: duplicate id {i!r}")
                seen.add(i)
    if n_rows != m["n_images"] and not errors:
        errors.append(f"{uri}: manifest n_images {m['n_images']} but shards hold {n_rows} rows")
    return {"ok": not errors, "n_rows": n_rows, "errors": errors}


class ShardDataset:
    """A shard folder seen through the ``open_dataset`` API (ids, class_names, num_classes, has_masks,
    image_bytes, mask_bytes, labels, load_image, load_mask), for single-process code such as ``wsss.train``.
    Holds every row's encoded bytes in memory: meant for small and medium sets; use Ray Data for large ones."""

    def __init__(self, uri: str):
        self.root = uri
        self.split = None
        self.manifest = read_manifest(uri)
        self.class_names = list(self.manifest["class_names"])
        self.num_classes = len(self.class_names)
        self.has_masks = bool(self.manifest.get("has_masks", False))
        self._rows: dict[str, dict] = {}
        for rec in iter_shard_rows(uri):
            self._rows[rec["id"]] = rec
        self.ids = list(self._rows)

    def __len__(self) -> int:
        return len(self.ids)

    def _row(self, item_id: str) -> dict:
        try:
            return self._rows[item_id]
        except KeyError:
            raise KeyError(f"id {item_id!r} not in shards {self.root}") from None

    def image_bytes(self, item_id: str) -> bytes:
        return self._row(item_id)["image"]

    def mask_bytes(self, item_id: str) -> bytes | None:
        return self._row(item_id)["mask"]

    def labels(self, item_id: str) -> np.ndarray:
        return self._row(item_id)["labels"].copy()

    def load_image(self, item_id: str) -> np.ndarray:
        from wsss.data import io as wio

        return wio.decode_image(self.image_bytes(item_id), f"{self.root}:{item_id}")

    def load_mask(self, item_id: str) -> np.ndarray | None:
        from wsss.data import io as wio

        data = self.mask_bytes(item_id)
        if data is None:
            return None
        row = self._row(item_id)
        return wio.decode_mask(data, f"{self.root}:{item_id} mask", expected_hw=(row["height"], row["width"]),
                               num_classes=self.num_classes)

    def __repr__(self) -> str:
        return f"ShardDataset({self.root!r}, n={len(self.ids)}, classes={self.num_classes})"

