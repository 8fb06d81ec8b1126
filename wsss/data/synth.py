"""Procedural synthetic dataset where plain CAMs are visibly incomplete.

Every object has a large plain *body* and a small *marker* attached to its outline. The body's shape and colour
are drawn from one distribution shared by all classes; only the marker (its shape, colour and pattern) tells the
class; each class's marker has its own saturated colour, while bodies and distractors are muted, so a small
network trained from scratch on the CPU can learn the classes in minutes. A classifier therefore needs only the marker, so its CAM lights up the marker and little of the body: the
gap that SEAM/DAEN (equivariance, PCM, attention) and the AffinityNet random walk are meant to close. The
segmentation masks cover body + marker.

Backgrounds are textured clutter (low-frequency shading, stripes, noisy low-saturation blobs, small solid
distractor shapes without the markers' black outline), so "anything not grey" is not a shortcut either.

Output is the VOC layout (readable by :func:`wsss.data.open_dataset`):
JPEGImages/<id>.jpg (quality 95), SegmentationClass/<id>.png (palette PNG; object = class index, background 0,
optionally a 1-px 255 inner border like VOC), ImageSets/Segmentation/{train,val}.txt, cls_labels.npy
({id: K float32}), classes.txt. Deterministic for a seed: image ``i`` depends only on ``(seed, i, size)``.
"""
from __future__ import annotations

import io
import math
import os
import time

import numpy as np
from PIL import Image, ImageDraw

from wsss.data import fs
from wsss.data.io import encode_label_png

__all__ = ["MARKERS", "make_synthetic", "render_image"]

#: Marker designs, one per foreground class, in class order (class k+1 = MARKERS[k]).
MARKERS = ("ring", "cross", "checker", "triangle", "stripes", "dots", "diamond", "bar")

_BLACK = np.array([18, 18, 18], np.float32)
_COLOURS = {
    "ring": np.array([255, 40, 40], np.float32),        # red (black centre)
    "checker": np.array([40, 235, 60], np.float32),     # green / black
    "stripes": np.array([250, 250, 250], np.float32),   # white / black
    "cross": np.array([250, 220, 20], np.float32),      # yellow
    "triangle": np.array([235, 40, 200], np.float32),   # magenta
    "dots": np.array([0, 215, 230], np.float32),        # cyan (black centre)
    "diamond": np.array([255, 135, 0], np.float32),     # orange
    "bar": np.array([55, 85, 255], np.float32),         # blue
}


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, np.float32) * 255.0


def _polygon_mask(size: int, pts: np.ndarray) -> np.ndarray:
    img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(img).polygon([(float(x), float(y)) for x, y in pts], fill=1)
    return np.asarray(img, dtype=bool)


def _blob_polygon(rng: np.random.Generator, cx: float, cy: float, r: float, n: int = 64,
                  jitter: float = 0.08) -> np.ndarray:
    """A superellipse (ellipse .. rounded rectangle) with a smooth radial wobble, randomly rotated."""
    aspect = rng.uniform(0.65, 1.0)
    p = rng.choice([2.0, 2.0, 3.0, 4.0])
    rot = rng.uniform(0, 2 * math.pi)
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    x = r * np.sign(c) * np.abs(c) ** (2.0 / p)
    y = r * aspect * np.sign(s) * np.abs(s) ** (2.0 / p)
    wob = np.ones_like(t)
    for k in (2, 3, 5):
        wob += rng.uniform(0, jitter) * np.sin(k * t + rng.uniform(0, 2 * math.pi))
    x, y = x * wob, y * wob
    xr = cx + x * math.cos(rot) - y * math.sin(rot)
    yr = cy + x * math.sin(rot) + y * math.cos(rot)
    return np.stack([xr, yr], axis=1)


# ---- markers ------------------------------------------------------------------------------------------------

def _marker(kind: str, size: int, cx: float, cy: float, h: float, ux: float, uy: float):
    """(mask bool (S,S), colours float32 (S,S,3)) of a marker with half-size ``h`` centred at (cx, cy);
    (ux, uy) is the outward direction of the body outline (orients the triangle and the bar). A 1-px black
    outline is part of the marker."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    u = dx * ux + dy * uy            # along the outward direction
    v = -dx * uy + dy * ux           # along the outline

    def shape(hh: float) -> np.ndarray:
        if kind in ("ring", "dots"):
            return dx * dx + dy * dy <= hh * hh
        if kind in ("checker", "stripes"):
            return (np.abs(dx) <= hh) & (np.abs(dy) <= hh)
        if kind == "cross":
            w = max(1.0, 0.38 * hh)
            return ((np.abs(dx) <= w) & (np.abs(dy) <= hh)) | ((np.abs(dy) <= w) & (np.abs(dx) <= hh))
        if kind == "triangle":
            return (u >= -hh) & (u <= hh) & (np.abs(v) <= (hh - u) * 0.62)
        if kind == "diamond":
            return np.abs(dx) + np.abs(dy) <= hh * 1.2
        if kind == "bar":
            return (np.abs(u) <= 0.45 * hh) & (np.abs(v) <= hh * 1.1)
        raise ValueError(f"unknown marker {kind!r}")

    inner = shape(h)
    outer = shape(h + 1.0) | inner
    col = np.empty((size, size, 3), np.float32)
    col[:] = _BLACK
    r2 = dx * dx + dy * dy
    if kind == "ring":
        fill = np.where((r2 > (0.45 * h) ** 2)[..., None], _COLOURS["ring"], _BLACK)
    elif kind == "dots":
        fill = np.where((r2 > (0.38 * h) ** 2)[..., None], _COLOURS["dots"], _BLACK)
    elif kind == "checker":
        cell = max(2.0, round(2 * h / 3))
        par = (np.floor((dx + h) / cell) + np.floor((dy + h) / cell)) % 2
        fill = np.where((par == 0)[..., None], _COLOURS["checker"], _BLACK)
    elif kind == "stripes":
        band = max(1.0, round(2 * h / 5))
        par = np.floor((dy + h) / band) % 2
        fill = np.where((par == 0)[..., None], _COLOURS["stripes"], _BLACK)
    else:
        fill = np.broadcast_to(_COLOURS[kind], col.shape)
    col = np.where(inner[..., None], fill, col)
    return outer, col


# ---- background ---------------------------------------------------------------------------------------------

def _upsampled_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(small, mode="F").resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.25), rng.uniform(0.35, 0.75))
    img = np.empty((size, size, 3), np.float32)
    img[:] = base
    img += 22.0 * _upsampled_noise(rng, size, max(2, size // 16))[..., None]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if rng.uniform() < 0.65:  # stripes
        ang = rng.uniform(0, math.pi)
        period = rng.uniform(size / 18, size / 5)
        tint = _hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.3), 1.0) / 255.0
        wave = np.sin(2 * math.pi * (xx * math.cos(ang) + yy * math.sin(ang)) / period)
        img += rng.uniform(12, 30) * wave[..., None] * tint
    for _ in range(int(rng.integers(2, 6))):  # noisy blobs: textured, low saturation, not objects
        r = rng.uniform(0.06, 0.2) * size
        m = _polygon_mask(size, _blob_polygon(rng, rng.uniform(0, size), rng.uniform(0, size), r, jitter=0.25))
        col = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.35), rng.uniform(0.25, 0.85))
        tex = col + rng.normal(0, 24, size=(size, size, 3)).astype(np.float32)
        img = np.where(m[..., None], tex, img)
    for _ in range(int(rng.integers(0, 4))):  # small solid distractors (no black outline, unlike markers)
        h = rng.uniform(0.03, 0.07) * size
        cx, cy = rng.uniform(h, size - h), rng.uniform(h, size - h)
        col = _hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 0.6), rng.uniform(0.5, 0.9))
        m = ((xx - cx) ** 2 + (yy - cy) ** 2 <= h * h) if rng.uniform() < 0.5 else \
            ((np.abs(xx - cx) <= h) & (np.abs(yy - cy) <= h * rng.uniform(0.4, 1.0)))
        img = np.where(m[..., None], col, img)
    return img


# ---- one image ----------------------------------------------------------------------------------------------

_RADIUS = {1: (0.20, 0.34), 2: (0.16, 0.27), 3: (0.13, 0.22)}  # body radius / image size by object count


def _try_render(rng: np.random.Generator, size: int, k: int, ignore_border: int):
    n_cls = min(k, int(rng.choice([1, 2, 3], p=[0.5, 0.38, 0.12])))
    classes = [int(c) for c in rng.choice(k, n_cls, replace=False)]  # 0-based foreground index
    n_obj = max(n_cls, int(rng.integers(1, 4)))
    obj_cls = classes + [int(rng.choice(classes)) for _ in range(n_obj - n_cls)]
    rng.shuffle(obj_cls)
    lo, hi = _RADIUS[min(n_obj, 3)]

    img = _background(rng, size)
    label = np.zeros((size, size), np.uint8)
    inst = np.zeros((size, size), np.int16)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    placed: list[tuple[float, float, float]] = []
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    for j, c in enumerate(obj_cls, start=1):
        r = rng.uniform(lo, hi) * size
        for _ in range(60):
            cx, cy = rng.uniform(0.8 * r, size - 0.8 * r), rng.uniform(0.8 * r, size - 0.8 * r)
            if all(math.hypot(cx - px, cy - py) >= 0.8 * (r + pr) for px, py, pr in placed):
                break
        else:
            return None
        poly = _blob_polygon(rng, cx, cy, r)
        body = _polygon_mask(size, poly)
        # marker on the outline, sticking out ~1/3 of its size, fully inside the image
        h = max(4.0, 0.3 * r)
        for _ in range(30):
            px, py = poly[int(rng.integers(len(poly)))]
            d = math.hypot(px - cx, py - cy) or 1.0
            ux, uy = (px - cx) / d, (py - cy) / d
            mx, my = px - 0.2 * h * ux, py - 0.2 * h * uy
            if 1.6 * h + 1 <= mx <= size - 2 - 1.6 * h and 1.6 * h + 1 <= my <= size - 2 - 1.6 * h:
                break
        else:
            return None
        mark, mcol = _marker(MARKERS[c], size, mx, my, h, ux, uy)
        # plain body: one colour from the shared distribution with a soft linear shading
        bcol = _hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 0.55), rng.uniform(0.4, 0.85))
        g = rng.uniform(0, 2 * math.pi)
        shade = 1.0 + 0.15 * ((xx - cx) * math.cos(g) + (yy - cy) * math.sin(g)) / r
        body_img = bcol[None, None, :] * shade[..., None]
        img = np.where(body[..., None], body_img, img)
        img = np.where(mark[..., None], mcol, img)
        obj = body | mark
        label[obj] = c + 1
        inst[obj] = j
        placed.append((cx, cy, r))
        parts.append((body, mark))
    # every object must keep most of its marker and half of its body visible
    for j, (body, mark) in enumerate(parts, start=1):
        vis = inst == j
        if (vis & mark).sum() < 0.75 * mark.sum() or (vis & body & ~mark).sum() < 0.5 * (body & ~mark).sum():
            return None
    img += rng.normal(0, 3.0, size=img.shape).astype(np.float32)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if ignore_border > 0:
        label = _ignore_border(label, inst, ignore_border)
    return img, label


def _ignore_border(label: np.ndarray, inst: np.ndarray, width: int) -> np.ndarray:
    """Set object pixels within ``width`` px of another region (background or another object) to 255."""
    edge = np.zeros(inst.shape, bool)
    cur = inst
    for _ in range(width):
        p = np.pad(cur, 1, mode="edge")
        nb_diff = ((p[1:-1, :-2] != cur) | (p[1:-1, 2:] != cur) | (p[:-2, 1:-1] != cur) | (p[2:, 1:-1] != cur))
        edge |= nb_diff & (inst > 0)
        cur = np.where(edge, -1, inst)
    out = label.copy()
    out[edge] = 255
    return out


def render_image(seed: int, index: int, size: int = 128, num_foreground: int = 6,
                 ignore_border: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (S,S,3), label uint8 (S,S)) of synthetic image ``index``; deterministic."""
    rng = np.random.default_rng([int(seed), int(index), int(size), int(num_foreground)])
    for _ in range(100):
        out = _try_render(rng, size, num_foreground, ignore_border)
        if out is not None:
            return out
    raise RuntimeError(f"synthetic image {index}: could not place objects at size {size}")


def make_synthetic(out: str, num_images: int = 200, size: int = 128, seed: int = 0, val_fraction: float = 0.25,
                   num_classes: int | None = None, ignore_border: int = 1) -> dict:
    """Write a synthetic VOC-layout dataset to ``out`` (local folder or s3:// prefix).

    ``num_classes`` is C, the class count including background (project convention); default 7 (6 markers +
    background), at most ``len(MARKERS) + 1``. Returns a summary dict (root, class_names, counts, seconds).
    """
    t0 = time.perf_counter()
    c = 7 if num_classes is None else int(num_classes)
    if not 2 <= c <= len(MARKERS) + 1:
        raise ValueError(f"num_classes={num_classes}: want 2..{len(MARKERS) + 1} (including background)")
    if num_images < 1:
        raise ValueError(f"num_images={num_images}: want >= 1")
    if size < 32:
        raise ValueError(f"size={size}: want >= 32 pixels")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}: want in [0, 1)")
    k = c - 1
    class_names = ["background"] + list(MARKERS[:k])
    out = str(out)
    local = not fs.is_remote(out)

    def put(rel: str, data: bytes) -> None:
        uri = fs.join(out, rel)
        if local:  # plain writes: a fresh generator output needs no per-file fsync
            os.makedirs(os.path.dirname(uri), exist_ok=True)
            with open(uri, "wb") as f:
                f.write(data)
        else:
            fs.write_bytes(uri, data)

    ids = [f"synth_{i:05d}" for i in range(num_images)]
    labels: dict[str, np.ndarray] = {}
    counts = np.zeros(k, np.int64)
    multi = 0
    for i, item_id in enumerate(ids):
        img, lab = render_image(seed, i, size, k, ignore_border)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        put(f"JPEGImages/{item_id}.jpg", buf.getvalue())
        put(f"SegmentationClass/{item_id}.png", encode_label_png(lab))
        vec = np.zeros(k, np.float32)
        present = [int(v) for v in np.unique(lab) if 0 < v < 255]
        vec[[v - 1 for v in present]] = 1.0
        labels[item_id] = vec
        counts += vec.astype(np.int64)
        multi += len(present) > 1
    order = np.random.default_rng([int(seed), 7919]).permutation(num_images)
    n_val = int(round(num_images * val_fraction))
    if num_images >= 2:
        n_val = min(max(n_val, 1 if val_fraction > 0 else 0), num_images - 1)
    val = sorted(ids[j] for j in order[:n_val])
    train = sorted(ids[j] for j in order[n_val:])
    put("ImageSets/Segmentation/train.txt", ("\n".join(train) + "\n").encode())
    put("ImageSets/Segmentation/val.txt", ("\n".join(val) + "\n").encode() if val else b"")
    put("classes.txt", ("\n".join(class_names) + "\n").encode())
    buf = io.BytesIO()
    np.save(buf, labels, allow_pickle=True)
    put("cls_labels.npy", buf.getvalue())
    return {"root": out, "class_names": class_names, "num_images": num_images, "train": len(train),
            "val": len(val), "size": size, "seed": seed, "multi_class_images": int(multi),
            "class_counts": {class_names[j + 1]: int(counts[j]) for j in range(k)},
            "seconds": time.perf_counter() - t0}
