"""Refinement of CAMs into pixel labels: affinity labels, AffinityNet random walk, dense CRF (no Ray here)."""
from wsss.refine.affinity_labels import affinity_labels, grid_labels, pair_sets
from wsss.refine.crf import crf_inference
from wsss.refine.random_walk import (neighbor_offsets, random_walk, random_walk_dense, rw_background, walk_cam)

__all__ = ["affinity_labels", "grid_labels", "pair_sets", "crf_inference", "neighbor_offsets", "random_walk",
           "random_walk_dense", "rw_background", "walk_cam"]
