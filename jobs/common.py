"""Helpers shared by the Ray jobs (``jobs/train.py``, ``jobs/tune.py``): cluster arguments, ``ray.init`` with the
S3 settings in the runtime environment, logging that never prints a credential, small file helpers.

Cluster selection (``--cluster`` / ``--address``):

- ``--address ADDR``: join that cluster (``auto``, ``127.0.0.1:6379``, ``ray://host:10001``, ``local`` for a
  fresh in-process cluster).
- ``--cluster``: join the running cluster (``RAY_ADDRESS`` if set, else ``auto``).
- neither: if ``RAY_ADDRESS`` is set (a job started by ``ray job submit`` has it) join that cluster, else start a
  private local cluster (``address="local"``), never a stray one found on the machine.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from typing import Any

log = logging.getLogger("wsss.jobs")

# Defaults for a private local cluster started by this process (loopback only, no auth: REFERENCE.md §2). A driver
# that joins a cluster keeps the environment it was given: on a real cluster the nodes' own RAY_AUTH_MODE (token)
# and the job's runtime_env decide, and nothing of Ray's is pushed into worker runtime envs.
_LOCAL_RAY_ENV_DEFAULTS = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


# ---- arguments ------------------------------------------------------------------------------------------

def add_cluster_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("cluster")
    g.add_argument("--cluster", action="store_true",
                   help="join the running Ray cluster (RAY_ADDRESS, else 'auto') instead of a private local one")
    g.add_argument("--address", default=None,
                   help="Ray address to join (auto, host:port, ray://host:10001, or 'local' for a private cluster)")
    g.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs of a private local cluster (default: Ray's detection)")
    g.add_argument("--max-resources", default=None, metavar="CPU=N,GPU=N,...",
                   help="what the cluster can scale to, for planning (default: --cluster-config, else "
                        "~/ray_bootstrap_config.yaml on a `ray up` head, else the nodes up now)")
    g.add_argument("--cluster-config", default=None,
                   help="Ray cluster launcher YAML whose node types x max_workers bound the plan (e.g. ray_cluster.yaml)")
    g.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", default=None, help="YAML config (wsss.config); defaults when omitted")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable (e.g. --set optim.lr=0.005)")
    return parser


def resolve_address(cluster: bool = False, address: str | None = None) -> str:
    if address:
        return address
    if cluster:
        return os.environ.get("RAY_ADDRESS") or "auto"
    return os.environ.get("RAY_ADDRESS") or "local"


# ---- secrets and logging --------------------------------------------------------------------------------

def _secret_values() -> list[str]:
    vals = []
    for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        v = os.environ.get(k)
        if v and len(v) >= 4:
            vals.append(v)
    return vals


_KV_SECRET = re.compile(r"(?i)((?:secret[_-]?(?:access[_-]?)?key|session[_-]?token|password)\s*[=:]\s*['\"]?)"
                        r"([^'\"\s,}&]+)")


def redact(text: Any) -> str:
    """``text`` with every credential replaced by ``***`` (cluster.storage.redact when present, plus the
    values of the secret AWS variables of this process)."""
    s = str(text)
    try:
        from cluster.storage import redact as storage_redact

        s = storage_redact(s)
    except ImportError:  # pragma: no cover - storage layer missing
        pass
    for v in _secret_values():
        s = s.replace(v, "***")
    return _KV_SECRET.sub(lambda m: m.group(1) + "***", s)


class RedactingFilter(logging.Filter):
    """Rewrites each record's final message through :func:`redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not kill logging
            msg = str(record.msg)
        record.msg = redact(msg)
        record.args = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def setup_logging(level: str | int = "INFO") -> logging.Logger:
    """Log to stderr through a redacting filter (idempotent)."""
    root = logging.getLogger()
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            level = logging.INFO
    if not any(getattr(h, "_wsss_redacting", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        h.addFilter(RedactingFilter())
        h._wsss_redacting = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(level)
    log.setLevel(level)
    return log


# ---- Ray ------------------------------------------------------------------------------------------------

def ship_credentials() -> bool:
    """Whether to put AWS credentials into runtime_envs (``WSSS_SHIP_CREDENTIALS=1``; default no).

    Ray keeps a job's runtime_env in its metadata (``ray job list``, dashboard), so by default only the
    non-secret S3 settings travel; workers get credentials from their own environment (a local cluster started by
    this process inherits it; cluster nodes use an instance profile / IRSA / the head's environment)."""
    return os.environ.get("WSSS_SHIP_CREDENTIALS", "").lower() in ("1", "true", "yes")


def s3_runtime_env_vars() -> dict[str, str]:
    """The S3 environment the Ray workers need (cluster.storage.s3_env_vars); no Ray settings (RAY_AUTH_MODE is the
    cluster's, set on every node)."""
    env: dict[str, str] = {}
    try:
        from cluster.storage import s3_env_vars

        env.update({k: str(v) for k, v in (s3_env_vars(include_credentials=ship_credentials()) or {}).items()
                    if v is not None})
    except ImportError:  # pragma: no cover - storage layer missing
        pass
    return env


def init_ray(address: str | None = None, num_cpus: int | None = None, runtime_env: dict | None = None,
             **kwargs) -> dict:
    """``ray.init`` once (no-op when Ray is already initialised in this process, e.g. by a test fixture).

    ``address="local"`` (the default outside a cluster) starts a private cluster on this machine, with auth off
    (loopback only) unless RAY_AUTH_MODE says otherwise, and the S3 settings (endpoint, region, checksum mode;
    credentials only with ``WSSS_SHIP_CREDENTIALS=1``, see :func:`ship_credentials`) in its runtime env. Joining a
    cluster passes only ``runtime_env`` if given: a submitted job already has the job's runtime_env (which Ray gives
    every task and actor of the job), and nodes have their own environment. Returns ``ray.cluster_resources()``."""
    import ray

    if not ray.is_initialized():
        address = address or resolve_address()
        env = dict(runtime_env or {})
        init_kwargs: dict[str, Any] = dict(address=address, logging_level=logging.WARNING, log_to_driver=True)
        if address == "local":
            for k, v in _LOCAL_RAY_ENV_DEFAULTS.items():
                os.environ.setdefault(k, v)
            env_vars = dict(s3_runtime_env_vars())
            env_vars.update(env.get("env_vars") or {})
            if env_vars:
                env["env_vars"] = env_vars
            init_kwargs["include_dashboard"] = False
            if num_cpus is not None:
                init_kwargs["num_cpus"] = num_cpus
        init_kwargs["runtime_env"] = env or None
        init_kwargs.update(kwargs)
        log.info("ray.init(address=%s)", address)
        ray.init(**init_kwargs)
    return dict(ray.cluster_resources())


def quiet_data_progress(force: bool | None = None) -> None:
    """Turn Ray Data's progress bars off when stderr is not a terminal (job logs, CI), or when ``force``."""
    import ray.data

    off = (not sys.stderr.isatty()) if force is None else force
    if off:
        ray.data.DataContext.get_current().enable_progress_bars = False


def worker_runtime_env() -> dict:
    """Runtime env for Ray Train worker actors (RunConfig.worker_runtime_env): the S3 variables, so that workers
    started on any node read the shards and write checkpoints through the same endpoint."""
    return {"env_vars": s3_runtime_env_vars()}


# ---- storage --------------------------------------------------------------------------------------------

def storage_for_ray(uri: str):
    """``(storage_path, storage_filesystem)`` for ``RunConfig`` (cluster.storage.storage_for_ray)."""
    from cluster.storage import storage_for_ray as _sfr

    return _sfr(uri)


def pyarrow_fs(uri: str):
    from cluster.storage import pyarrow_fs as _pfs

    return _pfs(uri)


def join_uri(base: str, *parts: str) -> str:
    from wsss.data import fs

    return fs.join(base, *parts)


def dump_json_line(obj: Any) -> str:
    import json

    return redact(json.dumps(obj, default=str, sort_keys=True))


def start_job(args, verb: str):
    """Shared start of the config-driven jobs (train, tune): logging, config (a bad key is a one-line error,
    returned as None), Ray init from --cluster/--address, quiet Ray Data progress. Returns the config or None."""
    import sys

    from wsss.config import ConfigError, load

    setup_logging(args.log_level)
    try:
        cfg = load(args.config, args.overrides)
    except ConfigError as e:
        print(f"{verb}: error: {e}", file=sys.stderr)
        return None
    init_ray(resolve_address(args.cluster, args.address), num_cpus=args.num_cpus)
    quiet_data_progress()
    return cfg
