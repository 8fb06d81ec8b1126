"""Pseudo labels: CAM -> (random walk with AffinityNet) -> (dense CRF) -> VOC-palette PNG per image.

The stage callables are shared by the local sequential loop here and the Ray Data job (jobs/pseudolabel.py):

* :class:`CamStage` - (image, labels) -> (cam (K',H,W), keys (K',)) with the CAM network of a checkpoint;
* :class:`RandomWalkStage` - (image, cam, keys) -> (probs (K'+1,H,W), keys with 0 first) with AffinityNet;
* :func:`cam_scores` - the no-walk path: background plane = the CAM threshold (SEAM alpha 0.26);
* :func:`crf_stage` - dense CRF on (image, probs);
* :func:`labels_from_scores` - arg-max to class indices (uint8).

"Scores" are per-image probabilities (C', H, W) with keys (C',), keys[0] == 0 (background).
torch is imported inside the CAM and walk stages only, so CRF-only workers (jobs/pseudolabel.py) never load it.
"""
from __future__ import annotations

import io
import json
import math
import time
from typing import Iterable

import numpy as np

from wsss.config import Config, resolve_device

STAGES = ("cam", "rw", "crf")
RESULT_COLUMNS = ("id", "classes", "sec_cam", "sec_rw", "sec_crf", "status")


# ---- stages ------------------------------------------------------------------------------------------

def _overrides_list(cfg_overrides) -> list[str]:
    if not cfg_overrides:
        return []
    if isinstance(cfg_overrides, dict):
        return [f"{k}={json.dumps(v)}" for k, v in cfg_overrides.items()]
    return list(cfg_overrides)


class CamStage:
    """(image uint8 HxWx3, labels (K,) multi-hot or None) -> (cam float32 (K',H,W) in [0,1], keys int64 (K',)).

    checkpoint: a CAM checkpoint folder (local or s3://); cfg_overrides: ["infer.scales=[1.0]", ...] or a dict.
    """

    def __init__(self, checkpoint: str, device=None, cfg_overrides=None):
        import torch

        from wsss.cam import CamInferencer
        from wsss.checkpoint import load_cam_model

        dev = torch.device(device) if device is not None else None
        self.model, self.cfg, self.meta = load_cam_model(checkpoint, dev, overrides=_overrides_list(cfg_overrides))
        self.device = next(self.model.parameters()).device
        self.class_names = list(self.meta["class_names"])
        self.inferencer = CamInferencer(self.model, self.cfg, self.device)

    def __call__(self, image: np.ndarray, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.inferencer(image, labels)

    def batch(self, images: list[np.ndarray], labels: list | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[self(im, lab) ...]`` with one forward per scale per group of same-size images (flips stacked)."""
        return self.inferencer.infer_batch(images, labels)


def load_affinity_model(checkpoint: str, device=None, radius: int = 5):
    """(AffinityNet in eval mode on ``device``, its cfg, meta) from an affinity checkpoint folder."""
    from wsss.checkpoint import load_checkpoint
    from wsss.models.affinity_net import AffinityNet

    state, acfg, meta, _ = load_checkpoint(checkpoint)
    if meta.get("kind") != "affinity":
        raise ValueError(f"checkpoint {checkpoint}: kind is {meta.get('kind')!r}, expected an affinity checkpoint")
    acfg.model.pretrained = None  # weights come from the checkpoint
    net = AffinityNet(acfg.model, load_weights=False, radius=radius)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {checkpoint}: state_dict does not match AffinityNet on "
                         f"{acfg.model.backbone} (first bad key: {(missing or unexpected)[0]})")
    import torch

    device = torch.device(device) if device is not None else resolve_device(acfg)
    net.to(device).eval()
    return net, acfg, meta


class RandomWalkStage:
    """(image, cam (K',H,W), keys (K',)) -> (probs float32 (K'+1,H,W), keys (K'+1,) with keys[0] = 0).

    AffinityNet affinities on the stride-8 grid of the image upscaled by the affinity checkpoint's
    ``affinity.upscale`` u (padded to a multiple of 8), i.e. one grid cell per 8/u input pixels; background
    (1 - max)^cfg.rw.bg_alpha (null: matched to cfg.infer.bg_threshold, see
    :func:`wsss.refine.random_walk.matched_bg_alpha`), CAM average-pooled to the grid, sparse random walk
    (beta = cfg.rw.beta, t = 2^cfg.rw.logt, radius cfg.rw.radius), bilinear upsampling, per-pixel normalisation.
    """

    def __init__(self, affinity_checkpoint: str, cfg: Config, device=None):
        import torch

        from wsss.refine.random_walk import GRID_STRIDE, matched_bg_alpha

        self.cfg = cfg
        self.device = torch.device(device) if device is not None else resolve_device(cfg)
        self.net, self.aff_cfg, self.meta = load_affinity_model(affinity_checkpoint, self.device,
                                                                radius=cfg.rw.radius)
        # the affinity checkpoint's own upscale: its AffinityNet only knows images at that scale
        self.upscale = int(self.aff_cfg.affinity.upscale)
        self.stride = GRID_STRIDE // self.upscale  # input pixels per grid cell
        a = cfg.rw.bg_alpha
        self.bg_alpha = float(a) if a is not None else matched_bg_alpha(cfg.infer.bg_threshold)

    def affinities(self, image: np.ndarray):
        """(P, h, w) pair affinities of the image on the grid of ``self.stride`` input pixels (on self.device)."""
        import torch

        from wsss.data.transforms import normalize
        from wsss.models.affinity_net import pair_affinities
        from wsss.train import autocast

        from wsss.refine.random_walk import GRID_STRIDE

        H, W = image.shape[:2]
        s = GRID_STRIDE  # AffinityNet's own stride, on the upscaled image
        x = normalize(image).unsqueeze(0).to(self.device)
        if self.upscale != 1:
            H, W = H * self.upscale, W * self.upscale
            x = torch.nn.functional.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
        ph, pw = (-H) % s, (-W) % s
        if ph or pw:
            x = torch.nn.functional.pad(x, (0, pw, 0, ph))  # zeros = the mean colour after normalisation
        with torch.no_grad(), autocast(self.device, self.cfg.optim.amp):
            feat = self.net.features(x)
        return pair_affinities(feat.float(), self.cfg.rw.radius)[0]

    def __call__(self, image: np.ndarray, cam: np.ndarray, keys) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from wsss.refine.random_walk import walk_cam

        cam = np.asarray(cam, dtype=np.float32)
        if cam.shape[1:] != image.shape[:2]:
            raise ValueError(f"random walk: cam size {cam.shape[2]}x{cam.shape[1]} (WxH) does not match image "
                             f"size {image.shape[1]}x{image.shape[0]}")
        aff = self.affinities(image)
        rw = self.cfg.rw
        with torch.no_grad():
            probs = walk_cam(torch.from_numpy(cam).to(self.device), aff, radius=rw.radius, beta=rw.beta,
                             logt=rw.logt, bg_alpha=self.bg_alpha, stride=self.stride)
        full_keys = np.concatenate([[0], np.asarray(keys, dtype=np.int64).reshape(-1)])
        return probs.float().cpu().numpy(), full_keys


def cam_scores(cam: np.ndarray, keys, bg_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """No-walk scores: (K'+1, H, W) with a constant background plane = ``bg_threshold`` (SEAM alpha 0.26) stacked
    before the CAM; keys with 0 first.  Arg-max equals wsss.cam.cam_labels (ties go to background)."""
    cam = np.asarray(cam, dtype=np.float32)
    h, w = cam.shape[-2:]
    probs = np.concatenate([np.full((1, h, w), bg_threshold, np.float32), cam.reshape(-1, h, w)], 0)
    return probs, np.concatenate([[0], np.asarray(keys, dtype=np.int64).reshape(-1)])


def crf_stage(image: np.ndarray, probs: np.ndarray, keys, crf_cfg) -> tuple[np.ndarray, np.ndarray]:
    """Dense CRF over the scores' classes; returns (probs float32 (C',H,W), keys)."""
    from wsss.refine.crf import crf_inference

    return crf_inference(image, probs, crf_cfg), np.asarray(keys)


def labels_from_scores(probs: np.ndarray, keys) -> np.ndarray:
    """uint8 (H, W): keys[argmax over the scores' planes]."""
    lut = np.asarray(keys, dtype=np.int64).reshape(-1)
    if lut.size == 0:
        raise ValueError("labels_from_scores: no score planes")
    if lut.min() < 0 or lut.max() > 255:
        raise ValueError(f"labels_from_scores: class indices must be 0..255, got {lut.min()}..{lut.max()}")
    return lut.astype(np.uint8)[np.asarray(probs).argmax(0)]


def check_stages(stages: Iterable[str], affinity: str | None) -> tuple[str, ...]:
    """Validate a stage list (ordered subset of cam, rw, crf, starting with cam; rw needs an affinity checkpoint)."""
    if isinstance(stages, str):
        stages = [s for s in stages.replace(" ", "").split(",") if s]
    st = tuple(stages)
    bad = [s for s in st if s not in STAGES]
    if bad:
        raise ValueError(f"unknown stage {bad[0]!r} (want cam, rw, crf)")
    if not st or st[0] != "cam" or len(set(st)) != len(st) or list(st) != sorted(st, key=STAGES.index):
        raise ValueError(f"stages {','.join(st)}: want cam first, then rw and/or crf in that order")
    if "rw" in st and not affinity:
        raise ValueError("stage rw needs an affinity checkpoint (--affinity)")
    return st


def checkpoint_config(checkpoint: str, overrides: list[str] | None = None) -> Config:
    """The resolved config stored in a checkpoint folder (config.yaml), with ``key=value`` overrides."""
    import yaml

    from wsss.config import from_dict
    from wsss.data import fs

    uri = fs.join(checkpoint, "config.yaml")
    if not fs.exists(uri):
        raise FileNotFoundError(f"checkpoint {checkpoint}: missing config.yaml (not a wsss checkpoint folder?)")
    return from_dict(yaml.safe_load(fs.read_bytes(uri)) or {}, overrides)


# ---- tables ----------------------------------------------------------------------------------------------

def _read_table(uri: str) -> list[dict]:
    from wsss.data import fs
    from wsss.data.io import read_parquet_bytes

    if not fs.exists(uri):
        return []
    try:
        # decoded in this thread: Arrow pool threads can abort the process at exit (wsss.data.io)
        return read_parquet_bytes(fs.read_bytes(uri)).to_pylist()
    except Exception:  # noqa: BLE001 - a torn table from a killed run is rebuilt from the PNGs
        return []


def _write_results(uri: str, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from wsss.data import fs

    schema = pa.schema([("id", pa.string()), ("classes", pa.list_(pa.string())), ("sec_cam", pa.float64()),
                        ("sec_rw", pa.float64()), ("sec_crf", pa.float64()), ("status", pa.string())])
    rows = sorted(rows, key=lambda r: r["id"])
    table = pa.Table.from_pylist([{k: r.get(k) for k in RESULT_COLUMNS} for r in rows], schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.write_bytes(uri, buf.getvalue())


def _write_rejects(uri: str, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from wsss.data import fs

    schema = pa.schema([("id", pa.string()), ("reason", pa.string())])
    rows = sorted(rows, key=lambda r: r["id"])
    table = pa.Table.from_pylist([{"id": r["id"], "reason": r["reason"]} for r in rows], schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.write_bytes(uri, buf.getvalue())


def _png_ok(uri: str, name: str) -> bool:
    from wsss.data import fs
    from wsss.data.io import decode_mask

    try:
        decode_mask(fs.read_bytes(uri), name)
        return True
    except Exception:  # noqa: BLE001 - unreadable or truncated: redo it
        return False


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:500]


# ---- the local sequential loop ---------------------------------------------------------------------------

def cam_chunk(cam_stage: "CamStage", items: list[dict]) -> list[tuple]:
    """CAMs of a chunk of loaded items: [((cam, keys) or the exception, seconds per image)], batched when the
    chunk has several images; if the batch fails, each image is tried alone so one bad item cannot sink the rest."""
    if len(items) > 1:
        t0 = time.perf_counter()
        try:
            outs = cam_stage.batch([it["image"] for it in items], [it["labels"] for it in items])
            sec = (time.perf_counter() - t0) / len(items)
            return [(o, sec) for o in outs]
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception:  # noqa: BLE001 - fall back to one image at a time to find the bad one
            pass
    res = []
    for it in items:
        t0 = time.perf_counter()
        try:
            o = cam_stage(it["image"], it["labels"])
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001
            o = e
        res.append((o, time.perf_counter() - t0))
    return res


def pseudolabel(cfg: Config | None, checkpoint: str, data_root: str, out: str, affinity: str | None = None,
                stages=("cam", "rw", "crf"), split: str | None = None, progress: bool = True,
                device=None, flush_every: int = 25, max_images: int | None = None, cam_batch: int = 8) -> dict:
    """Write ``<out>/_labels/<id>.png`` (VOC palette, class indices) for every image of the dataset, in one process.

    cfg: supplies rw.*, crf.*, infer.bg_threshold and data.layout (None: the CAM checkpoint's config); the CAM
    network and its inference settings (infer.scales, flip, use_pcm) come from the checkpoint.
    ``<out>/part-00000.parquet`` (id, classes, sec_cam, sec_rw, sec_crf, status: the folder's only data file, so
    ``pyarrow.dataset.dataset(out)`` / ``ray.data.read_parquet(out)`` read the result rows) and
    ``<out>/_rejects.parquet`` (id, reason) are rewritten every ``flush_every`` images and at the end (layout:
    wsss.data.layout; an old-layout folder is migrated first).  Every item is validated as ``wsss shard`` does
    (image decodes, mask decodes with the image's size and the class count, labels non-empty); a bad item, and
    every unsafe id of the split list, is rejected with its reason, so written + rejected = ids listed.
    Resumable: ids whose PNG exists and decodes are skipped and keep their previous result rows.
    ``cam_batch``: images per batched CAM forward (``CamStage.batch``; 1 = the per-image path); ``sec_cam`` of
    an image is then its batch's CAM time divided by the batch's images.
    """
    from tqdm import tqdm

    from wsss.data import fs, layout, open_dataset
    from wsss.data.io import encode_label_png

    st = check_stages(stages, affinity)
    if cfg is None:  # rw / crf / threshold settings from the CAM checkpoint's own config
        cfg = checkpoint_config(checkpoint)
    out = str(out)
    fs.makedirs(out)
    layout.migrate_output(out)
    results_uri = fs.join(out, layout.RESULTS)
    rejects_uri = fs.join(out, layout.REJECTS)
    labels_dir = fs.join(out, layout.LABELS_DIR)
    fs.makedirs(labels_dir)

    ds = open_dataset(data_root, split, layout=cfg.data.layout)
    ids = list(ds.ids)
    if max_images is not None:
        ids = ids[:max_images]
    id_set = set(ids)
    prev_results = {r["id"]: r for r in _read_table(results_uri)}
    prev_rejects = {r["id"]: r for r in _read_table(rejects_uri)}

    existing = set(fs.listdir(labels_dir)) if fs.exists(labels_dir) else set()
    done = [i for i in ids if f"{i}.png" in existing and _png_ok(layout.label_uri(out, i), f"{i}.png")]
    done_set = set(done)
    todo = [i for i in ids if i not in done_set]

    # Rows of ids outside this run (other splits) stay; rows of ids this run touches are rebuilt.
    results = {k: v for k, v in prev_results.items() if k not in id_set or k in done_set}
    rejects = {k: v for k, v in prev_rejects.items() if k not in id_set}
    for item_id, reason in getattr(ds, "rejects", []) or []:
        rejects[item_id] = {"id": item_id, "reason": str(reason)}
    for i in done:
        if i not in results:
            results[i] = {"id": i, "classes": None, "sec_cam": None, "sec_rw": None, "sec_crf": None,
                          "status": "resumed"}

    cam_stage = rw_stage = None
    if todo:
        cam_stage = CamStage(checkpoint, device=device)
        if list(cam_stage.class_names) != list(ds.class_names):
            raise ValueError(f"checkpoint {checkpoint}: its {len(cam_stage.class_names)} classes do not match the "
                             f"dataset's {len(ds.class_names)} classes at {data_root}")
        if "rw" in st:
            rw_stage = RandomWalkStage(affinity, cfg, device=cam_stage.device)

    n_written = 0
    sums = {"sec_cam": 0.0, "sec_rw": 0.0, "sec_crf": 0.0}
    counts = {k: 0 for k in sums}
    t_start = time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"pseudolabel {'+'.join(st)}", disable=not progress, unit="img")
    chunk_size = max(1, int(cam_batch))
    n_since_flush = 0
    for c0 in range(0, len(todo), chunk_size):
        chunk = todo[c0:c0 + chunk_size]
        items = []
        for item_id in chunk:
            try:
                items.append(ds.load_item(item_id))  # the checks of `wsss shard`: image, mask (size, classes), labels
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001 - batch: reject this item, keep the rest
                rejects[item_id] = {"id": item_id, "reason": _one_line(e)}
                results.pop(item_id, None)
        cams = cam_chunk(cam_stage, items) if items else []
        for item, (cam_out, sec_cam) in zip(items, cams):
            item_id, image = item["id"], item["image"]
            row = {"id": item_id, "classes": None, "sec_cam": sec_cam, "sec_rw": None, "sec_crf": None,
                   "status": "ok"}
            try:
                if isinstance(cam_out, BaseException):
                    raise cam_out
                cam, keys = cam_out
                row["classes"] = [ds.class_names[int(c)] for c in keys]
                if rw_stage is not None:
                    t0 = time.perf_counter()
                    probs, pkeys = rw_stage(image, cam, keys)
                    row["sec_rw"] = time.perf_counter() - t0
                else:
                    probs, pkeys = cam_scores(cam, keys, cfg.infer.bg_threshold)
                if "crf" in st:
                    t0 = time.perf_counter()
                    probs, pkeys = crf_stage(image, probs, pkeys, cfg.crf)
                    row["sec_crf"] = time.perf_counter() - t0
                label = labels_from_scores(probs, pkeys)
                fs.write_bytes(layout.label_uri(out, item_id), encode_label_png(label))
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001 - batch: reject this item, keep the rest
                rejects[item_id] = {"id": item_id, "reason": _one_line(e)}
                results.pop(item_id, None)
                continue
            results[item_id] = row
            rejects.pop(item_id, None)
            n_written += 1
            for key in sums:
                if row[key] is not None:
                    sums[key] += row[key]
                    counts[key] += 1
        bar.update(len(chunk))
        n_since_flush += len(chunk)
        if flush_every and n_since_flush >= flush_every:
            n_since_flush = 0
            _write_results(results_uri, list(results.values()))
            _write_rejects(rejects_uri, list(rejects.values()))
    bar.close()
    elapsed = time.perf_counter() - t_start
    _write_results(results_uri, list(results.values()))
    _write_rejects(rejects_uri, list(rejects.values()))
    listed_rejects = [i for i, _ in getattr(ds, "rejects", []) or []]
    n_rej = sum(1 for i in ids if i in rejects) + len(set(listed_rejects) - id_set)
    return {
        "out": out, "stages": list(st), "n_images": len(ids), "n_written": n_written, "n_skipped": len(done),
        "n_rejected": n_rej, "n_listed": len(ids) + len(set(listed_rejects) - id_set), "seconds": elapsed,
        "images_per_s": n_written / elapsed if elapsed > 0 and n_written else 0.0,
        **{f"mean_{k}": (v / counts[k] if counts[k] else math.nan) for k, v in sums.items()},
        "results": results_uri, "rejects": rejects_uri,
    }


__all__ = ["CamStage", "RandomWalkStage", "load_affinity_model", "checkpoint_config", "cam_scores", "crf_stage",
           "labels_from_scores", "check_stages", "pseudolabel", "cam_chunk", "STAGES"]
