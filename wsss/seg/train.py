"""Training the segmentation network on pseudo labels (or masks) in one process; the step the Ray workers share.

Optimisation (deeplab-pytorch's VOC settings, configs/seg_deeplabv2_voc.yaml): SGD momentum 0.9, weight decay
5e-4, lr 2.5e-4 with the head x10 and its biases x20 without decay (``SegNet.param_groups``), poly 0.9 over
``optim.max_steps`` (``wsss.train.set_lr``), pixel cross-entropy with 255 ignored (:func:`wsss.seg.models.seg_loss`),
mixed precision on CUDA only (``wsss.train.autocast`` / ``grad_scaler`` / ``backward_step``).

Checkpoint folder (local or s3://, ``wsss.checkpoint.save_checkpoint``): ``model.pt`` (state_dict of the
:class:`wsss.seg.models.SegNet`), ``config.yaml`` (the resolved SegConfig), ``meta.json`` (``kind: seg``,
class_names, step, arch, backbone, labels), ``metrics.json`` (loss history, val mIoU per protocol, rejects).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from wsss.seg.config import SegConfig, resolve_device
from wsss.seg.models import build_seg_model, seg_loss

__all__ = ["seg_train_step", "prepare_training", "train_seg", "seg_meta"]


def seg_train_step(model, batch: dict, cfg: SegConfig, optimizer=None, device=None, scaler=None) -> float:
    """Forward (+ backward and SGD step with an optimizer) of one batch; returns the loss."""
    from wsss.train import autocast, backward_step

    device = device or next(model.parameters()).device
    image = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    with autocast(device, cfg.optim.amp):
        logits = model(image)
    loss = seg_loss(logits, label)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"segmentation loss is {loss.item()}")
    if optimizer is not None:
        backward_step(loss, optimizer, [p for p in model.parameters() if p.requires_grad], cfg.optim.clip_grad_norm,
                      scaler)
    return float(loss.detach())


def prepare_training(cfg: SegConfig, dataset=None):
    """(image dataset, LabelSource, usable ids, rejects): opens the data, checks the label folder against the
    dataset's classes (one-line LabelFolderError) and, with ``data.check_labels``, reads every label once."""
    from wsss.seg.data import LabelSource, check_label_folder, open_images, scan_labels

    if dataset is None:
        dataset = open_images(cfg.data.root, cfg.data.train_split, layout=cfg.data.layout)
    if not dataset.class_names:
        raise ValueError(f"{cfg.data.root}: no class list (a training set needs classes.txt or a VOC layout)")
    if cfg.data.labels:
        check_label_folder(cfg.data.labels, list(dataset.class_names))
    source = LabelSource(dataset, cfg.data.labels or None)
    rejects = [tuple(r) for r in getattr(dataset, "rejects", []) or []]
    ids = list(dataset.ids)
    if cfg.data.check_labels:
        ids, bad = scan_labels(dataset, source, ids)
        rejects += bad
    if not ids:
        first = f" (first: {rejects[0][0]}: {rejects[0][1]})" if rejects else ""
        raise ValueError(f"no usable training labels in {source.name} for {cfg.data.root}{first}")
    return dataset, source, ids, rejects


def seg_meta(cfg: SegConfig, class_names, step: int, **extra) -> dict:
    return {"kind": "seg", "class_names": list(class_names), "step": int(step), "arch": cfg.model.arch,
            "backbone": cfg.model.backbone, "output_stride": cfg.model.output_stride,
            "labels": cfg.data.labels or "ground truth", **extra}


def _open_val(cfg: SegConfig):
    from wsss.seg.data import open_images

    if not cfg.data.val_split:
        return None
    try:
        ds = open_images(cfg.data.root, cfg.data.val_split, layout=cfg.data.layout)
    except (FileNotFoundError, ValueError):
        return None
    return ds if getattr(ds, "has_masks", False) else None


def train_seg(cfg: SegConfig, out: str | None = None, dataset=None, val_dataset=None, progress: bool = True,
              evaluate: bool = True, protocols=None) -> dict:
    """Train the configured network in one process and write a checkpoint folder to ``out`` (default cfg.out).
    Returns {"steps", "train_seconds", "images_per_s", "history", "rejects", "val": evaluate_seg(...) or None,
    "checkpoint"}."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from wsss.checkpoint import save_checkpoint
    from wsss.seg.data import SegTrainDataset
    from wsss.seg.predict import evaluate_seg
    from wsss.train import build_optimizer, grad_scaler, seed_everything, set_lr

    out = out or cfg.out
    seed_everything(cfg.seed)
    device = resolve_device(cfg)
    dataset, source, ids, rejects = prepare_training(cfg, dataset)
    if val_dataset is None and evaluate:
        val_dataset = _open_val(cfg)
    train_ds = SegTrainDataset(dataset, source, cfg.data, ids=ids, seed=cfg.seed)
    bs = min(cfg.optim.batch_size, len(train_ds))
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train_ds, batch_size=bs, shuffle=True, drop_last=True, num_workers=cfg.data.num_workers,
                        generator=gen, pin_memory=device.type == "cuda", persistent_workers=cfg.data.num_workers > 0)
    model = build_seg_model(cfg, dataset.num_classes).to(device)
    optimizer = build_optimizer(model, cfg)
    scaler = grad_scaler(device, cfg.optim.amp)
    total = int(cfg.optim.max_steps)
    history: list[dict] = []
    log_every = max(1, min(100, total // 10))
    step, run_loss, run_n, t_win = 0, 0.0, 0, time.perf_counter()
    t_start = time.perf_counter()
    bar = tqdm(total=total, desc=f"train-seg {cfg.model.arch}/{cfg.model.backbone}", disable=not progress,
               unit="step")
    model.train()
    while step < total:
        for batch in loader:
            if step >= total:
                break
            lr = set_lr(optimizer, cfg, step, total)
            loss = seg_train_step(model, batch, cfg, optimizer, device, scaler)
            step += 1
            run_loss += loss
            run_n += 1
            bar.update(1)
            if step % log_every == 0 or step == total:
                now = time.perf_counter()
                rec = {"step": step, "loss": run_loss / run_n, "lr": lr,
                       "images_per_s": run_n * bs / max(now - t_win, 1e-9)}
                if cfg.eval.every and val_dataset is not None and step % cfg.eval.every == 0:
                    ev = evaluate_seg(model, cfg, val_dataset, ["single"], max_images=cfg.eval.val_images)
                    rec["val_miou"] = ev["single"]["miou"]
                    model.train()
                history.append(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.2e}")
                run_loss, run_n, t_win = 0.0, 0, time.perf_counter()
    bar.close()
    train_seconds = time.perf_counter() - t_start
    model.eval()
    rejects += [r for r in train_ds.rejects if r not in rejects]
    result: dict = {"steps": step, "train_seconds": train_seconds, "images_per_s": step * bs / train_seconds,
                    "history": history, "rejects": [list(r) for r in rejects], "n_train": len(ids),
                    "loss_first": history[0]["loss"] if history else None,
                    "loss_last": history[-1]["loss"] if history else None, "val": None}
    if val_dataset is not None:
        result["val"] = evaluate_seg(model, cfg, val_dataset, protocols)
        result["val"]["rejects"] = [list(r) for r in result["val"]["rejects"]]
    save_checkpoint(out, model, cfg, meta=seg_meta(cfg, dataset.class_names, step), metrics=_json_metrics(result))
    result["checkpoint"] = str(out)
    return result


def _json_metrics(result: dict) -> dict:
    from wsss.metrics import json_safe

    return json_safe({k: v for k, v in result.items() if k != "checkpoint"})


def untrained_miou(cfg: SegConfig, dataset, seed: int = 0, protocols=("single",)) -> dict:
    """The same evaluation for an untrained network of the config (the floor a training must beat)."""
    from wsss.seg.predict import evaluate_seg

    torch.manual_seed(seed)
    np.random.seed(seed)
    net = build_seg_model(cfg, dataset.num_classes).eval()
    return evaluate_seg(net, cfg, dataset, list(protocols))
