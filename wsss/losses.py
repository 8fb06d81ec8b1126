"""Losses of the SEAM family (DAEN Sec. 3.5; SEAM; SSENet).

L = w_cla * L_cla + w_eq * L_eq + w_ce * L_ce with
  L_cla = mean over both branches of the multi-label soft-margin loss on the pooled foreground scores,
  L_eq  = |A(c^0) - c^1|_1   (equivariant regularisation, foreground channels, label-masked, max-normed CAMs),
  L_ce  = |A(c0) - c^1|_1 + |A(c^0) - c1|_1  (equivariant cross regularisation between PCM outputs c and the
          other branch's CAM c^, arg-max one-hot of the detached CAM as SEAM's code; averaged over the hardest
          ``topk`` fraction of elements per sample, SEAM: 20 %).
The background channel is handled as SEAM does: CAMs are multiplied by the label vector with background forced to 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label soft-margin loss over the K foreground classes (paper's l_cla)."""
    return F.multilabel_soft_margin_loss(logits.float(), labels.float())


def max_norm(cam: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """ReLU, then per-sample per-channel min-max normalisation to [0, 1] (SEAM's max_norm)."""
    cam = F.relu(cam.float())
    b, c = cam.shape[:2]
    flat = cam.reshape(b, c, -1)
    mx = flat.max(dim=-1)[0].reshape(b, c, 1, 1)
    mn = flat.min(dim=-1)[0].reshape(b, c, 1, 1)
    return F.relu(cam - mn - eps) / (mx - mn + eps)


def label_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B,K) foreground labels -> (B,K+1,1,1) with background forced to 1."""
    ones = torch.ones(labels.shape[0], 1, device=labels.device, dtype=torch.float32)
    return torch.cat([ones, labels.float()], dim=1)[:, :, None, None]


def max_onehot(cam: torch.Tensor) -> torch.Tensor:
    """Keep, at each pixel, only the arg-max channel's value (SEAM's max_onehot)."""
    mx = cam.max(dim=1, keepdim=True)[0]
    return torch.where(cam >= mx, cam, torch.zeros_like(cam))


def topk_mean(err: torch.Tensor, frac: float) -> torch.Tensor:
    """Mean of the largest ``frac`` of the elements of each sample (online hard example mining)."""
    b = err.shape[0]
    flat = err.reshape(b, -1)
    k = max(1, int(round(flat.shape[1] * frac)))
    return flat.topk(k, dim=1)[0].mean()


def equivariant_loss(cam_a: torch.Tensor, cam_b: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """|A(c^0) - c^1| over foreground channels (channel 0 = background is excluded, as SEAM)."""
    d = cam_a[:, 1:] - cam_b[:, 1:]
    return d.pow(2).mean() if kind == "mse" else d.abs().mean()


def cross_equivariant_loss(cam1, rv1, cam2, rv2, topk: float) -> torch.Tensor:
    """SEAM's ECR: PCM output of each branch supervised by the other branch's (detached) CAM."""
    e1 = topk_mean((max_onehot(cam2.detach()) - rv1).abs(), topk)
    e2 = topk_mean((max_onehot(cam1.detach()) - rv2).abs(), topk)
    return e1 + e2
