"""Train AffinityNet from CAMs (AffinityNet / SEAM / DAEN Sec. 4.2), in one process.

1. Affinity labels per image from its CAM file (``<cams_dir>/<id>.npz``, wsss.cam format) and image: low/high
   background powers (cfg.affinity.low_alpha 4 / high_alpha 24) each refined by the dense CRF
   (:func:`wsss.refine.affinity_labels.affinity_labels`), cached as ``<out>/affinity_labels/<id>.npz``.
2. AffinityNet on cfg.model's backbone, SGD (momentum cfg.optim.momentum; backbone x1, new layers
   x cfg.optim.new_lr_mult), lr cfg.affinity.lr with the poly schedule (power cfg.optim.power), weight decay
   cfg.affinity.weight_decay, batch cfg.affinity.batch_size, cfg.affinity.epochs (capped by max_steps), crops of
   cfg.affinity.crop (random long-side resize in cfg.data.resize_long, flip, colour jitter).
3. Checkpoint folder at ``out`` (wsss.checkpoint; meta kind "affinity").
"""
from __future__ import annotations

import dataclasses
import io
import json
import time
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from wsss.config import Config, resolve_device
from wsss.refine.affinity_labels import IGNORE, affinity_labels

LABEL_DIR = "affinity_labels"
SETTINGS_FILE = "settings.json"  # in the label cache: the settings its labels were made with


# ---- label cache ------------------------------------------------------------------------------------------

def _save_label(uri: str, label: np.ndarray) -> None:
    from wsss.data import fs

    buf = io.BytesIO()
    np.savez_compressed(buf, label=label.astype(np.uint8))
    fs.write_bytes(uri, buf.getvalue())


def load_label(uri: str) -> np.ndarray:
    """The cached uint8 (H, W) affinity label of one image."""
    from wsss.data import fs

    with np.load(io.BytesIO(fs.read_bytes(uri))) as z:
        return z["label"].astype(np.uint8)


def build_affinity_labels(cfg: Config, cams_dir: str, dataset, cache_dir: str, ids=None,
                          progress: bool = True) -> tuple[list[str], list[tuple[str, str]]]:
    """Compute (or reuse cached) affinity labels for ``ids`` (default all of the dataset).

    Returns (ids with a label, rejects [(id, reason)]).  A missing CAM file, a bad image or a size mismatch
    rejects that id only.  The cache records the settings its labels were made with (``settings.json``: the two
    background powers, the CRF parameters, the CAM folder); when they change, the cached labels are deleted and
    recomputed.
    """
    from tqdm import tqdm

    from wsss.cam import load_cam
    from wsss.data import fs

    fs.makedirs(cache_dir)
    low, high = label_alphas(cfg)
    settings = json.dumps({"low_alpha": round(low, 6), "high_alpha": round(high, 6),
                            "crf": dataclasses.asdict(cfg.crf), "cams_dir": str(cams_dir)}, sort_keys=True)
    stamp = fs.join(cache_dir, SETTINGS_FILE)
    have = set(fs.listdir(cache_dir))
    if SETTINGS_FILE not in have or fs.read_text(stamp) != settings:
        # labels made with other (or unknown) settings: drop them all, so the cache only ever holds labels of the
        # settings it is stamped with, also after an interrupted or partial (``ids``) rebuild
        for name in have:
            if name.endswith(".npz"):
                fs.remove(fs.join(cache_dir, name))
        fs.write_text(stamp, settings)
        have = set()
    ok: list[str] = []
    rejects: list[tuple[str, str]] = []
    for item_id in tqdm(list(ids if ids is not None else dataset.ids), desc="affinity labels",
                        disable=not progress, unit="img"):
        uri = fs.join(cache_dir, f"{item_id}.npz")
        if f"{item_id}.npz" in have:
            try:
                load_label(uri)
                ok.append(item_id)
                continue
            except Exception:  # noqa: BLE001 - a torn cache file is recomputed
                pass
        try:
            cam_uri = fs.join(cams_dir, f"{item_id}.npz")
            if not fs.exists(cam_uri):
                raise FileNotFoundError(f"id {item_id}: CAM file missing: {cam_uri}")
            cam, keys = load_cam(cam_uri)
            image = dataset.load_image(item_id)
            label = affinity_labels(image, cam, keys, low, high, cfg.crf)
            _save_label(uri, label)
            ok.append(item_id)
        except Exception as e:  # noqa: BLE001 - reject this id, keep the rest
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            rejects.append((item_id, f"{type(e).__name__}: {msg}"[:500]))
    return ok, rejects

def label_alphas(cfg: Config) -> tuple[float, float]:
    """(low, high) background powers of the affinity labels: cfg.affinity.low_alpha / high_alpha, or where null,
    matched (:func:`wsss.refine.random_walk.matched_bg_alpha`) to infer.bg_threshold + / - affinity.matched_band, so
    that confident foreground lies above t + band and confident background below t - band for CAMs thresholded at t."""
    from wsss.refine.random_walk import matched_bg_alpha

    a, t = cfg.affinity, float(cfg.infer.bg_threshold)
    low = a.low_alpha if a.low_alpha is not None else matched_bg_alpha(min(0.99, t + a.matched_band))
    high = a.high_alpha if a.high_alpha is not None else matched_bg_alpha(max(0.01, t - a.matched_band))
    return float(low), float(high)


# ---- training data -----------------------------------------------------------------------------------------

class AffinityTrainDataset(TorchDataset):
    """Image + affinity label crops: {"image": float (3, c, c), "label": long (c, c) (255 = ignore), "id"}.

    Joint augmentation (AffinityNet): random long-side resize in data_cfg.resize_long x ``upscale`` (image
    bilinear, label nearest; ``upscale`` = cfg.affinity.upscale), horizontal flip, brightness/contrast/saturation
    jitter (data_cfg.color_jitter[:3]), ImageNet normalisation, random crop of ``crop`` (image padded with 0 = the
    mean colour, label with 255).
    A bad item is recorded in ``.rejects`` and replaced by another one.
    """

    def __init__(self, dataset, ids: list[str], cache_dir: str, data_cfg, crop: int, seed: int = 0,
                 upscale: int = 1):
        if not ids:
            raise ValueError("affinity training: no image has an affinity label (see the rejects)")
        self.dataset = dataset
        self.ids = list(ids)
        self.cache_dir = cache_dir
        self.data_cfg = data_cfg
        self.crop = int(crop)
        self.seed = int(seed)
        self.upscale = int(upscale)
        self.rejects: list[tuple[str, str]] = []
        self._calls = 0

    def __len__(self) -> int:
        return len(self.ids)

    def _load(self, item_id: str) -> tuple[np.ndarray, np.ndarray]:
        from wsss.data import fs

        image = self.dataset.load_image(item_id)
        label = load_label(fs.join(self.cache_dir, f"{item_id}.npz"))
        if label.shape != image.shape[:2]:
            raise ValueError(f"id {item_id}: affinity label {label.shape} does not match image {image.shape[:2]}")
        return image, label

    def __getitem__(self, idx: int) -> dict:
        self._calls += 1
        rng = np.random.default_rng([self.seed, idx, self._calls, torch.initial_seed() % (2 ** 31)])
        for attempt in range(len(self.ids)):
            item_id = self.ids[(idx + attempt) % len(self.ids)]
            try:
                image, label = self._load(item_id)
            except Exception as e:  # noqa: BLE001
                self.rejects.append((item_id, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
                continue
            img_t, lab_t = self.augment(image, label, rng)
            return {"image": img_t, "label": lab_t, "id": item_id}
        raise ValueError("affinity training: every item failed to load (see .rejects)")

    def augment(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        from PIL import Image

        from wsss.data.transforms import normalize

        H, W = label.shape
        lo, hi = (v * self.upscale for v in self.data_cfg.resize_long)
        target = int(rng.integers(lo, hi + 1))
        s = target / max(H, W)
        nh, nw = max(1, int(round(H * s))), max(1, int(round(W * s)))
        if (nh, nw) != (H, W):
            image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
            label = np.asarray(Image.fromarray(label).resize((nw, nh), Image.NEAREST))
        if rng.random() < 0.5:
            image = image[:, ::-1]
            label = label[:, ::-1]
        image = self._jitter(image, rng)
        x = normalize(np.ascontiguousarray(image))
        lab = torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))
        c = self.crop
        out_x = torch.zeros((3, c, c), dtype=x.dtype)
        out_l = torch.full((c, c), IGNORE, dtype=torch.long)
        h, w = lab.shape
        # random placement: crop window inside the image when larger, image inside the window when smaller
        if h > c:
            sy, dy = int(rng.integers(0, h - c + 1)), 0
        else:
            sy, dy = 0, int(rng.integers(0, c - h + 1))
        if w > c:
            sx, dx = int(rng.integers(0, w - c + 1)), 0
        else:
            sx, dx = 0, int(rng.integers(0, c - w + 1))
        ch, cw = min(c, h), min(c, w)
        out_x[:, dy:dy + ch, dx:dx + cw] = x[:, sy:sy + ch, sx:sx + cw]
        out_l[dy:dy + ch, dx:dx + cw] = lab[sy:sy + ch, sx:sx + cw]
        return out_x, out_l

    def _jitter(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        jit = list(self.data_cfg.color_jitter or [])[:3]
        if not jit or not any(jit):
            return image
        b, c, s = (jit + [0, 0, 0])[:3]
        x = image.astype(np.float32)
        if b:
            x = x * rng.uniform(1 - b, 1 + b)
        if c:
            m = x.mean()
            x = (x - m) * rng.uniform(1 - c, 1 + c) + m
        if s:
            g = x.mean(2, keepdims=True)
            x = (x - g) * rng.uniform(1 - s, 1 + s) + g
        return np.clip(x, 0, 255).astype(np.uint8)


# ---- training --------------------------------------------------------------------------------------------------

def _poly(base: float, step: int, total: int, power: float) -> float:
    return base * (1.0 - min(step, total) / max(1, total)) ** power


def train_affinity(cfg: Config, cams_dir: str, data_root: str, out: str, split: str | None = None,
                   progress: bool = True) -> str:
    """Train AffinityNet on ``data_root`` (split default cfg.data.train_split) from the CAMs in ``cams_dir``.

    Writes the label cache ``<out>/affinity_labels/``, the checkpoint folder ``<out>`` (model.pt, config.yaml,
    meta.json with kind "affinity", metrics.json with the loss history and the rejects) and returns ``out``.
    """
    from tqdm import tqdm

    from wsss.checkpoint import save_checkpoint
    from wsss.data import fs, open_dataset
    from wsss.models.affinity_net import AffinityNet, affinity_loss, pair_affinities
    from wsss.train import autocast, backward_step, grad_scaler

    out = str(out)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (2 ** 32))
    device = resolve_device(cfg)
    dataset = open_dataset(data_root, split if split is not None else cfg.data.train_split, layout=cfg.data.layout)
    cache_dir = fs.join(out, LABEL_DIR)
    t_labels = time.perf_counter()
    ids, rejects = build_affinity_labels(cfg, cams_dir, dataset, cache_dir, progress=progress)
    t_labels = time.perf_counter() - t_labels
    rejects = list(getattr(dataset, "rejects", []) or []) + rejects
    train_ds = AffinityTrainDataset(dataset, ids, cache_dir, cfg.data, cfg.affinity.crop, seed=cfg.seed,
                                    upscale=cfg.affinity.upscale)

    a = cfg.affinity
    bs = min(int(a.batch_size), len(train_ds))
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train_ds, batch_size=bs, shuffle=True, drop_last=True, num_workers=cfg.data.num_workers,
                        generator=gen, pin_memory=device.type == "cuda")
    per_epoch = max(1, len(train_ds) // bs)
    total = per_epoch * int(a.epochs)
    if a.max_steps is not None:
        total = min(total, int(a.max_steps))

    net = AffinityNet(cfg.model, radius=a.radius).to(device)
    if getattr(net.backbone, "frozen_bn", False) and not net.pretrained_loaded:
        warnings.warn(f"training AffinityNet on a {cfg.model.backbone} backbone with frozen BatchNorm but no "
                      "pretrained weights (model.pretrained unset)", stacklevel=2)
    groups = net.param_groups(a.lr, a.weight_decay, cfg.optim.new_lr_mult)
    optimizer = torch.optim.SGD(groups, lr=a.lr, momentum=cfg.optim.momentum, weight_decay=a.weight_decay)
    scaler = grad_scaler(device, cfg.optim.amp)  # fp16 autocast only (GPUs without bf16)

    history: list[dict] = []
    step = 0
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="train affinity", disable=not progress, unit="step")
    net.train()
    lr = a.lr
    epoch = 0
    while step < total:
        sums: dict[str, float] = {}
        n = 0
        te = time.perf_counter()
        for batch in loader:
            if step >= total:
                break
            lr = _poly(a.lr, step, total, cfg.optim.power)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_mult", 1.0)
            image = batch["image"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            with autocast(device, cfg.optim.amp):
                feat = net.features(image)
            aff = pair_affinities(feat, a.radius)
            loss, terms = affinity_loss(aff, label, a.radius)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"affinity loss is {loss.item()} at step {step}")
            backward_step(loss, optimizer, net.parameters(), None, scaler)
            vals = {"loss": float(loss.detach()), **{k: float(v) for k, v in terms.items()}}
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{vals['loss']:.3f}", lr=f"{lr:.4f}")
        if n == 0:
            break
        dt = time.perf_counter() - te
        rec = {k: v / n for k, v in sums.items()}
        rec.update(epoch=epoch, step=step, lr=lr, sec_per_step=dt / n, samples_per_s=n * bs / max(dt, 1e-9))
        history.append(rec)
        epoch += 1
    bar.close()
    net.eval()
    rejects = rejects + list(train_ds.rejects)
    metrics = {"steps": step, "train_seconds": time.perf_counter() - t0, "label_seconds": t_labels,
               "n_images": len(ids), "loss_first": history[0]["loss"] if history else None,
               "loss_last": history[-1]["loss"] if history else None, "history": history,
               "rejects": [list(r) for r in rejects]}
    meta = {"kind": "affinity", "class_names": list(dataset.class_names), "step": step, "epoch": len(history),
            "radius": int(a.radius), "upscale": int(a.upscale), "cams_dir": str(cams_dir)}
    save_checkpoint(out, net, cfg, meta=meta, metrics=metrics)
    return out


__all__ = ["train_affinity", "build_affinity_labels", "AffinityTrainDataset", "load_label", "LABEL_DIR"]

