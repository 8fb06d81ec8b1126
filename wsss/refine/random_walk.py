"""Random walk with AffinityNet affinities: sparse production path and dense reference.

AffinityNet (Ahn & Kwak, CVPR 2018; used by SEAM and DAEN, paper Sec. 4.2 / Table 3) propagates CAM scores with a
transition matrix built from predicted pixel affinities on the stride-8 feature grid:

    A_ij = a_ij^beta  for pairs within ``radius`` (a_ii = 1),  T = A / column sums,  cam_rw = cam · T^t,

with beta = 8 and t = 2^logt, logt = 8 (AffinityNet; SEAM's copy uses logt = 6).  The reference formulation builds
the dense (n x n) matrix, n = h*w, and squares it ``logt`` times: O(n^2) memory and O(n^3 logt) time.

The production path never forms that matrix.  Because A is symmetric, column j of T holds pixel j's own weights
(its neighbours within the radius plus itself) divided by their sum, so one multiplication ``v · T`` is a
per-pixel weighted average over a fixed neighbourhood: ``2P + 1`` shifted views of the (C, h, w) scores, each
multiplied by a precomputed weight plane.  t steps cost t * C * n * (2P + 1) multiply-adds (P = 34 half offsets at
radius 5), and memory is O((2P + 1) * n).  Everything is torch and runs wherever the tensors are (CPU or CUDA).

Affinity layout shared with :mod:`wsss.models.affinity_net`: ``aff[p, y, x]`` is the affinity between grid pixel
(y, x) and (y + dy_p, x + dx_p) for the p-th *half* offset of :func:`neighbor_offsets`; entries whose partner lies
outside the grid are ignored.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

# AffinityNet works on the stride-8 feature grid of ResNet-38.
GRID_STRIDE = 8


@lru_cache(maxsize=None)
def neighbor_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """Half-neighbourhood offsets (dy, dx) with dy^2 + dx^2 < radius^2, excluding (0, 0).

    Only one of each pair (o, -o) is kept: dy > 0, or dy == 0 and dx > 0 (AffinityNet predicts each symmetric
    affinity once).  radius 5 -> 34 offsets.  Order: row by row (dy ascending), dx ascending.
    """
    if int(radius) != radius or radius < 1:
        raise ValueError(f"radius must be an integer >= 1, got {radius!r}")
    radius = int(radius)
    out = []
    for dy in range(0, radius):
        for dx in range(-radius + 1, radius):
            if dy == 0 and dx <= 0:
                continue
            if dy * dy + dx * dx < radius * radius:
                out.append((dy, dx))
    return tuple(out)


def radius_for_num_offsets(num: int) -> int:
    """The radius whose half neighbourhood has ``num`` offsets (ValueError if none)."""
    for r in range(1, 64):
        n = len(neighbor_offsets(r))
        if n == num:
            return r
        if n > num:
            break
    raise ValueError(f"{num} affinity planes match no neighbourhood radius")


def _check_aff(probs: torch.Tensor, aff: torch.Tensor, radius: int) -> None:
    offs = neighbor_offsets(radius)
    if probs.dim() != 3 or aff.dim() != 3:
        raise ValueError(f"random walk: want probs (C,h,w) and aff (P,h,w), got {tuple(probs.shape)} and "
                         f"{tuple(aff.shape)}")
    if aff.shape[0] != len(offs):
        raise ValueError(f"random walk: aff has {aff.shape[0]} planes but radius {radius} has {len(offs)} offsets")
    if tuple(aff.shape[1:]) != tuple(probs.shape[1:]):
        raise ValueError(f"random walk: probs grid {tuple(probs.shape[1:])} != affinity grid {tuple(aff.shape[1:])}")


def valid_pair_mask(h: int, w: int, radius: int, device=None) -> torch.Tensor:
    """Bool (P, h, w): True where the partner (y+dy, x+dx) of the p-th half offset lies inside the grid."""
    offs = neighbor_offsets(radius)
    ys = torch.arange(h, device=device).view(1, h, 1)
    xs = torch.arange(w, device=device).view(1, 1, w)
    dy = torch.tensor([o[0] for o in offs], device=device).view(-1, 1, 1)
    dx = torch.tensor([o[1] for o in offs], device=device).view(-1, 1, 1)
    return (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)


def transition_weights(aff: torch.Tensor, radius: int, beta: float) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Per-pixel normalised weights over the full neighbourhood (self, +offsets, -offsets).

    Returns ``(W, full_offsets)`` with W of shape (2P+1, h, w): ``W[k, y, x]`` is the weight pixel (y, x) gives to
    its neighbour at ``full_offsets[k]``; each pixel's weights sum to 1 (column of AffinityNet's T).  Partners
    outside the grid get weight 0.
    """
    P, h, w = aff.shape
    offs = neighbor_offsets(radius)
    valid = valid_pair_mask(h, w, radius, aff.device)
    # a^beta, with 0^0 = 1 (beta = 0 gives uniform weights), then drop out-of-grid partners.
    a = torch.where(valid, aff.clamp_min(0).pow(beta), torch.zeros((), dtype=aff.dtype, device=aff.device))
    r1 = radius - 1
    # backward planes: weight of (y, x) towards (y - dy, x - dx) = a_p at (y - dy, x - dx).
    ap = F.pad(a, (r1, r1, r1, 0))   # pad left/right by r1, top by r1
    back = torch.stack([ap[p, r1 - dy:r1 - dy + h, r1 - dx:r1 - dx + w] for p, (dy, dx) in enumerate(offs)])
    ones = torch.ones((1, h, w), dtype=aff.dtype, device=aff.device)
    Wt = torch.cat([ones, a, back], 0)
    Wt = Wt / Wt.sum(0, keepdim=True)
    full = [(0, 0)] + list(offs) + [(-dy, -dx) for dy, dx in offs]
    return Wt, full


def random_walk(probs: torch.Tensor, aff: torch.Tensor, radius: int = 5, beta: float = 8.0, logt: int = 8,
                steps: int | None = None) -> torch.Tensor:
    """Sparse random walk: ``probs · T^t`` with t = 2^logt (or ``steps``) by neighbourhood propagation.

    probs: (C, h, w) scores on the feature grid; aff: (P, h, w) half-offset affinities in [0, 1] (same device).
    Returns (C, h, w) in probs' dtype.  Never builds the (hw x hw) matrix.
    """
    _check_aff(probs, aff, radius)
    t = (1 << int(logt)) if steps is None else int(steps)
    C, h, w = probs.shape
    Wt, full = transition_weights(aff.to(probs.dtype), radius, beta)
    r1 = radius - 1
    H2, W2 = h + 2 * r1, w + 2 * r1
    # Two padded buffers (zeros outside the grid; out-of-grid weights are 0 anyway) swapped each step.
    bufs = [torch.zeros((C, H2, W2), dtype=probs.dtype, device=probs.device) for _ in range(2)]
    bufs[0][:, r1:r1 + h, r1:r1 + w] = probs
    views = [(Wt[k].unsqueeze(0), r1 + dy, r1 + dx) for k, (dy, dx) in enumerate(full)]
    cur = 0
    # In-place multiply-adds on strided views: no temporaries (measured ~1.5x faster than mul + add and ~10x
    # faster than unfold or index_select gathers on CPU; see bench/bench_random_walk.py).
    for _ in range(t):
        src = bufs[cur]
        dst = bufs[1 - cur][:, r1:r1 + h, r1:r1 + w]
        wk, y0, x0 = views[0]
        torch.mul(src[:, y0:y0 + h, x0:x0 + w], wk, out=dst)
        for wk, y0, x0 in views[1:]:
            dst.addcmul_(src[:, y0:y0 + h, x0:x0 + w], wk)
        cur = 1 - cur
    return bufs[cur][:, r1:r1 + h, r1:r1 + w].clone()


def dense_affinity_matrix(aff: torch.Tensor, radius: int) -> torch.Tensor:
    """The dense symmetric (n x n) affinity matrix, n = h*w, with a_ii = 1 (reference only)."""
    P, h, w = aff.shape
    offs = neighbor_offsets(radius)
    n = h * w
    valid = valid_pair_mask(h, w, radius, aff.device)
    A = torch.zeros((n, n), dtype=aff.dtype, device=aff.device)
    idx = torch.arange(n, device=aff.device).view(h, w)
    for p, (dy, dx) in enumerate(offs):
        m = valid[p]
        src = idx[m]
        dst = src + dy * w + dx
        A[src, dst] = aff[p][m]
        A[dst, src] = aff[p][m]
    A.fill_diagonal_(1.0)
    return A


def random_walk_dense(probs: torch.Tensor, aff: torch.Tensor, radius: int = 5, beta: float = 8.0,
                      logt: int = 8) -> torch.Tensor:
    """Reference formulation (AffinityNet): T = A^beta / column sum, squared ``logt`` times, cam · T.

    Forms the (hw x hw) matrix: only for tests and benchmarks on small grids.
    """
    _check_aff(probs, aff, radius)
    C, h, w = probs.shape
    A = dense_affinity_matrix(aff.to(probs.dtype), radius)
    A = A.clamp_min(0).pow(beta)
    if beta == 0:  # 0^0 = 1 would turn absent pairs into 1 too: keep the sparsity pattern of real pairs
        A = (dense_affinity_matrix(torch.ones_like(aff, dtype=probs.dtype), radius) > 0).to(probs.dtype)
    T = A / A.sum(0, keepdim=True)
    del A
    for _ in range(int(logt)):
        T = T @ T
    return (probs.reshape(C, -1) @ T).reshape(C, h, w)


def dense_bytes(h: int, w: int, itemsize: int = 4) -> int:
    """Peak bytes the dense reference needs (about three n x n matrices during a squaring)."""
    n = h * w
    return 3 * n * n * itemsize


# ---- CAM helpers ------------------------------------------------------------------------------------

def matched_bg_alpha(threshold: float) -> float:
    """The background power whose (1 - m)^alpha equals m exactly at m = ``threshold``: ln t / ln(1 - t).

    With it the walk's starting labels are the CAM's labels at that threshold (cfg.rw.bg_alpha = null). On the
    synthetic set the best power found by a sweep on train images matched this value for both CAM thresholds tried
    (0.37 -> 2.15, sweep best 2; 0.58 -> 0.63, sweep best 0.63; README).
    """
    import math

    t = float(threshold)
    if not 0.0 < t < 1.0:
        raise ValueError(f"config key 'infer.bg_threshold': {threshold!r} must lie strictly between 0 and 1 to "
                         "match the walk's background power (rw.bg_alpha: null)")
    return math.log(t) / math.log(1.0 - t)


def rw_background(cam, alpha: float):
    """Background score for the walk: (1 - max over foreground)^alpha (PSA alpha 16, SEAM 6; cfg.rw.bg_alpha).

    cam: (K', H, W) numpy array or tensor in [0, 1]; K' = 0 gives an all-ones background.
    """
    if isinstance(cam, torch.Tensor):
        if cam.shape[0] == 0:
            return torch.ones(cam.shape[1:], dtype=cam.dtype, device=cam.device)
        return (1 - cam.amax(0)).clamp(0, 1).pow(alpha)
    import numpy as np

    cam = np.asarray(cam)
    if cam.shape[0] == 0:
        return np.ones(cam.shape[1:], dtype=np.float32)
    return np.power(np.clip(1 - cam.max(0), 0, 1), alpha).astype(np.float32)


def pool_to_grid(probs: torch.Tensor, grid_hw: tuple[int, int], stride: int = GRID_STRIDE) -> torch.Tensor:
    """(C, H, W) -> (C, h, w): average over stride x stride cells (AffinityNet pools the CAM by 8).

    The image is taken to be padded at the bottom/right to (h*stride, w*stride) (edge values replicated); if the
    grid does not cover the image at that stride, adaptive average pooling is used instead.
    """
    C, H, W = probs.shape
    h, w = grid_hw
    if h * stride >= H and w * stride >= W and (h - 1) * stride < H and (w - 1) * stride < W:
        x = probs.unsqueeze(0)
        if h * stride != H or w * stride != W:
            x = F.pad(x, (0, w * stride - W, 0, h * stride - H), mode="replicate")
        return F.avg_pool2d(x, stride, stride)[0]
    return F.adaptive_avg_pool2d(probs.unsqueeze(0), (h, w))[0]


def upsample_from_grid(probs: torch.Tensor, image_hw: tuple[int, int], stride: int = GRID_STRIDE) -> torch.Tensor:
    """(C, h, w) -> (C, H, W): bilinear x stride, then crop the padding (inverse of :func:`pool_to_grid`)."""
    C, h, w = probs.shape
    H, W = image_hw
    if h * stride >= H and w * stride >= W:
        up = F.interpolate(probs.unsqueeze(0), size=(h * stride, w * stride), mode="bilinear", align_corners=False)
        return up[0, :, :H, :W]
    return F.interpolate(probs.unsqueeze(0), size=(H, W), mode="bilinear", align_corners=False)[0]


def walk_cam(cam: torch.Tensor, aff: torch.Tensor, radius: int = 5, beta: float = 8.0, logt: int = 8,
             bg_alpha: float = 16.0, stride: int = GRID_STRIDE) -> torch.Tensor:
    """CAM (K', H, W) in [0,1] -> random-walk probabilities (K'+1, H, W), channel 0 = background.

    Background (1 - max)^bg_alpha is computed at full resolution, stacked before the CAM, average-pooled to the
    affinity grid, walked, upsampled bilinearly, and normalised so every pixel sums to 1 (arg-max unchanged).
    """
    bg = rw_background(cam, bg_alpha)
    scores = torch.cat([bg.unsqueeze(0), cam], 0)
    grid = pool_to_grid(scores, tuple(aff.shape[1:]), stride)
    walked = random_walk(grid, aff, radius=radius, beta=beta, logt=logt)
    up = upsample_from_grid(walked, tuple(cam.shape[1:]), stride).clamp_min(0)
    return up / up.sum(0, keepdim=True).clamp_min(1e-8)


def expected_flops(h: int, w: int, channels: int, radius: int, logt: int) -> dict[str, float]:
    """Rough multiply-add counts of both paths (for the benchmark table)."""
    n = h * w
    k = 2 * len(neighbor_offsets(radius)) + 1
    return {"sparse": float((1 << logt) * channels * n * k), "dense": float(logt * n ** 3 + channels * n * n),
            "ratio": float(logt * n ** 3) / max(1.0, (1 << logt) * channels * n * k)}


__all__ = ["neighbor_offsets", "radius_for_num_offsets", "valid_pair_mask", "transition_weights", "random_walk",
           "random_walk_dense", "dense_affinity_matrix", "dense_bytes", "rw_background", "pool_to_grid",
           "upsample_from_grid", "walk_cam", "matched_bg_alpha", "expected_flops", "GRID_STRIDE"]
