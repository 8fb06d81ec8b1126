"""Affinity labels from CAMs (AffinityNet's la/ha scheme) and the pair sets AffinityNet trains on.

AffinityNet (Ahn & Kwak 2018; SEAM and DAEN train it on their CAMs, DAEN Sec. 4.2):
  * background score (1 - max_fg)^alpha with a low alpha (4) and a high alpha (24; PSA uses 32), each stacked with
    the CAM and refined by the dense CRF;
  * where the low-alpha map says foreground, the label is its arg-max class (confident foreground);
  * where the low-alpha map says background the pixel is uncertain (255) ...
  * ... unless the high-alpha map also says background: confident background (0).
Pairs of pixels within a radius (5) on the stride-8 grid are then positive (same label; background or foreground)
or negative (different labels); pairs touching 255 are dropped.
"""
from __future__ import annotations

import numpy as np
import torch

from wsss.refine.crf import crf_inference
from wsss.refine.random_walk import neighbor_offsets

IGNORE = 255


def _bg_stack(cam: np.ndarray, alpha: float) -> np.ndarray:
    if cam.shape[0] == 0:
        return np.ones((1,) + cam.shape[1:], np.float32)
    bg = np.power(np.clip(1.0 - cam.max(0), 0.0, 1.0), alpha)
    return np.concatenate([bg[None], cam], 0).astype(np.float32)


def affinity_labels(image: np.ndarray, cam: np.ndarray, keys, low_alpha: float = 4.0, high_alpha: float = 24.0,
                    crf_cfg=None) -> np.ndarray:
    """uint8 (H, W) affinity training label: class index, 0 background, 255 uncertain.

    image: uint8 (H, W, 3); cam: (K', H, W) in [0, 1] for the image's positive classes; keys: (K',) their class
    indices (1..K).  crf_cfg: cfg.crf (None: defaults).
    """
    cam = np.asarray(cam, dtype=np.float32)
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    if cam.ndim != 3 or cam.shape[0] != keys.shape[0]:
        raise ValueError(f"affinity labels: cam shape {cam.shape} does not match {keys.shape[0]} keys")
    H, W = cam.shape[1:]
    if image.shape[:2] != (H, W):
        raise ValueError(f"affinity labels: image size {image.shape[1]}x{image.shape[0]} (WxH) does not match cam "
                         f"size {W}x{H}")
    if cam.shape[0] == 0:
        return np.zeros((H, W), np.uint8)
    full_keys = np.concatenate([[0], keys])
    la = crf_inference(image, _bg_stack(cam, low_alpha), crf_cfg).argmax(0)
    ha = crf_inference(image, _bg_stack(cam, high_alpha), crf_cfg).argmax(0)
    label = full_keys[la].astype(np.uint8)
    label[la == 0] = IGNORE
    label[ha == 0] = 0
    return label


def grid_labels(label, grid_hw: tuple[int, int]):
    """Nearest-neighbour downsampling of a (..., H, W) label map to the feature grid (h, w).

    Samples the pixel nearest to each grid cell's centre (AffinityNet rescales the label by 1/8 with nearest
    interpolation).  Works on numpy arrays and torch tensors (kept on their device).
    """
    H, W = label.shape[-2:]
    h, w = grid_hw
    ys = np.minimum(((np.arange(h) + 0.5) * H / h).astype(np.int64), H - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * W / w).astype(np.int64), W - 1)
    if isinstance(label, torch.Tensor):
        yi = torch.as_tensor(ys, device=label.device)
        xi = torch.as_tensor(xs, device=label.device)
        return label.index_select(-2, yi).index_select(-1, xi)
    return label[..., ys[:, None], xs[None, :]]


def pair_sets(labels, radius: int = 5):
    """Boolean pair masks (bg_pos, fg_pos, neg), each (B, P, h, w), for grid labels (B, h, w) or (h, w).

    Pair p at (y, x) links (y, x) with (y + dy_p, x + dx_p) (half offsets of
    :func:`wsss.refine.random_walk.neighbor_offsets`).  bg_pos: both background; fg_pos: same foreground class;
    neg: different labels.  Pairs with a partner outside the grid or touching 255 are in no set.
    """
    lab = torch.as_tensor(labels).long()
    squeeze = lab.dim() == 2
    if squeeze:
        lab = lab.unsqueeze(0)
    B, h, w = lab.shape
    offs = neighbor_offsets(radius)
    r1 = radius - 1
    pad = torch.nn.functional.pad(lab, (r1, r1, 0, r1), value=IGNORE)
    partner = torch.stack([pad[:, dy:dy + h, r1 + dx:r1 + dx + w] for dy, dx in offs], 1)   # (B, P, h, w)
    me = lab.unsqueeze(1)
    valid = (me != IGNORE) & (partner != IGNORE)
    same = me == partner
    bg_pos = valid & same & (me == 0)
    fg_pos = valid & same & (me != 0)
    neg = valid & ~same
    if squeeze:
        return bg_pos[0], fg_pos[0], neg[0]
    return bg_pos, fg_pos, neg


__all__ = ["affinity_labels", "grid_labels", "pair_sets", "IGNORE"]
