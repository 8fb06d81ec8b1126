"""SEAM's pixel correlation module (PCM; SEAM Sec. 3.3, DAEN Sec. 3.4, REFERENCE.md Sec. 1).

``cam_rv[:, :, j] = sum_i cam'[:, :, i] * aff[i, j]`` with ``aff = relu(f^T f)`` of per-pixel L2-normalised
features, each column divided by its sum (+1e-5) - a weighted average of the prepared CAM over similar pixels.
No temperature, no softmax (as SEAM's code).

The CAM fed in is prepared without gradient (:func:`prepare_cam`): ReLU, per-channel max-norm (+1e-5),
background = 1 - max over the foreground channels, and every foreground channel zeroed except at pixels where it
is the arg-max.  Features: concat(image resized to the CAM size (3 ch, bilinear, align_corners=True as SEAM),
relu(1x1 conv f4 -> 64), relu(1x1 conv f5 -> 128)) -> 1x1 conv 195 -> 192; backbone features are detached, so
the PCM trains only its own projections.  Names map to SEAM's checkpoint keys: ``proj4`` = ``f8_3``,
``proj5`` = ``f8_4``, ``proj`` = ``f9``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5


@torch.no_grad()
def prepare_cam(cam: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) raw CAM (channel 0 = background) -> the CAM PCM propagates (no grad, float32)."""
    cam = F.relu(cam.detach().float())
    b, c = cam.shape[:2]
    peak = cam.reshape(b, c, -1).amax(dim=-1).reshape(b, c, 1, 1) + EPS
    cam = F.relu(cam - EPS) / peak
    fg = cam[:, 1:]
    if fg.shape[1] == 0:
        cam[:, 0] = 1.0
        return cam
    fg_max = fg.amax(dim=1, keepdim=True)
    cam[:, :1] = 1.0 - fg_max
    cam[:, 1:] = torch.where(fg < fg_max, torch.zeros_like(fg), fg)
    return cam


def normalize_affinity(aff: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """(B, N, N) non-negative affinity -> each column ``aff[:, :, j]`` divided by its sum (+eps), so sums to ~1."""
    return aff / (aff.sum(dim=1, keepdim=True) + eps)


class PCM(nn.Module):
    def __init__(self, c4: int, c5: int, dim4: int = 64, dim5: int = 128, dim: int = 192):
        super().__init__()
        self.proj4 = nn.Conv2d(c4, dim4, 1, bias=False)
        self.proj5 = nn.Conv2d(c5, dim5, 1, bias=False)
        self.proj = nn.Conv2d(3 + dim4 + dim5, dim, 1, bias=False)
        # SEAM's initialisation: kaiming for f8_3 / f8_4, xavier (gain 4) for f9
        nn.init.kaiming_normal_(self.proj4.weight)
        nn.init.kaiming_normal_(self.proj5.weight)
        nn.init.xavier_uniform_(self.proj.weight, gain=4)

    def features(self, image: torch.Tensor, f4: torch.Tensor, f5: torch.Tensor,
                 size: tuple[int, int]) -> torch.Tensor:
        """(B, dim, h, w) per-pixel L2-normalised features at ``size``."""
        def fit(t: torch.Tensor) -> torch.Tensor:  # bilinear, align_corners=True as SEAM's image resize
            return t if tuple(t.shape[-2:]) == tuple(size) else F.interpolate(
                t, size=size, mode="bilinear", align_corners=True)

        img = fit(image.float())
        a = F.relu(self.proj4(fit(f4.detach().float())))
        b = F.relu(self.proj5(fit(f5.detach().float())))
        f = self.proj(torch.cat([img, a, b], dim=1))
        return f / (f.norm(dim=1, keepdim=True) + EPS)

    def affinity(self, image: torch.Tensor, f4: torch.Tensor, f5: torch.Tensor,
                 size: tuple[int, int]) -> torch.Tensor:
        """(B, hw, hw) column-normalised affinity ``relu(f^T f)``."""
        f = self.features(image, f4, f5, size).flatten(2)          # (B, dim, N)
        aff = F.relu(torch.bmm(f.transpose(1, 2), f))              # (B, N, N)
        return normalize_affinity(aff)

    def forward(self, cam: torch.Tensor, image: torch.Tensor, f4: torch.Tensor, f5: torch.Tensor) -> torch.Tensor:
        b, c, h, w = cam.shape
        # float32 throughout, also under autocast (the column sums run over h*w terms)
        with torch.autocast(device_type=cam.device.type, enabled=False):
            cam_p = prepare_cam(cam).reshape(b, c, h * w)
            aff = self.affinity(image, f4, f5, (h, w))
            return torch.bmm(cam_p, aff).reshape(b, c, h, w)


__all__ = ["PCM", "prepare_cam", "normalize_affinity"]
