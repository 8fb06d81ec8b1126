"""wsss: weakly supervised semantic segmentation (DAEN / SEAM / SSENet / CAM) from image-level labels to pixel
pseudo labels. Pure PyTorch/numpy; the Ray entrypoints live in ``jobs/``."""

__version__ = "0.1.0"
