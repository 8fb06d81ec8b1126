"""Names of the files in a shard folder and in a pseudo-label output prefix, so that each is a Parquet *dataset*
every reader takes as-is (pyarrow.dataset, ``ray.data.read_parquet``, Spark, DuckDB, pandas).

The rule: the only ``*.parquet`` files visible in such a folder are its data files; everything else (manifest,
rejects, label PNGs, in-flight parts, statistics) has a name starting with ``_``, which pyarrow's dataset discovery
skips in any path component and Ray Data's file listing (2.60: ``.``/``_`` prefixes relative to the root) skips
too. Temporary files of atomic local writes start with ``.`` (skipped the same way).

Shard folder (``wsss shard``)::

    shard-00000.parquet ...   the data: one row per image (wsss.data.shards.SHARD_SCHEMA)
    _manifest.json            written last: counts, class names, source, shard files with sha256
    _rejects.parquet          id, reason: every listed id that is not in the shards

Pseudo-label output prefix (``wsss pseudolabel``, ``jobs.pseudolabel``)::

    part-00000.parquet        the data: one row per labelled id (id, classes, sec_cam, sec_rw, sec_crf, status)
    _labels/<id>.png          VOC-palette label maps (class indices, 255 = ignore)
    _rejects.parquet          id, reason: every id of the input that has no label
    _parts/part-*.parquet     the Ray job's per-batch results while it runs (merged into part-00000 at the end)
    _stage_stats.json         the Ray job's per-stage throughput

Older folders (``manifest.json``, ``rejects.parquet``, ``results.parquet``, ``results/``, ``stage_stats.json`` and
``<id>.png`` beside them) are still read, with one :class:`LegacyLayoutWarning` per folder; a pseudo-label run into
an old output folder first moves its files to the new names (:func:`migrate_output`).
"""
from __future__ import annotations

import warnings

from wsss.data import fs

__all__ = [
    "MANIFEST", "REJECTS", "LEGACY_MANIFEST", "LEGACY_REJECTS", "RESULTS", "RESULTS_PREFIX", "LABELS_DIR",
    "PARTS_DIR", "STATS", "LEGACY_RESULTS", "LEGACY_PARTS_DIR", "LEGACY_STATS", "LegacyLayoutWarning",
    "side_file", "label_dir", "label_uri", "read_rejects", "result_files", "is_legacy_output", "migrate_output", "warn_legacy",
]

# shard folders
MANIFEST = "_manifest.json"
REJECTS = "_rejects.parquet"  # also the pseudo-label output's rejects
LEGACY_MANIFEST = "manifest.json"
LEGACY_REJECTS = "rejects.parquet"

# pseudo-label output prefixes
RESULTS = "part-00000.parquet"
RESULTS_PREFIX = "part-"
LABELS_DIR = "_labels"
PARTS_DIR = "_parts"
STATS = "_stage_stats.json"
LEGACY_RESULTS = "results.parquet"
LEGACY_PARTS_DIR = "results"
LEGACY_STATS = "stage_stats.json"


class LegacyLayoutWarning(FutureWarning):
    """A folder written before the Parquet-dataset layout (side files without a leading underscore)."""


_warned: set[str] = set()


def warn_legacy(folder: str, what: str) -> None:
    """One warning per folder and process."""
    key = str(folder).rstrip("/")
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"{folder}: old layout ({what}); still read, but rewrite it (re-run the step that made it) so "
                  f"Parquet readers see only data files. Support for the old names will be removed.",
                  LegacyLayoutWarning, stacklevel=3)


def _names(folder: str) -> set[str]:
    try:
        return set(fs.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return set()


def side_file(folder: str, name: str, legacy: str, names: set[str] | None = None) -> str:
    """URI of a side file: ``folder/name``, or ``folder/legacy`` (with the one-time warning) when only the old
    name exists. ``names``: the folder's listing when the caller has it."""
    names = _names(folder) if names is None else names
    if name not in names and legacy in names:
        warn_legacy(folder, f"{legacy} instead of {name}")
        return fs.join(folder, legacy)
    return fs.join(folder, name)


def label_dir(pred: str, names: set[str] | None = None) -> str:
    """Folder holding the ``<id>.png`` label maps of a prediction folder: ``pred/_labels`` for a pseudo-label
    output prefix, else ``pred`` itself (a plain folder of PNGs, ``wsss cams --labels`` output, or an old-layout
    output prefix)."""
    names = _names(pred) if names is None else names
    if LABELS_DIR in names:
        return fs.join(pred, LABELS_DIR)
    if LEGACY_RESULTS in names or LEGACY_REJECTS in names:
        warn_legacy(pred, "label PNGs beside results.parquet instead of under _labels/")
    return pred


def read_rejects(folder: str, names: set[str] | None = None) -> dict[str, str]:
    """{id: reason} from a folder's ``_rejects.parquet`` (or the old ``rejects.parquet``); {} when it has none
    or it cannot be read."""
    from wsss.data.io import read_parquet_bytes

    names = _names(folder) if names is None else names
    if REJECTS not in names and LEGACY_REJECTS not in names:
        return {}
    uri = side_file(folder, REJECTS, LEGACY_REJECTS, names)
    try:
        table = read_parquet_bytes(fs.read_bytes(uri))
    except Exception:  # noqa: BLE001 - a torn or foreign file: no rejects known
        return {}
    cols = table.column_names
    if "id" not in cols or "reason" not in cols:
        return {}
    return dict(zip(table.column("id").to_pylist(), (str(r) for r in table.column("reason").to_pylist())))


def label_uri(out: str, item_id: str) -> str:
    """Where a pseudo-label run writes the label of ``item_id``."""
    return fs.join(out, LABELS_DIR, f"{item_id}.png")


def result_files(out: str, names: set[str] | None = None) -> list[str]:
    """URIs of the result-row files of an output prefix: every top-level ``part-*.parquet`` (sorted), or the
    old ``results.parquet``."""
    names = _names(out) if names is None else names
    parts = sorted(n for n in names if n.startswith(RESULTS_PREFIX) and n.endswith(".parquet"))
    if parts:
        return [fs.join(out, n) for n in parts]
    if LEGACY_RESULTS in names:
        warn_legacy(out, f"{LEGACY_RESULTS} instead of {RESULTS}")
        return [fs.join(out, LEGACY_RESULTS)]
    return []


def is_legacy_output(names: set[str]) -> bool:
    return (LEGACY_RESULTS in names or LEGACY_REJECTS in names or LEGACY_STATS in names
            or any(n.endswith(".png") for n in names))


def migrate_output(out: str) -> int:
    """Move an old-layout output prefix to the new names (``<id>.png`` -> ``_labels/``, ``results.parquet`` ->
    ``part-00000.parquet``, ``rejects.parquet`` -> ``_rejects.parquet``, ``results/*`` -> ``_parts/``,
    ``stage_stats.json`` -> ``_stage_stats.json``). Each file is written under its new name before the old one is
    deleted, so an interrupted migration loses nothing (a rerun finishes it). Returns the number of files moved."""
    names = _names(out)
    if not is_legacy_output(names) and LEGACY_PARTS_DIR not in names:
        return 0
    warn_legacy(out, "migrating to the Parquet-dataset layout")
    moves: list[tuple[str, str]] = []
    for n in sorted(names):
        if n.endswith(".png"):
            moves.append((fs.join(out, n), fs.join(out, LABELS_DIR, n)))
    for old, new in ((LEGACY_RESULTS, RESULTS), (LEGACY_REJECTS, REJECTS), (LEGACY_STATS, STATS)):
        if old in names and new not in names:
            moves.append((fs.join(out, old), fs.join(out, new)))
        elif old in names:  # the new file wins; the old one is stale
            moves.append((fs.join(out, old), None))
    if LEGACY_PARTS_DIR in names:
        for n in sorted(_names(fs.join(out, LEGACY_PARTS_DIR))):
            if n.startswith("part-") and n.endswith(".parquet"):
                moves.append((fs.join(out, LEGACY_PARTS_DIR, n), fs.join(out, PARTS_DIR, n)))
    for src, dst in moves:
        if dst is not None:
            fs.write_bytes(dst, fs.read_bytes(src))
        fs.remove(src)
    return len(moves)
