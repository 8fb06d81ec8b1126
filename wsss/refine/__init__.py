"""Refinement of CAMs into pixel labels: affinity labels, AffinityNet random walk, dense CRF (no Ray here).

The names below load their submodule on first use (PEP 562), so ``wsss.refine.crf`` alone (CRF-only workers) does
not import torch.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "affinity_labels": "affinity_labels", "grid_labels": "affinity_labels", "pair_sets": "affinity_labels",
    "crf_inference": "crf",
    "neighbor_offsets": "random_walk", "random_walk": "random_walk", "random_walk_dense": "random_walk",
    "rw_background": "random_walk", "walk_cam": "random_walk",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'wsss.refine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"wsss.refine.{_WHERE[name]}"), name)
