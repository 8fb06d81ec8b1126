"""The planted-fault VOC-layout set of issue 12 (imported by the layout / rejects / exit tests).

``make_faulty_voc(root)`` writes a VOC-layout folder (classes.txt with 4 classes, masks for every image, labels
derived from the masks, split ``train``) whose split list names:

- GOOD: 4 ordinary RGB JPEGs, plus two good-but-unusual images: ``gray`` (a grayscale JPEG) and ``rgba`` (an RGBA
  PNG stored under JPEGImages/ as ``rgba.png``);
- BAD (8, with a word each reason must contain): a truncated JPEG, garbage bytes, an empty file, a mask of the
  wrong size, an empty label vector (all-background mask), a mask with class 77, an id listed but without any
  file, and the path-like id ``../../../../etc/passwd``.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["background", "cat", "dog", "car"]
GOOD = ["good_0", "good_1", "good_2", "good_3", "gray", "rgba"]
#: id -> a piece of text its reject reason must contain
BAD = {
    "truncated": "truncated",
    "garbage": "not a readable image",
    "empty": "empty file",
    "wrongsize": "mask is",
    "nolabels": "empty label",
    "class77": "class index 77",
    "missing": "missing",
    "../../../../etc/passwd": "path separators",
}
SPLIT = "train"
SIZE = (40, 48)  # H, W


def _mask(rng, h, w, cls: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    y, x = int(rng.integers(2, h // 2)), int(rng.integers(2, w // 2))
    m[y:y + h // 2, x:x + w // 2] = cls
    m[0, :] = 255  # a VOC-style ignore border
    return m


def _image(rng, mask: np.ndarray) -> np.ndarray:
    base = rng.integers(0, 60, mask.shape + (3,), dtype=np.uint8)
    colours = np.array([[0, 0, 0], [200, 40, 40], [40, 200, 40], [40, 40, 200]], np.uint8)
    fg = (mask > 0) & (mask < len(colours))
    base[fg] = colours[mask[fg]]
    return base


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _png_mask(m: np.ndarray) -> bytes:
    from wsss.data.io import encode_label_png

    return encode_label_png(m)


def make_faulty_voc(root, seed: int = 0) -> dict:
    """Write the set under ``root``; returns {"root", "good", "bad", "listed", "class_names", "split"}."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = SIZE
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    jpg = root / "JPEGImages"
    seg = root / "SegmentationClass"

    def put(item_id: str, image: bytes | None, mask: np.ndarray | None, name: str | None = None):
        if image is not None:
            (jpg / (name or f"{item_id}.jpg")).write_bytes(image)
        if mask is not None:
            (seg / f"{item_id}.png").write_bytes(_png_mask(mask))

    for k in range(4):
        m = _mask(rng, h, w, 1 + k % 3)
        put(f"good_{k}", _jpeg(_image(rng, m)), m)
    m = _mask(rng, h, w, 2)
    gray = Image.fromarray(_image(rng, m)).convert("L")
    buf = io.BytesIO()
    gray.save(buf, format="JPEG", quality=92)
    put("gray", buf.getvalue(), m)
    m = _mask(rng, h, w, 3)
    rgba = np.concatenate([_image(rng, m), np.full((h, w, 1), 200, np.uint8)], axis=2)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    put("rgba", buf.getvalue(), m, name="rgba.png")

    m = _mask(rng, h, w, 1)
    full = _jpeg(_image(rng, m))
    put("truncated", full[: len(full) // 2], m)
    put("garbage", b"this is not an image, just some bytes " * 4, m)
    put("empty", b"", m)
    m = _mask(rng, h, w, 2)
    put("wrongsize", _jpeg(_image(rng, m)), _mask(rng, h + 8, w, 2))
    m = _mask(rng, h, w, 1)
    put("nolabels", _jpeg(_image(rng, m)), np.where(m == 255, 255, 0).astype(np.uint8))
    m = _mask(rng, h, w, 1)
    m77 = m.copy()
    m77[m77 == 1] = 77
    put("class77", _jpeg(_image(rng, m)), m77)
    # "missing": listed, no image and no mask; the path-like id: listed only

    listed = GOOD[:2] + list(BAD)[:4] + GOOD[2:] + list(BAD)[4:]
    (root / "ImageSets" / "Segmentation" / f"{SPLIT}.txt").write_text("\n".join(listed) + "\n")
    return {"root": str(root), "good": list(GOOD), "bad": dict(BAD), "listed": listed,
            "class_names": list(CLASSES), "split": SPLIT}


def check_rejects(rejects, good=GOOD, bad=BAD, where: str = "") -> None:
    """Assert that ``rejects`` ((id, reason) pairs or {"id", "reason"} dicts) hold exactly the 8 bad ids, each
    with a one-line reason containing its expected word, and none of the good ids."""
    pairs = [(r["id"], r["reason"]) if isinstance(r, dict) else (r[0], r[1]) for r in rejects]
    got = dict(pairs)
    assert len(got) == len(pairs), f"{where}: duplicate reject rows {pairs}"
    assert set(got) == set(bad), f"{where}: rejects {sorted(got)} != {sorted(bad)}"
    for item_id, needle in bad.items():
        reason = str(got[item_id])
        assert needle in reason and "\n" not in reason, f"{where}: {item_id}: {reason!r} lacks {needle!r}"
    assert not set(got) & set(good), where
