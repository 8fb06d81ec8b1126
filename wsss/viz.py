"""Small visual helpers (numpy + PIL only): label colouring, CAM heat-map overlays, image grids."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from wsss.data.io import voc_palette

__all__ = ["label_to_rgb", "colormap_jet", "cam_overlay", "grid", "resize_to", "to_png"]


def label_to_rgb(label: np.ndarray) -> np.ndarray:
    """uint8 (H, W) label map -> uint8 (H, W, 3) in the VOC palette (255 = ignore -> (224, 224, 192))."""
    a = np.asarray(label)
    if a.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {a.shape}")
    pal = np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)
    return pal[a.astype(np.uint8)]


def colormap_jet(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB with a jet-like map (blue -> cyan -> yellow -> red)."""
    x = np.clip(np.nan_to_num(np.asarray(x, dtype=np.float32)), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * x - 3.0), 0, 1)
    g = np.clip(1.5 - np.abs(4.0 * x - 2.0), 0, 1)
    b = np.clip(1.5 - np.abs(4.0 * x - 1.0), 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def resize_to(arr: np.ndarray, hw: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize a 2-D float/uint8 array or an (H, W, 3) uint8 image to (H, W)."""
    h, w = int(hw[0]), int(hw[1])
    a = np.asarray(arr)
    if a.shape[:2] == (h, w):
        return a
    resample = Image.NEAREST if nearest else Image.BILINEAR
    if a.ndim == 2 and a.dtype != np.uint8:
        img = Image.fromarray(a.astype(np.float32), mode="F")
        return np.asarray(img.resize((w, h), resample), dtype=np.float32)
    return np.asarray(Image.fromarray(a).resize((w, h), resample))


def cam_overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a jet heat map of ``cam`` (2-D, values in [0, 1], resized to the image if needed) over an RGB image.
    Returns uint8 (H, W, 3)."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"cam must be 2-D (H, W), got shape {cam.shape}")
    cam = resize_to(cam, img.shape[:2])
    heat = colormap_jet(cam).astype(np.float32)
    out = (1.0 - alpha) * img[..., :3].astype(np.float32) + alpha * heat
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _as_rgb(tile: np.ndarray) -> tuple[np.ndarray, bool]:
    """(RGB tile, is_label): 2-D tiles are label maps (coloured with the VOC palette, resized nearest)."""
    t = np.asarray(tile)
    if t.ndim == 2:
        return label_to_rgb(t), True
    return t[..., :3].astype(np.uint8), False


def grid(rows: list[list[np.ndarray | None]], tile: int | None = None, pad: int = 2,
         background: int = 255) -> np.ndarray:
    """Paste tiles (uint8 (H, W, 3) images, or 2-D label maps shown in the VOC palette) into one uint8 image.

    Each tile is resized (keeping its aspect) to fit a ``tile`` x ``tile`` cell (default: the largest tile side);
    ``None`` leaves the cell empty.
    """
    if not rows:
        raise ValueError("grid needs at least one row")
    ncols = max(len(r) for r in rows)
    tiles = [[None if t is None else _as_rgb(t) for t in r] for r in rows]
    if tile is None:
        tile = max((max(t[0].shape[:2]) for r in tiles for t in r if t is not None), default=16)
    H = len(rows) * tile + (len(rows) + 1) * pad
    W = ncols * tile + (ncols + 1) * pad
    out = np.full((H, W, 3), background, np.uint8)
    for i, r in enumerate(tiles):
        for j, t in enumerate(r):
            if t is None:
                continue
            t, is_label = t
            h, w = t.shape[:2]
            s = tile / max(h, w)
            nh, nw = max(1, round(h * s)), max(1, round(w * s))
            t = resize_to(t, (nh, nw), nearest=is_label)
            y0 = pad + i * (tile + pad) + (tile - nh) // 2
            x0 = pad + j * (tile + pad) + (tile - nw) // 2
            out[y0:y0 + nh, x0:x0 + nw] = t
    return out


def to_png(image: np.ndarray) -> bytes:
    """Encode a uint8 RGB (or gray) array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
