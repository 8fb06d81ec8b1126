"""Storage layer: wsss.data.fs (fsspec/s3fs) and cluster.storage (pyarrow, Ray settings, redaction).

S3 tests run against a real moto server over HTTP (the ``s3_server`` fixture); no in-process mocks.
"""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from cluster import storage
from wsss.data import fs


# --- wsss.data.fs, local ------------------------------------------------------------------------------------------

def test_local_roundtrip(tmp_path):
    root = str(tmp_path / "root")
    assert not fs.is_remote(root)
    fs.makedirs(fs.join(root, "a", "b"))
    uri = fs.join(root, "a", "b", "x.bin")
    payload = bytes(range(256)) * 10
    fs.write_bytes(uri, payload)
    assert fs.read_bytes(uri) == payload
    assert fs.exists(uri) and fs.exists(fs.join(root, "a")) and not fs.exists(fs.join(root, "nope"))
    fs.write_bytes(fs.join(root, "a", "c.txt"), b"c")  # parent created by the write itself
    assert fs.listdir(fs.join(root, "a")) == ["b", "c.txt"]
    fs.write_text(uri, "second")  # overwrite
    assert fs.read_text(uri) == "second"
    assert fs.read_bytes("file://" + uri) == b"second"
    # no temporary files left behind
    assert fs.listdir(fs.join(root, "a", "b")) == ["x.bin"]
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        fs.read_bytes(fs.join(root, "missing.bin"))
    with pytest.raises(FileNotFoundError, match="nofolder"):
        fs.listdir(fs.join(root, "nofolder"))
    fs.remove(uri)
    assert not fs.exists(uri)


def test_local_write_is_atomic(tmp_path, monkeypatch):
    uri = str(tmp_path / "f.bin")
    fs.write_bytes(uri, b"old")

    def boom(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        fs.write_bytes(uri, b"new content")
    monkeypatch.undo()
    assert fs.read_bytes(uri) == b"old"  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]  # and the temp file was cleaned up


def test_bad_scheme_rejected():
    with pytest.raises(ValueError, match="gs://bucket/x"):
        fs.get_fs("gs://bucket/x")
    with pytest.raises(ValueError, match="without a bucket"):
        fs.split_uri("s3:///key")


# --- wsss.data.fs, S3 over HTTP -----------------------------------------------------------------------------------

def test_s3_roundtrip(s3_server):
    base = s3_server.unique_uri("fs")
    assert fs.is_remote(base)
    assert fs.split_uri(base)[0] == s3_server.bucket
    uri = fs.join(base, "dir", "x.bin")
    payload = os.urandom(5000)
    fs.makedirs(fs.join(base, "dir"))  # no-op on S3, must not fail
    fs.write_bytes(uri, payload)
    fs.write_bytes(fs.join(base, "dir", "y.txt"), b"y")
    fs.write_bytes(fs.join(base, "top.txt"), b"t")
    assert fs.read_bytes(uri) == payload
    assert fs.exists(uri) and fs.exists(fs.join(base, "dir")) and fs.exists(s3_server.uri())
    assert not fs.exists(fs.join(base, "nope")) and not fs.exists("s3://no-such-bucket-x/k")
    assert fs.listdir(base) == ["dir", "top.txt"]
    assert fs.listdir(fs.join(base, "dir") + "/") == ["x.bin", "y.txt"]
    fs.write_bytes(uri, b"v2")  # overwrite, visible at once (no listings cache)
    assert fs.read_bytes(uri) == b"v2"
    with pytest.raises(FileNotFoundError, match=r"s3://.*/fs-.*/missing\.bin"):
        fs.read_bytes(fs.join(base, "missing.bin"))
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        fs.listdir(fs.join(base, "nothing-here"))
    fs.remove(fs.join(base, "dir"), recursive=True)
    assert fs.listdir(base) == ["top.txt"]
    # the object really is on the server (checked with an independent client)
    key = fs.split_uri(fs.join(base, "top.txt"))[1]
    assert s3_server.client().get_object(Bucket=s3_server.bucket, Key=key)["Body"].read() == b"t"


# --- cluster.storage ----------------------------------------------------------------------------------------------

def test_pyarrow_reads_what_s3fs_wrote_and_back(s3_server):
    base = s3_server.unique_uri("pa")
    table = pa.table({"id": ["a", "b", "c"], "v": [1.5, 2.5, 3.5]})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    fs.write_bytes(fs.join(base, "t.parquet"), buf.getvalue().to_pybytes())

    pfs, path = storage.pyarrow_fs(fs.join(base, "t.parquet"))
    assert isinstance(pfs, pafs.S3FileSystem)
    assert path == f"{s3_server.bucket}/{fs.split_uri(base)[1]}/t.parquet"
    assert pq.read_table(path, filesystem=pfs).equals(table)

    # pyarrow writes, s3fs reads
    with pfs.open_output_stream(path.replace("t.parquet", "from_pa.bin")) as out:
        out.write(b"written by pyarrow")
    assert fs.read_bytes(fs.join(base, "from_pa.bin")) == b"written by pyarrow"

    # explicit credentials from the env work too, and the secret is not in the filesystem's repr
    pfs2, _ = storage.pyarrow_fs(base, explicit_credentials=True)
    assert pq.read_table(path, filesystem=pfs2).num_rows == 3
    assert s3_server.secret_key not in repr(pfs) and s3_server.secret_key not in repr(pfs2)


def test_pyarrow_fs_local_and_storage_for_ray(tmp_path, s3_server):
    pfs, path = storage.pyarrow_fs(str(tmp_path / "x"))
    assert isinstance(pfs, pafs.LocalFileSystem) and path == str(tmp_path / "x")
    assert storage.storage_for_ray(str(tmp_path / "runs")) == (str(tmp_path / "runs"), None)
    p, sfs = storage.storage_for_ray(s3_server.uri("runs/exp1"))
    assert p == f"{s3_server.bucket}/runs/exp1" and isinstance(sfs, pafs.S3FileSystem)
    # the filesystem really points at the moto endpoint
    sfs.create_dir(f"{p}/probe")
    with sfs.open_output_stream(f"{p}/probe/ok.txt") as out:
        out.write(b"ok")
    assert fs.read_bytes(s3_server.uri("runs/exp1/probe/ok.txt")) == b"ok"
    with pytest.raises(ValueError, match="hdfs://nn/x"):
        storage.pyarrow_fs("hdfs://nn/x")


def test_endpoint_override_argument(s3_server, monkeypatch):
    # an endpoint from a config overrides the environment
    monkeypatch.setenv("WSSS_S3_ENDPOINT", "http://127.0.0.1:1")  # nothing listens there
    pfs, path = storage.pyarrow_fs(s3_server.uri("cfg"), endpoint=s3_server.endpoint)
    with pfs.open_output_stream(f"{path}/a.txt") as out:
        out.write(b"a")
    monkeypatch.setenv("WSSS_S3_ENDPOINT", s3_server.endpoint)
    assert fs.read_bytes(s3_server.uri("cfg/a.txt")) == b"a"


def test_s3_env_vars(s3_server):
    env = storage.s3_env_vars()
    assert env["WSSS_S3_ENDPOINT"] == s3_server.endpoint
    assert env["AWS_DEFAULT_REGION"] == s3_server.region
    assert env["AWS_REQUEST_CHECKSUM_CALCULATION"] == "when_required"
    assert env["AWS_SECRET_ACCESS_KEY"] == s3_server.secret_key
    no_creds = storage.s3_env_vars(include_credentials=False)
    assert "AWS_SECRET_ACCESS_KEY" not in no_creds and "AWS_ACCESS_KEY_ID" not in no_creds
    assert no_creds["WSSS_S3_ENDPOINT"] == s3_server.endpoint


def test_redact(s3_server):
    secret = s3_server.secret_key
    msg = f"env AWS_SECRET_ACCESS_KEY={secret} failed; cfg {{'secret_key': '{secret}'}}"
    out = storage.redact(msg)
    assert secret not in out and "***" in out
    assert "AWS_SECRET_ACCESS_KEY=***" in out
    # secrets not in this process's env are still caught by shape and by key name
    aws_like = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # AWS's documented example secret (40 chars)
    assert aws_like not in storage.redact(f"key is {aws_like}.")
    assert "hunter2" not in storage.redact("password: hunter2 and url http://u:pw123@host/x")
    assert "pw123" not in storage.redact("url http://u:pw123@host/x")
    assert "s3cr3t" not in storage.redact('{"SecretAccessKey": "s3cr3t"}')
    assert "extra-value" not in storage.redact("x extra-value y", secrets=["extra-value"])
    # harmless text is kept: hex digests, endpoints, ordinary words
    sha1 = "3f786850e387550fdab836ed7e6dc881de23001b"
    keep = f"commit {sha1} endpoint {s3_server.endpoint} max_tokens=5 bucket wsss-test"
    assert storage.redact(keep) == keep
