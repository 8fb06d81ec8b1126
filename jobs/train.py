"""Distributed CAM training on Ray Train (V2): ``python -m jobs.train --config CFG --data SHARDS --storage URI --name RUN``.

One ``TorchTrainer`` runs the foundation's training step (``wsss.train.Objective`` + ``train_step``) with DDP across
``--num-workers`` workers (gloo on CPU, NCCL on GPU). Input (``cluster.ingest.train_dataset``): the Parquet shards
of ``jobs/shard.py`` read with ``ray.data.read_parquet`` (files shuffled per epoch by a ``FileShuffleConfig`` seeded
with ``cfg.seed``), decoded and augmented with ``wsss.data.transforms.TrainTransform`` (the single-process loop's
code) in ``map_batches`` tasks on CPU workers, split across the ranks by Ray Train (``datasets={"train": ...}``,
order preserved) and iterated with ``get_dataset_shard("train").iter_torch_batches(prefetch_batches=...)``. A
seeded run gives every rank the same batches each time (the augmentation seed of a row comes from cfg.seed, its id
and a per-epoch ``ray.data.expressions.random`` draw). Images that do not decode are skipped and reported
(``n_rejects`` in the metrics, ``rejects`` in the checkpoint's metrics.json, gathered from every rank).
``--ingest worker`` keeps the earlier path (every worker decodes and augments its own raw rows). Every epoch every worker calls ``ray.train.report`` (a barrier); rank 0 attaches a checkpoint folder in the
foundation's format (model.pt of the unwrapped network, config.yaml, meta.json, metrics.json) plus
``train_state.pt`` (optimizer state, epoch, step, metric history) for resumption.

Storage: ``RunConfig(name, storage_path, storage_filesystem)`` from ``cluster.storage.storage_for_ray`` (local path
or ``s3://``); the last 2 checkpoints are kept. Fault tolerance: ``FailureConfig(max_failures)`` restarts the worker
group from the latest checkpoint; re-running with the same ``--name`` and ``--storage`` resumes the run (Train V2
has no ``Trainer.restore``: each worker calls ``ray.train.get_checkpoint()`` and continues from its epoch/step).
Checkpoints come at every epoch end and, with ``--checkpoint-every N`` (CLI default 100), every N steps inside an
epoch, so a restart repeats at most N steps (the resumed epoch passes over its first batches undecoded; Ray Data's
split order is not reproducible, so which images fill the rest of that epoch may differ). Every
``--preemption-check-every`` steps the workers ask ``ray.train.get_preemption_info()`` and save a just-in-time
checkpoint when a node is about to be preempted (spot reclaim). With a mid-epoch resume the epoch's metrics cover
the steps after the resume.

At the end the final weights are exported as a plain checkpoint folder ``<storage>/<name>/final/`` that
``wsss cams --checkpoint`` accepts.

Per-epoch metrics (reported to Ray Train, kept in ``metrics.json``): ``loss`` and each term (``cla``, ``eq``,
``ce``, averaged over all workers), ``lr``, ``samples_per_s`` (all workers together, whole epoch incl. data
waits), ``steady_samples_per_s`` (steps after the first ``warmup_steps`` of the attempt), ``val_cam_miou`` (rank 0,
a few validation images at scale 1, no flip, best background threshold) when a validation shard folder with masks
is given, and ``neg_loss`` (= -loss, for searches without masks).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

from jobs import common

log = logging.getLogger("wsss.jobs.train")

CKPT_FILES = ("model.pt", "config.yaml", "meta.json", "metrics.json")  # the plain checkpoint folder
TRAIN_STATE = "train_state.pt"
DEFAULT_VAL_IMAGES = 8
DEFAULT_WARMUP_STEPS = 2
DEFAULT_CHECKPOINT_EVERY = 100  # CLI default: steps between mid-epoch checkpoints (VOC, 8 workers: ~165 steps/epoch)
DEFAULT_PREEMPTION_CHECK_EVERY = 10
INGESTS = ("data", "worker")  # decode + augmentation in Ray Data map_batches tasks | on the training worker
DEFAULT_INGEST = "data"
DEFAULT_PREFETCH_BATCHES = 2


# ---- validation subset (rank 0) -------------------------------------------------------------------------

class _ValShards:
    """The first ``max_images`` rows with masks of a shard folder, through the ``open_dataset`` API that
    ``wsss.train.evaluate_cams`` uses (ids, class_names, num_classes, load_image, load_mask, labels)."""

    def __init__(self, uri: str, max_images: int):
        from wsss.data import shards

        m = shards.read_manifest(uri)
        self.root = uri
        self.class_names = list(m["class_names"])
        self.num_classes = len(self.class_names)
        self.rows: dict[str, dict] = {}
        for rec in shards.iter_shard_rows(uri):
            if rec.get("mask") is None:
                continue
            self.rows[rec["id"]] = rec
            if len(self.rows) >= max_images:
                break
        self.ids = list(self.rows)
        self.has_masks = bool(self.ids)
        self.rejects: list[tuple[str, str]] = []

    def load_image(self, item_id: str) -> np.ndarray:
        from wsss.data.io import decode_image

        return decode_image(self.rows[item_id]["image"], f"{self.root}:{item_id}")

    def load_mask(self, item_id: str):
        from wsss.data.io import BadItem, decode_mask

        r = self.rows[item_id]
        try:
            return decode_mask(r["mask"], f"{self.root}:{item_id} mask", expected_hw=(r["height"], r["width"]),
                               num_classes=self.num_classes)
        except BadItem as e:
            self.rejects.append((item_id, str(e)))
            return None

    def labels(self, item_id: str) -> np.ndarray:
        return np.asarray(self.rows[item_id]["labels"], dtype=np.float32)


# ---- worker side ----------------------------------------------------------------------------------------

def decode_batch(raw: dict, transform, rng, rejects: list, source: str = "shards") -> dict | None:
    """Ray Data numpy batch (id, image bytes, labels) -> {"image": float (B,3,crop,crop), "labels": (B,K), "id"}.
    Items that fail to decode go to ``rejects`` as (id, reason); None when no item of the batch is usable."""
    import torch

    from wsss.data.io import BadItem, decode_image

    images, labels, ids = [], [], []
    for item_id, data, lab in zip(raw["id"], raw["image"], raw["labels"]):
        item_id = str(item_id)
        try:
            img = decode_image(bytes(data), f"{source}:{item_id}")
        except BadItem as e:
            rejects.append((item_id, str(e).splitlines()[0]))
            continue
        images.append(transform(img, rng))
        labels.append(np.asarray(lab, dtype=np.float32))
        ids.append(item_id)
    if not images:
        return None
    return {"image": torch.stack(images), "labels": torch.from_numpy(np.stack(labels)), "id": ids}


def _all_reduce(values: list[float], device, op: str = "sum") -> list[float]:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return [float(v) for v in t.cpu()]


def _gather_rejects(rejects: list) -> list:
    """Every rank's (id, reason) rejects, deduplicated, in rank order (a collective: all ranks call it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(dict.fromkeys(rejects))
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(rejects))
    return list(dict.fromkeys(tuple(r) for part in out for r in part or []))


def _load_resume_state(checkpoint, net, map_location="cpu") -> dict | None:
    """Load model weights from a Ray checkpoint into ``net``; return the train_state dict (or None)."""
    import torch

    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "model.pt"), map_location=map_location, weights_only=True)
        net.load_state_dict(state)
        ts_path = os.path.join(d, TRAIN_STATE)
        if not os.path.exists(ts_path):
            return None
        return torch.load(ts_path, map_location=map_location, weights_only=False)


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function (one per rank)."""
    import torch

    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from wsss.checkpoint import save_checkpoint
    from wsss.config import from_dict
    from wsss.data.transforms import TrainTransform
    from wsss.train import (Objective, build_model, build_optimizer, grad_scaler, seed_everything, set_lr,
                            train_step)

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = from_dict(config["cfg"])
    hooks = config.get("hooks") or {}
    class_names = list(config["class_names"])
    per_epoch, total = int(config["steps_per_epoch"]), int(config["total_steps"])
    epochs = math.ceil(total / per_epoch)
    bs = cfg.optim.batch_size
    threads = int(config.get("torch_threads") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    device = ray.train.torch.get_device()
    cfg.device = str(device) if device.type == "cuda" else "cpu"

    seed_everything(cfg.seed)  # identical initial weights on every rank (DDP broadcasts rank 0's anyway)
    net = build_model(cfg, len(class_names))
    objective = Objective(net, cfg)
    optimizer = build_optimizer(net, cfg)
    scaler = grad_scaler(device, cfg.optim.amp)  # fp16 autocast only (GPUs without bf16)
    start_epoch, step, history = 0, 0, []
    ckpt = ray.train.get_checkpoint()
    ts = None
    if ckpt is not None:
        ts = _load_resume_state(ckpt, net)
        if ts is not None:
            start_epoch, step, history = int(ts["epoch"]), int(ts["step"]), list(ts.get("history", []))
            if ts.get("objective_rng") is not None:
                objective.rng.setstate(ts["objective_rng"])
    resumed = ckpt is not None
    model = ray.train.torch.prepare_model(objective, parallel_strategy_kwargs=config.get("ddp_kwargs") or None)
    if ts is not None and ts.get("optimizer") is not None:
        optimizer.load_state_dict(ts["optimizer"])  # after the move: state follows the parameters' device

    val = None
    if rank == 0 and config.get("val_uri"):
        try:
            val = _ValShards(config["val_uri"], int(config.get("val_max_images") or DEFAULT_VAL_IMAGES))
            if not val.has_masks:
                val = None
        except (FileNotFoundError, ValueError) as e:
            print(f"[wsss.train] validation disabled: {common.redact(e)}", file=sys.stderr)
            val = None

    shard = ray.train.get_dataset_shard("train")
    ingest = config.get("ingest") or DEFAULT_INGEST
    prefetch = int(config.get("prefetch_batches", DEFAULT_PREFETCH_BATCHES))
    transform = TrainTransform(cfg.data, seed=cfg.seed) if ingest == "worker" else None
    collate = None
    if ingest != "worker":
        from cluster.ingest import TrainCollate, take_good

        collate = TrainCollate()
    rejects: list[tuple[str, str]] = []
    warmup = int(config.get("warmup_steps", DEFAULT_WARMUP_STEPS))
    ckpt_every = int(config.get("checkpoint_every") or 0)
    # ray.train.get_preemption_info exists from Ray 2.60 on; older Ray: no just-in-time checkpoints
    preempt_every = int(config.get("preemption_check_every") or 0) if hasattr(ray.train, "get_preemption_info") else 0
    on_step, on_epoch = hooks.get("on_step"), hooks.get("on_epoch")  # test seams: callables, never set by the CLI
    saved_for_preemption = False
    all_rejects: list[tuple[str, str]] = []  # every rank's rejects, gathered at epoch ends
    attempt_steps = 0
    last_batch = None
    lr = set_lr(optimizer, cfg, step, total)
    # A mid-epoch checkpoint resumes inside its epoch: that epoch's first `skip` batches are passed over undecoded.
    skip = step - start_epoch * per_epoch

    def report(metrics: dict, epoch_done: int) -> None:
        """Every rank reports (a barrier); rank 0 attaches the checkpoint (plain folder + train_state.pt)."""
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="wsss-ckpt-") as d:
            meta = {"kind": "cam", "class_names": class_names, "step": step, "epoch": epoch_done,
                    "method": cfg.method.name, "attention": cfg.attention, "world_size": world,
                    "run": config.get("run_name")}
            extra = {"optimizer": optimizer.state_dict(), "epoch": epoch_done, "step": step,
                     "history": history, "objective_rng": objective.rng.getstate()}
            out_metrics = dict(metrics)
            out_metrics["history"] = history
            out_metrics["rejects"] = [list(r) for r in (all_rejects or rejects)[:100]]
            save_checkpoint(d, net, cfg, meta=meta, metrics=out_metrics, extra=extra)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))

    for epoch in range(start_epoch, epochs):
        if step >= total:
            break
        model.train()
        rng = np.random.default_rng([cfg.seed, rank, epoch] + ([step] if skip else []))
        sums: dict[str, float] = {}
        n_steps = n_samples = 0
        steady_t = 0.0
        steady_samples = 0
        t0 = time.perf_counter()
        t_prev = t0
        shuffle = int(config.get("shuffle_buffer", -1))
        shuffle = max(2 * bs, 16) if shuffle < 0 else shuffle
        shuffle_kw = {"local_shuffle_buffer_size": shuffle or None,
                      "local_shuffle_seed": (cfg.seed * 1000 + epoch * 10 + rank) if shuffle else None}
        if ingest == "worker":  # decode + augmentation here, on the training worker
            batches = shard.iter_batches(batch_size=bs, batch_format="numpy", drop_last=True,
                                         prefetch_batches=prefetch, **shuffle_kw)
        else:  # decoded and augmented by Ray Data's map_batches tasks; prefetched in a background thread
            batches = shard.iter_torch_batches(batch_size=bs, drop_last=True, prefetch_batches=prefetch,
                                               collate_fn=collate, **shuffle_kw)
        for raw in batches:
            if step >= total:
                break
            if skip > 0:
                skip -= 1
                continue
            if ingest == "worker":
                batch = decode_batch(raw, transform, rng, rejects)
            else:
                batch = take_good(raw, rejects)
            if batch is None:  # every item bad: keep the workers in step with the last good batch
                if last_batch is None:
                    raise ValueError(f"shards {config.get('shards_uri')}: a whole batch failed to decode "
                                     f"(first: {rejects[-1][0]}: {rejects[-1][1]})")
                batch = last_batch
            last_batch = batch
            lr = set_lr(optimizer, cfg, step, total)
            _, m = train_step(model, batch, cfg, optimizer, device, scaler)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
            n_steps += 1
            n_samples += len(batch["id"])
            step += 1
            attempt_steps += 1
            now = time.perf_counter()
            if attempt_steps > warmup:
                steady_t += now - t_prev
                steady_samples += len(batch["id"])
            t_prev = now
            if on_step is not None:
                on_step({"rank": rank, "step": step, "epoch": epoch, "resumed": resumed, "ids": list(batch["id"])})
            # Just-in-time checkpoint when a node of this run is about to be preempted (a barrier: every rank
            # checks at the same steps), then keep training until Ray Train restarts the group.
            jit = False
            if preempt_every and step % preempt_every == 0 and not saved_for_preemption:
                jit = ray.train.get_preemption_info() is not None
                saved_for_preemption = jit
            if step < total and step % per_epoch and (jit or (ckpt_every and step % ckpt_every == 0)):
                report({"step": step, "epoch": epoch, "mid_epoch": True, "preemption": jit, "lr": lr,
                        "loss": sums.get("loss", 0.0) / max(n_steps, 1)}, epoch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rejects[:] = list(dict.fromkeys(rejects))  # a bad image comes back every epoch: keep it once
        all_rejects = _gather_rejects(rejects)
        keys = sorted(sums)
        red = _all_reduce([sums[k] for k in keys] + [n_steps, n_samples, steady_samples], device, "sum")
        mx = _all_reduce([dt, steady_t], device, "max")
        g_steps = max(red[len(keys)], 1.0)
        metrics: dict[str, Any] = {k: red[i] / g_steps for i, k in enumerate(keys)}
        g_samples, g_steady = red[len(keys) + 1], red[len(keys) + 2]
        metrics.update(
            epoch=epoch + 1, step=step, lr=lr, world_size=world,
            samples_per_s=g_samples / max(mx[0], 1e-9),
            steady_samples_per_s=(g_steady / mx[1]) if mx[1] > 0 else None,
            epoch_seconds=mx[0], start_epoch=start_epoch, resumed=resumed, n_rejects=len(all_rejects),
            ingest=ingest)
        if "loss" in metrics:
            metrics["neg_loss"] = -metrics["loss"]
        if val is not None:
            from wsss.train import evaluate_cams

            ev = evaluate_cams(net, cfg, val, max_images=len(val.ids), scales=[1.0], flip=False)
            metrics["val_cam_miou"] = float(ev["miou"])
            metrics["val_best_threshold"] = float(ev["best_threshold"])
            metrics["val_images"] = int(ev["n_images"])
        history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float, bool)) or v is None})
        report(metrics, epoch + 1)
        if on_epoch is not None:
            on_epoch({"rank": rank, "step": step, "epoch": epoch + 1, "resumed": resumed})


# ---- driver side ----------------------------------------------------------------------------------------

def plan_steps(cfg, n_images: int, num_workers: int) -> tuple[int, int]:
    """(steps per epoch, total steps) with ``num_workers`` workers of ``cfg.optim.batch_size`` each: Ray Data's
    equal split gives each worker floor(n / workers) rows, batches drop the remainder."""
    world = max(1, int(num_workers))
    per_epoch = (n_images // world) // cfg.optim.batch_size
    total = per_epoch * cfg.optim.epochs
    if cfg.optim.max_steps:
        total = min(total, cfg.optim.max_steps)
    return per_epoch, total


def training_plan(num_workers: int, cpus_per_worker: float = 1, use_gpu: bool = False) -> list:
    """The Train worker group as ``(what, count, bundle)`` for ``cluster.resources.check_plan``."""
    bundle = {"CPU": float(cpus_per_worker), **({"GPU": 1.0} if use_gpu else {})}
    return [("Ray Train worker", int(num_workers), bundle)]


def export_final(checkpoint, storage_uri: str, name: str) -> str:
    """Copy the plain checkpoint files of a Ray ``Checkpoint`` to ``<storage>/<name>/final/``; returns the URI."""
    import pyarrow.fs as pafs

    from wsss.data import fs as wfs

    dst_uri = wfs.join(storage_uri, name, "final")
    dst_fs, dst_path = common.pyarrow_fs(dst_uri)
    dst_fs.create_dir(dst_path, recursive=True)
    src_fs, src_path = checkpoint.filesystem, checkpoint.path
    for fname in CKPT_FILES[1:] + CKPT_FILES[:1]:  # model.pt last: a folder with model.pt is complete
        src = f"{src_path.rstrip('/')}/{fname}"
        info = src_fs.get_file_info(src)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"checkpoint {src_path}: missing {fname}")
        with src_fs.open_input_stream(src) as fin:
            data = fin.read()
        with dst_fs.open_output_stream(f"{dst_path.rstrip('/')}/{fname}") as fout:
            fout.write(data)
    return dst_uri


def _checkpoint_uri(checkpoint, storage_uri: str) -> str:
    """A user-facing URI of a Ray checkpoint (s3:// for S3 storage)."""
    from wsss.data import fs as wfs

    path = checkpoint.path
    if wfs.is_remote(storage_uri):
        return "s3://" + path.lstrip("/")
    return path


def build_trainer(cfg, shards_uri: str, storage_uri: str, name: str, num_workers: int = 2, use_gpu: bool = False,
                  cpus_per_worker: float = 1, max_failures: int = 2, val_uri: str | None = None, *,
                  dist_timeout_s: int = 600, val_max_images: int = DEFAULT_VAL_IMAGES,
                  warmup_steps: int = DEFAULT_WARMUP_STEPS, callbacks: list | None = None,
                  hooks: dict | None = None, num_to_keep: int = 2, shuffle_buffer: int = -1,
                  ddp_kwargs: dict | None = None, checkpoint_every: int = 0,
                  preemption_check_every: int = DEFAULT_PREEMPTION_CHECK_EVERY, ingest: str = DEFAULT_INGEST,
                  reader: str = "auto", prefetch_batches: int = DEFAULT_PREFETCH_BATCHES,
                  decode_cpus: float = 1.0, decode_batch_size: int = 16):
    """The ``TorchTrainer`` of a run (not started). Returns (trainer, plan dict).

    ``checkpoint_every``: also checkpoint every N global steps inside an epoch (0: at epoch ends only); a restart
    then repeats at most N steps. ``preemption_check_every``: every N steps all ranks ask
    ``ray.train.get_preemption_info()`` (a barrier) and checkpoint at once when a node is about to go (0: never).
    ``hooks``: callables ``on_step(info)`` / ``on_epoch(info)`` (info: rank, step, epoch, resumed) run on every
    worker; a seam for tests (fault injection), never set by the CLI. ``shuffle_buffer`` is Ray Data's local
    shuffle buffer in rows (-1: max(2 x batch, 16), 0: off); ``ddp_kwargs`` go to DistributedDataParallel
    (e.g. ``{"find_unused_parameters": True}``).

    Input (``ingest``): ``"data"`` (default) reads the shards with ``cluster.ingest.train_dataset`` (files shuffled
    per epoch with a seeded ``FileShuffleConfig``, decode + ``TrainTransform`` in ``map_batches`` tasks of
    ``decode_cpus`` CPUs each, ``decode_batch_size`` rows per task batch) and the workers iterate
    ``iter_torch_batches(prefetch_batches=...)``; order is preserved (``cluster.ingest.ingest_options``) so a seeded
    run gives every rank the same batches. ``"worker"``: the raw rows are split and every worker decodes and
    augments them itself (the earlier path; kept for comparison). ``reader``: see ``cluster.ingest.READERS``."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.ingest import ingest_options, read_shards, train_dataset
    from wsss.data import shards

    manifest = shards.read_manifest(shards_uri)
    class_names = list(manifest["class_names"])
    n_images = int(manifest["n_images"])
    per_epoch, total = plan_steps(cfg, n_images, num_workers)
    if per_epoch < 1:
        raise ValueError(f"shards {shards_uri}: {n_images} images are too few for {num_workers} worker(s) x "
                         f"batch {cfg.optim.batch_size} (lower optim.batch_size or --num-workers)")
    if ingest not in INGESTS:
        raise ValueError(f"unknown ingest {ingest!r} (choose from {', '.join(INGESTS)})")
    if ingest == "data":
        ds = train_dataset(shards_uri, cfg.data, seed=cfg.seed, reader=reader, decode_batch_size=decode_batch_size,
                           decode_num_cpus=decode_cpus)
        data_config = DataConfig(execution_options={"train": ingest_options()})
    else:
        ds = read_shards(shards_uri, columns=["id", "image", "labels"], reader=reader, shuffle_seed=cfg.seed)
        data_config = DataConfig()
    storage_path, storage_fs = common.storage_for_ray(storage_uri)
    resources = {"CPU": float(cpus_per_worker)} if cpus_per_worker else {}
    config = {
        "cfg": cfg.to_dict(), "class_names": class_names, "steps_per_epoch": per_epoch, "total_steps": total,
        "val_uri": val_uri, "val_max_images": val_max_images, "warmup_steps": warmup_steps,
        "torch_threads": max(1, int(cpus_per_worker)) if not use_gpu else 0, "run_name": name,
        "shards_uri": shards_uri, "hooks": dict(hooks or {}), "shuffle_buffer": int(shuffle_buffer),
        "ddp_kwargs": dict(ddp_kwargs or {}), "checkpoint_every": int(checkpoint_every),
        "preemption_check_every": int(preemption_check_every), "ingest": ingest,
        "prefetch_batches": int(prefetch_batches),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(dist_timeout_s)),
        scaling_config=ScalingConfig(num_workers=int(num_workers), use_gpu=bool(use_gpu),
                                     resources_per_worker=resources or None),
        run_config=RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
            failure_config=FailureConfig(max_failures=int(max_failures)),
            worker_runtime_env=common.worker_runtime_env(),
            callbacks=list(callbacks or []),
        ),
        datasets={"train": ds},
        dataset_config=data_config,
    )
    plan = {"n_images": n_images, "class_names": class_names, "steps_per_epoch": per_epoch, "total_steps": total,
            "num_workers": int(num_workers), "ingest": ingest}
    return trainer, plan


def run_training(cfg, shards_uri: str, storage_uri: str, name: str, num_workers: int = 2, use_gpu: bool = False,
                 cpus_per_worker: float = 1, max_failures: int = 2, val_uri: str | None = None, *,
                 export: bool = True, **kwargs) -> dict:
    """Train with Ray Train (Ray must be initialised). Returns a dict: name, storage, checkpoint (URI of the last
    Ray checkpoint), final (URI of the exported plain checkpoint folder), metrics (last epoch's), history, plan.
    Re-running with the same ``name`` and ``storage_uri`` resumes from the latest checkpoint."""
    t0 = time.perf_counter()
    trainer, plan = build_trainer(cfg, shards_uri, storage_uri, name, num_workers, use_gpu, cpus_per_worker,
                                  max_failures, val_uri, **kwargs)
    log.info("train %s: %d images, %d worker(s), %d steps/epoch, %d steps, storage %s", name, plan["n_images"],
             plan["num_workers"], plan["steps_per_epoch"], plan["total_steps"], common.redact(storage_uri))
    return fit_result(trainer, storage_uri, name, plan, t0, export)


def fit_result(trainer, storage_uri: str, name: str, plan: dict, t0: float, export: bool, **extra) -> dict[str, Any]:
    """Run ``trainer.fit()`` and describe its result: metrics, the last checkpoint's URI and history, and (with
    ``export``) the exported final model. Shared by the CAM and segmentation training jobs."""
    from wsss.data import fs as wfs

    result = trainer.fit()
    if result.error is not None:  # fit() raises on failure in V2; keep a guard for other versions
        raise result.error
    ckpt = result.checkpoint
    out: dict[str, Any] = {"name": name, "storage": storage_uri, "run_dir": wfs.join(storage_uri, name),
                           "plan": plan, "metrics": dict(result.metrics or {}), **extra, "history": [],
                           "checkpoint": _checkpoint_uri(ckpt, storage_uri) if ckpt is not None else None}
    if ckpt is not None:
        with ckpt.as_directory() as d:
            p = os.path.join(d, "metrics.json")
            if os.path.exists(p):
                with open(p) as f:
                    out["history"] = json.load(f).get("history", [])
        if export:
            out["final"] = export_final(ckpt, storage_uri, name)
    out["seconds"] = time.perf_counter() - t0
    return out


# ---- CLI ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.splitlines()[0])
    common.add_config_args(p)
    p.add_argument("--data", required=True, help="train shard folder (jobs/shard.py output), local or s3://")
    p.add_argument("--val", default=None, help="validation shard folder with masks (CAM mIoU per epoch)")
    p.add_argument("--storage", required=True, help="Ray Train storage: local path or s3://bucket/prefix")
    p.add_argument("--name", required=True, help="run name; re-running with the same name resumes")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts from the last checkpoint")
    p.add_argument("--val-images", type=int, default=DEFAULT_VAL_IMAGES, help="validation images per epoch")
    p.add_argument("--dist-timeout", type=int, default=600, help="torch.distributed timeout (s)")
    p.add_argument("--checkpoint-every", type=int, default=DEFAULT_CHECKPOINT_EVERY,
                   help=f"also checkpoint every N steps inside an epoch (0: epoch ends only; default "
                        f"{DEFAULT_CHECKPOINT_EVERY}); a restarted worker group repeats at most N steps")
    p.add_argument("--preemption-check-every", type=int, default=DEFAULT_PREEMPTION_CHECK_EVERY,
                   help="steps between ray.train.get_preemption_info() checks (just-in-time checkpoint; 0: off)")
    p.add_argument("--ingest", choices=INGESTS, default=DEFAULT_INGEST,
                   help="data: decode + augmentation in Ray Data map_batches tasks (default); worker: on each "
                        "training worker")
    p.add_argument("--reader", default="auto", help="shard reader: auto (= parquet), parquet, parquet-v1, items")
    p.add_argument("--prefetch-batches", type=int, default=DEFAULT_PREFETCH_BATCHES,
                   help="batches each worker fetches ahead (iter_torch_batches)")
    p.add_argument("--decode-cpus", type=float, default=1.0, help="CPUs per decode/augment task (--ingest data)")
    p.add_argument("--no-export", action="store_true", help="do not write <storage>/<name>/final/")
    common.add_cluster_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from wsss.config import ConfigError

    args = build_parser().parse_args(argv)
    cfg = common.start_job(args, "train")
    if cfg is None:
        return 2
    from cluster import resources as cres

    try:
        # The worker group must fit what the cluster can scale to; the autoscaler is asked for it up front.
        plan = training_plan(args.num_workers, args.cpus_per_worker, args.use_gpu)
        capacity = cres.resolve_capacity(args.max_resources, args.cluster_config)
        cres.check_plan(plan, capacity)
        requested = capacity.autoscaling and cres.request_bundles(cres.expand(plan))
        res = run_training(cfg, args.data, args.storage, args.name, num_workers=args.num_workers,
                           use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
                           max_failures=args.max_failures, val_uri=args.val, export=not args.no_export,
                           val_max_images=args.val_images, dist_timeout_s=args.dist_timeout,
                           checkpoint_every=args.checkpoint_every,
                           preemption_check_every=args.preemption_check_every, ingest=args.ingest,
                           reader=args.reader, prefetch_batches=args.prefetch_batches,
                           decode_cpus=args.decode_cpus)
        if requested:
            cres.release_request()
    except (FileNotFoundError, ValueError, ConfigError) as e:
        print(f"train: error: {common.redact(str(e).splitlines()[0] if str(e) else type(e).__name__)}",
              file=sys.stderr)
        return 2
    m = res["metrics"]
    summary = {"name": res["name"], "epoch": m.get("epoch"), "step": m.get("step"), "loss": m.get("loss"),
               "val_cam_miou": m.get("val_cam_miou"), "samples_per_s": m.get("samples_per_s"),
               "checkpoint": res["checkpoint"], "final": res.get("final"), "seconds": round(res["seconds"], 1)}
    print(common.dump_json_line(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
