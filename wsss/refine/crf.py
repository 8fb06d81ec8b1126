"""Fully connected CRF (Kraehenbuehl & Koltun 2011) through ``pydensecrf`` (package ``pydensecrf2``).

Defaults (cfg.crf) follow AffinityNet / SEAM: 10 mean-field iterations, Gaussian kernel sxy 3 compat 3, bilateral
kernel sxy 80 srgb 13 compat 10.  Labels are only the classes present in the scores (background + the image's
positive classes), as in those codes.
"""
from __future__ import annotations

import numpy as np

# Unary = -log(max(p, UNARY_CLIP)) (pydensecrf's unary_from_softmax uses the same clip, 1e-5).
UNARY_CLIP = 1e-5


def _get(cfg, key, default):
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def crf_inference(image: np.ndarray, probs: np.ndarray, crf_cfg=None, iters: int | None = None) -> np.ndarray:
    """Refine per-pixel class probabilities with a dense CRF.

    image: uint8 (H, W, 3) RGB; probs: (C, H, W) non-negative scores (normalised per pixel here); crf_cfg: a
    :class:`wsss.config.CRFConfig` (or dict with the same keys, or None for the defaults); ``iters`` overrides
    crf_cfg.iters.  Returns float32 (C, H, W) marginals (each pixel sums to 1).
    """
    import pydensecrf.densecrf as dcrf

    probs = np.asarray(probs)
    image = np.asarray(image)
    if probs.ndim != 3:
        raise ValueError(f"crf: probs must be (C, H, W), got shape {probs.shape}")
    C, H, W = probs.shape
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"crf: image must be (H, W, 3) RGB, got shape {image.shape}")
    if image.shape[:2] != (H, W):
        raise ValueError(f"crf: image size {image.shape[1]}x{image.shape[0]} (WxH) does not match probabilities "
                         f"size {W}x{H}")
    if image.dtype != np.uint8:
        raise ValueError(f"crf: image must be uint8, got {image.dtype}")
    if C == 0:
        raise ValueError("crf: probs has no classes")
    n_iter = int(iters if iters is not None else _get(crf_cfg, "iters", 10))
    if C == 1:
        return np.ones((1, H, W), np.float32)
    p = np.clip(probs.astype(np.float32, copy=False), 0, None)
    s = p.sum(0, keepdims=True)
    p = np.where(s > 0, p / np.maximum(s, 1e-12), 1.0 / C)
    unary = np.ascontiguousarray(-np.log(np.maximum(p, UNARY_CLIP)).reshape(C, -1), dtype=np.float32)

    d = dcrf.DenseCRF2D(W, H, C)
    d.setUnaryEnergy(unary)
    gs = float(_get(crf_cfg, "gauss_sxy", 3.0))
    d.addPairwiseGaussian(sxy=(gs, gs), compat=float(_get(crf_cfg, "gauss_compat", 3.0)))
    bs = float(_get(crf_cfg, "bi_sxy", 80.0))
    sr = float(_get(crf_cfg, "bi_srgb", 13.0))
    # pydensecrf wants a C-contiguous, writeable uint8 buffer (views and read-only arrays are copied)
    rgb = np.require(image, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])
    d.addPairwiseBilateral(sxy=(bs, bs), srgb=(sr, sr, sr), rgbim=rgb,
                           compat=float(_get(crf_cfg, "bi_compat", 10.0)))
    q = d.inference(n_iter)
    return np.asarray(q, dtype=np.float32).reshape(C, H, W)


__all__ = ["crf_inference", "UNARY_CLIP"]
