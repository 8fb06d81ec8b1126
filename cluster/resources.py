"""Sizing helpers: read what the Ray cluster has and derive worker, trial and actor-pool sizes from it.

All functions take an optional ``resources`` dict (e.g. ``{"CPU": 8, "GPU": 0}``) so they can be used (and
tested) without a cluster; without it they ask the connected cluster (``ray.init`` must have been called).
Results are always >= 1 so a pipeline never ends up with zero actors; when even one does not fit, Ray queues it
(and Ray Data's ``wait_for_min_actors_s`` / the autoscaler decide what happens).
"""
from __future__ import annotations

import math

__all__ = ["cluster_resources", "available_resources", "use_gpu", "trial_resources", "max_concurrent_trials",
           "actor_pool_size", "train_workers"]


def _require_ray():
    import ray

    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialized: call ray.init(...) (or pass resources=...) first")
    return ray


def cluster_resources() -> dict:
    """Total resources of the connected cluster: ``{"CPU": float, "GPU": float, "memory": bytes,
    "object_store_memory": bytes, "nodes": int alive nodes, ...custom}``. Autoscaling clusters report what is up
    now, not what they could scale to."""
    ray = _require_ray()
    res = {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")}
    res.setdefault("CPU", 0.0)
    res.setdefault("GPU", 0.0)
    res["nodes"] = sum(1 for n in ray.nodes() if n.get("Alive"))
    return res


def available_resources() -> dict:
    """Resources not in use right now (same keys as :func:`cluster_resources`, without ``nodes``)."""
    ray = _require_ray()
    res = {k: v for k, v in ray.available_resources().items() if not k.startswith("node:")}
    res.setdefault("CPU", 0.0)
    res.setdefault("GPU", 0.0)
    return res


def _res(resources: dict | None) -> dict:
    return resources if resources is not None else cluster_resources()


def use_gpu(resources: dict | None = None) -> bool:
    """True when the cluster has at least one GPU."""
    return float(_res(resources).get("GPU", 0) or 0) >= 1


def trial_resources(num_workers: int, cpus_per_worker: float = 1, gpus_per_worker: float = 0,
                    trainer_cpus: float = 1) -> tuple[float, float]:
    """``(cpus, gpus)`` one Tune trial holds: the trial's own function/trainer process (``trainer_cpus``) plus
    ``num_workers`` Ray Train workers (``num_workers=0``: the loop runs inside the trial process)."""
    n = max(0, int(num_workers))
    return trainer_cpus + n * cpus_per_worker, n * gpus_per_worker


def max_concurrent_trials(cpus_per_trial: float, gpus_per_trial: float = 0, resources: dict | None = None,
                          reserve_cpus: float = 0, cap: int | None = None) -> int:
    """How many trials fit at once: min over CPU and GPU of floor(available / per-trial), at least 1.
    ``reserve_cpus`` keeps CPUs free for other work (e.g. Ray Data feeding the trials)."""
    r = _res(resources)
    if cpus_per_trial <= 0 and gpus_per_trial <= 0:
        raise ValueError("a trial needs some CPU or GPU (cpus_per_trial and gpus_per_trial are both 0)")
    fits = []
    if cpus_per_trial > 0:
        fits.append(math.floor((float(r.get("CPU", 0)) - reserve_cpus) / cpus_per_trial + 1e-9))
    if gpus_per_trial > 0:
        fits.append(math.floor(float(r.get("GPU", 0)) / gpus_per_trial + 1e-9))
    n = max(1, min(fits))
    return min(n, cap) if cap else n


def actor_pool_size(cpus_per_actor: float = 1, gpus_per_actor: float = 0, resources: dict | None = None,
                    reserve_cpus: float = 0, max_size: int | None = None, share: float = 1.0) -> int:
    """Actors that fit in ``share`` (0..1] of the cluster's CPUs/GPUs after ``reserve_cpus``, at least 1.

    Example: CAM actors with 1 GPU each on a 4-GPU cluster -> 4; CRF tasks get what is left of the CPUs.
    """
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    r = _res(resources)
    fits = []
    if gpus_per_actor > 0:
        fits.append(math.floor(float(r.get("GPU", 0)) * share / gpus_per_actor + 1e-9))
    if cpus_per_actor > 0:
        fits.append(math.floor((float(r.get("CPU", 0)) - reserve_cpus) * share / cpus_per_actor + 1e-9))
    n = max(1, min(fits)) if fits else 1
    return min(n, max_size) if max_size else n


def train_workers(resources: dict | None = None, cpus_per_worker: float = 1, max_workers: int | None = None,
                  reserve_cpus: float = 1) -> tuple[int, bool]:
    """``(num_workers, use_gpu)`` for a TorchTrainer: one worker per GPU when there are GPUs, else as many CPU
    workers as fit after ``reserve_cpus`` (the driver / Ray Data), at least 1."""
    r = _res(resources)
    gpus = int(float(r.get("GPU", 0) or 0))
    if gpus >= 1:
        n = gpus
        return (min(n, max_workers) if max_workers else n), True
    n = max(1, math.floor((float(r.get("CPU", 0)) - reserve_cpus) / max(cpus_per_worker, 1e-9) + 1e-9))
    return (min(n, max_workers) if max_workers else n), False
