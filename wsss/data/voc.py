"""PASCAL VOC layout reader (also the synthetic set's layout).

::

    root/
      JPEGImages/<id>.<jpg|jpeg|png|...>     images (any format PIL reads whatever the extension says; found by id
                                             with any extension of IMAGE_EXTS, case-insensitive, .jpg first)
      SegmentationClass/<id>.png             masks, palette indices, 255 = ignore (optional)
      SegmentationClassAug/<id>.png          SBD-augmented masks (optional)
      ImageSets/Segmentation/<split>.txt     one id per line
      cls_labels.npy                         {id: 20 floats} as shipped with PSA/SEAM (optional)
      classes.txt                            one class name per line, background first (optional; default VOC 21)

Mask choice: ``SegmentationClass/<id>.png`` when it exists, else ``SegmentationClassAug/<id>.png``. The original
masks come first because the SEAM-family evaluation uses them (REFERENCE.md: mIoU on the train split with the
original SegmentationClass masks); the Aug set only fills ids the original set does not cover.

Labels: ``cls_labels.npy`` when it has the id, else derived from the id's mask (values other than 0 and 255).

Split: ``split=None`` takes the union of all ``ImageSets/Segmentation/*.txt`` files (in name order); without any
split file, every image in JPEGImages/. A named split whose file is missing -> DatasetError. Unsafe ids in a split
file (``../x``, ``a/b``) are in ``.rejects`` with their reason, not in ``.ids``.
"""
from __future__ import annotations

import numpy as np

from wsss.data import fs
from wsss.data.base import (Dataset, DatasetError, _list, load_label_dict, read_class_names, read_split_ids)
from wsss.data.io import BadItem, validate_id

__all__ = ["VOC_CLASSES", "VOCDataset", "IMAGE_EXTS"]

#: Image extensions looked up in JPEGImages/, in order of preference when several files share an id.
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]


class VOCDataset(Dataset):
    layout = "voc"

    def __init__(self, root: str, split: str | None = None):
        super().__init__(root, split)
        top = set(_list(self.root))
        if "JPEGImages" not in top:
            if not top and not fs.exists(self.root):
                raise DatasetError(f"dataset root not found: {self.root}")
            raise DatasetError(f"{self.root}: not a VOC layout (no JPEGImages/ folder)")
        self.class_names = (read_class_names(fs.join(self.root, "classes.txt")) if "classes.txt" in top
                            else list(VOC_CLASSES))
        self._label_file = fs.join(self.root, "cls_labels.npy") if "cls_labels.npy" in top else None
        self._label_dict: dict[str, np.ndarray] | None = None
        self._seg = set(_stems(_list(fs.join(self.root, "SegmentationClass")), ".png")) \
            if "SegmentationClass" in top else set()
        self._seg_aug = set(_stems(_list(fs.join(self.root, "SegmentationClassAug")), ".png")) \
            if "SegmentationClassAug" in top else set()
        # id -> image file name, any supported extension (an RGBA .png under JPEGImages/ is a good image)
        self._images: dict[str, str] = {}
        for name in _list(fs.join(self.root, "JPEGImages")):
            stem, dot, ext = name.rpartition(".")
            if not dot or not stem or ("." + ext.lower()) not in IMAGE_EXTS:
                continue
            prev = self._images.get(stem)
            if prev is None or _ext_rank(name) < _ext_rank(prev):
                self._images[stem] = name
        split_dir = fs.join(self.root, "ImageSets", "Segmentation")
        if split is not None:
            self.ids, self.rejects = read_split_ids(fs.join(split_dir, f"{split}.txt"))
        else:
            files = [n for n in _list(split_dir) if n.endswith(".txt")]
            if files:
                seen: set[str] = set()
                for n in files:
                    ids, rej = read_split_ids(fs.join(split_dir, n))
                    self.rejects.extend(rej)
                    for i in ids:
                        if i not in seen:
                            seen.add(i)
                            self.ids.append(i)
            else:
                self.ids = sorted(self._images)

    def _image_uri(self, item_id: str) -> str:
        return fs.join(self.root, "JPEGImages", self._images.get(item_id, f"{item_id}.jpg"))

    def image_bytes(self, item_id: str) -> bytes:
        validate_id(item_id)
        if item_id not in self._images:
            raise BadItem(f"id {item_id}: image file missing: {fs.join(self.root, 'JPEGImages', item_id)}.jpg "
                          f"(nor .jpeg, .png, ...)")
        return super().image_bytes(item_id)

    def _mask_uri(self, item_id: str) -> str | None:
        if item_id in self._seg:
            return fs.join(self.root, "SegmentationClass", f"{item_id}.png")
        if item_id in self._seg_aug:
            return fs.join(self.root, "SegmentationClassAug", f"{item_id}.png")
        return None

    def _file_labels(self, item_id: str) -> np.ndarray | None:
        if self._label_file is None:
            return None
        if self._label_dict is None:
            self._label_dict = load_label_dict(self._label_file)
        return self._label_dict.get(item_id)


def _stems(names: list[str], ext: str) -> list[str]:
    return [n[: -len(ext)] for n in names if n.endswith(ext)]


def _ext_rank(name: str) -> int:
    ext = "." + name.rpartition(".")[2].lower()
    return IMAGE_EXTS.index(ext) if ext in IMAGE_EXTS else len(IMAGE_EXTS)
