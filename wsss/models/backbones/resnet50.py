"""ResNet-50 backbone (torchvision architecture, never downloads weights).

Output stride 8 (``replace_stride_with_dilation=[False, True, True]``) or 16 (``[False, False, True]``).
Features: ``f4`` = layer2 (512 ch, stride 8), ``f5`` = layer3 (1024 ch, stride 8 or 16), ``f6_pre`` = layer4's
output *before* its last ReLU, i.e. the sum ``bn3(conv3(.)) + shortcut`` of the last bottleneck (2048 ch,
stride = output_stride); the attention module applies the ReLU/CSM on top (DAEN Sec. 3.2).

Parameter names are torchvision's (``conv1``, ``bn1``, ``layer1`` .. ``layer4``), so a torchvision ImageNet
state_dict saved with ``torch.save(model.state_dict(), path)`` loads strictly; its ``fc.*`` keys are dropped
(``pretrained_ignore``).  BatchNorm is frozen (eval, no grad) as in SEAM/IRN.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from wsss.models.backbones import Backbone


class ResNet50(Backbone):
    out_channels = (512, 1024, 2048)
    frozen_bn = True
    pretrained_ignore = ("fc.",)

    def __init__(self, output_stride: int = 8):
        super().__init__()
        if output_stride == 8:
            dil = [False, True, True]
        elif output_stride == 16:
            dil = [False, False, True]
        else:
            raise ValueError(f"config key 'model.output_stride': resnet50 supports 8 or 16, got {output_stride}")
        self.output_stride = output_stride
        tv = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=dil)
        self.conv1, self.bn1, self.relu, self.maxpool = tv.conv1, tv.bn1, tv.relu, tv.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = tv.layer1, tv.layer2, tv.layer3, tv.layer4
        self.freeze_bn()

    @staticmethod
    def _bottleneck_preact(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A torchvision Bottleneck's output without its final ReLU."""
        out = block.relu(block.bn1(block.conv1(x)))
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
        identity = x if block.downsample is None else block.downsample(x)
        return out + identity

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        f4 = self.layer2(x)
        f5 = self.layer3(f4)
        x = f5
        for block in list(self.layer4)[:-1]:
            x = block(x)
        f6_pre = self._bottleneck_preact(self.layer4[-1], x)
        return f4, f5, f6_pre
