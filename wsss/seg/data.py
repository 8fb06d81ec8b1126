"""Images and training labels of the segmentation stage; joint augmentation; the torch Dataset.

Training labels are either a folder (local or s3://) of label PNGs -- the pseudo labels of ``wsss pseudolabel`` --
or the dataset's own masks (``data.labels: null``, the fully supervised upper bound). Every label PNG is found by
:func:`label_uri` (the one place that knows the pseudo-label layout). A label that is missing, of another size
than its image, or with a class index >= the dataset's class count (255 = ignore is fine) is a reject
``(id, reason)``; a folder that declares other classes than the dataset (``classes.txt``, or ``class_names`` in
``manifest.json`` / ``meta.json``) is a one-line :class:`LabelFolderError` before training.

Augmentation (deeplab-pytorch's VOC recipe): one scale drawn from ``data.scales`` (image bilinear, label
nearest), horizontal flip, ImageNet normalisation, padding to the crop (image: the mean colour, label: 255),
one random crop window shared by image and label.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from wsss.data import fs
from wsss.data.io import IGNORE, BadItem, decode_image, decode_mask

__all__ = ["label_uri", "LabelFolderError", "LabelSource", "check_label_folder", "open_images", "ImageFolder",
           "scan_labels", "seg_augment", "SegTrainDataset", "image_hw"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class LabelFolderError(ValueError):
    """The label folder as a whole does not fit the dataset (missing, other classes); one line naming it."""


_LABEL_DIRS: dict[str, str] = {}


def label_uri(labels_root: str, item_id: str) -> str:
    """Where the label PNG of ``item_id`` lives in a pseudo-label folder: ``<root>/_labels/<id>.png`` when the
    folder has ``_labels/`` (the Parquet-dataset output layout), else ``<root>/<id>.png`` (the older layout, and a
    plain folder of PNGs). The folder's layout is looked up once per root."""
    d = _LABEL_DIRS.get(labels_root)
    if d is None:
        try:
            sub = "_labels" in fs.listdir(labels_root)
        except (FileNotFoundError, NotADirectoryError):
            sub = False
        d = _LABEL_DIRS[labels_root] = fs.join(labels_root, "_labels") if sub else labels_root
    return fs.join(d, f"{item_id}.png")


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def image_hw(dataset, item_id: str) -> tuple[int, int]:
    """(H, W) of an image without decoding its pixels where the dataset allows."""
    if hasattr(dataset, "image_hw"):
        return tuple(dataset.image_hw(item_id))
    row = getattr(dataset, "_rows", {}).get(item_id)  # ShardDataset rows carry the size
    if row is not None:
        return int(row["height"]), int(row["width"])
    return tuple(dataset.load_image(item_id).shape[:2])


def declared_classes(labels_root: str) -> list[str] | None:
    """Class names a label folder declares (classes.txt, or class_names in [_]manifest.json / meta.json), or None."""
    from wsss.data.base import read_class_names

    try:
        names = set(fs.listdir(labels_root))
    except (FileNotFoundError, NotADirectoryError):
        raise LabelFolderError(f"label folder not found: {labels_root}") from None
    if "classes.txt" in names:
        return read_class_names(fs.join(labels_root, "classes.txt"))
    for n in ("_manifest.json", "manifest.json", "meta.json"):
        if n in names:
            try:
                obj = json.loads(fs.read_bytes(fs.join(labels_root, n)) or b"{}")
            except ValueError:
                raise LabelFolderError(f"{fs.join(labels_root, n)}: not valid JSON") from None
            if isinstance(obj, dict) and obj.get("class_names"):
                return [str(c) for c in obj["class_names"]]
    return None


def check_label_folder(labels_root: str, class_names: list[str]) -> None:
    """One-line LabelFolderError when the folder is missing or declares a class list other than the dataset's."""
    names = declared_classes(labels_root)
    if names is not None and len(names) != len(class_names):
        raise LabelFolderError(f"label folder {labels_root}: declares {len(names)} classes but the dataset has "
                               f"{len(class_names)} ({', '.join(class_names[:4])}, ...)")
    if names is not None and names != list(class_names):
        raise LabelFolderError(f"label folder {labels_root}: its class names ({', '.join(names[:4])}, ...) differ "
                               f"from the dataset's ({', '.join(class_names[:4])}, ...)")


class LabelSource:
    """The training label of an id: a PNG under ``labels_root``, or (``labels_root=None``) the dataset's mask."""

    def __init__(self, dataset, labels_root: str | None = None):
        self.dataset = dataset
        self.root = labels_root
        self.num_classes = int(dataset.num_classes)

    @property
    def name(self) -> str:
        return self.root if self.root else "ground-truth masks"

    def load(self, item_id: str, hw: tuple[int, int]) -> np.ndarray:
        """uint8 (H, W) label, checked against the image size ``hw`` and the class count; BadItem otherwise."""
        if self.root is None:
            mask = self.dataset.load_mask(item_id)
            if mask is None:
                raise BadItem(f"id {item_id}: no ground-truth mask")
            if tuple(mask.shape) != tuple(hw):
                raise BadItem(f"id {item_id}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is "
                              f"{hw[1]}x{hw[0]}")
            return mask
        uri = label_uri(self.root, item_id)
        try:
            data = fs.read_bytes(uri)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise BadItem(f"{uri}: label PNG missing") from None
        return decode_mask(data, uri, expected_hw=hw, num_classes=self.num_classes)


def scan_labels(dataset, source: LabelSource, ids=None, threads: int = 8) -> tuple[list[str], list[tuple[str, str]]]:
    """Read every id's label once (threads: S3 reads overlap). Returns (usable ids in order, rejects)."""
    ids = list(dataset.ids if ids is None else ids)

    def one(item_id):
        try:
            source.load(item_id, image_hw(dataset, item_id))
            return None
        except (BadItem, FileNotFoundError) as e:
            return _one_line(e)

    remote = fs.is_remote(source.root or str(getattr(dataset, "root", "")))
    with ThreadPoolExecutor(max(1, threads if remote else min(threads, 4))) as pool:
        reasons = list(pool.map(one, ids))
    ok = [i for i, r in zip(ids, reasons) if r is None]
    rejects = [(i, r) for i, r in zip(ids, reasons) if r is not None]
    return ok, rejects


class ImageFolder:
    """A plain folder (local or s3://) of image files: ids are the file stems; no labels or masks."""

    layout = "images"

    def __init__(self, root: str):
        self.root = str(root)
        self.split = None
        self.class_names: list[str] = []
        try:
            names = fs.listdir(self.root)
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(f"image folder not found: {self.root}") from None
        self._files = {}
        for n in names:
            stem, dot, ext = n.rpartition(".")
            if dot and "." + ext.lower() in IMAGE_EXTS and stem not in self._files:
                self._files[stem] = n
        self.ids = sorted(self._files)
        self.rejects: list[tuple[str, str]] = []
        self.has_masks = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load_image(self, item_id: str) -> np.ndarray:
        uri = fs.join(self.root, self._files[item_id])
        try:
            return decode_image(fs.read_bytes(uri), uri)
        except FileNotFoundError:
            raise BadItem(f"{uri}: image file missing") from None

    def load_mask(self, item_id: str):
        return None

    def __len__(self) -> int:
        return len(self.ids)


def open_images(uri: str, split: str | None = None, layout: str = "auto"):
    """A dataset-like reader (ids, load_image, class_names, load_mask) for a shard folder (manifest.json), a
    VOC / generic dataset, or a plain folder of images."""
    from wsss.data import open_dataset
    from wsss.data.base import DatasetError, detect_layout

    if any(fs.exists(fs.join(uri, n)) for n in ("_manifest.json", "manifest.json")):
        from wsss.data.shards import ShardDataset

        return ShardDataset(uri)
    try:
        detect_layout(uri) if layout == "auto" else None
    except DatasetError:
        return ImageFolder(uri)
    return open_dataset(uri, split, layout=layout)


# ---- augmentation ------------------------------------------------------------------------------------------

def seg_augment(image: np.ndarray, label: np.ndarray, crop: int, scales, flip: bool,
                rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (H, W, 3) image + uint8 (H, W) label -> float (3, crop, crop), int64 (crop, crop) (255 = ignore)."""
    from wsss.data.transforms import normalize, random_crop

    img = Image.fromarray(np.asarray(image, np.uint8))
    lab = Image.fromarray(np.asarray(label, np.uint8))
    s = float(scales[int(rng.integers(0, len(scales)))])
    w, h = img.size
    nw, nh = max(1, int(round(w * s))), max(1, int(round(h * s)))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
        lab = lab.resize((nw, nh), Image.NEAREST)
    if flip and rng.uniform() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
        lab = lab.transpose(Image.FLIP_LEFT_RIGHT)
    x = normalize(np.asarray(img))
    # one crop window for both: the label rides as an extra channel holding (label - 255), so the crop's zero
    # padding becomes 255 (ignore) once 255 is added back; the image's zero padding is the mean colour
    y = torch.from_numpy(np.asarray(lab, np.float32) - float(IGNORE))[None]
    both = random_crop(torch.cat([x, y], 0), int(crop), rng)
    return both[:3].contiguous(), (both[3] + float(IGNORE)).round().long()


class SegTrainDataset(torch.utils.data.Dataset):
    """Items ``{"image": (3, crop, crop), "label": (crop, crop) int64, "id"}`` over ``ids`` of ``dataset`` with
    labels from ``source``. A label or image that fails at read time is a reject and the next id is served."""

    def __init__(self, dataset, source: LabelSource, data_cfg, ids=None, seed: int = 0):
        self.dataset = dataset
        self.source = source
        self.ids = list(dataset.ids if ids is None else ids)
        self.crop = int(data_cfg.crop)
        self.scales = list(data_cfg.scales)
        self.flip = bool(data_cfg.flip)
        self.seed = int(seed)
        self.rejects: list[tuple[str, str]] = []
        self._bad: set[str] = set()
        self._visits: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, item_id: str) -> tuple[np.ndarray, np.ndarray]:
        image = self.dataset.load_image(item_id)
        return image, self.source.load(item_id, image.shape[:2])

    def __getitem__(self, index: int) -> dict:
        n = len(self.ids)
        for k in range(n):
            item_id = self.ids[(index + k) % n]
            if item_id in self._bad:
                continue
            try:
                image, label = self.load(item_id)
            except (BadItem, FileNotFoundError) as e:
                self._bad.add(item_id)
                self.rejects.append((item_id, _one_line(e)))
                continue
            visit = self._visits.get(int(index), 0)
            self._visits[int(index)] = visit + 1
            info = torch.utils.data.get_worker_info()
            wseed = int(info.seed) % (2 ** 63) if info is not None else 0
            rng = np.random.default_rng([self.seed, int(index), visit, wseed])
            x, y = seg_augment(image, label, self.crop, self.scales, self.flip, rng)
            return {"image": x, "label": y, "id": item_id}
        raise BadItem(f"dataset {getattr(self.dataset, 'root', '?')}: no usable training item")
