"""Segmentation training on Ray Train (V2): ``python -m jobs.train_seg --config CFG --data SHARDS [--labels URI]
--storage URI --name RUN``.

The training images are a shard set (``jobs/shard.py``); the labels are a pseudo-label folder or s3:// prefix
(``--labels``, else ``data.labels``; none = the shards' own masks). Before training one Ray Data pass attaches each
row's label PNG and validates it (present, same size as the image, class indices < the dataset's): bad rows go to
the rejects list with their reason and the rest trains; a label folder that declares another class list is a
one-line error first (``wsss.seg.data.check_label_folder``). The validated rows are materialised once and split
across the workers (``ray.train.get_dataset_shard``).

Each worker runs the one-process step (``wsss.seg.train.seg_train_step``: the SegNet under DDP, poly lr,
autocast / GradScaler on CUDA) on its split, decoding and augmenting its rows itself (``wsss.seg.data.seg_augment``).
Every ``--checkpoint-every`` steps (default: once per epoch of the split) all workers report; rank 0 attaches a
checkpoint folder in the format of ``wsss train-seg`` plus ``train_state.pt`` (optimizer, step, epoch, history)
and, with ``--val``, the single-scale mIoU of a few validation images. Storage, resumption and fault tolerance are
those of ``jobs.train``: ``RunConfig(name, storage_path, storage_filesystem)`` (local or s3://, last 2 checkpoints
kept), ``FailureConfig(max_failures)``, and re-running with the same ``--name`` resumes from the last checkpoint's
step (the interrupted epoch's data order restarts). The final weights go to ``<storage>/<name>/final/``, a plain
checkpoint folder that ``wsss predict-seg --checkpoint`` accepts.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from typing import Any

import numpy as np

from jobs import common
from jobs.train import DEFAULT_WARMUP_STEPS, _all_reduce, _load_resume_state, _ValShards, fit_result

log = logging.getLogger("wsss.jobs.train_seg")

SHARD_COLUMNS = ["id", "image", "mask", "width", "height"]
DEFAULT_VAL_IMAGES = 8


# ---- data (Ray Data tasks) ------------------------------------------------------------------------------

def attach_labels(batch: dict, labels_root: str | None, num_classes: int) -> dict:
    """Shard rows -> (id, image, label PNG bytes, status, reason): the label from ``labels_root`` (through
    ``wsss.seg.data.label_uri``) or the row's mask, validated against the row's size and the class count."""
    from wsss.data import fs
    from wsss.data.io import BadItem, decode_mask
    from wsss.seg.data import label_uri

    ids = [str(i) for i in batch["id"]]
    labels, status, reason = [], [], []
    for k, item_id in enumerate(ids):
        hw = (int(batch["height"][k]), int(batch["width"][k]))
        try:
            if labels_root:
                uri = label_uri(labels_root, item_id)
                try:
                    data = fs.read_bytes(uri)
                except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                    raise BadItem(f"{uri}: label PNG missing") from None
            else:
                uri = f"{item_id} mask"
                data = batch["mask"][k]
                if data is None:
                    raise BadItem(f"id {item_id}: no ground-truth mask in the shards")
                data = bytes(data)
            decode_mask(data, uri, expected_hw=hw, num_classes=num_classes)
            labels.append(data)
            status.append("ok")
            reason.append("")
        except BadItem as e:
            labels.append(b"")
            status.append("rejected")
            reason.append(str(e).splitlines()[0][:500])
    obj = lambda v: np.array(v, dtype=object)  # noqa: E731
    return {"id": obj(ids), "image": obj([bytes(b) for b in batch["image"]]), "label": obj(labels),
            "status": obj(status), "reason": obj(reason)}


def decode_seg_batch(raw: dict, cfg, rng, rejects: list, source: str = "shards") -> dict | None:
    """Ray Data numpy batch (id, image bytes, label PNG bytes) -> {"image": (B,3,crop,crop), "label": (B,crop,crop),
    "id"}; a row that fails to decode goes to ``rejects``; None when no row is usable."""
    import torch

    from wsss.data.io import BadItem, decode_image, decode_mask
    from wsss.seg.data import seg_augment

    xs, ys, ids = [], [], []
    for item_id, img_b, lab_b in zip(raw["id"], raw["image"], raw["label"]):
        item_id = str(item_id)
        try:
            img = decode_image(bytes(img_b), f"{source}:{item_id}")
            lab = decode_mask(bytes(lab_b), f"{source}:{item_id} label", expected_hw=img.shape[:2])
        except BadItem as e:
            rejects.append((item_id, str(e).splitlines()[0]))
            continue
        x, y = seg_augment(img, lab, cfg.data.crop, cfg.data.scales, cfg.data.flip, rng)
        xs.append(x)
        ys.append(y)
        ids.append(item_id)
    if not xs:
        return None
    return {"image": torch.stack(xs), "label": torch.stack(ys), "id": ids}


# ---- worker ---------------------------------------------------------------------------------------------

def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function (one per rank)."""
    import torch

    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from wsss.checkpoint import save_checkpoint
    from wsss.seg.config import seg_from_dict
    from wsss.seg.models import build_seg_model
    from wsss.seg.train import seg_meta, seg_train_step
    from wsss.train import build_optimizer, grad_scaler, seed_everything, set_lr

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = seg_from_dict(config["cfg"])
    hooks = config.get("hooks") or {}
    class_names = list(config["class_names"])
    total, every = int(config["total_steps"]), int(config["checkpoint_every"])
    bs = cfg.optim.batch_size
    threads = int(config.get("torch_threads") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    device = ray.train.torch.get_device()
    cfg.device = str(device) if device.type == "cuda" else "cpu"

    seed_everything(cfg.seed)
    net = build_seg_model(cfg, len(class_names))
    optimizer = build_optimizer(net, cfg)
    scaler = grad_scaler(device, cfg.optim.amp)
    step, epoch, history = 0, 0, []
    ckpt = ray.train.get_checkpoint()
    ts = _load_resume_state(ckpt, net) if ckpt is not None else None
    if ts is not None:
        step, epoch, history = int(ts["step"]), int(ts["epoch"]), list(ts.get("history", []))
    resumed, start_step = ckpt is not None, step
    model = ray.train.torch.prepare_model(net)
    if ts is not None and ts.get("optimizer") is not None:
        optimizer.load_state_dict(ts["optimizer"])

    val = None
    if rank == 0 and config.get("val_uri"):
        try:
            val = _ValShards(config["val_uri"], int(config.get("val_max_images") or DEFAULT_VAL_IMAGES))
            val = val if val.has_masks else None
        except (FileNotFoundError, ValueError) as e:
            print(f"[wsss.train_seg] validation disabled: {common.redact(e)}", file=sys.stderr)

    shard = ray.train.get_dataset_shard("train")
    rejects: list[tuple[str, str]] = []
    warmup = int(config.get("warmup_steps", DEFAULT_WARMUP_STEPS))
    step_sleep = float(hooks.get("step_sleep", 0.0))
    fail_after = hooks.get("fail_after_step")
    last_batch = None
    loss_sum, n_steps, n_samples, steady_t, steady_n, attempt = 0.0, 0, 0, 0.0, 0, 0
    t_win = time.perf_counter()
    lr = set_lr(optimizer, cfg, step, total)
    model.train()
    while step < total:
        rng = np.random.default_rng([cfg.seed, rank, epoch])
        shuffle = max(2 * bs, 16)
        for raw in shard.iter_batches(batch_size=bs, batch_format="numpy", drop_last=True,
                                      local_shuffle_buffer_size=shuffle,
                                      local_shuffle_seed=cfg.seed * 1000 + epoch * 10 + rank):
            if step >= total:
                break
            t_prev = time.perf_counter()
            batch = decode_seg_batch(raw, cfg, rng, rejects)
            if batch is None:  # every row bad: keep the workers in step with the last good batch
                if last_batch is None:
                    raise ValueError(f"shards {config.get('shards_uri')}: a whole batch failed to decode "
                                     f"(first: {rejects[-1][0]}: {rejects[-1][1]})")
                batch = last_batch
            last_batch = batch
            lr = set_lr(optimizer, cfg, step, total)
            loss_sum += seg_train_step(model, batch, cfg, optimizer, device, scaler)
            if step_sleep:
                time.sleep(step_sleep)
            step += 1
            attempt += 1
            n_steps += 1
            n_samples += len(batch["id"])
            if attempt > warmup:
                steady_t += time.perf_counter() - t_prev
                steady_n += len(batch["id"])
            if step % every and step != total:
                continue
            # ---- report (every rank, same steps) ----
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t_win
            red = _all_reduce([loss_sum, n_steps, n_samples, steady_n], device, "sum")
            mx = _all_reduce([dt, steady_t], device, "max")
            metrics: dict[str, Any] = {
                "step": step, "epoch": epoch + 1, "loss": red[0] / max(red[1], 1.0), "lr": lr, "world_size": world,
                "images_per_s": red[2] / max(mx[0], 1e-9),
                "steady_images_per_s": (red[3] / mx[1]) if mx[1] > 0 else None,
                "resumed": resumed, "start_step": start_step, "n_rejects": len(rejects)}
            if val is not None:
                from wsss.seg.predict import evaluate_seg

                ev = evaluate_seg(net, cfg, val, ["single"])
                metrics["val_miou"] = float(ev["single"]["miou"])
                metrics["val_images"] = int(ev["n_images"])
                model.train()
            history.append(dict(metrics))
            if rank == 0:
                with tempfile.TemporaryDirectory(prefix="wsss-seg-ckpt-") as d:
                    meta = seg_meta(cfg, class_names, step, epoch=epoch + 1, world_size=world,
                                    run=config.get("run_name"))
                    extra = {"optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                             "history": history}
                    out_metrics = dict(metrics, history=history, rejects=rejects[:100],
                                       data_rejects=config.get("data_rejects", [])[:100])
                    save_checkpoint(d, net, cfg, meta=meta, metrics=out_metrics, extra=extra)
                    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics, checkpoint=None)
            loss_sum, n_steps, n_samples, steady_t, steady_n = 0.0, 0, 0, 0.0, 0
            t_win = time.perf_counter()
            # ---- test hook (fault injection; never set by the CLI) ----
            if fail_after is not None and not resumed and step >= int(fail_after) and rank == 0:
                ray.train.get_all_reported_checkpoints(timeout_s=120)
                raise RuntimeError(f"injected failure after step {step} (test hook)")
        epoch += 1


# ---- driver ---------------------------------------------------------------------------------------------

def prepare_data(shards_uri: str, labels: str | None, class_names: list[str], batch_size: int = 16):
    """(materialised Ray Dataset of ok rows (id, image, label), rejects [(id, reason)], n_ok)."""
    from cluster.storage import read_shards_ray
    from wsss.seg.data import check_label_folder

    if labels:
        check_label_folder(labels, class_names)
    ds = read_shards_ray(shards_uri, columns=SHARD_COLUMNS)
    ds = ds.map_batches(attach_labels, batch_format="numpy", batch_size=batch_size,
                        fn_kwargs={"labels_root": labels, "num_classes": len(class_names)}).materialize()
    status = ds.select_columns(["id", "status", "reason"]).take_all()
    rejects = [(r["id"], r["reason"]) for r in status if r["status"] != "ok"]
    n_ok = len(status) - len(rejects)
    ok = ds.filter(lambda r: r["status"] == "ok").select_columns(["id", "image", "label"])
    return ok, rejects, n_ok


def run_train_seg(cfg, shards_uri: str, storage_uri: str, name: str, labels: str | None = None,
                  num_workers: int = 2, use_gpu: bool = False, cpus_per_worker: float = 1, max_failures: int = 2,
                  val_uri: str | None = None, checkpoint_every: int | None = None, *, export: bool = True,
                  dist_timeout_s: int = 600, val_max_images: int = DEFAULT_VAL_IMAGES, hooks: dict | None = None,
                  num_to_keep: int = 2) -> dict:
    """Train on Ray Train (Ray must be initialised). Returns name, storage, checkpoint, final, metrics, history,
    plan, rejects. Re-running with the same ``name`` and ``storage_uri`` resumes."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from wsss.data.shards import read_manifest

    t0 = time.perf_counter()
    labels = labels or cfg.data.labels or None
    cfg.data.labels = labels
    class_names = list(read_manifest(shards_uri)["class_names"])
    ds, rejects, n_ok = prepare_data(shards_uri, labels, class_names)
    world = max(1, int(num_workers))
    per_epoch = (n_ok // world) // cfg.optim.batch_size
    if per_epoch < 1:
        first = f" (first reject: {rejects[0][0]}: {rejects[0][1]})" if rejects else ""
        raise ValueError(f"shards {shards_uri}: {n_ok} usable labelled images are too few for {world} worker(s) x "
                         f"batch {cfg.optim.batch_size}{first}")
    total = int(cfg.optim.max_steps)
    every = int(checkpoint_every or per_epoch)
    storage_path, storage_fs = common.storage_for_ray(storage_uri)
    config = {"cfg": cfg.to_dict(), "class_names": class_names, "total_steps": total, "checkpoint_every": every,
              "val_uri": val_uri, "val_max_images": val_max_images, "run_name": name, "shards_uri": shards_uri,
              "torch_threads": max(1, int(cpus_per_worker)) if not use_gpu else 0, "hooks": dict(hooks or {}),
              "data_rejects": [list(r) for r in rejects]}
    resources = {"CPU": float(cpus_per_worker)} if cpus_per_worker else None
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(dist_timeout_s)),
        scaling_config=ScalingConfig(num_workers=world, use_gpu=bool(use_gpu), resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
                             failure_config=FailureConfig(max_failures=int(max_failures)),
                             worker_runtime_env=common.worker_runtime_env()),
        datasets={"train": ds})
    plan = {"n_images": n_ok + len(rejects), "n_train": n_ok, "n_rejects": len(rejects), "class_names": class_names,
            "steps_per_epoch": per_epoch, "total_steps": total, "checkpoint_every": every, "num_workers": world}
    log.info("train-seg %s: %d labelled images (%d rejected), %d worker(s), %d steps, storage %s", name, n_ok,
             len(rejects), world, total, common.redact(storage_uri))
    return fit_result(trainer, storage_uri, name, plan, t0, export, rejects=rejects)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.train_seg", description=__doc__.splitlines()[0])
    common.add_config_args(p)
    p.add_argument("--data", required=True, help="train shard folder (jobs/shard.py output), local or s3://")
    p.add_argument("--labels", default=None, help="pseudo-label folder / s3:// prefix (default: data.labels; "
                                                  "none: the shards' masks)")
    p.add_argument("--val", default=None, help="validation shard folder with masks (mIoU at each checkpoint)")
    p.add_argument("--storage", required=True, help="Ray Train storage: local path or s3://bucket/prefix")
    p.add_argument("--name", required=True, help="run name; re-running with the same name resumes")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts from the last checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default: epoch)")
    p.add_argument("--val-images", type=int, default=DEFAULT_VAL_IMAGES)
    p.add_argument("--dist-timeout", type=int, default=600, help="torch.distributed timeout (s)")
    p.add_argument("--no-export", action="store_true", help="do not write <storage>/<name>/final/")
    common.add_cluster_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from wsss.config import ConfigError
    from wsss.seg.config import load_seg_config

    args = build_parser().parse_args(argv)
    common.setup_logging(args.log_level)
    try:
        cfg = load_seg_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"train-seg: error: {e}", file=sys.stderr)
        return 2
    common.init_ray(common.resolve_address(args.cluster, args.address), num_cpus=args.num_cpus)
    common.quiet_data_progress()
    try:
        res = run_train_seg(cfg, args.data, args.storage, args.name, labels=args.labels,
                            num_workers=args.num_workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
                            max_failures=args.max_failures, val_uri=args.val, checkpoint_every=args.checkpoint_every,
                            export=not args.no_export, val_max_images=args.val_images,
                            dist_timeout_s=args.dist_timeout)
    except (FileNotFoundError, ValueError, ConfigError) as e:
        print(f"train-seg: error: {common.redact(str(e).splitlines()[0] if str(e) else type(e).__name__)}",
              file=sys.stderr)
        return 2
    m = res["metrics"]
    print(common.dump_json_line({"name": res["name"], "step": m.get("step"), "loss": m.get("loss"),
                                 "val_miou": m.get("val_miou"), "images_per_s": m.get("images_per_s"),
                                 "n_rejects": len(res["rejects"]), "checkpoint": res["checkpoint"],
                                 "final": res.get("final"), "seconds": round(res["seconds"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
