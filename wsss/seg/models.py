"""The segmentation model family (pure PyTorch; ImageNet weights from a path, s3:// or a package, never a hub).

Every model is a :class:`SegNet`: ``backbone`` + ``classifier`` (the new layers: x ``new_lr_mult`` in SGD, biases
x 2 * ``new_lr_mult`` without decay, :func:`wsss.models.param_groups.sgd_param_groups`), ``forward(x)`` -> logits
(B, C, H, W) at the input size (bilinear), ``logits_at_stride(x)`` -> (B, C, H/os, W/os).

- ``deeplabv3``: torchvision's ``deeplabv3_resnet50/101`` architecture (dilated ResNet, ASPP with image pooling;
  built with ``weights=None, weights_backbone=None``). OS 8 is torchvision's builder; OS 16 dilates layer4 only and
  uses rates 6/12/18 (DeepLab-v3 Sec. 3.3). The state_dict keys are torchvision's (``backbone.layer4...``,
  ``classifier.0.convs...``), so a torchvision DeepLab-v3 state_dict (without ``aux_classifier``) loads as is.
- ``deeplabv2``: DeepLab-v2's ASPP-L (four 3x3 convs straight to the classes at rates 6/12/18/24, outputs summed;
  weights N(0, 0.01), biases 0, as deeplab-pytorch) on a dilated torchvision ResNet-50/101 (OS 8 or 16).
- ``deeplabv1``: DeepLab-LargeFOV (3x3 rate 12 -> ReLU -> dropout -> 1x1 -> ReLU -> dropout -> classifier) on a
  wsss backbone's last features (SEAM's recommendation: ResNet-38, OS 8).
- ``light``: a small ASPP (1x1 + dilated 3x3 branches + image pooling, BN, ReLU, 1x1 projection) on any wsss
  backbone (``wsss.models.backbones.build_backbone``: tiny, efficientnet_lite0, ...): the CPU demo's network.

Frozen BatchNorm (``model.freeze_bn``, deeplab-pytorch with an ImageNet backbone): every BatchNorm of the backbone
stays in eval mode under ``.train()`` and its affine parameters get no gradient; the head's BatchNorm trains.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsss.models.param_groups import sgd_param_groups

__all__ = ["SegNet", "build_seg_model", "seg_loss", "ASPPv2", "LightASPP", "LargeFOV", "IGNORE"]

IGNORE = 255
_BN = nn.modules.batchnorm._BatchNorm


def seg_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Pixel cross-entropy averaged over the pixels whose label is not ``ignore_index``. ``logits`` (B, C, h, w)
    are upsampled (bilinear) to the label size when they differ. A batch without any valid pixel gives 0 (with a
    gradient of 0) instead of torch's NaN."""
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    target = target.long()
    valid = target != ignore_index
    n = valid.sum()
    loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    return loss / n.clamp(min=1).to(loss.dtype)


class SegNet(nn.Module):
    """Common behaviour: frozen backbone BN, SGD groups, upsampled forward."""

    new_modules: tuple[str, ...] = ("classifier",)
    output_stride: int = 8

    def __init__(self, num_classes: int):
        super().__init__()
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")
        self.num_classes = int(num_classes)
        self.bn_frozen = False

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - per model
        raise NotImplementedError

    def logits_at_stride(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.logits_at_stride(x)
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def set_bn_frozen(self, frozen: bool) -> None:
        """Freeze (eval, no grad) or unfreeze every BatchNorm of the backbone."""
        self.bn_frozen = bool(frozen)
        bb = self.backbone
        if hasattr(bb, "frozen_bn"):
            bb.frozen_bn = bool(frozen)  # a wsss Backbone keeps its BN in eval mode under .train() itself
        for m in bb.modules():
            if isinstance(m, _BN):
                for p in m.parameters():
                    p.requires_grad_(not frozen)
                m.train(self.training and not frozen)

    def train(self, mode: bool = True) -> "SegNet":
        super().train(mode)
        if self.bn_frozen:
            for m in self.backbone.modules():
                if isinstance(m, _BN):
                    m.eval()
        return self

    def param_groups(self, optim_cfg) -> list[dict]:
        """deeplab-pytorch's groups: backbone weights x1 (decay), head weights x new_lr_mult (decay), head biases
        x 2 * new_lr_mult (no decay); backbone biases (none in a ResNet) x2 without decay."""
        return sgd_param_groups(self, self.new_modules, float(optim_cfg.lr), float(optim_cfg.weight_decay),
                                float(optim_cfg.new_lr_mult))


# ---- heads ------------------------------------------------------------------------------------------------

class ASPPv2(nn.Module):
    """DeepLab-v2 ASPP: parallel 3x3 convs (in -> classes) at the given rates, outputs summed."""

    def __init__(self, c_in: int, num_classes: int, rates=(6, 12, 18, 24)):
        super().__init__()
        self.rates = tuple(int(r) for r in rates)
        self.convs = nn.ModuleList(nn.Conv2d(c_in, num_classes, 3, padding=r, dilation=r, bias=True)
                                   for r in self.rates)
        for c in self.convs:
            nn.init.normal_(c.weight, 0.0, 0.01)
            nn.init.zeros_(c.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(c(x) for c in self.convs)


class LargeFOV(nn.Module):
    """DeepLab-v1 LargeFOV head: fc6 3x3 at rate r -> ReLU -> dropout -> fc7 1x1 -> ReLU -> dropout -> fc8."""

    def __init__(self, c_in: int, num_classes: int, rate: int = 12, channels: int = 1024, dropout: float = 0.5):
        super().__init__()
        self.fc6 = nn.Conv2d(c_in, channels, 3, padding=rate, dilation=rate)
        self.fc7 = nn.Conv2d(channels, channels, 1)
        self.fc8 = nn.Conv2d(channels, num_classes, 1)
        self.drop = nn.Dropout2d(dropout)
        for c in (self.fc6, self.fc7):
            nn.init.kaiming_normal_(c.weight, nonlinearity="relu")
            nn.init.zeros_(c.bias)
        nn.init.normal_(self.fc8.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc8.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(F.relu(self.fc6(x)))
        x = self.drop(F.relu(self.fc7(x)))
        return self.fc8(x)


class LightASPP(nn.Module):
    """A small ASPP for CPU models: 1x1 branch, one 3x3 branch per rate, image pooling (each conv + BN + ReLU,
    ``channels`` wide), concatenated, 1x1 projection + BN + ReLU, dropout 0.1, 1x1 classifier."""

    def __init__(self, c_in: int, num_classes: int, rates=(2, 4), channels: int = 64, dropout: float = 0.1):
        super().__init__()

        def cbr(k: int, d: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, channels, k, padding=d * (k // 2), dilation=d, bias=False),
                                 nn.BatchNorm2d(channels), nn.ReLU(inplace=True))

        self.branches = nn.ModuleList([cbr(1)] + [cbr(3, int(r)) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c_in, channels, 1, bias=False),
                                  nn.ReLU(inplace=True))  # no BN on a 1x1 map (batch 1 at test)
        n = len(self.branches) + 1
        self.project = nn.Sequential(nn.Conv2d(n * channels, channels, 1, bias=False), nn.BatchNorm2d(channels),
                                     nn.ReLU(inplace=True), nn.Dropout2d(dropout))
        self.out = nn.Conv2d(channels, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.out.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        feats = [b(x) for b in self.branches]
        feats.append(self.pool(x).expand(-1, -1, h, w))
        return self.out(self.project(torch.cat(feats, 1)))


# ---- models -----------------------------------------------------------------------------------------------

def _resnet_body(name: str, output_stride: int):
    """A torchvision ResNet (no weights) dilated to ``output_stride``, as torchvision's segmentation builders do,
    wrapped so that it returns layer4's output ({"out": ...})."""
    import torchvision
    from torchvision.models._utils import IntermediateLayerGetter

    dil = [False, True, True] if output_stride == 8 else [False, False, True]
    fn = getattr(torchvision.models, name)
    net = fn(weights=None, replace_stride_with_dilation=dil)
    return IntermediateLayerGetter(net, return_layers={"layer4": "out"})


class DeepLabV3(SegNet):
    """torchvision's DeepLab-v3 (backbone + DeepLabHead) without the auxiliary head."""

    def __init__(self, num_classes: int, backbone: str = "resnet101", output_stride: int = 8, rates=None):
        super().__init__(num_classes)
        from torchvision.models.segmentation.deeplabv3 import DeepLabHead

        self.output_stride = int(output_stride)
        if self.output_stride == 8 and rates is None:
            import torchvision.models.segmentation as tvseg

            tv = getattr(tvseg, f"deeplabv3_{backbone}")(weights=None, weights_backbone=None,
                                                        num_classes=self.num_classes, aux_loss=False)
            self.backbone, self.classifier = tv.backbone, tv.classifier
        else:
            rates = rates or ([12, 24, 36] if self.output_stride == 8 else [6, 12, 18])
            self.backbone = _resnet_body(backbone, self.output_stride)
            self.classifier = DeepLabHead(2048, self.num_classes, atrous_rates=tuple(rates))

    def features(self, x):
        return self.backbone(x)["out"]


class DeepLabV2(SegNet):
    def __init__(self, num_classes: int, backbone: str = "resnet101", output_stride: int = 8,
                 rates=(6, 12, 18, 24)):
        super().__init__(num_classes)
        self.output_stride = int(output_stride)
        self.backbone = _resnet_body(backbone, self.output_stride)
        self.classifier = ASPPv2(2048, self.num_classes, rates)

    def features(self, x):
        return self.backbone(x)["out"]


class _WsssBackboneNet(SegNet):
    """A wsss Backbone's last features (``f6_pre``, then ReLU as the CAM nets do) under a head."""

    def __init__(self, num_classes: int, model_cfg, head_fn, load_weights: bool = True):
        super().__init__(num_classes)
        from wsss.models.backbones import build_backbone

        self.backbone = build_backbone(model_cfg, load_weights=False)
        self.output_stride = int(getattr(self.backbone, "output_stride", model_cfg.output_stride))
        self.classifier = head_fn(self.backbone.out_channels[2])

    def features(self, x):
        return F.relu(self.backbone(x)[2])


def build_seg_model(cfg, num_classes: int, load_weights: bool = True) -> SegNet:
    """The network of ``cfg.model`` (a :class:`wsss.seg.config.SegConfig`) for ``num_classes`` classes incl.
    background. With ``load_weights`` and ``model.pretrained`` set, the backbone's ImageNet weights are loaded
    (a path, s3:// or ``package:NAME``, through :func:`wsss.models.weights.load_pretrained`; torchvision's ``fc.``
    keys are dropped). BatchNorm of the backbone is frozen when ``model.freeze_bn``."""
    m = cfg.model
    rates = cfg.aspp_rates()
    if m.arch == "deeplabv3":
        net: SegNet = DeepLabV3(num_classes, m.backbone, m.output_stride,
                                rates=None if m.aspp_rates is None else rates)
    elif m.arch == "deeplabv2":
        net = DeepLabV2(num_classes, m.backbone, m.output_stride, rates)
    elif m.arch == "deeplabv1":
        net = _WsssBackboneNet(num_classes, m, lambda c: LargeFOV(c, num_classes, rates[0], 1024, m.dropout))
    elif m.arch == "light":
        net = _WsssBackboneNet(num_classes, m, lambda c: LightASPP(c, num_classes, rates, m.head_channels))
    else:
        raise ValueError(f"config key 'model.arch': unknown {m.arch!r}")
    if load_weights and m.pretrained:
        from wsss.models.weights import load_pretrained

        bb = net.backbone
        ignore = tuple(getattr(bb, "pretrained_ignore", ())) or ("fc.",)
        load_pretrained(bb, m.pretrained, ignore=ignore)
    net.set_bn_frozen(bool(m.freeze_bn))
    return net
