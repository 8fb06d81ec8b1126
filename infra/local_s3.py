"""A local S3 server for development and the demo: moto server on 127.0.0.1 on a free port.

    python -m infra.local_s3 start [--bucket wsss] [--port 0] [--state-dir .wsss-stack]
    python -m infra.local_s3 status
    python -m infra.local_s3 stop

``start`` launches ``moto_server`` as a background process (it outlives the command), waits until it answers,
creates the bucket and records ``{pid, endpoint, bucket}`` in ``<state-dir>/s3.json`` (log in ``s3.log``).
``stop`` ends exactly that process (by its recorded pid, after checking it is still our moto server).
State is in memory: stopping the server loses its objects.

The credentials of the local server are fixed, fake, local-only values (:data:`LOCAL_ACCESS_KEY`,
:data:`LOCAL_SECRET_KEY`): moto accepts any key. They are nobody's secret, but are still not printed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

LOCAL_ACCESS_KEY = "wsss-local-access-key"
LOCAL_SECRET_KEY = "wsss-local-secret-key-not-a-real-secret"
LOCAL_REGION = "us-east-1"
DEFAULT_BUCKET = "wsss"
DEFAULT_STATE_DIR = ".wsss-stack"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and read back what the OS picked)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def local_s3_env(endpoint: str, with_credentials: bool = True) -> dict[str, str]:
    """Environment for clients of the local S3 server (endpoint, region, checksum mode, fake credentials)."""
    env = {
        "WSSS_S3_ENDPOINT": endpoint,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": LOCAL_REGION,
        "AWS_REGION": LOCAL_REGION,
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    if with_credentials:
        env["AWS_ACCESS_KEY_ID"] = LOCAL_ACCESS_KEY
        env["AWS_SECRET_ACCESS_KEY"] = LOCAL_SECRET_KEY
    return env


def _moto_executable() -> list[str]:
    exe = Path(sys.executable).with_name("moto_server")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("moto_server")
    if found:
        return [found]
    return [sys.executable, "-m", "moto.server"]


class LocalS3:
    """Start/stop a moto S3 server process on 127.0.0.1. ``endpoint`` is ``http://127.0.0.1:<port>``."""

    def __init__(self, state_dir: str | os.PathLike = DEFAULT_STATE_DIR, bucket: str = DEFAULT_BUCKET,
                 host: str = "127.0.0.1", port: int = 0):
        if len(bucket) < 3:
            raise ValueError(f"bucket name {bucket!r} too short (S3 needs at least 3 characters)")
        self.state_dir = Path(state_dir).resolve()
        self.bucket = bucket
        self.host = host
        self.port = port
        self.pid: int | None = None
        self.endpoint: str | None = None
        self._load()

    @property
    def state_file(self) -> Path:
        return self.state_dir / "s3.json"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "s3.log"

    def _load(self) -> None:
        if self.state_file.exists():
            try:
                st = json.loads(self.state_file.read_text())
                self.pid, self.endpoint = int(st["pid"]), st["endpoint"]
                self.bucket, self.port = st.get("bucket", self.bucket), int(st.get("port", self.port))
            except (ValueError, KeyError, TypeError):
                self.pid = self.endpoint = None

    def running(self) -> bool:
        return bool(self.pid and pid_alive(self.pid) and "moto" in cmdline(self.pid) and self._answers())

    def _answers(self, timeout: float = 2.0) -> bool:
        if not self.endpoint:
            return False
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=timeout) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self, timeout_s: float = 30.0) -> "LocalS3":
        """Start (or reuse a running) server and create the bucket. Returns self."""
        if self.running():
            self.create_bucket()
            return self
        self.state_dir.mkdir(parents=True, exist_ok=True)
        port = self.port if self.port and port_is_free(self.port, self.host) else free_port(self.host)
        self.port = port
        self.endpoint = f"http://{self.host}:{port}"
        log = open(self.log_file, "ab")
        proc = subprocess.Popen(
            _moto_executable() + ["-H", self.host, "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the command that started it; not killed by the shell's Ctrl-C
        )
        log.close()
        self.pid = proc.pid
        deadline = time.monotonic() + timeout_s
        while not self._answers(timeout=1.0):
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with code {proc.returncode}; see {self.log_file}")
            if time.monotonic() > deadline:
                self._kill(proc.pid)
                raise TimeoutError(f"moto_server did not answer on {self.endpoint} within {timeout_s:.0f}s; "
                                   f"see {self.log_file}")
            time.sleep(0.2)
        self.state_file.write_text(json.dumps({"pid": self.pid, "endpoint": self.endpoint, "port": port,
                                               "bucket": self.bucket}, indent=2))
        self.create_bucket()
        return self

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=LOCAL_REGION,
            aws_access_key_id=LOCAL_ACCESS_KEY, aws_secret_access_key=LOCAL_SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"),
        )

    def create_bucket(self, bucket: str | None = None) -> None:
        c = self.client()
        name = bucket or self.bucket
        try:
            c.head_bucket(Bucket=name)
        except Exception:
            c.create_bucket(Bucket=name)

    def env(self, with_credentials: bool = True) -> dict[str, str]:
        if not self.endpoint:
            raise RuntimeError("local S3 is not started")
        return local_s3_env(self.endpoint, with_credentials)

    @staticmethod
    def _kill(pid: int, grace_s: float = 5.0) -> None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while pid_alive(pid) and time.monotonic() < deadline:
            try:  # reap it if it is our child
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.1)
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> bool:
        """Stop the recorded server (only if that pid is still a moto server). True if one was stopped."""
        stopped = False
        if self.pid and pid_alive(self.pid) and "moto" in cmdline(self.pid):
            self._kill(self.pid)
            stopped = True
        if self.state_file.exists():
            self.state_file.unlink()
        self.pid = None
        return stopped

    def status(self) -> dict:
        return {"running": self.running(), "endpoint": self.endpoint, "bucket": self.bucket, "pid": self.pid}

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.local_s3", description="local moto S3 server")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--bucket", default=DEFAULT_BUCKET)
    p.add_argument("--port", type=int, default=0, help="0 = a free port")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    a = p.parse_args(argv)
    s3 = LocalS3(a.state_dir, bucket=a.bucket, port=a.port)
    if a.action == "start":
        s3.start()
        print(json.dumps(s3.status()))
    elif a.action == "stop":
        print(json.dumps({"stopped": s3.stop()}))
    else:
        st = s3.status()
        print(json.dumps(st))
        return 0 if st["running"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
