"""Backbones: ``build_backbone(model_cfg)`` returns a :class:`Backbone`.

Every backbone returns three feature maps ``(f4, f5, f6_pre)`` and exposes ``.out_channels = (c4, c5, c6)``:

* ``f4`` - mid-level features at stride 8 (SEAM's ``conv4``; PCM and AffinityNet input),
* ``f5`` - deeper features at stride 8 or ``output_stride`` (SEAM's ``conv5``),
* ``f6_pre`` - the deepest features at ``output_stride`` **before** their final ReLU. SEAM applies
  ``relu(bn7(b7))``; DAEN puts its CSM in place of that ReLU (DAEN Sec. 3.2), so the attention module
  (``wsss.models.attention.build_attention``; "none" = plain ReLU) owns the last activation.

``.frozen_bn`` is True where BatchNorm is frozen as in SEAM (eval mode even under ``.train()``, no grad);
``.pretrained_ignore`` lists key prefixes of a converted ImageNet state_dict that are not part of the backbone
(e.g. torchvision's ``fc.``) and are dropped by :func:`wsss.models.weights.load_pretrained`.
"""
from __future__ import annotations

import torch
from torch import nn

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


class Backbone(nn.Module):
    """Common behaviour: frozen BatchNorm stays in eval mode under ``.train()``."""

    out_channels: tuple[int, int, int] = (0, 0, 0)
    output_stride: int = 8
    frozen_bn: bool = False
    pretrained_ignore: tuple[str, ...] = ()

    def init_from_scratch(self) -> None:
        """Kaiming (fan-out) convolutions, unit BatchNorm: the initialisation of a backbone trained from scratch."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def freeze_bn(self) -> None:
        """Freeze every BatchNorm (SEAM: eval mode, weight/bias without grad)."""
        self.frozen_bn = True
        for m in self.modules():
            if isinstance(m, _BN_TYPES):
                for p in m.parameters():
                    p.requires_grad_(False)
                m.eval()

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        if self.frozen_bn:
            for m in self.modules():
                if isinstance(m, _BN_TYPES):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


def build_backbone(model_cfg, load_weights: bool = True) -> Backbone:
    """The backbone named by ``model_cfg.backbone`` (resnet38 | resnet50 | efficientnet_lite0 | tiny).

    When ``load_weights`` and ``model_cfg.pretrained`` is set, the converted state_dict there (local path,
    s3:// URI or ``package:NAME``) is loaded strictly into the backbone (:func:`wsss.models.weights.load_pretrained`).
    efficientnet_lite0 freezes its BatchNorm when ``model_cfg.pretrained`` is set (also with ``load_weights=False``,
    when a checkpoint of such a model is restored), and trains it from scratch otherwise.
    """
    name = model_cfg.backbone
    if name == "resnet38":
        from wsss.models.backbones.resnet38 import ResNet38

        net: Backbone = ResNet38(output_stride=model_cfg.output_stride)
    elif name == "resnet50":
        from wsss.models.backbones.resnet50 import ResNet50

        net = ResNet50(output_stride=model_cfg.output_stride)
    elif name == "efficientnet_lite0":
        from wsss.models.backbones.efficientnet_lite import EfficientNetLite0

        net = EfficientNetLite0(output_stride=model_cfg.output_stride,
                                frozen_bn=bool(getattr(model_cfg, "pretrained", None)))
    elif name == "tiny":
        from wsss.models.backbones.tiny import TinyNet

        net = TinyNet(width=model_cfg.width, output_stride=model_cfg.output_stride)
    else:
        raise ValueError(f"config key 'model.backbone': unknown backbone {name!r} (want resnet38, resnet50, "
                         "efficientnet_lite0 or tiny)")
    if load_weights and getattr(model_cfg, "pretrained", None):
        from wsss.models.weights import load_pretrained

        load_pretrained(net, model_cfg.pretrained)
    return net


__all__ = ["Backbone", "build_backbone"]
