"""The dataset interface shared by the VOC and generic layouts, and ``open_dataset``.

A dataset is a list of ids (one split) plus ways to read each id's image, image-level labels and optional mask.
Reads go through :mod:`wsss.data.fs`, so a root may be a local folder or an ``s3://`` prefix. Per-item problems
raise :class:`wsss.data.io.BadItem` (one line naming the file or id); problems with the dataset as a whole
(missing root, missing split file, bad classes.txt) raise :class:`DatasetError`.

Ids listed in a split file that are not safe file stems (``../x``, ``a/b``, absolute paths) are not in ``.ids``;
they are recorded in ``.rejects`` as ``(id, reason)`` so a batch job can report them.
"""
from __future__ import annotations

import io
import pickle

import numpy as np

from wsss.data import fs
from wsss.data.io import BadItem, decode_image, decode_mask, image_size, validate_id

__all__ = ["Dataset", "DatasetError", "open_dataset", "read_class_names", "read_split_ids", "load_label_dict",
           "detect_layout"]


class DatasetError(ValueError):
    """The dataset as a whole cannot be opened (missing root/split/class list); the message names the path."""


class Dataset:
    """Common behaviour of the layouts. Subclasses fill ``class_names``, ``ids`` and implement the path methods
    ``_image_uri(id)``, ``_mask_uri(id) -> str | None`` and ``_file_labels(id) -> np.ndarray | None``."""

    layout = "?"

    def __init__(self, root: str, split: str | None):
        self.root = str(root)
        self.split = split
        self.class_names: list[str] = []
        self.ids: list[str] = []
        self.rejects: list[tuple[str, str]] = []
        self._derived_labels: dict[str, np.ndarray] = {}

    # ---- basic facts -----------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """C = number of classes including background (index 0)."""
        return len(self.class_names)

    @property
    def num_foreground(self) -> int:
        """K = C - 1."""
        return len(self.class_names) - 1

    @property
    def has_masks(self) -> bool:
        return any(self._mask_uri(i) is not None for i in self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self):
        return iter(self.ids)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={self.root!r}, split={self.split!r}, n={len(self.ids)}, "
                f"classes={self.num_classes})")

    # ---- per-item reads ----------------------------------------------------------------------------------
    def _image_uri(self, item_id: str) -> str:
        raise NotImplementedError

    def _mask_uri(self, item_id: str) -> str | None:
        raise NotImplementedError

    def _file_labels(self, item_id: str) -> np.ndarray | None:
        raise NotImplementedError

    def image_uri(self, item_id: str) -> str:
        return self._image_uri(validate_id(item_id))

    def mask_uri(self, item_id: str) -> str | None:
        return self._mask_uri(validate_id(item_id))

    def image_bytes(self, item_id: str) -> bytes:
        uri = self.image_uri(item_id)
        return _read(uri, f"id {item_id}: image file missing: {uri}")

    def mask_bytes(self, item_id: str) -> bytes | None:
        uri = self.mask_uri(item_id)
        if uri is None:
            return None
        return _read(uri, f"id {item_id}: mask file missing: {uri}")

    def load_image(self, item_id: str) -> np.ndarray:
        """uint8 (H, W, 3) RGB."""
        return decode_image(self.image_bytes(item_id), self.image_uri(item_id))

    def image_hw(self, item_id: str) -> tuple[int, int]:
        """(H, W) of the image from its header."""
        return image_size(self.image_bytes(item_id), self.image_uri(item_id))

    def load_mask(self, item_id: str, expected_hw: tuple[int, int] | None = None,
                  check_size: bool = True) -> np.ndarray | None:
        """uint8 (H, W) class indices (255 = ignore) or None when the id has no mask.

        The size is checked against ``expected_hw`` when given, else against the image's header (one more read)
        unless ``check_size`` is False. Class indices >= num_classes (except 255) -> BadItem.
        """
        data = self.mask_bytes(item_id)
        if data is None:
            return None
        if expected_hw is None and check_size:
            expected_hw = self.image_hw(item_id)
        return decode_mask(data, self.mask_uri(item_id), expected_hw=expected_hw, num_classes=self.num_classes)

    def labels(self, item_id: str) -> np.ndarray:
        """float32 (K,) multi-hot over the foreground classes (index k <-> class k+1).

        From the layout's label file when it has the id, else derived from the mask (its values except 0 and
        255). No positive class, wrong length, or neither source -> BadItem naming the id.
        """
        validate_id(item_id)
        k = self.num_foreground
        vec = self._file_labels(item_id)
        if vec is None:
            vec = self._derived_labels.get(item_id)
            if vec is None:
                if self._mask_uri(item_id) is None:
                    raise BadItem(f"id {item_id}: no image-level labels (not in the label file and no mask)")
                mask = self.load_mask(item_id, check_size=False)
                vec = labels_from_mask(mask, self.num_classes)
                self._derived_labels[item_id] = vec
        vec = np.asarray(vec, dtype=np.float32).reshape(-1)
        if vec.shape[0] != k:
            raise BadItem(f"id {item_id}: label vector has {vec.shape[0]} entries, want {k} foreground classes")
        if not np.all(np.isfinite(vec)):
            raise BadItem(f"id {item_id}: label vector has non-finite values")
        if not np.any(vec > 0):
            raise BadItem(f"id {item_id}: empty label vector (no positive class)")
        return vec.copy()

    def load_item(self, item_id: str) -> dict:
        """Image, labels and mask (or None) of one id, each file read once."""
        image = self.load_image(item_id)
        mask = self.load_mask(item_id, expected_hw=image.shape[:2])
        return {"id": item_id, "image": image, "labels": self.labels(item_id), "mask": mask}

    def class_list(self, labels: np.ndarray) -> list[str]:
        """Names of the positive classes of a (K,) label vector."""
        return [self.class_names[k + 1] for k in np.flatnonzero(np.asarray(labels) > 0)]


def labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """(K,) float32 multi-hot of the classes present in a mask (values other than 0 and 255)."""
    vals = np.unique(mask)
    vec = np.zeros(num_classes - 1, dtype=np.float32)
    for v in vals:
        v = int(v)
        if v == 0 or v == 255:
            continue
        vec[v - 1] = 1.0  # decode_mask has already refused v >= num_classes
    return vec


def _read(uri: str, missing_msg: str) -> bytes:
    try:
        return fs.read_bytes(uri)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise BadItem(missing_msg) from None
    except PermissionError:
        raise BadItem(f"{uri}: permission denied") from None


def _list(uri: str) -> list[str]:
    """Names under a folder, [] when it does not exist."""
    try:
        return fs.listdir(uri)
    except (FileNotFoundError, NotADirectoryError):
        return []


def read_class_names(uri: str) -> list[str]:
    """classes.txt: one name per line, first = background; blank lines and '#' comments skipped."""
    try:
        text = fs.read_bytes(uri).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"{uri}: not UTF-8 text") from None
    names = [ln.strip() for ln in text.splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if len(names) < 2:
        raise DatasetError(f"{uri}: need at least 2 class names (background first), got {len(names)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DatasetError(f"{uri}: duplicate class name {dup[0]!r}")
    return names


def read_split_ids(uri: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Ids of a split file (first whitespace-separated token per line; blank lines and '#' comments skipped,
    duplicates kept once). Returns (valid ids, rejects) where rejects are (id, reason) for unsafe ids."""
    try:
        text = fs.read_bytes(uri).decode("utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"split file not found: {uri}") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{uri}: not UTF-8 text") from None
    ids: list[str] = []
    seen: set[str] = set()
    rejects: list[tuple[str, str]] = []
    for ln in text.splitlines():
        s = ln.strip()
        if not s or s.startswith("#"):
            continue
        tok = s.split()[0]
        try:
            validate_id(tok)
        except BadItem as e:
            rejects.append((tok, f"{uri}: {e}"))
            continue
        if tok not in seen:
            seen.add(tok)
            ids.append(tok)
    return ids, rejects


class _LabelUnpickler(pickle.Unpickler):
    """Only what ``np.save(dict)`` produces: numpy arrays/dtypes/scalars inside plain containers. A crafted
    cls_labels.npy cannot run code (np.load(allow_pickle=True) would)."""

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_label_dict(uri: str) -> dict[str, np.ndarray]:
    """cls_labels.npy: a 0-d object array holding {id: (K,) floats} (as SEAM/PSA ship it), read without running
    arbitrary pickled code. A plain (N,) structured file is not supported. Bad file -> DatasetError naming it."""
    data = fs.read_bytes(uri)
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        if dtype != np.dtype(object) or shape != ():
            raise DatasetError(f"{uri}: expected a pickled dict (0-d object array), got dtype {dtype} shape {shape}")
        obj = _LabelUnpickler(f).load()
        if isinstance(obj, np.ndarray):
            obj = obj.item()
    except DatasetError:
        raise
    except Exception as e:
        first = (str(e).splitlines() or [""])[0]
        raise DatasetError(f"{uri}: cannot read label dict ({type(e).__name__}: {first})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{uri}: expected a dict id -> label vector, got {type(obj).__name__}")
    return {str(k): np.asarray(v, dtype=np.float32).reshape(-1) for k, v in obj.items()}


def detect_layout(root: str) -> str:
    """'voc' when root has JPEGImages/, 'generic' when it has images/; else DatasetError."""
    names = set(_list(root))
    if not names and not fs.exists(root):
        raise DatasetError(f"dataset root not found: {root}")
    if "JPEGImages" in names:
        return "voc"
    if "images" in names:
        return "generic"
    raise DatasetError(f"{root}: unknown dataset layout (want JPEGImages/ (VOC) or images/ + labels.csv (generic))")


def open_dataset(root: str, split: str | None = None, layout: str = "auto") -> Dataset:
    """Open a dataset folder (local or s3://). ``layout``: auto | voc | generic.

    VOC: JPEGImages/, SegmentationClass(Aug)/, ImageSets/Segmentation/<split>.txt, cls_labels.npy, classes.txt.
    Generic: images/, labels.csv, classes.txt, masks/, splits/<split>.txt. See voc.py / generic.py.
    """
    root = str(root)
    if split is not None:
        try:
            validate_id(split)
        except BadItem:
            raise DatasetError(f"split name {split!r}: not a plain name") from None
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "voc":
        from wsss.data.voc import VOCDataset

        return VOCDataset(root, split)
    if layout == "generic":
        from wsss.data.generic import GenericDataset

        return GenericDataset(root, split)
    raise DatasetError(f"unknown dataset layout {layout!r} (want auto, voc or generic)")
