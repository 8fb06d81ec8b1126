"""Losses of the SEAM family (DAEN Sec. 3.5; SEAM; SSENet), as SEAM's public code computes them (train_SEAM.py).

L = w_cla * L_cla + w_rvmin * L_rvmin + w_eq * L_eq + w_ce * L_ce with
  L_cla   = mean over both branches of the multi-label soft-margin loss on the pooled foreground scores,
  L_rvmin = mean over both branches of SEAM's adaptive min-pooling loss on the label-masked foreground PCM output
            (:func:`adaptive_min_pooling_loss`; SEAM adds it to L_cla with weight 1),
  L_eq    = |A(c^0) - c^1|_1   (ER: foreground channels of the label-masked, max-normed CAMs),
  L_ce    = |onehot(c^1) - A(rv^0)|_1 + |onehot(A(c^0)) - rv^1|_1  (ECR: each branch's max-normed PCM output against
            the other branch's detached CAM whose background channel is 1 - max(foreground) and whose non-maximal
            foreground values are zeroed (:func:`ecr_target`); each term averaged over the hardest ``topk`` fraction
            of the C*h*w elements of each sample, SEAM: 20 %).
CAMs are multiplied by the label vector with background forced to 1 (:func:`label_mask`).
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
    """SEAM's max_onehot: channel 0 (background) kept as it is; each foreground channel keeps its value only where
    it is the arg-max among the *foreground* channels (ties all kept), else 0."""
    fg = cam[:, 1:]
    if fg.shape[1] == 0:
        return cam.clone()
    mx = fg.max(dim=1, keepdim=True)[0]
    return torch.cat([cam[:, :1], torch.where(fg >= mx, fg, torch.zeros_like(fg))], dim=1)


def with_background(cam: torch.Tensor) -> torch.Tensor:
    """A copy of ``cam`` whose channel 0 is 1 - max over the foreground channels (SEAM, before ECR)."""
    if cam.shape[1] < 2:
        return torch.ones_like(cam)
    return torch.cat([1.0 - cam[:, 1:].max(dim=1, keepdim=True)[0], cam[:, 1:]], dim=1)


def ecr_target(cam: torch.Tensor) -> torch.Tensor:
    """ECR's target from a max-normed, label-masked CAM: detached, background 1 - max(fg), non-maximal fg zeroed."""
    return max_onehot(with_background(cam.detach()))


def topk_mean(err: torch.Tensor, frac: float) -> torch.Tensor:
    """Mean of the largest ``frac`` of the elements of each sample (online hard example mining)."""
    b = err.shape[0]
    flat = err.reshape(b, -1)
    k = max(1, int(flat.shape[1] * frac))  # SEAM: int(21 * h * w * 0.2), all channels, per sample
    return flat.topk(k, dim=1)[0].mean()


def adaptive_min_pooling_loss(rv_fg: torch.Tensor, frac: float = 0.25) -> torch.Tensor:
    """SEAM's rvmin: (B, K, H, W) label-masked foreground PCM output -> max over channels, the lowest ``frac``
    (SEAM: h*w // 4) pixels of each sample, ReLU, mean. Pushes the least active pixels towards 0."""
    b = rv_fg.shape[0]
    if rv_fg.shape[1] == 0:
        return rv_fg.new_zeros(()).float()
    x = rv_fg.float().max(dim=1)[0].reshape(b, -1)
    k = max(1, int(x.shape[1] * frac))
    return F.relu(x.topk(k, dim=1, largest=False)[0]).sum() / (k * b)


def equivariant_loss(cam_a: torch.Tensor, cam_b: torch.Tensor, kind: str = "l1",
                     num_classes: int | None = None) -> torch.Tensor:
    """|A(c^0) - c^1| over foreground channels (channel 0 = background is excluded, as SEAM): the mean over the K
    foreground channels, or with ``num_classes`` N the sum over the K channels divided by N (N = 20: the per-class
    strength ER has on VOC; ``method.er_classes``)."""
    d = cam_a[:, 1:] - cam_b[:, 1:]
    e = d.pow(2) if kind == "mse" else d.abs()
    if num_classes is None:
        return e.mean()
    return e.sum() / (e.shape[0] * int(num_classes) * e[0, 0].numel())


def cross_equivariant_loss(cam1, rv1, cam2, rv2, topk: float) -> torch.Tensor:
    """SEAM's ECR: PCM output of each branch supervised by the other branch's CAM made into :func:`ecr_target`.
    All four maps on the same grid, max-normed and label-masked; the two terms are summed (as SEAM)."""
    e1 = topk_mean((ecr_target(cam2) - rv1).abs(), topk)
    e2 = topk_mean((ecr_target(cam1) - rv2).abs(), topk)
    return e1 + e2
