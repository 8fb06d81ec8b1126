"""DAEN's channel-spatial attention module (CSM, DAEN Sec. 3.2) and its single-branch ablations.

* Channel attention (DAEN Sec. 3.2.1, CBAM): ``Ca(f) = sigmoid(MLP(AvgPool(f)) + MLP(MaxPool(f)))`` with a shared
  two-layer MLP ``c -> max(c // r, 1) -> c`` (ReLU between; reduction r = 16 -> 256 hidden for 4096 channels).
* Spatial attention (DAEN Sec. 3.2.2, CBAM): ``Sa(f) = sigmoid(conv_kxk([mean_c(f); max_c(f)]))`` with k = 7.
  NOTE: the paper's formula writes ``C7x7(Avg(f) + Max(f))``; CBAM and the DAEN code *concatenate* the two
  channel-pooled maps into a 2-channel input, which is what we do.
* ``CSM(f) = ReLU((Ca(f) * f) * Sa(Ca(f) * f))`` - applied to the backbone's last features after bn7, in place of
  SEAM's final ReLU.

``build_attention(name, c, r, k)``: "none" -> ReLU only (SEAM), "channel" -> ReLU(Ca(f) * f) (DAEN's "CM"),
"spatial" -> ReLU(Sa(f) * f) (DAEN's "SM"), "csm" -> the full CSM (DAEN).
All layers are new (not in ImageNet weights) and bias-free.
"""
from __future__ import annotations

import torch
from torch import nn


class ChannelAttention(nn.Module):
    """Per-channel weights in (0, 1), shape (B, C, 1, 1)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // max(int(reduction), 1), 1)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)  # shared MLP as 1x1 convs
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)
        nn.init.kaiming_normal_(self.fc1.weight, nonlinearity="relu")
        nn.init.xavier_uniform_(self.fc2.weight)

    def mlp(self, v: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(v)))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        avg = f.mean(dim=(2, 3), keepdim=True)
        mx = f.amax(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.mlp(avg) + self.mlp(mx))


class SpatialAttention(nn.Module):
    """Per-pixel weights in (0, 1), shape (B, 1, H, W)."""

    def __init__(self, kernel: int = 7):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"config key 'model.kernel': spatial attention kernel must be odd, got {kernel}")
        # input channels: [mean over channels, max over channels] (CBAM concatenation, see module docstring)
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=False)
        nn.init.xavier_uniform_(self.conv.weight)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([f.mean(dim=1, keepdim=True), f.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class ChannelGate(nn.Module):
    """ReLU(Ca(f) * f) - DAEN's "CM" ablation."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.channel(f) * f)


class SpatialGate(nn.Module):
    """ReLU(Sa(f) * f) - DAEN's "SM" ablation."""

    def __init__(self, kernel: int = 7):
        super().__init__()
        self.spatial = SpatialAttention(kernel)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.spatial(f) * f)


class CSM(nn.Module):
    """CSM(f) = ReLU((Ca(f) * f) * Sa(Ca(f) * f))  (DAEN Sec. 3.2, Eq. 1)."""

    def __init__(self, channels: int, reduction: int = 16, kernel: int = 7):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        g = self.channel(f) * f
        return torch.relu(g * self.spatial(g))


def build_attention(name: str, channels: int, reduction: int = 16, kernel: int = 7) -> nn.Module:
    """The activation put after the backbone's last BatchNorm: none | channel | spatial | csm."""
    if name == "none":
        return nn.ReLU()
    if name == "channel":
        return ChannelGate(channels, reduction)
    if name == "spatial":
        return SpatialGate(kernel)
    if name == "csm":
        return CSM(channels, reduction, kernel)
    raise ValueError(f"config key 'model.attention': unknown attention {name!r} (want none, channel, spatial or csm)")


__all__ = ["ChannelAttention", "SpatialAttention", "ChannelGate", "SpatialGate", "CSM", "build_attention"]
