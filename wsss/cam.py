"""CAM inference: multi-scale + flip (SEAM: scales 0.5, 1, 1.5, 2 x flip = 8 passes), PCM output, per-class
normalisation, background by a threshold.

Two scorings, each as its public code (``infer.use_pcm``):
- PCM output (SEAM's infer_SEAM.py): per pass, cam_rv upsampled to the pass's input size (bilinear,
  align_corners=True, as SEAM's network returns it), then to the image size (align_corners=False); the passes
  summed, negatives clipped, per-channel min-max normalisation.
- raw CAM (PSA's infer_cls.py): per pass ReLU(cam) upsampled to the image size (align_corners=False); summed;
  divided by the per-channel max.
Each scale's image is resized as both codes do (PIL bicubic of the uint8 image; ``infer.resample: bilinear``
resizes the normalised tensor instead).

Per-image file format (``<out>/<id>.npz``, written atomically):
  ``cam``  float16 (K', H, W) in [0, 1] at the image's resolution, one plane per positive class of the image;
  ``keys`` int16 (K',) the class index of each plane in the dataset's class_names (1..K, 0 = background never stored);
  ``hw``   int32 (2,) the image height and width.
Labels come from the background threshold: label = keys[argmax] where max > bg_threshold (ties go to background, as SEAM), else 0.
"""
from __future__ import annotations

import io
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from wsss.config import Config, resolve_device


def save_cam(uri: str, cam: np.ndarray, keys: np.ndarray) -> None:
    from wsss.data import fs

    buf = io.BytesIO()
    cam = np.asarray(cam)
    np.savez_compressed(buf, cam=cam.astype(np.float16), keys=np.asarray(keys, dtype=np.int16),
                        hw=np.asarray(cam.shape[-2:], dtype=np.int32))
    fs.write_bytes(uri, buf.getvalue())


def load_cam(uri: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (cam float32 (K',H,W), keys int64 (K',))."""
    from wsss.data import fs

    with np.load(io.BytesIO(fs.read_bytes(uri))) as z:
        return z["cam"].astype(np.float32), z["keys"].astype(np.int64)


class CamInferencer:
    """Callable: (image uint8 HxWx3, labels (K,) multi-hot or None) -> (cam float32 (K',H,W), keys (K',)).

    With ``labels=None`` the classes are those the classifier scores positive (logit > 0) at scale 1.
    ``infer_batch`` does the same for a list of images with one forward per scale for each group of same-size
    images (both flips stacked in that batch); its results equal the per-image call's (allclose: eval-mode
    BatchNorm, PCM and attention are per-sample, only the float summation order of batched kernels differs).
    Both go through the same per-scale steps (``_scaled``, ``_forward``, ``_pass_cam``) and scoring (``_finish``).
    When the PCM output is not used, a model whose forward takes ``pcm=`` is asked not to compute it.
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, device: torch.device | None = None,
                 scales: list[float] | None = None, flip: bool | None = None, use_pcm: bool | None = None,
                 batch_size: int = 8):
        import inspect

        self.model = getattr(model, "module", model)
        self.cfg = cfg
        self.device = device or next(self.model.parameters()).device
        self.scales = list(scales if scales is not None else cfg.infer.scales)
        self.flip = cfg.infer.flip if flip is None else flip
        self.use_pcm = (cfg.infer.use_pcm and cfg.uses_pcm) if use_pcm is None else use_pcm
        self.batch_size = max(1, int(batch_size))  # images per forward in infer_batch (x2 with flip)
        try:
            self._skip_pcm = (not self.use_pcm) and "pcm" in inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
            self._skip_pcm = False

    # ---- the per-scale steps shared by the per-image and the batched path -----------------------------------
    def _scaled(self, images: list[np.ndarray], x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The (B, 3, *size) input of one scale: ``x`` itself at scale 1, else each uint8 image resized with PIL
        bicubic (PSA / SEAM MSF loaders) or, with ``infer.resample: bilinear``, ``x`` resized."""
        from wsss.data.transforms import normalize

        if size == tuple(x.shape[-2:]):
            return x
        if self.cfg.infer.resample == "bicubic":
            return torch.stack([normalize(np.asarray(Image.fromarray(np.ascontiguousarray(im)).resize(
                (size[1], size[0]), Image.BICUBIC))) for im in images]).to(self.device)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def _forward(self, xs: torch.Tensor) -> dict:
        from wsss.train import autocast

        with autocast(self.device, self.cfg.optim.amp):
            return self.model(xs, pcm=False) if self._skip_pcm else self.model(xs)

    def _pass_cam(self, out: dict, size: tuple[int, int], hw: tuple[int, int]) -> tuple[torch.Tensor, bool]:
        """(N, C, H, W) CAM of one pass at the image size, and whether it is the PCM output."""
        pcm_scored = bool(self.use_pcm and out.get("cam_rv") is not None)
        if pcm_scored:  # SEAM: cam_rv at the pass's input size (align_corners=True), then the image size
            cam = F.interpolate(out["cam_rv"].float(), size=size, mode="bilinear", align_corners=True)
        else:  # PSA: ReLU per pass
            cam = F.relu(out["cam"].float())
        return F.interpolate(cam, size=hw, mode="bilinear", align_corners=False), pcm_scored

    def _multi_scale(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Summed (B, C, H, W) CAMs over scales and flips of same-size images, their (B, C) logits at scale 1
        (else the first scale), and whether they are PCM outputs. One forward per scale for the whole batch."""
        from wsss.data.transforms import normalize

        h, w = images[0].shape[:2]
        b = len(images)
        x = torch.stack([normalize(im) for im in images]).to(self.device)
        total = None
        logits1 = None
        pcm_scored = False
        for s in self.scales:
            size = (max(8, int(round(h * s))), max(8, int(round(w * s))))
            xs = self._scaled(images, x, size)
            if self.flip:
                xs = torch.cat([xs, torch.flip(xs, dims=(-1,))], dim=0)
            out = self._forward(xs)
            cam, pcm_scored = self._pass_cam(out, size, (h, w))
            if self.flip:
                cam = cam[:b] + torch.flip(cam[b:], dims=(-1,))
            total = cam if total is None else total + cam
            if s == 1.0 or logits1 is None:
                logits1 = out["logits"][:b].float()
        return total, logits1, pcm_scored

    @torch.no_grad()
    def __call__(self, image: np.ndarray, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        was_training = self.model.training
        self.model.eval()
        try:
            total, logits1, pcm_scored = self._multi_scale([image])
        finally:
            if was_training:
                self.model.train()
        return self._finish(total[0], logits1[0], labels, pcm_scored)

    def _finish(self, total: torch.Tensor, logits1: torch.Tensor, labels,
                pcm_scored: bool) -> tuple[np.ndarray, np.ndarray]:
        """(C, H, W) summed CAM of one image -> its positive classes' planes, normalised, and their keys."""
        if labels is None:
            labels_t = (logits1 > 0).float()
        else:
            labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.float32, device=self.device)
        keys = torch.nonzero(labels_t > 0.5).flatten() + 1
        cam = F.relu(total[keys])
        flat = cam.reshape(cam.shape[0], -1)
        mx = flat.max(dim=1)[0].reshape(-1, 1, 1)
        if pcm_scored:  # SEAM: per-channel min-max (values at the minimum go to 0)
            mn = flat.min(dim=1)[0].reshape(-1, 1, 1)
            cam = (cam - mn - 1e-5) / (mx - mn + 1e-5)
        else:  # PSA: divided by the max
            cam = cam / (mx + 1e-5)
        return cam.clamp(0, 1).cpu().numpy().astype(np.float32), keys.cpu().numpy().astype(np.int64)

    @torch.no_grad()
    def infer_batch(self, images: list[np.ndarray], labels: list | None = None,
                    batch_size: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[self(im, lab) for im, lab in zip(images, labels)]`` with batched forwards: images are grouped by size,
        and each group (in chunks of ``batch_size`` images, default ``self.batch_size``) goes through the network
        once per scale with its flipped copies stacked in the same batch (2B inputs per forward)."""
        n = len(images)
        labels = [None] * n if labels is None else list(labels)
        if len(labels) != n:
            raise ValueError(f"infer_batch: {n} images but {len(labels)} label vectors")
        bs = max(1, int(batch_size or self.batch_size))
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(tuple(int(v) for v in im.shape[:2]), []).append(i)
        results: list = [None] * n
        was_training = self.model.training
        self.model.eval()
        try:
            for idx in groups.values():
                for c0 in range(0, len(idx), bs):
                    chunk = idx[c0:c0 + bs]
                    total, logits1, pcm_scored = self._multi_scale([images[i] for i in chunk])
                    for j, i in enumerate(chunk):
                        results[i] = self._finish(total[j], logits1[j], labels[i], pcm_scored)
        finally:
            if was_training:
                self.model.train()
        return results


def cam_labels(cam: np.ndarray, keys: np.ndarray, bg_threshold: float) -> np.ndarray:
    """uint8 label map from a CAM: class of the arg-max plane where it reaches the threshold, else background."""
    h, w = cam.shape[-2:]
    if cam.shape[0] == 0:
        return np.zeros((h, w), np.uint8)
    stacked = np.concatenate([np.full((1, h, w), bg_threshold, np.float32), cam.astype(np.float32)], axis=0)
    lut = np.concatenate([[0], np.asarray(keys)]).astype(np.uint8)
    return lut[stacked.argmax(0)]


def infer_cams(checkpoint: str, data_root: str, out: str, split: str | None = None,
               overrides: list[str] | None = None, labels_png: bool = False, progress: bool = True,
               device: str | None = None) -> dict:
    """Run CAM inference over a dataset: ``<out>/<id>.npz`` per image (+ label PNGs under ``<out>/labels``
    when ``labels_png``), ``<out>/rejects.csv`` (id, reason) for bad items and unsafe ids of the split list, so
    written + already there + rejected = ids listed. Items are checked as ``wsss shard`` checks them (image, mask
    size and classes, labels) and inferred in batches (``CamInferencer.infer_batch``). Resumes: existing npz
    files are skipped."""
    from tqdm import tqdm

    from wsss.checkpoint import load_cam_model
    from wsss.data import fs, open_dataset
    from wsss.data.io import BadItem, encode_label_png

    model, cfg, meta = load_cam_model(checkpoint, device=torch.device(device) if device else None, overrides=overrides)
    ds = open_dataset(data_root, split)
    if list(ds.class_names) != list(meta["class_names"]):
        raise ValueError(f"dataset {data_root}: class names {ds.class_names} differ from the checkpoint's "
                         f"{meta['class_names']}")
    inf = CamInferencer(model, cfg)
    fs.makedirs(out)
    if labels_png:
        fs.makedirs(fs.join(out, "labels"))
    try:
        done = set(n[:-4] for n in fs.listdir(out) if n.endswith(".npz"))
    except FileNotFoundError:  # a fresh s3:// prefix has no objects yet
        done = set()
    rejects: list[tuple[str, str]] = [(str(i), str(r).splitlines()[0]) for i, r in ds.rejects]
    n_new = 0
    t0 = time.perf_counter()
    todo = [i for i in ds.ids if i not in done]
    bar = tqdm(total=len(todo), desc="cams", disable=not progress, unit="img")
    for c0 in range(0, len(todo), inf.batch_size):
        ok_ids, images, labels = [], [], []
        for i in todo[c0:c0 + inf.batch_size]:
            try:
                item = ds.load_item(i)
            except (BadItem, FileNotFoundError, ValueError) as e:
                rejects.append((i, str(e).splitlines()[0]))
                continue
            ok_ids.append(i)
            images.append(item["image"])
            labels.append(item["labels"])
        for i, (cam, keys) in zip(ok_ids, inf.infer_batch(images, labels) if images else []):
            save_cam(fs.join(out, f"{i}.npz"), cam, keys)
            if labels_png:
                fs.write_bytes(fs.join(out, "labels", f"{i}.png"),
                               encode_label_png(cam_labels(cam, keys, cfg.infer.bg_threshold)))
            n_new += 1
        bar.update(len(todo[c0:c0 + inf.batch_size]))
    bar.close()
    dt = time.perf_counter() - t0
    if rejects:
        import csv

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["id", "reason"])
        writer.writerows(rejects)
        fs.write_bytes(fs.join(out, "rejects.csv"), buf.getvalue().encode())
    return {"written": n_new, "skipped_existing": len(done & set(ds.ids)), "rejects": rejects,
            "seconds": dt, "images_per_s": n_new / dt if dt > 0 else 0.0, "out": out}


def evaluate_cams_folder(cams_dir: str, data_root: str, split: str | None = None, json_path: str | None = None,
                         thresholds=None) -> dict:
    """CAM mIoU with a background-threshold sweep (0.00-0.95, SEAM's 0.00-0.59 extended; best reported) over the
    CAM files of ``cams_dir`` against the dataset's masks. A missing CAM file is listed in ``missing``."""
    import json as _json

    from wsss.data import fs, open_dataset
    from wsss.metrics import threshold_sweep

    ds = open_dataset(data_root, split)
    missing: list[str] = []
    rejects: list[tuple[str, str]] = []

    def pairs():
        for i in ds.ids:
            uri = fs.join(cams_dir, f"{i}.npz")
            if not fs.exists(uri):
                missing.append(i)
                continue
            mask = ds.load_mask(i)
            if mask is None:
                continue
            cam, keys = load_cam(uri)
            if cam.shape[-2:] != mask.shape:
                rejects.append((i, f"CAM {uri} is {cam.shape[-2:]} but the mask is {mask.shape}"))
                continue
            yield cam, keys, mask

    kw = {} if thresholds is None else {"thresholds": thresholds}
    res = threshold_sweep(pairs(), ds.num_classes, ds.class_names, **kw)
    res.update(n_images=len(ds.ids) - len(missing) - len(rejects), split=ds.split, missing=missing,
               rejects=[list(r) for r in rejects], threshold=res.get("best_threshold"))
    if json_path:
        with open(json_path, "w") as f:
            _json.dump(res, f, indent=2, default=float)
    return res
