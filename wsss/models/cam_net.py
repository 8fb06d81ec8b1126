"""The CAM network of SEAM / DAEN (and the plain-CAM and SSENet baselines).

backbone -> attention on f6_pre (DAEN: CSM after bn7; SEAM: ReLU) -> Dropout2d(0.5) -> 1x1 conv (no bias)
-> ``cam`` (B, C, h, w) with channel 0 = background (SEAM's fc8).  ``logits`` = global average pool of the
foreground channels (B, C-1).  With PCM (SEAM / DAEN) ``cam_rv`` = PCM(cam, image, f4, f5).

Module names: ``backbone``, ``attention``, ``dropout``, ``classifier`` (SEAM's ``fc8``), ``pcm`` (``proj4/proj5/proj``
= SEAM's ``f8_3/f8_4/f9``).  attention, classifier and pcm are *new* layers: x ``new_lr_mult`` in the optimizer
(REFERENCE.md: DAEN's public code left its CSM at backbone lr; as new layers they belong in the x10 group).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from wsss.models.attention import build_attention
from wsss.models.backbones import build_backbone
from wsss.models.param_groups import sgd_param_groups
from wsss.models.pcm import PCM

NEW_MODULES = ("attention", "classifier", "pcm")


class CAMNet(nn.Module):
    def __init__(self, cfg, num_classes: int, load_weights: bool = True):
        """``num_classes`` C includes background (index 0).  ``load_weights=False`` skips ``cfg.model.pretrained``
        (e.g. when a checkpoint's state_dict is loaded right after)."""
        super().__init__()
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")
        self.num_classes = int(num_classes)
        self.attention_name = cfg.attention
        self.with_pcm = bool(cfg.uses_pcm)
        m = cfg.model
        self.backbone = build_backbone(m, load_weights=load_weights)
        self.pretrained_loaded = bool(load_weights and m.pretrained)
        c4, c5, c6 = self.backbone.out_channels
        self.attention = build_attention(cfg.attention, c6, m.reduction, m.kernel)
        self.dropout = nn.Dropout2d(m.dropout)  # SEAM head: Dropout2d(0.5)
        self.classifier = nn.Conv2d(c6, self.num_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)  # SEAM: xavier for fc8
        self.pcm = PCM(c4, c5) if self.with_pcm else None

    def forward(self, x: torch.Tensor, pcm: bool | None = None) -> dict:
        """x (B, 3, H, W) normalised image -> dict(cam, logits, cam_rv, feats).

        ``pcm``: run the PCM (default: when the method uses it); ``cam_rv`` is None otherwise.
        """
        f4, f5, f6_pre = self.backbone(x)
        f6 = self.attention(f6_pre)
        cam = self.classifier(self.dropout(f6))
        logits = F.adaptive_avg_pool2d(cam[:, 1:], 1).flatten(1)
        use_pcm = self.with_pcm if pcm is None else (bool(pcm) and self.pcm is not None)
        cam_rv = self.pcm(cam, x, f4, f5) if use_pcm else None
        return {"cam": cam, "logits": logits, "cam_rv": cam_rv, "feats": (f4, f5, f6)}

    def param_groups(self, optim_cfg) -> list[dict]:
        """SGD groups (SEAM): backbone weights x1, backbone biases x2 (no decay), new-layer weights x new_lr_mult,
        new biases x 2*new_lr_mult (no decay).  Only trainable parameters; empty groups are left out.
        Each group: params, name, lr_mult, lr (= optim_cfg.lr * lr_mult), weight_decay."""
        if self.backbone.frozen_bn and not self.pretrained_loaded:
            warnings.warn(f"training a {type(self.backbone).__name__} backbone with frozen BatchNorm (SEAM) but no "
                          "pretrained weights (model.pretrained unset): use converted ImageNet weights or the "
                          "tiny backbone", stacklevel=2)
        return sgd_param_groups(self, NEW_MODULES, float(optim_cfg.lr), float(optim_cfg.weight_decay),
                                float(optim_cfg.new_lr_mult))


__all__ = ["CAMNet"]
