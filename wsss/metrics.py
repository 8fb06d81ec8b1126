"""Segmentation metrics: confusion matrix, per-class IoU / mIoU, background-threshold sweep, folder evaluation.

Conventions (SEAM-family evaluation, REFERENCE.md §1): mIoU over all C classes including background; ground-truth
pixels labelled 255 are ignored; a class that appears neither in the ground truth nor in the predictions has no
IoU (reported as absent / None) and is left out of the mean. A prediction value outside 0..C-1 (e.g. 255 =
"uncertain" in a pseudo label) on a valid ground-truth pixel counts as a miss for the ground-truth class.

CAM labels: the background score is a constant threshold t; a pixel takes the arg-max foreground class where that
class's CAM is > t, else background (arg-max over [t, cam_1..cam_K'] with ties to background, as SEAM).
"""
from __future__ import annotations

import json
from typing import Iterable

import numpy as np

__all__ = ["ConfusionMatrix", "iou_from_confusion", "format_table", "cam_to_label", "threshold_sweep",
           "evaluate_folder", "SEAM_THRESHOLDS", "DEFAULT_THRESHOLDS"]

IGNORE = 255

#: SEAM's sweep of the background threshold: 0.00 .. 0.59 in steps of 0.01.
SEAM_THRESHOLDS = np.round(np.arange(0.0, 0.60, 0.01), 2)
#: The default sweep: 0.00 .. 0.95. SEAM's range ends at 0.59 because its VOC CAMs peak near 0.2-0.3; on other data
#: (our synthetic set: best thresholds of 0.5-0.6 and more) a range that stops at 0.59 reports a truncated best.
#: Its first 60 entries are SEAM's, so a best threshold below 0.60 is the same as with SEAM's sweep.
DEFAULT_THRESHOLDS = np.round(np.arange(0.0, 0.96, 0.01), 2)


class ConfusionMatrix:
    """Accumulates a (C, C) confusion matrix, rows = ground truth, columns = prediction.

    ``.matrix`` is the (C, C) int64 matrix; ``.unassigned`` (C,) counts valid ground-truth pixels whose prediction
    was outside 0..C-1 (they lower that class's IoU).
    """

    def __init__(self, num_classes: int):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self._m = np.zeros((self.num_classes, self.num_classes + 1), np.int64)

    @property
    def matrix(self) -> np.ndarray:
        return self._m[:, : self.num_classes]

    @property
    def unassigned(self) -> np.ndarray:
        return self._m[:, self.num_classes]

    @property
    def extended(self) -> np.ndarray:
        """(C, C+1): the matrix with the unassigned column last (what iou_from_confusion accepts too)."""
        return self._m

    def reset(self) -> None:
        self._m[:] = 0

    def update(self, gt: np.ndarray, pred: np.ndarray) -> "ConfusionMatrix":
        gt = np.asarray(gt)
        pred = np.asarray(pred)
        if gt.shape != pred.shape:
            raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
        g = gt.reshape(-1).astype(np.int64)
        p = pred.reshape(-1).astype(np.int64)
        c = self.num_classes
        valid = g != IGNORE
        bad_gt = valid & ((g < 0) | (g >= c))
        if bad_gt.any():
            raise ValueError(f"ground truth has class index {int(g[bad_gt][0])} outside 0..{c - 1} (255 = ignore)")
        g, p = g[valid], p[valid]
        p = np.where((p < 0) | (p >= c), c, p)
        self._m += np.bincount(g * (c + 1) + p, minlength=c * (c + 1)).reshape(c, c + 1)
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class into {self.num_classes}-class confusion")
        self._m += other._m
        return self

    def result(self, class_names: list[str]) -> dict:
        return iou_from_confusion(self, class_names)


def iou_from_confusion(conf, class_names: list[str]) -> dict:
    """Per-class IoU and mIoU from a ConfusionMatrix, a (C, C) array or a (C, C+1) array (last column = unassigned).

    Returns ``{"miou": float in [0, 1] (nan when no class is present), "per_class": {name: iou | None},
    "absent": [names], "pixel_accuracy": float}``.
    """
    m = conf.extended if isinstance(conf, ConfusionMatrix) else np.asarray(conf, dtype=np.int64)
    c = m.shape[0]
    if m.ndim != 2 or m.shape[1] not in (c, c + 1):
        raise ValueError(f"confusion matrix must be (C, C) or (C, C+1), got {m.shape}")
    if len(class_names) != c:
        raise ValueError(f"{len(class_names)} class names for a {c}-class confusion matrix")
    tp = np.diag(m[:, :c]).astype(np.float64)
    gt_total = m.sum(axis=1).astype(np.float64)          # includes unassigned predictions
    pred_total = m[:, :c].sum(axis=0).astype(np.float64)
    union = gt_total + pred_total - tp
    per_class: dict[str, float | None] = {}
    absent: list[str] = []
    ious = []
    for k, name in enumerate(class_names):
        if union[k] <= 0:
            per_class[name] = None
            absent.append(name)
        else:
            v = float(tp[k] / union[k])
            per_class[name] = v
            ious.append(v)
    total = gt_total.sum()
    return {"miou": float(np.mean(ious)) if ious else float("nan"), "per_class": per_class, "absent": absent,
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan")}


def format_table(result: dict, title: str | None = None) -> str:
    """Per-class IoU table in percent, absent classes marked, last line ``mIoU``."""
    per = result.get("per_class", {})
    width = max([len(n) for n in per] + [len("bg threshold"), 5])
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'class':<{width}}  {'IoU %':>7}")
    lines.append("-" * (width + 9))
    for name, v in per.items():
        lines.append(f"{name:<{width}}  {'absent' if v is None else f'{100.0 * v:7.2f}':>7}")
    lines.append("-" * (width + 9))
    miou = result.get("miou")
    lines.append(f"{'mIoU':<{width}}  {'n/a' if miou is None or miou != miou else f'{100.0 * miou:7.2f}':>7}")
    if result.get("best_threshold") is not None:
        lines.append(f"{'bg threshold':<{width}}  {result['best_threshold']:7.2f}")
    return "\n".join(lines)


def cam_to_label(cam: np.ndarray, keys, bg_threshold: float) -> np.ndarray:
    """uint8 (H, W) label from CAM planes (K', H, W) with class indices ``keys`` (K',): the arg-max class where its
    score is > ``bg_threshold``, else 0 (background)."""
    cam = np.asarray(cam, dtype=np.float32)
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    if cam.ndim != 3 or cam.shape[0] != keys.shape[0]:
        raise ValueError(f"cam {cam.shape} and keys {keys.shape} do not match (want (K', H, W) and (K',))")
    h, w = cam.shape[1:]
    if cam.shape[0] == 0:
        return np.zeros((h, w), np.uint8)
    lut = np.concatenate([[0], keys]).astype(np.uint8)
    idx = cam.argmax(axis=0)
    best = np.take_along_axis(cam, idx[None], axis=0)[0]
    return np.where(best > np.float32(bg_threshold), lut[idx + 1], 0).astype(np.uint8)


def threshold_sweep(pairs: Iterable, num_classes: int, class_names: list[str] | None = None,
                    thresholds=None) -> dict:
    """mIoU for every background threshold in one pass over ``pairs`` of ``(cam (K',H,W), keys (K',), gt (H,W))``
    (optionally ``(cam, keys, gt, id)``). Pairs whose shapes disagree are skipped into ``rejects``.

    Returns ``{"best_threshold", "miou", "per_class", "absent", "curve": [(t, miou), ...], "n_images",
    "rejects": [(id or index, reason)]}``. The default thresholds are 0.00 .. 0.95 (DEFAULT_THRESHOLDS;
    SEAM's own 0.00 .. 0.59 is SEAM_THRESHOLDS).
    """
    c = int(num_classes)
    names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    ts = np.asarray(DEFAULT_THRESHOLDS if thresholds is None else thresholds, dtype=np.float64).reshape(-1)
    if ts.size == 0:
        raise ValueError("threshold_sweep needs at least one threshold")
    order = np.argsort(ts, kind="stable")
    sorted_ts = ts[order]
    sorted_ts32 = sorted_ts.astype(np.float32)  # compare in float32, exactly as cam_to_label does
    nt = ts.size
    # hist[b, g, p]: pixels with gt g, foreground arg-max class p and "bin" b = number of thresholds below its score.
    # At threshold j (sorted) a pixel is foreground iff score > t_j iff b > j.
    fg_hist = np.zeros((nt + 1, c, c + 1), np.int64)
    rejects: list[tuple] = []
    n = 0
    for k, item in enumerate(pairs):
        cam, keys, gt = item[0], item[1], item[2]
        name = item[3] if len(item) > 3 else k
        cam = np.asarray(cam, dtype=np.float32)
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        gt = np.asarray(gt)
        if cam.ndim != 3 or cam.shape[0] != keys.shape[0] or cam.shape[1:] != gt.shape:
            rejects.append((name, f"cam {tuple(cam.shape)} / keys {tuple(keys.shape)} / gt {tuple(gt.shape)} "
                                  f"do not match"))
            continue
        g = gt.reshape(-1).astype(np.int64)
        valid = g != IGNORE
        if np.any(valid & ((g < 0) | (g >= c))):
            rejects.append((name, f"ground truth has class indices outside 0..{c - 1}"))
            continue
        if keys.size and (keys.min() < 0 or keys.max() >= c):
            rejects.append((name, f"CAM keys {keys.tolist()} outside 0..{c - 1}"))
            continue
        n += 1
        g = g[valid]
        if cam.shape[0] == 0:
            p = np.zeros_like(g)
            b = np.zeros_like(g)
        else:
            flat = cam.reshape(cam.shape[0], -1)[:, valid]
            idx = flat.argmax(axis=0)
            score = flat[idx, np.arange(flat.shape[1])]
            p = keys[idx]
            b = np.searchsorted(sorted_ts32, score, side="left")  # count of thresholds strictly below score
        fg_hist += np.bincount((b * c + g) * (c + 1) + p, minlength=(nt + 1) * c * (c + 1)).reshape(nt + 1, c, c + 1)
    # foreground part at threshold j: bins > j; background part: bins <= j (prediction 0).
    fg_cum = np.cumsum(fg_hist[::-1], axis=0)[::-1]              # fg_cum[b] = sum over bins >= b
    all_by_gt = fg_hist.sum(axis=(0, 2))                          # (C,) valid pixels per gt class
    curve_sorted = []
    results_sorted = []
    for j in range(nt):
        conf = fg_cum[j + 1].copy()
        bg_counts = all_by_gt - conf.sum(axis=1)
        conf[:, 0] += bg_counts
        r = iou_from_confusion(conf, names)
        results_sorted.append(r)
        curve_sorted.append(r["miou"])
    curve = [None] * nt
    for pos, j in enumerate(order):
        curve[j] = (float(ts[j]), float(curve_sorted[pos]))
    vals = np.array([-1.0 if v != v else v for v in curve_sorted])
    best = int(np.argmax(vals))  # first (lowest threshold) among equals
    res = results_sorted[best]
    return {"best_threshold": float(sorted_ts[best]), "miou": res["miou"], "per_class": res["per_class"],
            "absent": res["absent"], "curve": curve, "n_images": n, "rejects": rejects}


def evaluate_folder(pred_dir: str, data_root: str, split: str | None = None, json_path: str | None = None,
                    layout: str = "auto") -> dict:
    """mIoU of prediction PNGs ``<pred_dir>/<id>.png`` (palette/label maps, local or s3://) against a dataset's
    ground-truth masks (any layout). ``pred_dir`` may be a pseudo-label output prefix (PNGs under ``_labels/``,
    its ``_rejects.parquet`` read: an id it rejected is reported in ``rejects`` with that reason, prefixed
    ``pseudolabel: ``) or a plain folder of PNGs. Missing predictions are listed in ``missing``; the dataset's
    unsafe ids, unreadable files and size mismatches in ``rejects`` as ``[id, reason]``; neither stops the run.

    Writes JSON ``{"miou", "per_class", "absent", "n_images", "split", "missing", "rejects", "pred_dir"}`` to
    ``json_path`` when given.
    """
    from wsss.data import fs, open_dataset
    from wsss.data import layout as out_layout
    from wsss.data.io import BadItem, decode_mask

    ds = open_dataset(data_root, split, layout=layout)
    try:
        pred_names = set(fs.listdir(pred_dir))
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"prediction folder not found: {pred_dir}") from None
    label_dir = out_layout.label_dir(pred_dir, pred_names)
    available = {n[:-4] for n in (pred_names if label_dir == pred_dir else fs.listdir(label_dir)) if n.endswith(".png")}
    pred_rejects = out_layout.read_rejects(pred_dir, pred_names)
    cm = ConfusionMatrix(ds.num_classes)
    missing: list[str] = []
    rejects: list[list[str]] = [[i, r] for i, r in ds.rejects]
    n = 0
    for item_id in ds.ids:
        if item_id not in available and item_id in pred_rejects:
            rejects.append([item_id, f"pseudolabel: {pred_rejects[item_id]}"])
            continue
        if ds.mask_uri(item_id) is None:
            rejects.append([item_id, f"id {item_id}: no ground-truth mask"])
            continue
        if item_id not in available:
            missing.append(item_id)
            continue
        try:
            gt = ds.load_mask(item_id, check_size=False)
            uri = fs.join(label_dir, f"{item_id}.png")
            pred = decode_mask(fs.read_bytes(uri), uri)
            if pred.shape != gt.shape:
                raise BadItem(f"{uri}: prediction is {pred.shape[1]}x{pred.shape[0]} (WxH) but the mask is "
                              f"{gt.shape[1]}x{gt.shape[0]}")
            bad = np.unique(pred[(pred >= ds.num_classes) & (pred != IGNORE)])
            if bad.size:
                raise BadItem(f"{uri}: prediction has class index {int(bad[0])} (dataset has {ds.num_classes})")
        except (BadItem, FileNotFoundError) as e:
            rejects.append([item_id, (str(e).splitlines() or [type(e).__name__])[0]])
            continue
        cm.update(gt, pred)
        n += 1
    res = iou_from_confusion(cm, ds.class_names)
    out = {"miou": res["miou"], "per_class": res["per_class"], "absent": res["absent"],
           "pixel_accuracy": res["pixel_accuracy"], "n_images": n, "split": ds.split, "missing": missing,
           "rejects": rejects, "pred_dir": str(pred_dir), "data_root": str(data_root)}
    if json_path is not None:
        fs.write_bytes(json_path, (json.dumps(json_safe(out), indent=2) + "\n").encode())
    return out


def json_safe(obj):
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
