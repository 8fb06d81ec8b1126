"""One small file-system layer for local paths and ``s3://bucket/key`` URIs (pure fsspec/s3fs, no Ray).

Every reader and writer in ``wsss`` goes through these functions so that a dataset root, a checkpoint folder or an
output prefix may be a local folder or an S3 prefix without the caller caring which.

S3 settings (never hard-coded, never logged):

- endpoint: ``WSSS_S3_ENDPOINT`` or else ``AWS_ENDPOINT_URL`` (unset = real AWS S3). With an endpoint override the
  client uses path-style addressing and only computes/validates checksums when required, which keeps it working
  against S3-compatible stores (moto, MinIO, Ceph) that reject the newer default checksums of boto3 >= 1.36.
- region: ``AWS_DEFAULT_REGION`` or ``AWS_REGION`` (default ``us-east-1``).
- credentials: the standard AWS chain of botocore (env vars, shared profile, instance profile / IRSA). They are
  never passed through this module's arguments and never appear in error messages.

Writes are atomic: a local write goes to a temporary file in the same folder and is renamed over the target
(``os.replace``); an S3 write is a single PUT (an object appears whole or not at all).
"""
from __future__ import annotations

import os
import posixpath
import tempfile
from typing import Any

import fsspec

__all__ = [
    "REMOTE_SCHEMES",
    "s3_settings",
    "is_remote",
    "split_uri",
    "get_fs",
    "join",
    "read_bytes",
    "write_bytes",
    "read_text",
    "write_text",
    "exists",
    "isdir",
    "listdir",
    "makedirs",
    "remove",
    "open_file",
]

REMOTE_SCHEMES = ("s3", "s3a", "s3n")
DEFAULT_REGION = "us-east-1"


def s3_settings() -> dict[str, str | None]:
    """The non-secret S3 settings read from the environment: ``{"endpoint": url|None, "region": str}``."""
    endpoint = os.environ.get("WSSS_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or DEFAULT_REGION
    return {"endpoint": endpoint, "region": region}


def _scheme(uri: str) -> str:
    uri = os.fspath(uri)
    if "://" in uri:
        return uri.split("://", 1)[0].lower()
    return ""


def is_remote(uri: str) -> bool:
    """True for ``s3://`` (and s3a/s3n) URIs; False for local paths and ``file://`` URIs."""
    return _scheme(uri) in REMOTE_SCHEMES


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``. Raises ValueError for a non-S3 URI or an empty bucket."""
    uri = os.fspath(uri)
    if not is_remote(uri):
        raise ValueError(f"not an s3:// uri: {uri}")
    rest = uri.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 uri without a bucket: {uri}")
    return bucket, key.strip("/")


def _local_path(uri: str) -> str:
    uri = os.fspath(uri)
    if _scheme(uri) == "file":
        uri = uri[len("file://"):]
    elif _scheme(uri) not in ("",) and not is_remote(uri):
        raise ValueError(f"unsupported uri scheme {_scheme(uri)!r}: {uri} (use a local path or s3://bucket/key)")
    return uri


def _s3_filesystem():
    """An s3fs filesystem configured from the environment (fsspec caches instances by their arguments)."""
    import s3fs  # imported lazily: local-only users never pay for botocore

    settings = s3_settings()
    client_kwargs: dict[str, Any] = {"region_name": settings["region"]}
    config_kwargs: dict[str, Any] = {}
    if settings["endpoint"]:
        client_kwargs["endpoint_url"] = settings["endpoint"]
        config_kwargs = {
            "s3": {"addressing_style": "path"},
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
        }
    # No listings cache: jobs write and then check for outputs (resume), a stale cache would hide fresh objects.
    return s3fs.S3FileSystem(
        client_kwargs=client_kwargs,
        config_kwargs=config_kwargs,
        use_listings_cache=False,
    )


def get_fs(uri: str):
    """``(fsspec filesystem, path)`` for a local path, ``file://`` URI or ``s3://bucket/key`` URI.

    For S3 the path is ``bucket/key`` (what s3fs expects); for local paths it is the plain path.
    """
    uri = os.fspath(uri)
    if is_remote(uri):
        bucket, key = split_uri(uri)
        return _s3_filesystem(), f"{bucket}/{key}" if key else bucket
    return fsspec.filesystem("file"), _local_path(uri)


def join(base: str, *parts: str) -> str:
    """Join URI/path parts with ``/`` for remote URIs and ``os.path.join`` for local paths."""
    base = os.fspath(base)
    parts = tuple(os.fspath(p) for p in parts)
    if is_remote(base):
        out = base.rstrip("/")
        for p in parts:
            p = p.strip("/")
            if p:
                out = f"{out}/{p}"
        return out
    return os.path.join(base, *parts)


def read_bytes(uri: str) -> bytes:
    """The whole object/file as bytes. A missing one raises FileNotFoundError naming the uri."""
    uri = os.fspath(uri)
    fs, path = get_fs(uri)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {uri}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"is a directory, not a file: {uri}") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` atomically (local: temp file + ``os.replace``; S3: single PUT). Creates local parents."""
    uri = os.fspath(uri)
    data = bytes(data)
    if is_remote(uri):
        fs, path = get_fs(uri)
        bucket, key = split_uri(uri)
        if not key:
            raise ValueError(f"s3 uri without a key: {uri}")
        # s3fs.pipe_file is one PutObject for payloads below its multipart threshold (several MiB), and a
        # multipart upload (also all-or-nothing) above it.
        fs.pipe_file(path, data)
        return
    path = _local_path(uri)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def write_text(uri: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def exists(uri: str) -> bool:
    """True when a file/object or a folder/prefix exists at ``uri``."""
    fs, path = get_fs(uri)
    if is_remote(uri) and "/" not in path:
        # a bare bucket
        try:
            fs.ls(path)
            return True
        except (FileNotFoundError, PermissionError):
            return False
    return fs.exists(path)


def isdir(uri: str) -> bool:
    fs, path = get_fs(uri)
    return fs.isdir(path)


def listdir(uri: str) -> list[str]:
    """Sorted names (not paths) of the entries directly under ``uri``. A missing folder raises FileNotFoundError."""
    uri = os.fspath(uri)
    if not is_remote(uri):
        path = _local_path(uri)
        try:
            return sorted(os.listdir(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"no such folder: {uri}") from None
        except NotADirectoryError:
            raise NotADirectoryError(f"not a folder: {uri}") from None
    fs, path = get_fs(uri)
    try:
        entries = fs.ls(path.rstrip("/"), detail=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such prefix: {uri}") from None
    base = path.rstrip("/")
    names = []
    for e in entries:
        e = e.rstrip("/")
        if e == base:  # s3fs lists a plain object as itself
            raise NotADirectoryError(f"not a folder: {uri}")
        names.append(posixpath.basename(e))
    return sorted(set(names))


def makedirs(uri: str) -> None:
    """Create a local folder (with parents). A no-op for S3, where prefixes exist once an object is under them."""
    if is_remote(uri):
        return
    os.makedirs(_local_path(uri), exist_ok=True)


def remove(uri: str, recursive: bool = False) -> None:
    """Delete a file/object (or a folder/prefix with ``recursive=True``). Missing -> FileNotFoundError naming it."""
    fs, path = get_fs(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"no such file: {uri}")
    fs.rm(path, recursive=recursive)


def open_file(uri: str, mode: str = "rb"):
    """A file object (context manager) for streaming reads/writes. Not atomic for writes: use write_bytes."""
    fs, path = get_fs(uri)
    if "r" in mode:
        try:
            return fs.open(path, mode)
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {uri}") from None
    if not is_remote(uri):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return fs.open(path, mode)
