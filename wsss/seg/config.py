"""Typed configuration of the segmentation stage (``wsss train-seg`` / ``predict-seg``, ``jobs.train_seg``).

A :class:`SegConfig` is separate from the CAM :class:`wsss.config.Config` (another network, other settings) but is
built, validated and overridden by the same helpers: YAML load, ``--set key=value``, a one-line
:class:`wsss.config.ConfigError` naming a bad key. Defaults are deeplab-pytorch's PASCAL VOC settings (DeepLab-v2
ResNet-101, the retraining protocol of AdvCAM / AMR's lineage; REFERENCE.md §6); ``configs/`` holds SEAM's
DeepLab-v1 / ResNet-38 settings and the synthetic-scale ones.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wsss.config import CRFConfig, ConfigError, _check, _merge, apply_override, read_yaml_mapping

__all__ = ["SegConfig", "SegDataConfig", "SegModelConfig", "SegOptimConfig", "SegEvalConfig", "ARCHS",
           "seg_from_dict", "load_seg_config", "deeplab_crf"]

#: deeplabv3: torchvision's DeepLab-v3 (ResNet-50/101, ASPP 12/24/36 at OS 8, 6/12/18 at OS 16, image pooling);
#: deeplabv2: DeepLab-v2 ASPP (four 3x3 branches at rates 6/12/18/24, summed) on a torchvision ResNet;
#: deeplabv1: DeepLab-v1 LargeFOV head (3x3 rate 12 -> 1x1 -> classifier) on a wsss backbone (SEAM: ResNet-38);
#: light: a small ASPP head on any wsss backbone (tiny, efficientnet_lite0, ...) for the CPU demo.
ARCHS = ("deeplabv3", "deeplabv2", "deeplabv1", "light")
RESNETS = ("resnet50", "resnet101")


def deeplab_crf() -> CRFConfig:
    """deeplab-pytorch's dense CRF for VOC: 10 iterations, POS_W 3, POS_XY_STD 1, BI_W 4, BI_XY_STD 67,
    BI_RGB_STD 3 (in wsss.refine.crf's names: gauss_compat, gauss_sxy, bi_compat, bi_sxy, bi_srgb)."""
    return CRFConfig(iters=10, gauss_sxy=1.0, gauss_compat=3.0, bi_sxy=67.0, bi_srgb=3.0, bi_compat=4.0)


@dataclass
class SegDataConfig:
    root: str = "data/VOC2012"          # image dataset (VOC / generic layout or a shard folder), local or s3://
    layout: str = "auto"
    train_split: str = "train_aug"
    val_split: str = "val"
    labels: str | None = None           # training labels: a folder / s3:// prefix of <id>.png (pseudo labels);
    #                                     null = the dataset's own masks (the fully supervised upper bound)
    crop: int = 321                     # deeplab-pytorch VOC: 321 x 321 random crop
    scales: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5])  # deeplab-pytorch: one drawn
    flip: bool = True                   # random horizontal flip
    check_labels: bool = True           # read every label once before training; bad ones go to the rejects list
    num_workers: int = 0                # DataLoader workers


@dataclass
class SegModelConfig:
    arch: str = "deeplabv2"             # deeplabv3 | deeplabv2 | deeplabv1 | light
    backbone: str = "resnet101"         # deeplabv2/v3: resnet50 | resnet101; deeplabv1/light: a wsss backbone
    output_stride: int = 8              # 8 or 16 (deeplab-pytorch DeepLab-v2: 8)
    pretrained: str | None = None       # backbone ImageNet weights: path, s3:// URI or package:NAME; never a hub
    freeze_bn: bool = True              # deeplab-pytorch: backbone BatchNorm frozen (eval, no grad)
    aspp_rates: list[int] | None = None  # null: per arch (v2 6/12/18/24; v3 12/24/36 at OS 8, 6/12/18 at 16;
    #                                      v1 [12]; light [2, 4])
    head_channels: int = 64             # light head width (deeplabv1: 1024, torchvision v3: 256, fixed)
    width: int = 32                     # tiny backbone base width
    dropout: float = 0.5                # DeepLab-v1 head dropout (fc6/fc7); light head dropout = 0.1


@dataclass
class SegOptimConfig:
    lr: float = 2.5e-4                  # deeplab-pytorch VOC
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.9                  # poly
    new_lr_mult: float = 10.0           # head x10, head biases x20 without decay (wsss.models.param_groups)
    batch_size: int = 10                # deeplab-pytorch: 5 x 2 accumulation = 10
    max_steps: int = 20000              # deeplab-pytorch VOC ITER_MAX 20k (SEAM's DeepLab-v1: 20k)
    amp: bool = True                    # autocast on CUDA only
    clip_grad_norm: float | None = None


@dataclass
class SegEvalConfig:
    scales: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75])  # multi-scale test
    flip: bool = True                   # multi-scale pass also averages the flipped image
    crf: bool = True                    # also report after the dense CRF
    max_images: int | None = None       # evaluate on the first N val images (null: all)
    every: int = 0                      # single-scale val mIoU every N steps during training (0: only at the end)
    val_images: int = 16                # images of that periodic check


@dataclass
class SegConfig:
    data: SegDataConfig = field(default_factory=SegDataConfig)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    optim: SegOptimConfig = field(default_factory=SegOptimConfig)
    eval: SegEvalConfig = field(default_factory=SegEvalConfig)
    crf: CRFConfig = field(default_factory=deeplab_crf)
    seed: int = 0
    device: str = "auto"                # auto (cuda if available) | cpu | cuda | cuda:N
    out: str = "runs/seg"               # checkpoint folder or s3:// prefix

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    def aspp_rates(self) -> list[int]:
        """The ASPP / LargeFOV rates actually used (explicit, else the arch's default)."""
        m = self.model
        if m.aspp_rates is not None:
            return list(m.aspp_rates)
        if m.arch == "deeplabv2":
            return [6, 12, 18, 24]                              # DeepLab-v2 ASPP-L
        if m.arch == "deeplabv3":
            return [12, 24, 36] if m.output_stride == 8 else [6, 12, 18]  # DeepLab-v3 Sec. 3.3
        if m.arch == "deeplabv1":
            return [12]                                         # DeepLab-LargeFOV: fc6 3x3 rate 12
        return [2, 4]

    def validate(self) -> "SegConfig":
        from wsss.config import BACKBONES

        m, o, d, e = self.model, self.optim, self.data, self.eval
        _check(m.arch in ARCHS, "model.arch", m.arch, f"one of {ARCHS}")
        if m.arch in ("deeplabv3", "deeplabv2"):
            _check(m.backbone in RESNETS, "model.backbone", m.backbone, f"one of {RESNETS} for {m.arch}")
        else:
            _check(m.backbone in BACKBONES, "model.backbone", m.backbone, f"one of {BACKBONES} for {m.arch}")
        _check(m.output_stride in (8, 16), "model.output_stride", m.output_stride, "8 or 16")
        _check(m.aspp_rates is None or (len(m.aspp_rates) >= 1 and all(r >= 1 for r in m.aspp_rates)),
               "model.aspp_rates", m.aspp_rates, "null or a non-empty list of rates >= 1")
        _check(m.head_channels >= 1, "model.head_channels", m.head_channels, ">= 1")
        _check(0 <= m.dropout < 1, "model.dropout", m.dropout, "in [0, 1)")
        _check(o.lr > 0, "optim.lr", o.lr, "> 0")
        _check(o.batch_size >= 1, "optim.batch_size", o.batch_size, ">= 1")
        _check(o.max_steps >= 1, "optim.max_steps", o.max_steps, ">= 1")
        _check(o.new_lr_mult > 0, "optim.new_lr_mult", o.new_lr_mult, "> 0")
        _check(o.clip_grad_norm is None or o.clip_grad_norm > 0, "optim.clip_grad_norm", o.clip_grad_norm,
               "> 0 or null")
        _check(d.layout in ("auto", "voc", "generic"), "data.layout", d.layout, "auto, voc or generic")
        _check(d.crop >= 16, "data.crop", d.crop, ">= 16")
        _check(len(d.scales) >= 1 and all(s > 0 for s in d.scales), "data.scales", d.scales, "non-empty, each > 0")
        _check(len(e.scales) >= 1 and all(s > 0 for s in e.scales), "eval.scales", e.scales, "non-empty, each > 0")
        _check(e.max_images is None or e.max_images >= 1, "eval.max_images", e.max_images, ">= 1 or null")
        _check(e.every >= 0, "eval.every", e.every, ">= 0")
        _check(self.crf.iters >= 1, "crf.iters", self.crf.iters, ">= 1")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
               self.device, "auto, cpu, cuda or cuda:N")
        return self


def seg_from_dict(data: dict[str, Any] | None, overrides: list[str] | None = None) -> SegConfig:
    cfg = SegConfig()
    _merge(cfg, copy.deepcopy(data or {}))
    for ov in overrides or []:
        apply_override(cfg, ov)
    return cfg.validate()


def load_seg_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SegConfig:
    """Load a segmentation YAML config (defaults when ``path`` is None) and apply ``key=value`` overrides."""
    return seg_from_dict(read_yaml_mapping(path), overrides)


def resolve_device(cfg: SegConfig):
    """The torch device named by ``cfg.device`` (auto: CUDA when available)."""
    from wsss.config import resolve_device as _resolve

    return _resolve(cfg)
