"""Generic layout reader: a folder of images with a labels table (e.g. histology sets such as LUAD-HistoSeg).

::

    root/
      images/<id>.<png|jpg|jpeg|bmp|tif|tiff|webp>
      labels.csv        header ``id,classes``; classes = class names separated by ';' (or spaces), e.g.
                        ``img01,TE;LYM``. A 'background' entry is ignored (labels are foreground only).
      classes.txt       one name per line, background first (optional: else 'background' + the sorted names
                        seen in labels.csv)
      masks/<id>.png    optional palette/grayscale masks (class indices, 255 = ignore)
      splits/<split>.txt  optional id lists

Split: ``splits/<split>.txt`` when it exists. Without a split file the split is all ids (the ids of labels.csv in
file order, or every image when there is no labels.csv). When splits/ exists but the named file does not, that is a
DatasetError (a typo must not silently select everything).

Labels: labels.csv when it has the id, else derived from the mask. An unknown class name -> BadItem for that id.
"""
from __future__ import annotations

import csv
import io
import re

import numpy as np

from wsss.data import fs
from wsss.data.base import Dataset, DatasetError, _list, read_class_names, read_split_ids
from wsss.data.io import BadItem, validate_id

__all__ = ["GenericDataset", "IMAGE_EXTS"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_SEP = re.compile(r"[;\s]+")


class GenericDataset(Dataset):
    layout = "generic"

    def __init__(self, root: str, split: str | None = None):
        super().__init__(root, split)
        top = set(_list(self.root))
        if "images" not in top:
            if not top and not fs.exists(self.root):
                raise DatasetError(f"dataset root not found: {self.root}")
            raise DatasetError(f"{self.root}: not a generic layout (no images/ folder)")
        # images: stem -> file name (the first by extension preference when several share a stem)
        self._images: dict[str, str] = {}
        for name in _list(fs.join(self.root, "images")):
            stem, dot, ext = name.rpartition(".")
            if not dot or ("." + ext.lower()) not in IMAGE_EXTS:
                continue
            prev = self._images.get(stem)
            if prev is None or _ext_rank(name) < _ext_rank(prev):
                self._images[stem] = name
        self._masks = {n[:-4] for n in _list(fs.join(self.root, "masks")) if n.endswith(".png")} \
            if "masks" in top else set()
        # labels.csv -> id: list of names
        self._names_by_id: dict[str, list[str]] = {}
        csv_ids: list[str] = []
        if "labels.csv" in top:
            csv_ids = self._read_labels_csv(fs.join(self.root, "labels.csv"))
        if "classes.txt" in top:
            self.class_names = read_class_names(fs.join(self.root, "classes.txt"))
        else:
            seen = sorted({n for names in self._names_by_id.values() for n in names if n != "background"})
            if not seen:
                raise DatasetError(f"{self.root}: no classes.txt and no class names in labels.csv")
            self.class_names = ["background"] + seen
        self._index = {n: i for i, n in enumerate(self.class_names)}
        # ids of the split
        split_file = fs.join(self.root, "splits", f"{split}.txt") if split is not None else None
        if split is not None and "splits" in top:
            if f"{split}.txt" not in set(_list(fs.join(self.root, "splits"))):
                raise DatasetError(f"split file not found: {split_file}")
            self.ids, self.rejects = read_split_ids(split_file)
        elif csv_ids:
            self.ids = csv_ids
        else:
            self.ids = sorted(self._images)

    def _read_labels_csv(self, uri: str) -> list[str]:
        try:
            text = fs.read_bytes(uri).decode("utf-8-sig")
        except UnicodeDecodeError:
            raise DatasetError(f"{uri}: not UTF-8 text") from None
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header is None:
            raise DatasetError(f"{uri}: empty file (want a header 'id,classes')")
        cols = [h.strip().lower() for h in header]
        if "id" not in cols or "classes" not in cols:
            raise DatasetError(f"{uri}: header {header!r} lacks 'id' and 'classes' columns")
        ci, cc = cols.index("id"), cols.index("classes")
        ids: list[str] = []
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            item_id = row[ci].strip() if ci < len(row) else ""
            try:
                validate_id(item_id)
            except BadItem as e:
                self.rejects.append((item_id, f"{uri} line {lineno}: {e}"))
                continue
            if item_id in self._names_by_id:
                continue  # the first row of an id wins
            cell = row[cc] if cc < len(row) else ""
            self._names_by_id[item_id] = [n for n in _SEP.split(cell.strip()) if n]
            ids.append(item_id)
        return ids

    def _image_uri(self, item_id: str) -> str:
        name = self._images.get(item_id, f"{item_id}.png")
        return fs.join(self.root, "images", name)

    def image_bytes(self, item_id: str) -> bytes:
        validate_id(item_id)
        if item_id not in self._images:
            raise BadItem(f"id {item_id}: no image file {fs.join(self.root, 'images', item_id)}.<png|jpg|...>")
        return super().image_bytes(item_id)

    def _mask_uri(self, item_id: str) -> str | None:
        if item_id in self._masks:
            return fs.join(self.root, "masks", f"{item_id}.png")
        return None

    def _file_labels(self, item_id: str) -> np.ndarray | None:
        names = self._names_by_id.get(item_id)
        if names is None:
            return None
        vec = np.zeros(self.num_foreground, dtype=np.float32)
        for n in names:
            if n == self.class_names[0] or n.lower() == "background":
                continue
            idx = self._index.get(n)
            if idx is None:
                known = ", ".join(self.class_names[1:])
                raise BadItem(f"id {item_id}: unknown class {n!r} in labels.csv (classes: {known})")
            vec[idx - 1] = 1.0
        return vec


def _ext_rank(name: str) -> int:
    ext = "." + name.rpartition(".")[2].lower()
    return IMAGE_EXTS.index(ext) if ext in IMAGE_EXTS else len(IMAGE_EXTS)
