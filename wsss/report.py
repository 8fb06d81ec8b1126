"""Static HTML report: per-class IoU tables, per-stage throughput, and a visual grid
(image / ground truth / CAM / each label stage) for the first images of a split.

The page is self-contained (inline CSS, no scripts, no external assets); its images are PNG files written to a
folder beside it (``<name>_files/``) and referenced by relative paths, so the pair can be copied or served as is.
Local paths and s3:// URIs both work (through :mod:`wsss.data.fs`). Every name shown is HTML-escaped.
"""
from __future__ import annotations

import html
import io
import posixpath

import numpy as np

from wsss.data import fs
from wsss.viz import cam_overlay, label_to_rgb, resize_to, to_png

__all__ = ["write_report", "results_table_html", "throughput_table_html"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;margin:8px 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;font-variant-numeric:tabular-nums}
th:first-child,td:first-child{text-align:left}
tr.miou td{font-weight:bold;border-top:2px solid #888}
td.absent{color:#999}
table.grid td{text-align:center;vertical-align:top;font-size:.8em}
table.grid img{display:block;max-width:200px;image-rendering:pixelated}
.meta{color:#666;font-size:.9em}
"""

_THUMB = 192  # long side of grid thumbnails (pixels)


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _pct(v) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    return f"{100.0 * float(v):.2f}"


def results_table_html(results: dict[str, dict]) -> str:
    """One row per class, one column per result entry (IoU in percent), last row mIoU."""
    names: list[str] = []
    for r in results.values():
        for n in (r.get("per_class") or {}):
            if n not in names:
                names.append(n)
    cols = list(results)
    out = ["<table class='iou'><tr><th>class</th>" + "".join(f"<th>{_esc(c)}</th>" for c in cols) + "</tr>"]
    for n in names:
        cells = []
        for c in cols:
            per = results[c].get("per_class") or {}
            if n not in per:
                cells.append("<td></td>")
            elif per[n] is None:
                cells.append("<td class='absent'>absent</td>")
            else:
                cells.append(f"<td>{_pct(per[n])}</td>")
        out.append(f"<tr><td>{_esc(n)}</td>{''.join(cells)}</tr>")
    out.append("<tr class='miou'><td>mIoU</td>" + "".join(f"<td>{_pct(results[c].get('miou'))}</td>" for c in cols)
               + "</tr>")
    if any(results[c].get("best_threshold") is not None for c in cols):
        cells = []
        for c in cols:
            t = results[c].get("best_threshold")
            cells.append("<td></td>" if t is None else f"<td>{float(t):.2f}</td>")
        out.append("<tr><td>bg threshold</td>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def throughput_table_html(rows: list[dict]) -> str:
    """A table of per-stage measurements: columns = union of the rows' keys in first-seen order."""
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    out = ["<table class='throughput'><tr>" + "".join(f"<th>{_esc(k)}</th>" for k in keys) + "</tr>"]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k, "")
            if isinstance(v, float):
                v = f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
            cells.append(f"<td>{_esc(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _thumb(img: np.ndarray, label: bool = False) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(1.0, _THUMB / max(h, w))
    if s < 1.0:
        img = resize_to(img, (max(1, round(h * s)), max(1, round(w * s))), nearest=label)
    return img


def _load_cam_max(uri: str, hw: tuple[int, int]) -> np.ndarray:
    """Max over the stored CAM planes of ``<cams_dir>/<id>.npz`` (keys ``cam`` (K',H,W), ``keys``), at ``hw``."""
    with np.load(io.BytesIO(fs.read_bytes(uri)), allow_pickle=False) as z:
        cam = np.asarray(z["cam"], dtype=np.float32)
    if cam.ndim != 3:
        raise ValueError(f"{uri}: cam has shape {cam.shape}, want (K', H, W)")
    m = cam.max(axis=0) if cam.shape[0] else np.zeros(cam.shape[1:], np.float32)
    return np.clip(resize_to(m, hw), 0.0, 1.0)


def write_report(out_html: str, data_root: str, split: str | None = None, pred_dirs: dict[str, str] | None = None,
                 cams_dir: str | None = None, results: dict[str, dict] | None = None,
                 throughput: list[dict] | None = None, max_images: int = 16, title: str = "wsss report",
                 stage_miou: list[dict] | None = None) -> str:
    """Write the report page ``out_html`` (and its ``<name>_files/`` images). Returns ``out_html``.

    ``results``: {column name: result dict with "per_class"/"miou"} (e.g. {"CAM": ..., "+RW": ..., "+CRF": ...});
    ``pred_dirs``: {stage name: folder of ``<id>.png`` label maps}; ``cams_dir``: folder of ``<id>.npz`` CAMs;
    ``throughput``: list of per-stage dicts (e.g. {"stage": "rw", "images/s": 12.3}); ``stage_miou``: rows of the
    per-stage mIoU table shown first (e.g. {"stage": "CAM", "val mIoU %": 28.8}, ..., {"stage": "seg net", ...}).
    A missing or unreadable file leaves its grid cell with a short note instead of failing the page.
    """
    from wsss.data import open_dataset
    from wsss.data.io import BadItem, decode_mask

    out_html = str(out_html)
    from wsss.data.layout import label_dir

    pred_dirs = {k: label_dir(v) for k, v in (pred_dirs or {}).items()}  # <out>/_labels of a pseudo-label output
    ds = open_dataset(data_root, split)
    base = out_html.rsplit("/", 1)[0] if fs.is_remote(out_html) else None
    stem = posixpath.basename(out_html) if fs.is_remote(out_html) else out_html.replace("\\", "/").rsplit("/", 1)[-1]
    stem = stem[:-5] if stem.lower().endswith(".html") else stem
    files_rel = f"{stem}_files"
    if base is None:
        import os

        files_dir = os.path.join(os.path.dirname(os.path.abspath(out_html)), files_rel)
        os.makedirs(files_dir, exist_ok=True)
    else:
        files_dir = fs.join(base, files_rel)

    def put_png(name: str, arr: np.ndarray) -> str:
        fs.write_bytes(fs.join(files_dir, name), to_png(arr))
        return f"{files_rel}/{name}"

    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{_esc(title)}</h1>",
             f"<p class='meta'>dataset {_esc(ds.root)} &middot; split {_esc(ds.split or 'all')} &middot; "
             f"{len(ds)} images &middot; {ds.num_classes} classes</p>"]
    if stage_miou:
        parts.append("<h2>mIoU per stage</h2>")
        parts.append(throughput_table_html(list(stage_miou)))
    if results:
        parts.append("<h2>Per-class IoU (%)</h2>")
        parts.append(results_table_html(results))
    if throughput:
        parts.append("<h2>Throughput per stage</h2>")
        parts.append(throughput_table_html(list(throughput)))

    cols = ["image", "ground truth"] + (["CAM"] if cams_dir else []) + list(pred_dirs)
    parts.append("<h2>Examples</h2>")
    parts.append("<table class='grid'><tr><th>id</th>" + "".join(f"<th>{_esc(c)}</th>" for c in cols) + "</tr>")
    for n_row, item_id in enumerate(ds.ids[: max(0, int(max_images))]):
        cells: list[str] = []
        try:
            image = ds.load_image(item_id)
        except (BadItem, FileNotFoundError) as e:
            parts.append(f"<tr><td>{_esc(item_id)}</td><td colspan='{len(cols)}'>{_esc(_line(e))}</td></tr>")
            continue
        hw = image.shape[:2]
        tag = f"{n_row:03d}"
        cells.append(_img_cell(put_png(f"{tag}_image.png", _thumb(image)), "image"))
        try:
            mask = ds.load_mask(item_id, expected_hw=hw)
            cells.append(_img_cell(put_png(f"{tag}_gt.png", _thumb(label_to_rgb(mask), True)), "ground truth")
                         if mask is not None else "<td>no mask</td>")
        except (BadItem, FileNotFoundError) as e:
            cells.append(f"<td>{_esc(_line(e))}</td>")
        if cams_dir:
            uri = fs.join(cams_dir, f"{item_id}.npz")
            try:
                cam = _load_cam_max(uri, hw)
                cells.append(_img_cell(put_png(f"{tag}_cam.png", _thumb(cam_overlay(image, cam))), "CAM"))
            except FileNotFoundError:
                cells.append("<td>missing</td>")
            except Exception as e:  # a corrupt npz must not sink the page
                cells.append(f"<td>{_esc(_line(e))}</td>")
        for j, (stage, d) in enumerate(pred_dirs.items()):
            uri = fs.join(d, f"{item_id}.png")
            try:
                lab = decode_mask(fs.read_bytes(uri), uri)
                cells.append(_img_cell(put_png(f"{tag}_pred{j}.png", _thumb(label_to_rgb(lab), True)), stage))
            except FileNotFoundError:
                cells.append("<td>missing</td>")
            except BadItem as e:
                cells.append(f"<td>{_esc(_line(e))}</td>")
        parts.append(f"<tr><td>{_esc(item_id)}</td>{''.join(cells)}</tr>")
    parts.append("</table></body></html>")
    fs.write_bytes(out_html, "\n".join(parts).encode("utf-8"))
    return out_html


def _img_cell(src: str, alt: str) -> str:
    return f"<td><img src='{_esc(src)}' alt='{_esc(alt)}'></td>"


def _line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
