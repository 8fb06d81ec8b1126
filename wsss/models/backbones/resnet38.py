"""Wide ResNet-38 ("model A1" of Wu, Shen & van den Hengel, *Wider or Deeper*, 2019) as used by PSA, SEAM and DAEN.

Architecture (REFERENCE.md Sec. 1 "SEAM"): pre-activation residual units, output stride 8.

==========  =======================================  ==========  =========  ==========
stage       units                                    channels    stride     dilation
==========  =======================================  ==========  =========  ==========
conv1a      3x3 conv                                 3 -> 64     1          1
b2          3 wide units (3x3, 3x3)                  128         2          1
b3          3 wide units                             256         4          1
b4          6 wide units                             512         8          1
b5          3 wide units (mid 512)                   1024        8          2 (first conv of b5: 1)
b6          1 bottleneck unit (1x1, 3x3, 1x1), drop 0.3   2048   8          4
b7          1 bottleneck unit, dropout 0.5           4096        8          4
bn7         BatchNorm (then ReLU/CSM outside)        4096
==========  =======================================  ==========  =========  ==========

Features (SEAM): ``f4`` = ``conv4`` = relu(bn(input of b5)) (512 ch), ``f5`` = ``conv5`` = relu(bn(input of b6))
(1024 ch), ``f6_pre`` = ``bn7(b7 output)`` *before* the final ReLU (4096 ch; DAEN puts its CSM there).

Parameter names follow the converted MXNet "ilsvrc-cls_rna-a1_cls1000" weights that PSA/SEAM load, so such a
converted state_dict loads strictly (its ``linear1000`` classifier is not part of it):

* ``conv1a.weight``
* wide unit ``bX[_i]``: ``bn_branch2a`` (BN of the unit input), ``conv_branch2a`` (3x3), ``bn_branch2b1``,
  ``conv_branch2b1`` (3x3), and ``conv_branch1`` (1x1 projection, only where the shape changes)
* bottleneck unit ``b6``/``b7``: ``bn_branch2a``, ``conv_branch2a`` (1x1, out/4), ``bn_branch2b1``,
  ``conv_branch2b1`` (3x3, out/2), ``bn_branch2b2``, ``conv_branch2b2`` (1x1, out), ``conv_branch1``
* ``bn7.{weight,bias,running_mean,running_var}``

All convolutions are bias-free.  As in SEAM all BatchNorm layers are frozen (eval mode, no grad) and conv1a,
b2, b2_1 and b2_2 are frozen too (SEAM trains from converted ImageNet weights and keeps the first stage fixed).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsss.models.backbones import Backbone


class WideUnit(nn.Module):
    """Pre-activation residual unit with two 3x3 convolutions (ResNet-38 stages b2..b5)."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, stride: int = 1, first_dilation: int | None = None,
                 dilation: int = 1):
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        self.same_shape = c_in == c_out and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(c_in)
        self.conv_branch2a = nn.Conv2d(c_in, c_mid, 3, stride, padding=first_dilation, dilation=first_dilation,
                                       bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(c_mid)
        self.conv_branch2b1 = nn.Conv2d(c_mid, c_out, 3, 1, padding=dilation, dilation=dilation, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor, return_preact: bool = False):
        pre = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(pre)
        y = self.conv_branch2a(pre)
        y = F.relu(self.bn_branch2b1(y))
        y = self.conv_branch2b1(y)
        out = shortcut + y
        return (out, pre) if return_preact else out


class BottleneckUnit(nn.Module):
    """Pre-activation bottleneck unit 1x1 (out/4) -> 3x3 (out/2) -> 1x1 (out) with Dropout2d (b6, b7)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, dilation: int = 1, dropout: float = 0.0):
        super().__init__()
        self.same_shape = c_in == c_out and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(c_in)
        self.conv_branch2a = nn.Conv2d(c_in, c_out // 4, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(c_out // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(c_out // 4, c_out // 2, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(c_out // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(c_out // 2, c_out, 1, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor, return_preact: bool = False):
        pre = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(pre)
        y = self.conv_branch2a(pre)
        y = self.dropout_2b1(F.relu(self.bn_branch2b1(y)))
        y = self.conv_branch2b1(y)
        y = self.dropout_2b2(F.relu(self.bn_branch2b2(y)))
        y = self.conv_branch2b2(y)
        out = shortcut + y
        return (out, pre) if return_preact else out


class ResNet38(Backbone):
    """Wide ResNet-38, output stride 8; forward(x) -> (conv4 512ch, conv5 1024ch, bn7 output 4096ch)."""

    out_channels = (512, 1024, 4096)
    frozen_bn = True
    # conv1a and stage b2 stay fixed (SEAM's ``not_training`` list)
    frozen_modules = ("conv1a", "b2", "b2_1", "b2_2")

    def __init__(self, output_stride: int = 8):
        super().__init__()
        if output_stride != 8:
            raise ValueError(f"config key 'model.output_stride': resnet38 supports only 8, got {output_stride}")
        self.output_stride = 8
        self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.b2 = WideUnit(64, 128, 128, stride=2)
        self.b2_1 = WideUnit(128, 128, 128)
        self.b2_2 = WideUnit(128, 128, 128)
        self.b3 = WideUnit(128, 256, 256, stride=2)
        self.b3_1 = WideUnit(256, 256, 256)
        self.b3_2 = WideUnit(256, 256, 256)
        self.b4 = WideUnit(256, 512, 512, stride=2)
        self.b4_1 = WideUnit(512, 512, 512)
        self.b4_2 = WideUnit(512, 512, 512)
        self.b4_3 = WideUnit(512, 512, 512)
        self.b4_4 = WideUnit(512, 512, 512)
        self.b4_5 = WideUnit(512, 512, 512)
        # b5..b7 keep stride 8 and dilate instead (SEAM: dilations 2 / 4 / 4)
        self.b5 = WideUnit(512, 512, 1024, first_dilation=1, dilation=2)
        self.b5_1 = WideUnit(1024, 512, 1024, dilation=2)
        self.b5_2 = WideUnit(1024, 512, 1024, dilation=2)
        self.b6 = BottleneckUnit(1024, 2048, dilation=4, dropout=0.3)
        self.b7 = BottleneckUnit(2048, 4096, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(4096)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.freeze_bn()
        for name in self.frozen_modules:
            for p in getattr(self, name).parameters():
                p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.conv1a(x)
        for name in ("b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2", "b4", "b4_1", "b4_2", "b4_3", "b4_4", "b4_5"):
            x = getattr(self, name)(x)
        x, f4 = self.b5(x, return_preact=True)
        x = self.b5_1(x)
        x = self.b5_2(x)
        x, f5 = self.b6(x, return_preact=True)
        x = self.b7(x)
        f6_pre = self.bn7(x)
        return f4, f5, f6_pre
