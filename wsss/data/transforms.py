"""Training augmentation (SEAM's recipe) and the torch Dataset that feeds the CAM training loop.

SEAM (REFERENCE.md §1): random resize of the long side to [448, 768], horizontal flip, colour jitter
(brightness 0.3, contrast 0.3, saturation 0.3, hue 0.1), ImageNet normalisation, random crop 448 with zero padding
(in normalised space, i.e. the mean colour) when the image is smaller than the crop.

Randomness comes from a numpy Generator seeded per item inside :class:`TrainDataset` from
``(seed, epoch, index, visit, worker seed)``: a fresh TrainDataset with the same seed (and a DataLoader with a seeded
generator) replays the same augmentations, while repeated visits of an item differ even when ``set_epoch`` is never
called (the visit count varies them in-process; DataLoader workers get a new torch seed every epoch).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageEnhance

from wsss.data.io import BadItem

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "normalize", "TrainTransform", "TrainDataset"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MEAN = np.asarray(IMAGENET_MEAN, np.float32) * 255.0
_STD = np.asarray(IMAGENET_STD, np.float32) * 255.0


def normalize(img: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> float32 (3, H, W) tensor with ImageNet mean/std normalisation."""
    a = np.asarray(img)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"normalize wants an (H, W, 3) image, got shape {a.shape}")
    x = (a.astype(np.float32) - _MEAN) / _STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def _jitter(img: Image.Image, rng: np.random.Generator, b: float, c: float, s: float, h: float) -> Image.Image:
    """torchvision-style ColorJitter (factors uniform in [1-x, 1+x], hue shift in [-h, h]) in random order,
    driven by ``rng`` instead of torch's global generator."""
    ops = []
    if b > 0:
        f = rng.uniform(max(0.0, 1 - b), 1 + b)
        ops.append(lambda im, f=f: ImageEnhance.Brightness(im).enhance(f))
    if c > 0:
        f = rng.uniform(max(0.0, 1 - c), 1 + c)
        ops.append(lambda im, f=f: ImageEnhance.Contrast(im).enhance(f))
    if s > 0:
        f = rng.uniform(max(0.0, 1 - s), 1 + s)
        ops.append(lambda im, f=f: ImageEnhance.Color(im).enhance(f))
    if h > 0:
        f = rng.uniform(-h, h)
        ops.append(lambda im, f=f: _shift_hue(im, f))
    for k in rng.permutation(len(ops)):
        img = ops[k](img)
    return img


def _shift_hue(img: Image.Image, shift: float) -> Image.Image:
    hsv = np.asarray(img.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(round(shift * 255))) % 256
    return Image.fromarray(hsv, mode="HSV").convert("RGB")


class TrainTransform:
    """uint8 (H, W, 3) image -> float32 (3, crop, crop) tensor: random long-side resize in
    ``data_cfg.resize_long``, horizontal flip (p = 0.5), colour jitter, normalisation, random crop with padding."""

    def __init__(self, data_cfg, seed: int = 0):
        self.crop = int(data_cfg.crop)
        self.resize_long = (int(data_cfg.resize_long[0]), int(data_cfg.resize_long[1]))
        cj = list(data_cfg.color_jitter) + [0.0] * (4 - len(data_cfg.color_jitter))
        self.jitter = tuple(float(v) for v in cj[:4])
        self.rng = np.random.default_rng(seed)

    def __call__(self, img: np.ndarray, rng: np.random.Generator | None = None) -> torch.Tensor:
        rng = self.rng if rng is None else rng
        pil = Image.fromarray(np.asarray(img, dtype=np.uint8))
        w, h = pil.size
        target = int(rng.integers(self.resize_long[0], self.resize_long[1] + 1))
        scale = target / max(w, h)
        nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
        if (nw, nh) != (w, h):
            pil = pil.resize((nw, nh), Image.BILINEAR)
        if rng.uniform() < 0.5:
            pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        if any(v > 0 for v in self.jitter):
            pil = _jitter(pil, rng, *self.jitter)
        x = normalize(np.asarray(pil))
        return random_crop(x, self.crop, rng)


def random_crop(x: torch.Tensor, crop: int, rng: np.random.Generator) -> torch.Tensor:
    """Crop (C, H, W) to (C, crop, crop) at a random place; a smaller side is zero-padded at a random offset."""
    c, h, w = x.shape
    out = x.new_zeros((c, crop, crop))
    ch, cw = min(crop, h), min(crop, w)
    # source window (when the image is larger) and destination offset (when it is smaller)
    sy = int(rng.integers(0, h - ch + 1))
    sx = int(rng.integers(0, w - cw + 1))
    dy = int(rng.integers(0, crop - ch + 1))
    dx = int(rng.integers(0, crop - cw + 1))
    out[:, dy:dy + ch, dx:dx + cw] = x[:, sy:sy + ch, sx:sx + cw]
    return out


class TrainDataset(torch.utils.data.Dataset):
    """Torch Dataset over a :class:`wsss.data.base.Dataset` split for CAM training.

    Items are dicts ``{"image": float (3, crop, crop), "labels": float (K,), "id": str}``. A bad item (unreadable
    image, no positive class, ...) is recorded in ``.rejects`` as ``(id, reason)`` (once per id) and replaced by
    the next good item, so a batch never fails for one file. With DataLoader workers the list fills in each
    worker's copy; call :meth:`check` first to find bad items in the main process.
    Augmentation randomness: see the module docstring; :meth:`set_epoch` is optional.
    """

    def __init__(self, dataset, data_cfg, seed: int = 0):
        self.dataset = dataset
        self.ids = list(dataset.ids)
        self.transform = TrainTransform(data_cfg, seed)
        self.seed = int(seed)
        self.epoch = 0
        self._visits: dict[int, int] = {}
        self.rejects: list[tuple[str, str]] = list(getattr(dataset, "rejects", []))
        self._bad: set[str] = {i for i, _ in self.rejects}

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _reject(self, item_id: str, reason: str) -> None:
        if item_id not in self._bad:
            self._bad.add(item_id)
            self.rejects.append((item_id, reason))

    def _load(self, item_id: str) -> tuple[np.ndarray, np.ndarray]:
        labels = self.dataset.labels(item_id)
        image = self.dataset.load_image(item_id)
        return image, labels

    def check(self) -> list[tuple[str, str]]:
        """Read every item once (image decode + labels); drop bad ones from this dataset; return the rejects."""
        keep = []
        for i in self.ids:
            try:
                self._load(i)
            except (BadItem, FileNotFoundError) as e:
                self._reject(i, _reason(e))
                continue
            keep.append(i)
        self.ids = keep
        return list(self.rejects)

    def __getitem__(self, index: int) -> dict:
        n = len(self.ids)
        if n == 0:
            raise BadItem(f"dataset {getattr(self.dataset, 'root', '?')}: no usable items")
        for k in range(n):
            item_id = self.ids[(index + k) % n]
            if item_id in self._bad:
                continue
            try:
                image, labels = self._load(item_id)
            except (BadItem, FileNotFoundError) as e:
                self._reject(item_id, _reason(e))
                continue
            visit = self._visits.get(int(index), 0)
            self._visits[int(index)] = visit + 1
            info = torch.utils.data.get_worker_info()
            worker_seed = int(info.seed) % (2 ** 63) if info is not None else 0
            rng = np.random.default_rng([self.seed, self.epoch, int(index), visit, worker_seed])
            x = self.transform(image, rng)
            return {"image": x, "labels": torch.from_numpy(np.asarray(labels, np.float32)), "id": item_id}
        raise BadItem(f"dataset {getattr(self.dataset, 'root', '?')}: every item is bad "
                      f"(first: {self.rejects[0][0] if self.rejects else '?'})")


def _reason(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
