"""AffinityNet (Ahn & Kwak, CVPR 2018): pixel affinities on the stride-8 grid, trained from CAM-derived labels.

SEAM and DAEN refine their CAMs with it (DAEN Sec. 4.2, Table 3).  Architecture as in AffinityNet on ResNet-38:
1x1 projections (no bias) of conv4 / conv5 / conv6 to 64 / 128 / 256 channels, ELU, concatenated, 1x1 to 448
channels, ELU.  conv6 here is relu(f6_pre) (the backbone's deepest features after their ReLU).  The affinity of
feature-grid pixels i and j is a_ij = exp(-mean_c |f_i - f_j|), predicted for every pixel and each *half* offset
within ``radius`` (default 5; :func:`wsss.refine.random_walk.neighbor_offsets`), so a_ij = a_ji is stored once.

Loss (AffinityNet): L = L_bg+/4 + L_fg+/4 + L_neg/2 with L_+ = mean(-log a) over positive pairs and
L_neg = mean(-log(1 - a)) over negative pairs, each averaged over its own pairs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsss.models.backbones import build_backbone
from wsss.models.param_groups import sgd_param_groups
from wsss.refine.affinity_labels import grid_labels, pair_sets
from wsss.refine.random_walk import neighbor_offsets, radius_for_num_offsets, valid_pair_mask

# AffinityNet: projections of conv4 / conv5 / conv6 to 64 / 128 / 256 channels, then 448.
PROJ_CHANNELS = (64, 128, 256)
EMBED_CHANNELS = 448
NEW_MODULES = ("proj4", "proj5", "proj6", "embed")
EPS = 1e-5  # AffinityNet's log guard


class AffinityNet(nn.Module):
    """Backbone + affinity embedding.  ``forward(x, radius)`` -> dict(aff=(B,P,h,w), valid=(P,h,w) bool, feat)."""

    def __init__(self, model_cfg, load_weights: bool = True, radius: int = 5):
        super().__init__()
        self.backbone = build_backbone(model_cfg, load_weights=load_weights)
        self.pretrained_loaded = bool(load_weights and getattr(model_cfg, "pretrained", None))
        self.radius = int(radius)
        c4, c5, c6 = self.backbone.out_channels
        p4, p5, p6 = PROJ_CHANNELS
        self.proj4 = nn.Conv2d(c4, p4, 1, bias=False)
        self.proj5 = nn.Conv2d(c5, p5, 1, bias=False)
        self.proj6 = nn.Conv2d(c6, p6, 1, bias=False)
        self.embed = nn.Conv2d(p4 + p5 + p6, EMBED_CHANNELS, 1, bias=False)
        for m in (self.proj4, self.proj5, self.proj6):
            nn.init.kaiming_normal_(m.weight)
        # AffinityNet initialises the last layer with a large gain (xavier, gain 4) so that early affinities
        # are not all ~1.
        nn.init.xavier_uniform_(self.embed.weight, gain=4)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised image -> (B, 448, h, w) embedding on f4's (stride-8) grid."""
        f4, f5, f6_pre = self.backbone(x)
        size = f4.shape[-2:]
        g4 = F.elu(self.proj4(f4))
        g5 = F.elu(self.proj5(f5))
        g6 = F.elu(self.proj6(F.relu(f6_pre)))
        if g5.shape[-2:] != size:
            g5 = F.interpolate(g5, size=size, mode="bilinear", align_corners=False)
        if g6.shape[-2:] != size:
            g6 = F.interpolate(g6, size=size, mode="bilinear", align_corners=False)
        return F.elu(self.embed(torch.cat([g4, g5, g6], 1)))

    def forward(self, x: torch.Tensor, radius: int | None = None) -> dict:
        feat = self.features(x)
        r = self.radius if radius is None else int(radius)
        return {"aff": pair_affinities(feat, r), "valid": valid_pair_mask(*feat.shape[-2:], r, feat.device),
                "feat": feat}

    def param_groups(self, lr: float, weight_decay: float, new_lr_mult: float = 10.0) -> list[dict]:
        """SGD groups (AffinityNet/SEAM): backbone weights x1, backbone biases x2 (no decay), new layers x10.

        Only trainable parameters; empty groups are left out.  Each group: params, name, lr_mult, lr,
        weight_decay (the lr schedule multiplies ``lr_mult``).
        """
        return sgd_param_groups(self, NEW_MODULES, lr, weight_decay, new_lr_mult)


def pair_affinities(feat: torch.Tensor, radius: int = 5) -> torch.Tensor:
    """a_ij = exp(-mean_c |f_i - f_j|) for every grid pixel i and its half-offset partners j.

    feat: (B, D, h, w) -> (B, P, h, w) float32; pairs whose partner lies outside the grid hold 0 (use
    :func:`wsss.refine.random_walk.valid_pair_mask`).  Computed in float32 also under autocast.
    """
    feat = feat.float()
    B, D, h, w = feat.shape
    offs = neighbor_offsets(radius)
    r1 = radius - 1
    pad = F.pad(feat, (r1, r1, 0, r1))
    out = []
    for dy, dx in offs:
        partner = pad[:, :, dy:dy + h, r1 + dx:r1 + dx + w]
        out.append(torch.exp(-(feat - partner).abs().mean(1)))
    aff = torch.stack(out, 1)
    return aff * valid_pair_mask(h, w, radius, feat.device).to(aff.dtype)


def affinity_loss(aff: torch.Tensor, labels: torch.Tensor, radius: int | None = None) -> tuple[torch.Tensor, dict]:
    """Balanced affinity loss.  aff: (B, P, h, w) in [0, 1]; labels: (B, h, w) grid labels (0 bg, 255 ignore)
    or full-resolution labels (B, H, W), which are nearest-downsampled to the grid.

    Returns (loss, dict(bg=..., fg=..., neg=..., n_bg=..., n_fg=..., n_neg=...)).  An empty pair set contributes
    0 (its mean is taken over max(count, 1) pairs).
    """
    if aff.dim() == 3:
        aff = aff.unsqueeze(0)
    if labels.dim() == 2:
        labels = labels.unsqueeze(0)
    r = radius if radius is not None else radius_for_num_offsets(aff.shape[1])
    if tuple(labels.shape[-2:]) != tuple(aff.shape[-2:]):
        labels = grid_labels(labels, tuple(aff.shape[-2:]))
    bg_pos, fg_pos, neg = pair_sets(labels.to(aff.device), r)
    aff = aff.float()
    n_bg, n_fg, n_neg = bg_pos.sum(), fg_pos.sum(), neg.sum()
    l_pos = -torch.log(aff + EPS)
    l_neg = -torch.log(1.0 + EPS - aff)
    bg = (l_pos * bg_pos).sum() / n_bg.clamp_min(1)
    fg = (l_pos * fg_pos).sum() / n_fg.clamp_min(1)
    ng = (l_neg * neg).sum() / n_neg.clamp_min(1)
    loss = bg / 4 + fg / 4 + ng / 2
    return loss, {"bg": bg.detach(), "fg": fg.detach(), "neg": ng.detach(), "n_bg": n_bg, "n_fg": n_fg,
                  "n_neg": n_neg}


__all__ = ["AffinityNet", "pair_affinities", "affinity_loss", "PROJ_CHANNELS", "EMBED_CHANNELS"]
