"""Session fixtures for the local stack: a real moto S3 server over HTTP and a local Ray cluster.

- ``s3_server``: moto server on 127.0.0.1 (free port) for the whole test session; sets the S3 environment
  (``WSSS_S3_ENDPOINT``, test credentials, region, checksum settings) and restores it afterwards; creates a bucket.
  Yields an ``S3Server`` with ``.endpoint``, ``.bucket``, ``.access_key``, ``.secret_key``, ``.region``,
  ``.uri(prefix)`` (-> ``s3://bucket/prefix``), ``.env()`` (the env vars it set) and ``.client()`` (boto3 client).
  Use distinct prefixes per test (e.g. ``s3_server.uri(f"test_x/{uuid}")``): the bucket is shared by the session.
- ``ray_local``: ``ray.init(address="local", num_cpus=8, include_dashboard=False)`` once per session, started
  after ``s3_server`` so Ray's processes inherit the S3 environment; the same S3 variables also go into the job's
  ``runtime_env`` env_vars. Yields a ``RayLocal`` with ``.address``, ``.num_cpus`` and ``.s3``.

The credentials are fake test values for the local moto server only.
"""
from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field

import pytest

TEST_ACCESS_KEY = "wsss-test-access-key"
# Distinct, searchable value: tests grep logs for it to prove the secret never leaks.
TEST_SECRET_KEY = "wsssTESTsecret0000000000000000000000000000"
TEST_REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = TEST_REGION
    _env: dict = field(default_factory=dict, repr=False)

    def uri(self, prefix: str = "") -> str:
        prefix = prefix.strip("/")
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    def unique_uri(self, name: str = "t") -> str:
        """A fresh prefix in the session bucket."""
        return self.uri(f"{name}-{uuid.uuid4().hex[:10]}")

    def env(self) -> dict[str, str]:
        return dict(self._env)

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def __repr__(self) -> str:  # never show the secret in pytest output
        return f"S3Server(endpoint={self.endpoint!r}, bucket={self.bucket!r})"


@dataclass
class RayLocal:
    address: str
    num_cpus: int
    s3: S3Server


def _s3_env(endpoint: str) -> dict[str, str]:
    return {
        "WSSS_S3_ENDPOINT": endpoint,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        "AWS_DEFAULT_REGION": TEST_REGION,
        "AWS_REGION": TEST_REGION,
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        # keep botocore from looking at a developer's real profile / config files or instance metadata
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = _s3_env(endpoint)
    env.pop("AWS_SESSION_TOKEN", None)
    saved = {k: os.environ.get(k) for k in list(env) + ["AWS_SESSION_TOKEN", "AWS_PROFILE"]}
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(env)
    srv = S3Server(endpoint=endpoint, bucket="wsss-test", access_key=TEST_ACCESS_KEY,
                   secret_key=TEST_SECRET_KEY, _env=env)
    try:
        srv.client().create_bucket(Bucket=srv.bucket)
        yield srv
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="session")
def ray_local(s3_server):
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    num_cpus = 8
    started = False
    if not ray.is_initialized():
        env_vars = dict(s3_server.env())
        env_vars["RAY_AUTH_MODE"] = os.environ["RAY_AUTH_MODE"]
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env={"env_vars": env_vars},
            log_to_driver=True,
            logging_level="WARNING",
        )
        started = True
    ctx = ray.get_runtime_context()
    try:
        yield RayLocal(address=ctx.gcs_address, num_cpus=int(ray.cluster_resources().get("CPU", 0)), s3=s3_server)
    finally:
        if started:
            ray.shutdown()
