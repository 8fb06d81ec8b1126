"""Storage for Ray jobs: one way to open local paths and ``s3://bucket/prefix`` URIs.

- ``pyarrow_fs(uri)`` -> ``(pyarrow.fs.FileSystem, path)`` for Ray Data readers/writers and Parquet.
- ``storage_for_ray(uri)`` -> ``(storage_path, storage_filesystem | None)`` for Ray Train/Tune ``RunConfig``.
- ``s3_env_vars()`` -> env vars to put in a Ray ``runtime_env`` so every worker reaches the same S3 endpoint.
- ``redact(text)`` removes secrets before anything is logged.
- ``read_shards_ray(uri)`` -> ``ray.data.Dataset`` over the Parquet shards written by ``wsss.data.shards``
  (``ray.data.read_parquet`` over the manifest's files; see ``cluster.ingest``).

Settings come from the environment, like ``wsss.data.fs`` (the fsspec side, used by ``wsss/``):
``WSSS_S3_ENDPOINT`` (or ``AWS_ENDPOINT_URL``) for S3-compatible stores (moto, MinIO); region from
``AWS_DEFAULT_REGION``/``AWS_REGION`` (default us-east-1). Credentials come from the standard AWS chain (env vars,
shared profile, EC2 instance profile / IRSA). By default they are NOT passed to pyarrow's constructor: pyarrow's
AWS SDK reads the same chain itself on every process, and a filesystem object built without explicit keys can be
pickled to Ray workers (and shown in reprs) without carrying the secret.

Secrets policy: nothing in this module prints or logs credentials. ``s3_env_vars()`` returns the credentials only
for a ``runtime_env``; we never log runtime_envs, but note that Ray itself keeps a job's runtime_env in the job's
metadata (visible to anyone who can run ``ray job list`` on that cluster). On shared clusters use an instance
profile / IRSA and ``s3_env_vars(include_credentials=False)`` instead.
"""
from __future__ import annotations

import os
import re
from typing import Iterable
from urllib.parse import urlparse

from wsss.data import fs as wfs

__all__ = [
    "S3_SETTING_VARS",
    "S3_CREDENTIAL_VARS",
    "s3_endpoint",
    "s3_region",
    "pyarrow_fs",
    "storage_for_ray",
    "s3_env_vars",
    "redact",
    "read_shards_ray",
]

# Non-secret settings propagated to Ray workers.
S3_SETTING_VARS = (
    "WSSS_S3_ENDPOINT",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_PROFILE",
)
S3_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def s3_endpoint(endpoint: str | None = None) -> str | None:
    """The S3 endpoint URL: the argument (e.g. from a config) or WSSS_S3_ENDPOINT / AWS_ENDPOINT_URL; None = AWS."""
    return endpoint or wfs.s3_settings()["endpoint"]


def s3_region(region: str | None = None) -> str:
    return region or wfs.s3_settings()["region"]


def _s3_pyarrow(endpoint: str | None, region: str | None, explicit_credentials: bool):
    import pyarrow.fs as pafs

    kwargs: dict = {"region": s3_region(region)}
    ep = s3_endpoint(endpoint)
    if ep:
        parsed = urlparse(ep if "://" in ep else f"https://{ep}")
        if not parsed.netloc:
            raise ValueError(f"bad S3 endpoint URL {ep!r} (expected e.g. http://127.0.0.1:9000)")
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme or "https"
        # path-style addressing is pyarrow's default (force_virtual_addressing=False)
    if explicit_credentials and os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


def pyarrow_fs(uri: str, endpoint: str | None = None, region: str | None = None,
               explicit_credentials: bool = False):
    """``(pyarrow.fs.FileSystem, path)`` for a local path / ``file://`` URI or an ``s3://bucket/prefix`` URI.

    For S3 the path is bucket-relative (``bucket/prefix``), as pyarrow expects; for local paths it is absolute.
    ``endpoint``/``region`` override the environment (e.g. from a config). ``explicit_credentials=True`` passes
    AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from the environment to the constructor (only when both are set);
    the default lets pyarrow's AWS SDK find them through the standard chain.
    """
    import pyarrow.fs as pafs

    uri = os.fspath(uri)
    if wfs.is_remote(uri):
        bucket, key = wfs.split_uri(uri)
        return _s3_pyarrow(endpoint, region, explicit_credentials), f"{bucket}/{key}" if key else bucket
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if "://" in path:
        raise ValueError(f"unsupported uri scheme: {uri} (use a local path or s3://bucket/prefix)")
    return pafs.LocalFileSystem(), os.path.abspath(path)


def storage_for_ray(uri: str, endpoint: str | None = None, region: str | None = None):
    """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig`` / Tune.

    Local: ``(absolute path, None)`` (on a multi-node cluster a local path must be a shared mount).
    S3: ``("bucket/prefix", pyarrow S3FileSystem)`` so that custom endpoints (moto/MinIO) work; on real AWS the
    same pair works too.
    """
    fs, path = pyarrow_fs(uri, endpoint=endpoint, region=region)
    if wfs.is_remote(uri):
        return path, fs
    return path, None


def s3_env_vars(include_credentials: bool = True) -> dict[str, str]:
    """Env vars for a Ray ``runtime_env`` so that workers on every node use the same S3 settings.

    Always the non-secret settings that are set here (endpoint, region, checksum mode, profile name). With
    ``include_credentials`` also AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN when they are set
    in this process's environment (e.g. the local moto stack's fake keys). We never log the returned dict; see the
    module docstring about Ray keeping runtime_envs in job metadata. The endpoint is mirrored into
    AWS_ENDPOINT_URL and the checksum mode defaults to ``when_required`` whenever an endpoint override is set.
    """
    out = {k: os.environ[k] for k in S3_SETTING_VARS if os.environ.get(k)}
    ep = s3_endpoint()
    if ep:
        out.setdefault("WSSS_S3_ENDPOINT", ep)
        out.setdefault("AWS_ENDPOINT_URL", ep)
        out.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
        out.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
    out.setdefault("AWS_DEFAULT_REGION", s3_region())
    if include_credentials:
        out.update({k: os.environ[k] for k in S3_CREDENTIAL_VARS if os.environ.get(k)})
    return out


# --- redaction ---------------------------------------------------------------------------------------------------

_MASK = "***"
# key=value / key: value / "key": "value" for secret-ish keys
_KV_RE = re.compile(
    r"""(?ix)
    (?P<key>(?<![A-Za-z0-9_])["']?(?:aws_secret_access_key|secret_access_key|secretaccesskey|secret_key|aws_session_token
       |session_token|sessiontoken|password|passwd|token)["']?)
    (?P<sep>\s*[=:]\s*)
    (?P<q>["']?)
    (?P<val>[^\s"',;}]+)
    """
)
# credentials embedded in URLs: scheme://user:pass@host
_URL_USERINFO_RE = re.compile(r"(?P<pre>[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]+:)(?P<pw>[^/\s@]+)(?P<at>@)")
# AWS secret access keys are 40 characters of base64 (mixed case). Hex digests (git/sha1) are excluded by
# requiring both upper- and lower-case letters.
_AWS_SECRET_RE = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")


def _looks_like_secret(s: str) -> bool:
    return bool(re.search(r"[A-Z]", s) and re.search(r"[a-z]", s) and re.search(r"[0-9/+]", s))


def redact(text, secrets: Iterable[str] = ()) -> str:
    """``text`` with credentials removed: the values of AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN from the
    environment, any ``secrets`` given, ``secret_key=...``-style assignments, passwords in URLs and 40-character
    AWS-secret-looking tokens. Use on every message that might contain configs, env dumps or exceptions."""
    text = str(text)
    values = [os.environ.get(k) for k in _SECRET_VARS] + list(secrets)
    for v in sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True):
        text = text.replace(v, _MASK)
    text = _KV_RE.sub(lambda m: f"{m['key']}{m['sep']}{m['q']}{_MASK}", text)
    text = _URL_USERINFO_RE.sub(lambda m: f"{m['pre']}{_MASK}{m['at']}", text)
    text = _AWS_SECRET_RE.sub(lambda m: _MASK if _looks_like_secret(m.group(0)) else m.group(0), text)
    return text


# --- Ray Data reader ---------------------------------------------------------------------------------------------

def read_shards_ray(uri: str, columns: list[str] | None = None, **read_kwargs):
    """A ``ray.data.Dataset`` over the shard files listed in the manifest of ``uri`` (written by
    ``wsss.data.shards.write_shards``); rows: id, image, labels, mask, width, height (or ``columns``). Only the
    manifest's shards are read (never the side files or stale files).

    ``ray.data.read_parquet`` through ``cluster.ingest.read_shards`` (its default reader: the ParquetDatasource V1
    path, the fastest of the readers bench/bench_ingest.py timed, locally and on S3). ``read_kwargs`` go there
    (``reader=``, ``shuffle_seed=``, or read_parquet arguments such as ``num_cpus``). The pyarrow filesystem travels
    to the workers pickled without credentials; they find credentials through the AWS chain in their own
    environment (give them ``s3_env_vars()`` in the runtime_env, or an instance profile).
    """
    from cluster.ingest import read_shards

    return read_shards(uri, columns=columns, **read_kwargs)
