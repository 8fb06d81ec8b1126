"""The segmentation stage: a fully supervised network trained on the pseudo labels (pure PyTorch, no Ray).

``config.py`` (SegConfig), ``models.py`` (DeepLab-v3 / v2 / v1 and a light CPU model), ``data.py`` (labels,
rejects, augmentation), ``train.py`` (one-process training, the shared step), ``predict.py`` (multi-scale + flip
inference, dense CRF, evaluation, label PNGs). The Ray side is ``jobs/train_seg.py`` and ``jobs/predict_seg.py``.
"""
from wsss.seg.config import SegConfig, load_seg_config, seg_from_dict

__all__ = ["SegConfig", "load_seg_config", "seg_from_dict"]
