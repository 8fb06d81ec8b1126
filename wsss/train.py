"""The single-process training loop and the step functions Ray Train workers call.

``Objective`` holds the whole forward of one training step (one or two branches and the losses), so that a
DDP-wrapped objective sees exactly one forward per backward. Methods (``cfg.method.name``):
- ``cam``:  single branch, L_cla only (plain CAM baseline);
- ``er``:   siamese, branch 2 sees A(image); L_cla + L_eq (ER, L1) only: no PCM, no ECR, no background channel;
- ``seam``: siamese, shared weights, branch 2 sees A(image); L_cla + L_rvmin + L_eq (ER) + L_ce (ECR) with PCM,
  computed as SEAM's train_SEAM.py (``method.er_grid: input``: maps upsampled to the input size first);
- ``daen``: ``seam`` + channel-spatial attention (CSM) on the backbone output (attention from cfg.attention);
- ``sse``:  siamese with a scale drawn from ``method.sse_scales``, no PCM, L_cla + L_eq (MSE, as SSENet).
Optimisation as DAEN Sec. 4.1 / SEAM: SGD, poly lr (0.01, power 0.9), new layers x10 (biases x20).
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from wsss import losses
from wsss.config import Config, resolve_device
from wsss.equivariance import make_transform


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """The CAM network (``wsss.models.cam_net.CAMNet``) for ``num_classes`` classes incl. background."""
    from wsss.models.cam_net import CAMNet

    return CAMNet(cfg, num_classes)


class Objective(nn.Module):
    """One training step's forward: returns a dict of scalar tensors (``loss`` and each term)."""

    def __init__(self, net: nn.Module, cfg: Config):
        super().__init__()
        self.net = net
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.steps_seen = 0  # training forwards so far (drives method.warmup_steps)

    def ramp(self) -> float:
        """Weight multiplier of L_eq and L_ce: 1, or a linear warm-up over ``method.warmup_steps``."""
        w = self.cfg.method.warmup_steps
        return 1.0 if w <= 0 else min(1.0, self.steps_seen / w)

    def forward(self, image: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, m = self.cfg, self.cfg.method
        ramp = self.ramp()
        if self.training:
            self.steps_seen += 1
        out1 = self.net(image)
        zero = image.new_zeros(()).float()
        if not cfg.siamese:
            l_cla1 = losses.classification_loss(out1["logits"], labels)
            return {"loss": m.w_cla * l_cla1, "cla": l_cla1, "rvmin": zero, "eq": zero, "ce": zero}
        A = make_transform(m, self.rng)
        image2 = A.apply(image)
        out2 = self.net(image2)
        with_pcm = cfg.uses_pcm and out1.get("cam_rv") is not None and out2.get("cam_rv") is not None
        if m.er_grid == "input":
            # SEAM's network returns cam and cam_rv bilinearly upsampled to its input (align_corners=True), and
            # every loss (the GAP of L_cla included) is computed on those maps
            cam1_raw, cam2_raw = _to_size(out1["cam"], image.shape[-2:]), _to_size(out2["cam"], image2.shape[-2:])
            logits1, logits2 = _gap_fg(cam1_raw), _gap_fg(cam2_raw)
            rv1_raw = _to_size(out1["cam_rv"], image.shape[-2:]) if with_pcm else None
            rv2_raw = _to_size(out2["cam_rv"], image2.shape[-2:]) if with_pcm else None
        else:
            cam1_raw, cam2_raw, logits1, logits2 = out1["cam"], out2["cam"], out1["logits"], out2["logits"]
            rv1_raw, rv2_raw = (out1["cam_rv"], out2["cam_rv"]) if with_pcm else (None, None)
        l_cla = 0.5 * (losses.classification_loss(logits1, labels) + losses.classification_loss(logits2, labels))
        lab = losses.label_mask(labels)
        size2 = cam2_raw.shape[-2:]
        cam1 = A.apply_to(losses.max_norm(cam1_raw), size2) * lab
        cam2 = losses.max_norm(cam2_raw) * lab
        l_eq = losses.equivariant_loss(cam1, cam2, kind="mse" if m.name == "sse" else "l1",
                                       num_classes=m.er_classes)
        l_ce = l_rvmin = zero
        if with_pcm:
            l_rvmin = 0.5 * (losses.adaptive_min_pooling_loss((rv1_raw * lab)[:, 1:])
                             + losses.adaptive_min_pooling_loss((rv2_raw * lab)[:, 1:]))
            rv1 = A.apply_to(losses.max_norm(rv1_raw), size2) * lab
            rv2 = losses.max_norm(rv2_raw) * lab
            l_ce = losses.cross_equivariant_loss(cam1, rv1, cam2, rv2, m.ecr_topk)
        loss = m.w_cla * l_cla + m.w_rvmin * l_rvmin + ramp * (m.w_eq * l_eq + m.w_ce * l_ce)
        return {"loss": loss, "cla": l_cla, "rvmin": l_rvmin, "eq": l_eq, "ce": l_ce}


def _to_size(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize to ``size`` with align_corners=True (SEAM's network output); float32; no-op when equal."""
    x = x.float()
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def _gap_fg(cam: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) CAM -> (B, C-1) global average pool of the foreground channels (SEAM's label1/label2)."""
    return cam[:, 1:].mean(dim=(2, 3))


def build_optimizer(net: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """SGD over the network's parameter groups (each group carries ``lr_mult``); momentum is explicit."""
    net = getattr(net, "module", net)
    groups = net.param_groups(cfg.optim)
    for g in groups:
        g["lr"] = cfg.optim.lr * g.get("lr_mult", 1.0)
        g.setdefault("initial_lr", g["lr"])
    return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                           weight_decay=cfg.optim.weight_decay)


def poly_lr(base: float, step: int, max_steps: int, power: float) -> float:
    """Poly schedule (DAEN Sec. 4.1): lr = base * (1 - step / max_steps) ** power."""
    return base * (1.0 - min(step, max_steps) / max(1, max_steps)) ** power


def set_lr(optimizer: torch.optim.Optimizer, cfg: Config, step: int, max_steps: int) -> float:
    lr = poly_lr(cfg.optim.lr, step, max_steps, cfg.optim.power)
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    return lr


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast dtype: bf16 on CUDA where supported, else fp16 on CUDA; None (full precision) on the CPU."""
    if enabled and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def autocast(device: torch.device, enabled: bool):
    """Mixed precision on CUDA only (bf16 where supported); a no-op context on the CPU."""
    dtype = amp_dtype(device, enabled)
    if dtype is not None:
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def grad_scaler(device: torch.device, enabled: bool) -> "torch.amp.GradScaler | None":
    """A GradScaler where autocast runs in fp16 (GPUs without bf16, e.g. V100/T4), whose small gradients would
    underflow otherwise; None for bf16 and full precision, which need none."""
    if amp_dtype(device, enabled) == torch.float16:
        return torch.amp.GradScaler("cuda")
    return None


def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params, clip_grad_norm: float | None = None,
                  scaler: "torch.amp.GradScaler | None" = None) -> None:
    """zero_grad, backward, optional gradient-norm clipping, SGD step; through ``scaler`` when given (the
    gradients are unscaled before clipping; a step with inf/nan gradients is skipped by the scaler)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        if clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        optimizer.step()
        return
    scaler.scale(loss).backward()
    if clip_grad_norm:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()


def train_step(objective: nn.Module, batch: dict, cfg: Config, optimizer: torch.optim.Optimizer | None = None,
               device: torch.device | None = None, scaler: "torch.amp.GradScaler | None" = None
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward (and, with an optimizer, backward + SGD step) of one batch. Returns (loss, metrics).
    ``scaler``: the GradScaler of :func:`grad_scaler` (fp16 autocast only)."""
    device = device or next(objective.parameters()).device
    image = batch["image"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True).float()
    with autocast(device, cfg.optim.amp):
        terms = objective(image, labels)
    loss = terms["loss"]
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss.item()} (terms: "
                                 + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items()) + ")")
    if optimizer is not None:
        backward_step(loss, optimizer, objective.parameters(), cfg.optim.clip_grad_norm, scaler)
    return loss.detach(), {k: float(v.detach()) for k, v in terms.items()}


def steps_for(cfg: Config, n_images: int) -> tuple[int, int]:
    """(steps per epoch, total steps) for ``n_images`` at the configured batch size."""
    per_epoch = max(1, n_images // cfg.optim.batch_size)
    total = per_epoch * cfg.optim.epochs
    if cfg.optim.max_steps:
        total = min(total, cfg.optim.max_steps) if cfg.optim.epochs > 1 else cfg.optim.max_steps
    return per_epoch, total


def evaluate_cams(net: nn.Module, cfg: Config, dataset, max_images: int | None = None,
                  scales: list[float] | None = None, flip: bool | None = None, progress: bool = False) -> dict:
    """CAM mIoU (with a background-threshold sweep) of ``net`` on a dataset with masks."""
    from wsss.cam import CamInferencer
    from wsss.metrics import threshold_sweep

    inf = CamInferencer(net, cfg, scales=scales, flip=flip)
    ids = list(dataset.ids)[: max_images or None]

    def pairs():
        for i in ids:
            mask = dataset.load_mask(i)
            if mask is None:
                continue
            cam, keys = inf(dataset.load_image(i), dataset.labels(i))
            yield cam, keys, mask

    return threshold_sweep(pairs(), dataset.num_classes, dataset.class_names)


def train(cfg: Config, out: str | None = None, dataset=None, progress: bool = True,
          on_epoch: Callable[[int, dict], None] | None = None, val_dataset=None, eval_max_images: int = 64) -> dict:
    """Train a CAM network in one process. Writes a checkpoint folder to ``out`` (default cfg.out)."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from wsss.checkpoint import save_checkpoint
    from wsss.data import open_dataset
    from wsss.data.transforms import TrainDataset

    out = out or cfg.out
    seed_everything(cfg.seed)
    device = resolve_device(cfg)
    if dataset is None:
        dataset = open_dataset(cfg.data.root, cfg.data.train_split, layout=cfg.data.layout)
    if val_dataset is None and cfg.data.val_split:
        try:
            val_dataset = open_dataset(cfg.data.root, cfg.data.val_split, layout=cfg.data.layout)
        except (FileNotFoundError, ValueError):
            val_dataset = None
    train_ds = TrainDataset(dataset, cfg.data, seed=cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train_ds, batch_size=cfg.optim.batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.data.num_workers, generator=gen, pin_memory=device.type == "cuda")
    net = build_model(cfg, dataset.num_classes).to(device)
    objective = Objective(net, cfg).to(device)
    optimizer = build_optimizer(net, cfg)
    scaler = grad_scaler(device, cfg.optim.amp)
    per_epoch, total = steps_for(cfg, len(train_ds))
    epochs = math.ceil(total / per_epoch)
    history: list[dict] = []
    step = 0
    t_start = time.perf_counter()
    bar = tqdm(total=total, desc=f"train {cfg.method.name}/{cfg.attention}", disable=not progress, unit="step")
    net.train()
    for epoch in range(epochs):
        sums: dict[str, float] = {}
        n = 0
        t0 = time.perf_counter()
        for batch in loader:
            if step >= total:
                break
            lr = set_lr(optimizer, cfg, step, total)
            _, metrics = train_step(objective, batch, cfg, optimizer, device, scaler)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{lr:.4f}")
        dt = time.perf_counter() - t0
        rec = {k: v / max(n, 1) for k, v in sums.items()}
        rec.update(epoch=epoch, step=step, lr=lr, samples_per_s=n * cfg.optim.batch_size / max(dt, 1e-9),
                   sec_per_step=dt / max(n, 1))
        history.append(rec)
        if on_epoch is not None:
            on_epoch(epoch, rec)
        if step >= total:
            break
    bar.close()
    train_seconds = time.perf_counter() - t_start
    net.eval()
    result: dict = {"steps": step, "train_seconds": train_seconds, "history": history,
                    "loss_first": history[0]["loss"] if history else None,
                    "loss_last": history[-1]["loss"] if history else None,
                    "rejects": list(train_ds.rejects)}
    if val_dataset is not None and val_dataset.has_masks:
        ev = evaluate_cams(net, cfg, val_dataset, max_images=eval_max_images)
        result["val_cam_miou"] = ev["miou"]
        result["val_best_threshold"] = ev["best_threshold"]
    meta = {"kind": "cam", "class_names": list(dataset.class_names), "step": step, "epoch": len(history),
            "method": cfg.method.name, "attention": cfg.attention}
    metrics_out = {k: v for k, v in result.items() if k not in ("history",)}
    metrics_out["history"] = history
    save_checkpoint(out, net, cfg, meta=meta, metrics=metrics_out)
    result["checkpoint"] = str(out)
    return result
