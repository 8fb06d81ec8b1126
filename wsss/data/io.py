"""Defensive decoding of data items: ids, images, label masks, label PNGs.

Everything that turns bytes from a dataset into arrays goes through here, so that one bad file becomes one
:class:`BadItem` with a one-line message naming the file (or id) instead of a crash deep in a training loop.

- Images: any format PIL reads (JPEG, PNG, ...) whatever the file extension says; grayscale, palette, 16-bit,
  CMYK and RGBA images are converted to 8-bit RGB (alpha dropped). The EXIF orientation is NOT applied: VOC-style
  masks are aligned with the stored pixel grid.
- Masks: palette ("P") or grayscale PNGs hold class indices directly; 255 = ignore (VOC object borders).
  RGB-coded masks in the VOC colours are mapped back to indices.
- A decompression-bomb guard rejects images above :data:`MAX_IMAGE_PIXELS` before their pixels are decoded.
- Parquet from bytes (:func:`read_parquet_bytes`, :func:`iter_parquet_bytes`) is decoded in the calling thread.
  ``pq.read_table(BufferReader(bytes))`` decodes on Arrow's thread pools, and a pool worker can drop the last
  reference to the Python-owned buffer after the call returned; if that happens while the interpreter exits,
  the worker's GIL request ends it with ``pthread_exit`` inside a C++ destructor and the process aborts with
  ``terminate called without an active exception`` (seen at the end of ``wsss shard``; Arrow issue #45017 has
  the same stack).
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

__all__ = ["BadItem", "MAX_IMAGE_PIXELS", "IGNORE", "validate_id", "decode_image", "decode_mask",
           "image_size", "encode_label_png", "voc_palette", "read_parquet_bytes", "iter_parquet_bytes"]

#: Largest image accepted (pixels). PIL's own default decompression-bomb limit (~9459 x 9459); kept equal to it
#: so PIL never warns below our limit and anything above is refused before decoding.
MAX_IMAGE_PIXELS = 89_478_485

#: Label value meaning "ignore" (VOC object borders / uncertain pixels).
IGNORE = 255


class BadItem(ValueError):
    """One data item (image, mask, label or id) cannot be used; the message names the file or id."""


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    text = msg[0] if msg else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def validate_id(item_id: str) -> str:
    """Return ``item_id`` if it is a safe file stem inside a dataset folder, else raise BadItem.

    Rejected: non-strings, '' and whitespace-only, '.', '..', anything with '/', '\\\\' or NUL, absolute paths
    (also Windows drive prefixes such as 'C:'), and ids with leading/trailing whitespace or control characters.
    """
    if not isinstance(item_id, str):
        raise BadItem(f"id {item_id!r}: not a string")
    if item_id.strip() == "":
        raise BadItem(f"id {item_id!r}: empty")
    if item_id != item_id.strip():
        raise BadItem(f"id {item_id!r}: leading or trailing whitespace")
    if item_id in (".", ".."):
        raise BadItem(f"id {item_id!r}: would escape the dataset folder")
    if "/" in item_id or "\\" in item_id or os.path.isabs(item_id) or (len(item_id) >= 2 and item_id[1] == ":"):
        raise BadItem(f"id {item_id!r}: path separators or absolute paths are not allowed in an id")
    if any(ord(c) < 32 or ord(c) == 127 for c in item_id):
        raise BadItem(f"id {item_id!r}: control characters (NUL, newline, ...) are not allowed in an id")
    return item_id


def _open(data: bytes, name: str, what: str) -> Image.Image:
    """Open and fully decode an image (catching truncation), with the size guard applied before decoding."""
    if data is None or len(data) == 0:
        raise BadItem(f"{name}: empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:  # its message names a BytesIO object's address: say what it means
        raise BadItem(f"{name}: not a readable {what} (unknown format, {len(data)} bytes)") from None
    except Exception as e:  # SyntaxError, OSError, DecompressionBombError, ...
        raise BadItem(f"{name}: not a readable {what} ({_one_line(e)})") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadItem(f"{name}: {what} has an empty size {w}x{h}")
    if w * h > MAX_IMAGE_PIXELS:
        raise BadItem(f"{name}: {what} is {w}x{h} pixels, above the limit of {MAX_IMAGE_PIXELS} pixels")
    try:
        img.load()  # decodes now: a truncated or corrupt stream fails here, not later
    except Exception as e:
        raise BadItem(f"{name}: corrupt or truncated {what} ({_one_line(e)})") from None
    return img


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0 if a.max(initial=0) <= 65535 else a * (255.0 / max(a.max(), 1.0))
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        return np.asarray(img.convert("RGBA").convert("RGB"), dtype=np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode image bytes to uint8 (H, W, 3) RGB. Corrupt, truncated, empty or oversized -> BadItem naming ``name``."""
    img = _open(data, name, "image")
    try:
        arr = _to_rgb_array(img)
    except Exception as e:
        raise BadItem(f"{name}: cannot convert image mode {img.mode} to RGB ({_one_line(e)})") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise BadItem(f"{name}: decoded to an unexpected shape {arr.shape}")
    return np.ascontiguousarray(arr)


def image_size(data: bytes, name: str) -> tuple[int, int]:
    """(H, W) of an encoded image from its header only (no pixel decoding). Unreadable -> BadItem."""
    if data is None or len(data) == 0:
        raise BadItem(f"{name}: empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except Exception as e:
        raise BadItem(f"{name}: not a readable image ({_one_line(e)})") from None
    return int(h), int(w)


def _rgb_mask_to_index(rgb: np.ndarray, name: str) -> np.ndarray:
    """Map a VOC-coloured RGB mask back to palette indices; an unknown colour -> BadItem."""
    pal = np.asarray(voc_palette(), dtype=np.int64).reshape(256, 3)
    codes = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    lut = {int(c): i for i, c in reversed(list(enumerate(codes)))}  # first index wins for duplicate colours
    px = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2].astype(np.int64)
    uniq, inv = np.unique(px, return_inverse=True)
    out = np.empty(len(uniq), dtype=np.uint8)
    for j, c in enumerate(uniq):
        if int(c) not in lut:
            r, g, b = (int(c) >> 16) & 255, (int(c) >> 8) & 255, int(c) & 255
            raise BadItem(f"{name}: RGB mask colour ({r}, {g}, {b}) is not a VOC palette colour")
        out[j] = lut[int(c)]
    return out[inv.reshape(px.shape)]


def decode_mask(data: bytes, name: str, expected_hw: tuple[int, int] | None = None,
                num_classes: int | None = None) -> np.ndarray:
    """Decode a label mask to uint8 (H, W) class indices (255 = ignore).

    Palette/grayscale PNGs are read as indices; RGB(A) masks in VOC colours are mapped back. A size other than
    ``expected_hw`` (H, W) or a value >= ``num_classes`` other than 255 -> BadItem naming ``name``.
    """
    img = _open(data, name, "mask")
    mode = img.mode
    try:
        if mode in ("P", "L"):
            m = np.asarray(img, dtype=np.uint8)
        elif mode == "1":
            m = np.asarray(img, dtype=np.uint8)
        elif mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            a = np.asarray(img)
            if a.size and (a.min() < 0 or a.max() > 255):
                raise BadItem(f"{name}: mask value {int(a.max())} does not fit a class index (0..255)")
            m = a.astype(np.uint8)
        elif mode in ("RGB", "RGBA"):
            m = _rgb_mask_to_index(np.asarray(img.convert("RGB")), name)
        else:
            raise BadItem(f"{name}: unsupported mask mode {mode} (want a palette or grayscale PNG)")
    except BadItem:
        raise
    except Exception as e:
        raise BadItem(f"{name}: cannot read mask ({_one_line(e)})") from None
    if m.ndim != 2:
        raise BadItem(f"{name}: mask decoded to shape {m.shape}, want (H, W)")
    if expected_hw is not None and tuple(m.shape) != tuple(int(v) for v in expected_hw):
        eh, ew = (int(v) for v in expected_hw)
        raise BadItem(f"{name}: mask is {m.shape[1]}x{m.shape[0]} (WxH) but its image is {ew}x{eh}")
    if num_classes is not None:
        vals = np.unique(m)
        bad = vals[(vals >= num_classes) & (vals != IGNORE)]
        if bad.size:
            raise BadItem(f"{name}: mask has class index {int(bad[0])} but the dataset has {num_classes} classes "
                          f"(0..{num_classes - 1}, 255 = ignore)")
    return np.ascontiguousarray(m)


def encode_label_png(label: np.ndarray) -> bytes:
    """Encode a uint8 (H, W) label map as a VOC-palette PNG (values are palette indices, 255 = ignore)."""
    a = np.asarray(label)
    if a.ndim != 2:
        raise ValueError(f"label map must be 2-D (H, W), got shape {a.shape}")
    if a.dtype != np.uint8:
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ValueError(f"label values must be in 0..255, got {a.min()}..{a.max()}")
        a = a.astype(np.uint8)
    h, w = a.shape
    img = Image.frombytes("P", (w, h), np.ascontiguousarray(a).tobytes())  # index-preserving
    img.putpalette(voc_palette())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


_PALETTE: list[int] | None = None


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map: 256 RGB triples (768 ints); index c's colour spreads the bits of c over R, G, B
    (bit 0 -> R, bit 1 -> G, bit 2 -> B, most significant first). Index 255 is (224, 224, 192)."""
    global _PALETTE
    if _PALETTE is None:
        pal = []
        for c in range(256):
            r = g = b = 0
            v = c
            for shift in range(7, -1, -1):
                r |= ((v >> 0) & 1) << shift
                g |= ((v >> 1) & 1) << shift
                b |= ((v >> 2) & 1) << shift
                v >>= 3
            pal.extend((r, g, b))
        _PALETTE = pal
    return list(_PALETTE)


def read_parquet_bytes(data: bytes, columns: list[str] | None = None):
    """A Parquet file held in memory -> ``pyarrow.Table``, decoded in this thread (no Arrow pool threads, see the
    module docstring). For the small tables of this project (rejects, results, shard id columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.ParquetFile(pa.BufferReader(data), pre_buffer=False).read(columns=columns, use_threads=False)


def iter_parquet_bytes(data: bytes, batch_size: int, columns: list[str] | None = None):
    """Record batches of a Parquet file held in memory, decoded in this thread (see :func:`read_parquet_bytes`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(pa.BufferReader(data), pre_buffer=False)
    yield from pf.iter_batches(batch_size=batch_size, columns=columns, use_threads=False)
