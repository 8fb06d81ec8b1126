"""Spatial transforms A for equivariant regularisation, each with its inverse.

SEAM (and DAEN, Sec. 3.3) feed branch 2 with A(image) and compare its CAM with A(CAM of branch 1).
- ``Rescale(s)``: bilinear down-scaling by s (SEAM/SSENet: s = 0.3), ``align_corners=True`` as the public code.
  Its inverse up-samples back; on functions that are linear in x and y (ramps) the round trip is exact, which the
  tests check; on arbitrary images it is the usual interpolation loss.
- ``Flip``: horizontal flip, its own exact inverse.
The SSENet variant (``method: sse``) draws one scale per step from ``cfg.method.sse_scales``.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F


class Transform:
    name = "identity"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Transform an image batch (B,C,H,W)."""
        raise NotImplementedError

    def apply_to(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Transform a map (e.g. a CAM) so that it matches a target spatial ``size`` exactly."""
        raise NotImplementedError

    def invert(self, y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Undo the transform, returning a map of spatial ``size``."""
        raise NotImplementedError


class Rescale(Transform):
    name = "rescale"

    def __init__(self, scale: float):
        if not 0 < scale:
            raise ValueError(f"rescale factor must be > 0, got {scale}")
        self.scale = float(scale)

    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """floor(size * scale), as ``F.interpolate(scale_factor=...)`` in SEAM's code (448 -> 134 at 0.3)."""
        return (max(1, math.floor(size[0] * self.scale)), max(1, math.floor(size[1] * self.scale)))

    def apply(self, x):
        return F.interpolate(x, size=self.out_size(x.shape[-2:]), mode="bilinear", align_corners=True)

    def apply_to(self, x, size):
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)

    def invert(self, y, size):
        return F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=True)

    def __repr__(self):
        return f"Rescale({self.scale})"


class Flip(Transform):
    name = "flip"

    def apply(self, x):
        return torch.flip(x, dims=(-1,))

    def apply_to(self, x, size):
        y = torch.flip(x, dims=(-1,))
        if tuple(y.shape[-2:]) != tuple(size):
            y = F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=True)
        return y

    def invert(self, y, size):
        x = torch.flip(y, dims=(-1,))
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
        return x

    def __repr__(self):
        return "Flip()"


def make_transform(method_cfg, rng: random.Random | None = None) -> Transform:
    """The transform for one training step: ``sse`` draws a scale; otherwise ``method.transform``."""
    rng = rng or random
    if method_cfg.name == "sse":
        return Rescale(rng.choice(list(method_cfg.sse_scales)))
    if method_cfg.transform == "flip":
        return Flip()
    return Rescale(method_cfg.scale)
