"""Datasets: VOC and generic layouts (local or s3://), the synthetic generator, transforms, safe decoding.

``open_dataset(root, split=None, layout="auto")`` is the entry point; see base.py, voc.py and generic.py.
"""
from wsss.data.base import Dataset, DatasetError, open_dataset
from wsss.data.io import BadItem

__all__ = ["open_dataset", "Dataset", "DatasetError", "BadItem"]
