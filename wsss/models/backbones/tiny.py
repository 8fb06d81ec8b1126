"""A small CNN that trains from scratch on the CPU in minutes (64-128 px images); for tests and demos.

Output stride 8 (or 16).  Base width ``w`` (``cfg.model.width``, default 32):

* stem: 3x3 s2 (w) -> 3x3 (w)                          stride 2
* down: 3x3 s2 (2w) -> 3x3 s2 (2w) -> 3x3 (2w) = f4    stride 8, 2w channels
* stage5: 3x3 (4w) -> 3x3 (4w) = f5
* stage6: 3x3 dilation 2 (8w) -> 3x3 dilation 2 (8w) + BN, no ReLU = f6_pre

Every conv is followed by BatchNorm (trained, not frozen) and ReLU (except the last).  The receptive field is
~131 px at stride 8: body pixels of the synthetic objects (diameter up to ~0.7 of a 64-128 px image) see the
class-telling marker, so class activation can spread over whole objects.  Dilations (stage5, stage6) are an
argument; measured on the synthetic set (96 px, plain CAM, width 16, 1500 steps, one seed, best-threshold
CAM mIoU on 40 val images): (2, 4) [RF ~227 px] 0.22, (1, 2) 0.27, (1, 1) [RF ~99 px] 0.30 - receptive fields far
larger than the image spread the CAM over the background.
With output_stride 16 the first stage5 conv has stride 2 and stage6 is not dilated.
"""
from __future__ import annotations

import torch
from torch import nn

from wsss.models.backbones import Backbone


def _cbr(c_in: int, c_out: int, stride: int = 1, dilation: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, stride, padding=dilation, dilation=dilation, bias=False),
                               nn.BatchNorm2d(c_out)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class TinyNet(Backbone):
    frozen_bn = False

    def __init__(self, width: int = 32, output_stride: int = 8, dilations: tuple[int, int] | None = None):
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"config key 'model.output_stride': tiny supports 8 or 16, got {output_stride}")
        if width < 1:
            raise ValueError(f"config key 'model.width': must be >= 1, got {width}")
        w = int(width)
        self.output_stride = output_stride
        self.out_channels = (2 * w, 4 * w, 8 * w)
        s5, d5, d6 = (1, 1, 2) if output_stride == 8 else (2, 1, 1)
        if dilations is not None:
            d5, d6 = dilations
        self.stem = nn.Sequential(_cbr(3, w, stride=2), _cbr(w, w))
        self.down = nn.Sequential(_cbr(w, 2 * w, stride=2), _cbr(2 * w, 2 * w, stride=2), _cbr(2 * w, 2 * w))
        self.stage5 = nn.Sequential(_cbr(2 * w, 4 * w, stride=s5, dilation=d5), _cbr(4 * w, 4 * w, dilation=d5))
        self.stage6 = nn.Sequential(_cbr(4 * w, 8 * w, dilation=d6), _cbr(8 * w, 8 * w, dilation=d6, relu=False))
        self.init_from_scratch()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f4 = self.down(self.stem(x))
        f5 = self.stage5(f4)
        f6_pre = self.stage6(f5)
        return f4, f5, f6_pre
