"""SGD parameter groups of the SEAM family (SEAM, AffinityNet, DAEN): one function for every network here.

Backbone weights x1, backbone biases x2 (no weight decay), new-layer weights x ``new_lr_mult`` (SEAM: 10), new
biases x 2 * ``new_lr_mult`` (no decay). A parameter is "new" when its top-level module name is in ``new_modules``.
"""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def sgd_param_groups(module: nn.Module, new_modules: Iterable[str], lr: float, weight_decay: float,
                     new_lr_mult: float) -> list[dict]:
    """Groups of the trainable parameters; empty groups are left out. Each group: params, name, lr_mult,
    lr (= lr * lr_mult), weight_decay. The poly schedule later multiplies each group's ``lr_mult``."""
    new_modules = tuple(new_modules)
    spec = {"backbone_weight": (1.0, weight_decay), "backbone_bias": (2.0, 0.0),
            "new_weight": (new_lr_mult, weight_decay), "new_bias": (2.0 * new_lr_mult, 0.0)}
    buckets: dict[str, list[nn.Parameter]] = {k: [] for k in spec}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        new = name.split(".", 1)[0] in new_modules
        kind = "bias" if name.endswith(".bias") else "weight"
        buckets[f"{'new' if new else 'backbone'}_{kind}"].append(p)
    return [{"params": buckets[k], "name": k, "lr_mult": m, "lr": float(lr) * m, "weight_decay": wd}
            for k, (m, wd) in spec.items() if buckets[k]]


__all__ = ["sgd_param_groups"]
