"""Segmentation inference: single-scale or multi-scale + flip probabilities, optional dense CRF, evaluation
against masks, and label PNGs for any image folder, dataset or shard set.

Multi-scale (``eval.scales``, deeplab-pytorch's 0.5-1.75): the image is resized by each scale, the network's
softmax probabilities are resized back to the image size and averaged over scales (and over the horizontally
flipped image when ``eval.flip``). The CRF (``crf``: deeplab-pytorch's 10 iterations, POS_W 3, POS_XY_STD 1,
BI_W 4, BI_XY_STD 67, BI_RGB_STD 3) refines those probabilities over all classes (:mod:`wsss.refine.crf`).
"""
from __future__ import annotations

import io
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from wsss.data.io import BadItem

__all__ = ["SegPredictor", "crf_labels", "evaluate_seg", "predict_folder", "load_seg_model", "PROTOCOLS"]

PROTOCOLS = ("single", "single+crf", "multi", "multi+crf")


def load_seg_model(where: str, device=None, overrides: list[str] | None = None):
    """Build the network of a segmentation checkpoint folder (local or s3://) and load its weights.
    Returns (model in eval mode, SegConfig, meta). One-line errors naming the folder."""
    import yaml

    from wsss.data import fs
    from wsss.seg.config import resolve_device, seg_from_dict
    from wsss.seg.models import build_seg_model

    for name in ("model.pt", "config.yaml", "meta.json"):
        if not fs.exists(fs.join(where, name)):
            raise FileNotFoundError(f"checkpoint {where}: missing {name} (not a wsss checkpoint folder?)")
    meta = json.loads(fs.read_bytes(fs.join(where, "meta.json")) or b"{}")
    if meta.get("kind") != "seg":
        raise ValueError(f"checkpoint {where}: kind is {meta.get('kind')!r}, expected a segmentation checkpoint "
                         f"(wsss train-seg)")
    class_names = meta.get("class_names")
    if not class_names:
        raise ValueError(f"checkpoint {where}: meta.json has no class_names")
    cfg = seg_from_dict(yaml.safe_load(fs.read_bytes(fs.join(where, "config.yaml"))) or {}, overrides)
    try:
        state = torch.load(io.BytesIO(fs.read_bytes(fs.join(where, "model.pt"))), map_location="cpu",
                           weights_only=True)
    except Exception as e:  # noqa: BLE001 - report the file
        raise ValueError(f"checkpoint {where}/model.pt: cannot be read ({type(e).__name__})") from None
    model = build_seg_model(cfg, len(class_names), load_weights=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {where}: state_dict does not match the config's network "
                         f"(first bad key: {(missing or unexpected)[0]})")
    device = torch.device(device) if device is not None else resolve_device(cfg)
    model.to(device).eval()
    return model, cfg, meta


class SegPredictor:
    """uint8 (H, W, 3) image -> float32 (C, H, W) class probabilities (``probs``) or uint8 labels (``__call__``)."""

    def __init__(self, model, cfg, device=None, scales=None, flip: bool | None = None):
        self.model = model.eval()
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.scales = [float(s) for s in (cfg.eval.scales if scales is None else scales)]
        self.flip = bool(cfg.eval.flip if flip is None else flip)

    @torch.no_grad()
    def probs(self, image: np.ndarray) -> np.ndarray:
        from wsss.data.transforms import normalize
        from wsss.train import autocast

        x = normalize(image)[None].to(self.device)
        h, w = x.shape[-2:]
        acc = None
        n = 0
        for s in self.scales:
            xs = x if s == 1.0 else F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))),
                                                  mode="bilinear", align_corners=False)
            batch = torch.cat([xs, xs.flip(-1)]) if self.flip else xs
            with autocast(self.device, self.cfg.optim.amp):
                logits = self.model(batch)
            p = torch.softmax(F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False), 1)
            if self.flip:
                p = p[0:1] + p[1:2].flip(-1)
            acc = p[0] if acc is None else acc + p[0]
            n += 2 if self.flip else 1
        return (acc / n).cpu().numpy().astype(np.float32)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.probs(image).argmax(0).astype(np.uint8)


def crf_labels(image: np.ndarray, probs: np.ndarray, crf_cfg) -> np.ndarray:
    """uint8 labels after the dense CRF on (C, H, W) probabilities."""
    from wsss.refine.crf import crf_inference

    return crf_inference(np.array(image, np.uint8), probs, crf_cfg).argmax(0).astype(np.uint8)


def evaluate_seg(model, cfg, dataset, protocols=None, max_images: int | None = None, progress: bool = False) -> dict:
    """mIoU of ``model`` on a dataset with masks, per protocol: ``single`` (scale 1, no flip), ``multi``
    (``eval.scales`` x flip), each ``+crf``. Default protocols: single and multi, with +crf when ``eval.crf``.
    Returns {protocol: {"miou", "per_class", "absent", "pixel_accuracy"}, "n_images", "rejects", "seconds"}."""
    from tqdm import tqdm

    from wsss.metrics import ConfusionMatrix, iou_from_confusion

    if protocols is None:
        protocols = ["single", "multi"] + (["single+crf", "multi+crf"] if cfg.eval.crf else [])
    protocols = [p for p in PROTOCOLS if p in set(protocols)]
    bad = set(protocols) - set(PROTOCOLS)
    if bad:
        raise ValueError(f"unknown evaluation protocol {sorted(bad)[0]!r} (want {PROTOCOLS})")
    preds = {"single": SegPredictor(model, cfg, scales=[1.0], flip=False), "multi": SegPredictor(model, cfg)}
    cms = {p: ConfusionMatrix(dataset.num_classes) for p in protocols}
    secs = {p: 0.0 for p in protocols}
    limit = max_images if max_images is not None else cfg.eval.max_images
    ids = list(dataset.ids)[: limit or None]
    rejects: list[tuple[str, str]] = []
    n = 0
    for item_id in tqdm(ids, desc="evaluate seg", disable=not progress, unit="img"):
        try:
            image = dataset.load_image(item_id)
            gt = dataset.load_mask(item_id)
        except (BadItem, FileNotFoundError) as e:
            rejects.append((item_id, str(e).splitlines()[0]))
            continue
        if gt is None:
            rejects.append((item_id, f"id {item_id}: no ground-truth mask"))
            continue
        n += 1
        for base in ("single", "multi"):
            if base not in protocols and f"{base}+crf" not in protocols:
                continue
            t0 = time.perf_counter()
            probs = preds[base].probs(image)
            if base in protocols:
                cms[base].update(gt, probs.argmax(0))
                secs[base] += time.perf_counter() - t0
            if f"{base}+crf" in protocols:
                t1 = time.perf_counter()
                cms[f"{base}+crf"].update(gt, crf_labels(image, probs, cfg.crf))
                secs[f"{base}+crf"] += time.perf_counter() - t1 + (t1 - t0)
    out: dict = {p: iou_from_confusion(cms[p], list(dataset.class_names)) for p in protocols}
    for p in protocols:
        out[p]["sec_per_image"] = secs[p] / max(n, 1)
    out.update(n_images=n, rejects=rejects, protocols=protocols)
    return out


def predict_folder(checkpoint: str, data: str, out: str, split: str | None = None, multi_scale: bool = False,
                   crf: bool = False, device=None, max_images: int | None = None, progress: bool = True,
                   overrides: list[str] | None = None) -> dict:
    """Label PNGs ``<out>/<id>.png`` (VOC palette, class indices) for every image of ``data`` (a shard folder,
    a VOC / generic dataset or a plain image folder; local or s3://) with a segmentation checkpoint. Resumable:
    ids whose PNG exists are skipped. Unreadable images go to ``<out>/rejects.parquet`` (id, reason)."""
    from tqdm import tqdm

    from wsss.data import fs
    from wsss.data.io import encode_label_png
    from wsss.seg.data import open_images

    model, cfg, meta = load_seg_model(checkpoint, device, overrides)
    ds = open_images(data, split)
    if ds.class_names and list(ds.class_names) != list(meta["class_names"]):
        raise ValueError(f"checkpoint {checkpoint}: its {len(meta['class_names'])} classes do not match the "
                         f"{len(ds.class_names)} classes of {data}")
    pred = SegPredictor(model, cfg, scales=None if multi_scale else [1.0], flip=None if multi_scale else False)
    fs.makedirs(out)
    try:
        existing = {n[:-4] for n in fs.listdir(out) if n.endswith(".png")}
    except FileNotFoundError:
        existing = set()
    ids = [i for i in ds.ids if i not in existing][: max_images or None]
    rejects = list(getattr(ds, "rejects", []) or [])
    t0 = time.perf_counter()
    n = 0
    for item_id in tqdm(ids, desc="predict seg", disable=not progress, unit="img"):
        try:
            image = ds.load_image(item_id)
            probs = pred.probs(image)
            label = crf_labels(image, probs, cfg.crf) if crf else probs.argmax(0).astype(np.uint8)
        except (BadItem, FileNotFoundError) as e:
            rejects.append((item_id, str(e).splitlines()[0]))
            continue
        fs.write_bytes(fs.join(out, f"{item_id}.png"), encode_label_png(label))
        n += 1
    _write_rejects(fs.join(out, "rejects.parquet"), rejects)
    dt = time.perf_counter() - t0
    return {"out": out, "n_images": len(ds.ids), "n_written": n, "n_skipped": len(existing & set(ds.ids)),
            "n_rejected": len(rejects), "rejects": rejects, "seconds": dt,
            "images_per_s": n / dt if dt > 0 and n else 0.0, "multi_scale": multi_scale, "crf": crf}


def _write_rejects(uri: str, rejects: list[tuple[str, str]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from wsss.data import fs

    table = pa.table({"id": pa.array([str(i) for i, _ in rejects], pa.string()),
                      "reason": pa.array([str(r) for _, r in rejects], pa.string())})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.write_bytes(uri, buf.getvalue())
