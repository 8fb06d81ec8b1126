"""Checkpoint folders: ``model.pt`` (state_dict) + ``config.yaml`` (exact resolved config) + ``meta.json``
(kind, class_names, step, epoch) + ``metrics.json``. Local paths or ``s3://`` prefixes (through wsss.data.fs)."""
from __future__ import annotations

import io
import json
from typing import Any

import torch
import yaml

from wsss import config as config_mod


def _fs():
    from wsss.data import fs

    return fs


def save_checkpoint(where: str, model: torch.nn.Module | dict, cfg, meta: dict | None = None,
                    metrics: dict | None = None, extra: dict | None = None) -> str:
    """Write a checkpoint folder. ``model`` may be a module (DDP unwrapped here) or a state_dict.
    ``extra`` (optimizer state etc.) goes to ``train_state.pt``; model.pt is written last so that a folder
    with model.pt is complete."""
    fs = _fs()
    fs.makedirs(where)
    if isinstance(model, torch.nn.Module):
        model = getattr(model, "module", model)
        state = model.state_dict()
    else:
        state = model
    fs.write_bytes(fs.join(where, "config.yaml"), cfg.to_yaml().encode())
    fs.write_bytes(fs.join(where, "meta.json"), json.dumps(meta or {}, indent=2).encode())
    fs.write_bytes(fs.join(where, "metrics.json"), json.dumps(metrics or {}, indent=2, default=float).encode())
    if extra is not None:
        buf = io.BytesIO()
        torch.save(extra, buf)
        fs.write_bytes(fs.join(where, "train_state.pt"), buf.getvalue())
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
    fs.write_bytes(fs.join(where, "model.pt"), buf.getvalue())
    return where


def load_checkpoint(where: str, map_location="cpu"):
    """Return (state_dict, cfg, meta, metrics). One-line error naming the path when something is missing."""
    fs = _fs()
    model_uri = fs.join(where, "model.pt")
    cfg_uri = fs.join(where, "config.yaml")
    for uri in (model_uri, cfg_uri):
        if not fs.exists(uri):
            raise FileNotFoundError(f"checkpoint {where}: missing {uri.rsplit('/', 1)[-1]} (not a wsss checkpoint folder?)")
    try:
        state = torch.load(io.BytesIO(fs.read_bytes(model_uri)), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - report the file
        raise ValueError(f"checkpoint {model_uri}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    cfg = config_mod.from_dict(yaml.safe_load(fs.read_bytes(cfg_uri)) or {})
    meta = _read_json(fs, fs.join(where, "meta.json"))
    metrics = _read_json(fs, fs.join(where, "metrics.json"))
    return state, cfg, meta, metrics


def load_train_state(where: str, map_location="cpu") -> dict | None:
    fs = _fs()
    uri = fs.join(where, "train_state.pt")
    if not fs.exists(uri):
        return None
    return torch.load(io.BytesIO(fs.read_bytes(uri)), map_location=map_location, weights_only=False)


def _read_json(fs, uri) -> dict[str, Any]:
    if not fs.exists(uri):
        return {}
    return json.loads(fs.read_bytes(uri) or b"{}")


def load_cam_model(where: str, device=None, overrides: list[str] | None = None):
    """Build the CAM network of a checkpoint and load its weights. Returns (model in eval mode, cfg, meta)."""
    from wsss.train import build_model

    state, cfg, meta, _ = load_checkpoint(where)
    if meta.get("kind", "cam") != "cam":
        raise ValueError(f"checkpoint {where}: kind is {meta.get('kind')!r}, expected a CAM network checkpoint")
    for ov in overrides or []:
        config_mod.apply_override(cfg, ov)
    cfg.validate()
    class_names = meta.get("class_names")
    if not class_names:
        raise ValueError(f"checkpoint {where}: meta.json has no class_names")
    cfg.model.pretrained = None  # weights come from the checkpoint
    model = build_model(cfg, len(class_names))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise ValueError(f"checkpoint {where}: state_dict does not match the config's network (first bad key: {first})")
    device = device or config_mod.resolve_device(cfg)
    model.to(device).eval()
    return model, cfg, meta
