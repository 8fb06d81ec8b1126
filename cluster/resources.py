"""Sizing helpers: read what the Ray cluster has (or can scale to) and derive worker, trial and actor-pool sizes.

All functions take an optional ``resources`` dict (e.g. ``{"CPU": 8, "GPU": 0}``) so they can be used (and
tested) without a cluster; without it they ask the connected cluster (``ray.init`` must have been called).
Results are always >= 1 so a pipeline never ends up with zero actors; when even one does not fit, Ray queues it
(and Ray Data's ``wait_for_min_actors_s`` / the autoscaler decide what happens).
"""
from __future__ import annotations

import math

__all__ = ["cluster_resources", "available_resources", "use_gpu", "trial_resources", "max_concurrent_trials",
           "actor_pool_size", "train_workers", "PlanError", "NodeType", "Capacity", "parse_resources",
           "capacity_from_resources", "capacity_from_cluster_config", "live_capacity", "resolve_capacity", "pack",
           "check_plan", "count_fitting", "request_bundles", "release_request", "expand"]


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


# ---- capacity planning for autoscaling clusters ---------------------------------------------------------------
#
# A plan is a list of resource bundles (one per actor, Train worker, Tune trial driver or CPU task slot). It is
# checked against the *capacity* of the cluster: what the configured cluster can scale to (ray_cluster.yaml's node
# types x max_workers, the launcher's bootstrap copy of it on the head, or an explicit --max-resources), not what is
# up right now. A plan that fits is requested from the autoscaler (ray.autoscaler.sdk.request_resources), so the
# nodes come up before the actors and tasks wait for them; only a plan that can never fit is an error.

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the resolved cluster config on the head
CLUSTER_CONFIG_ENV = "WSSS_CLUSTER_CONFIG"
MAX_RESOURCES_ENV = "WSSS_MAX_RESOURCES"
_EPS = 1e-9


class PlanError(ValueError):
    """The plan can never fit the configured cluster (one line, names the bundle and the source)."""


class NodeType:
    """A node shape: ``resources`` per node, at most ``max_count`` nodes of it (None: no per-type cap)."""

    def __init__(self, name: str, resources: dict, max_count: int | None, is_head: bool = False):
        self.name = name
        self.resources = {k: float(v) for k, v in (resources or {}).items() if float(v) > 0}
        self.max_count = max_count
        self.is_head = is_head

    def __repr__(self) -> str:
        return f"NodeType({self.name!r}, {self.resources}, max={self.max_count})"


class Capacity:
    """What a cluster can scale to. ``autoscaling`` is False for the live fallback (the nodes up now are all
    there is); ``max_workers`` caps the worker nodes over all types (the head is not counted)."""

    def __init__(self, node_types: list[NodeType], source: str, autoscaling: bool, max_workers: int | None = None):
        self.node_types = list(node_types)
        self.source = source
        self.autoscaling = autoscaling
        self.max_workers = max_workers

    def total(self) -> dict:
        """Upper bound per resource over all nodes the cluster can have (per resource, the global worker cap
        filled with the node types richest in it)."""
        keys = sorted({k for t in self.node_types for k in t.resources})
        out = {}
        for k in keys:
            v = sum(t.resources.get(k, 0.0) for t in self.node_types if t.is_head)
            left = self.max_workers
            for t in sorted((t for t in self.node_types if not t.is_head), key=lambda t: -t.resources.get(k, 0.0)):
                n = t.max_count if t.max_count is not None else (left if left is not None else 0)
                if left is not None:
                    n = min(n, left)
                    left -= n
                v += n * t.resources.get(k, 0.0)
            out[k] = v
        return out

    def describe(self) -> str:
        tot = self.total()
        return f"{self.source}: " + ", ".join(f"{k}={tot[k]:g}" for k in sorted(tot))


def parse_resources(spec: str) -> dict:
    """``"CPU=64,GPU=4,driver=4"`` -> ``{"CPU": 64.0, "GPU": 4.0, "driver": 4.0}`` (one-line error otherwise)."""
    out = {}
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        k, sep, v = part.partition("=")
        try:
            if not sep or not k.strip():
                raise ValueError
            out[k.strip()] = float(v)
        except ValueError:
            raise ValueError(f"max resources {spec!r}: expected NAME=NUMBER[,NAME=NUMBER...], got {part!r}") from None
    if not out:
        raise ValueError(f"max resources {spec!r}: empty")
    return out


def capacity_from_resources(resources: dict, source: str = "--max-resources") -> Capacity:
    """An aggregate capacity (no node shapes known): one pseudo-node holding everything."""
    return Capacity([NodeType("all", resources, 1, is_head=True)], source, autoscaling=True)


def capacity_from_cluster_config(config) -> Capacity:
    """Capacity of a Ray cluster launcher config (a path or the loaded dict): the head plus each worker type x
    its max_workers, capped by the top-level max_workers. Every node type must list its ``resources``
    (the launcher's detection from the instance type happens on the cluster, not here)."""
    import os

    import yaml

    source = "cluster config"
    if not isinstance(config, dict):
        source = str(config)
        with open(os.path.expanduser(str(config))) as f:
            config = yaml.safe_load(f) or {}
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    if not types or head not in types:
        raise ValueError(f"{source}: no available_node_types / head_node_type")
    nodes = []
    for name, t in types.items():
        res = dict(t.get("resources") or {})
        is_head = name == head
        if not is_head and not res:
            raise ValueError(f"{source}: node type {name} has no resources: list them (e.g. resources: "
                             "{CPU: 4, GPU: 1}) so that jobs can plan against the cluster's maximum")
        nodes.append(NodeType(name, res, 1 if is_head else int(t.get("max_workers", 0)), is_head=is_head))
    mw = config.get("max_workers")
    return Capacity(nodes, source, autoscaling=True, max_workers=int(mw) if mw is not None else None)


def live_capacity() -> Capacity:
    """The nodes alive now, each as its own node type (for clusters that do not autoscale)."""
    ray = _require_ray()
    nodes = []
    for n in ray.nodes():
        if n.get("Alive"):
            res = {k: v for k, v in (n.get("Resources") or {}).items()
                   if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
            nodes.append(NodeType(n.get("NodeID", "node")[:8], res, 1, is_head=True))
    return Capacity(nodes, "the nodes up now", autoscaling=False)


def resolve_capacity(max_resources: str | dict | None = None, cluster_config: str | None = None) -> Capacity:
    """The capacity jobs plan against, first found: ``max_resources`` (flag) / $WSSS_MAX_RESOURCES, then
    ``cluster_config`` (flag) / $WSSS_CLUSTER_CONFIG, then the launcher's ``~/ray_bootstrap_config.yaml`` when this
    process runs on a `ray up` head, else the live cluster (needs ``ray.init``)."""
    import os

    spec = max_resources if max_resources is not None else os.environ.get(MAX_RESOURCES_ENV)
    if spec:
        return capacity_from_resources(spec if isinstance(spec, dict) else parse_resources(spec),
                                       "--max-resources" if max_resources is not None else MAX_RESOURCES_ENV)
    path = cluster_config or os.environ.get(CLUSTER_CONFIG_ENV)
    if not path and os.path.exists(os.path.expanduser(BOOTSTRAP_CONFIG)):
        path = BOOTSTRAP_CONFIG
    if path:
        return capacity_from_cluster_config(path)
    return live_capacity()


def _fits(bundle: dict, free: dict) -> bool:
    return all(free.get(k, 0.0) + _EPS >= v for k, v in bundle.items() if v > 0)


def pack(bundles: list[dict], capacity: Capacity) -> dict[str, int] | None:
    """First-fit-decreasing packing of ``bundles`` onto the capacity's nodes (opening nodes of the first type that
    fits while its and the global caps allow). Returns nodes used per type, or None when something does not fit."""
    order = sorted(range(len(bundles)), key=lambda i: (-bundles[i].get("GPU", 0.0), -sum(bundles[i].values())))
    open_nodes: list[tuple[NodeType, dict]] = []
    used: dict[str, int] = {}
    workers = 0
    for t in capacity.node_types:  # the head (and live nodes) exist already
        if t.is_head:
            open_nodes.append((t, dict(t.resources)))
    for i in order:
        b = {k: float(v) for k, v in bundles[i].items() if float(v) > 0}
        slot = next((free for _, free in open_nodes if _fits(b, free)), None)
        if slot is None:
            # a bundle without GPUs goes to a CPU-only type first (as the autoscaler would)
            for t in sorted(capacity.node_types, key=lambda t: bool(t.resources.get("GPU")) and not b.get("GPU")):
                if t.is_head or not _fits(b, t.resources):
                    continue
                if t.max_count is not None and used.get(t.name, 0) >= t.max_count:
                    continue
                if capacity.max_workers is not None and workers >= capacity.max_workers:
                    continue
                slot = dict(t.resources)
                open_nodes.append((t, slot))
                used[t.name] = used.get(t.name, 0) + 1
                workers += 1
                break
        if slot is None:
            return None
        for k, v in b.items():
            slot[k] = slot.get(k, 0.0) - v
    return used


def _fmt_bundle(b: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(b.items()) if v) + "}"


def check_plan(groups: list[tuple[str, int, dict]], capacity: Capacity) -> dict[str, int]:
    """``groups``: (what, count, bundle), e.g. ("CAM actor", 2, {"CPU": 1, "GPU": 1}). Raises :class:`PlanError`
    naming the first group that cannot fit (alone on the largest node, or together with the groups before it);
    returns the worker nodes per type the plan needs."""
    bundles: list[dict] = []
    hint = ("" if capacity.autoscaling else "; if this cluster autoscales, pass --cluster-config ray_cluster.yaml "
            "or --max-resources CPU=..,GPU=..")
    for what, count, bundle in groups:
        if count <= 0:
            continue
        if pack([bundle], capacity) is None:
            raise PlanError(f"a {what} needs {_fmt_bundle(bundle)}, which no node of {capacity.describe()} has"
                            f"{hint}")
        bundles += [dict(bundle) for _ in range(int(count))]
        if pack(bundles, capacity) is None:
            need = {}
            for b in bundles:
                for k, v in b.items():
                    need[k] = need.get(k, 0.0) + v
            raise PlanError(f"the plan ({', '.join(f'{c} x {w} {_fmt_bundle(b)}' for w, c, b in groups if c > 0)}; "
                            f"in all {_fmt_bundle(need)}) does not fit {capacity.describe()}: reached at the "
                            f"{what}s{hint}")
    return pack(bundles, capacity) or {}


def count_fitting(group: list[dict], capacity: Capacity, limit: int, reserve: list[dict] | None = None) -> int:
    """How many copies of ``group`` (the bundles of one Tune trial) fit at once next to ``reserve``, in [1, limit]."""
    base = [dict(b) for b in (reserve or [])]
    n = 0
    while n < limit and pack(base + [dict(b) for b in group] * (n + 1), capacity) is not None:
        n += 1
    return max(1, n)


def request_bundles(bundles: list[dict]) -> bool:
    """Ask the autoscaler to make room for ``bundles`` now (persistent until :func:`release_request`). A no-op on
    clusters without an autoscaler. Returns whether the request was sent."""
    _require_ray()
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=[{k: v for k, v in b.items() if v > 0} for b in bundles if any(b.values())])
    except Exception:  # noqa: BLE001 - a hint only: the pending actors/tasks also make the autoscaler scale
        return False
    global _release_registered
    if not _release_registered:  # a driver that dies before its explicit release still withdraws the request
        import atexit

        atexit.register(release_request)
        _release_registered = True
    return True


_release_registered = False


def release_request() -> None:
    """Withdraw this job's standing request (so that idle nodes can scale down after it)."""
    import ray

    if not ray.is_initialized():
        return
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=[])
    except Exception:  # noqa: BLE001
        pass


def expand(groups: list[tuple[str, int, dict]]) -> list[dict]:
    """The bundles of ``groups`` one by one."""
    return [dict(b) for _, c, b in groups for _ in range(max(0, int(c)))]
