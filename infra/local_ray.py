"""A local Ray head for development and the demo (``ray start --head`` on 127.0.0.1 with the dashboard).

    python -m infra.local_ray start [--num-cpus 8] [--dashboard-port 8265] [--state-dir .wsss-stack]
    python -m infra.local_ray status
    python -m infra.local_ray stop

Why the details matter:
- The head is started with this interpreter's ``bin`` folder (the project's ``.venv/bin``) first on PATH: a job's
  ``python -m jobs.X`` entrypoint runs with the PATH that ``ray start`` had, and would otherwise be the system
  Python without torch or ray.
- ``RAY_AUTH_MODE`` is set explicitly (default ``disabled`` for this local, 127.0.0.1-only dev stack; Ray >= 2.59
  turns token auth on by default) and must be the same for ``ray start``, tests and ``ray job submit``: the value
  is recorded in ``<state-dir>/ray.json`` and in the stack's env file. ``RAY_USAGE_STATS_ENABLED=0``.
- Every port is a free one (GCS, dashboard -- 8265 when free --, client server, agents, metrics), so several
  heads can run on one shared machine, and the head gets its own ``--temp-dir``. ``stop`` ends only the
  processes of this head (found by that temp dir in their command lines), never other users' Ray processes the
  way ``ray stop`` (which kills every Ray process of the machine) would. On a machine that is yours alone,
  ``ray stop`` works too.
- Extra environment given to :meth:`LocalRay.start` (e.g. the local S3 endpoint and its fake credentials) is
  inherited by every worker and job driver of this head.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from infra.local_s3 import DEFAULT_STATE_DIR, cmdline, free_port, pid_alive, port_is_free

DEFAULT_AUTH_MODE = "disabled"
DEFAULT_NUM_CPUS = 8  # more logical CPUs than the 2 cores of the dev box: trials, train workers and Ray Data


def venv_bin() -> Path:
    """The folder of the running interpreter (the project's .venv/bin when run as .venv/bin/python)."""
    return Path(sys.executable).parent


def ray_executable() -> str:
    exe = venv_bin() / "ray"
    if exe.exists():
        return str(exe)
    found = shutil.which("ray")
    if not found:
        raise FileNotFoundError("no `ray` executable beside the interpreter or on PATH (pip install 'ray[default]')")
    return found


def head_env(extra: dict[str, str] | None = None, auth_mode: str | None = None) -> dict[str, str]:
    """The environment for ``ray start``: .venv/bin first on PATH, auth mode, no usage stats, plus ``extra``."""
    env = dict(os.environ)
    env.update(extra or {})
    path = [str(venv_bin())] + [p for p in env.get("PATH", "").split(os.pathsep) if p and p != str(venv_bin())]
    env["PATH"] = os.pathsep.join(path)
    env["VIRTUAL_ENV"] = str(venv_bin().parent)
    env["RAY_AUTH_MODE"] = auth_mode or os.environ.get("RAY_AUTH_MODE") or DEFAULT_AUTH_MODE
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.pop("RAY_ADDRESS", None)  # `ray start --head` must not try to join another cluster
    return env


class LocalRay:
    """Start/stop a local Ray head. After ``start()``: ``.gcs_address`` (``127.0.0.1:PORT`` for ``ray.init``),
    ``.dashboard_url`` (``http://127.0.0.1:PORT`` for ``ray job submit`` / JobSubmissionClient)."""

    def __init__(self, state_dir: str | os.PathLike = DEFAULT_STATE_DIR, num_cpus: int = DEFAULT_NUM_CPUS,
                 dashboard_port: int = 8265, auth_mode: str | None = None, num_gpus: int | None = None):
        self.state_dir = Path(state_dir).resolve()
        self.num_cpus = int(num_cpus)
        self.num_gpus = num_gpus
        self.dashboard_port = int(dashboard_port)
        self.auth_mode = auth_mode or os.environ.get("RAY_AUTH_MODE") or DEFAULT_AUTH_MODE
        # short, per-state-dir temp dir: Ray's unix socket paths must stay under ~107 characters
        digest = hashlib.sha1(str(self.state_dir).encode()).hexdigest()[:8]
        self.temp_dir = f"/tmp/wsss-ray-{os.getuid()}-{digest}"
        self.gcs_address: str | None = None
        self.dashboard_url: str | None = None
        self._load()

    @property
    def state_file(self) -> Path:
        return self.state_dir / "ray.json"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "ray-start.log"

    def _load(self) -> None:
        if self.state_file.exists():
            try:
                st = json.loads(self.state_file.read_text())
                self.gcs_address, self.dashboard_url = st["gcs_address"], st["dashboard_url"]
                self.temp_dir, self.auth_mode = st.get("temp_dir", self.temp_dir), st.get("auth_mode", self.auth_mode)
            except (ValueError, KeyError, TypeError):
                self.gcs_address = self.dashboard_url = None

    def pids(self) -> list[int]:
        """Pids of this head's processes (their command lines name its temp dir)."""
        me = os.getpid()
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != me and self.temp_dir in cmdline(int(entry)):
                out.append(int(entry))
        return sorted(out)

    def _dashboard_answers(self, timeout: float = 2.0) -> bool:
        if not self.dashboard_url:
            return False
        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=timeout) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def running(self) -> bool:
        return bool(self.gcs_address and self.pids() and self._dashboard_answers())

    def start(self, env: dict[str, str] | None = None, timeout_s: float = 120.0) -> "LocalRay":
        """Start the head (or reuse a running one). ``env``: extra variables for every worker and job driver."""
        if self.running():
            return self
        if self.pids():  # half-dead leftovers of an earlier head with this temp dir
            self._kill(self.pids())
        self.state_dir.mkdir(parents=True, exist_ok=True)
        gcs_port = free_port()
        dport = self.dashboard_port if self.dashboard_port and port_is_free(self.dashboard_port) else free_port()
        ports = {name: free_port() for name in ("ray-client-server-port", "dashboard-agent-listen-port",
                                                "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                                "metrics-export-port", "node-manager-port",
                                                "object-manager-port")}
        cmd = [ray_executable(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dport}",
               f"--num-cpus={self.num_cpus}", "--disable-usage-stats", f"--temp-dir={self.temp_dir}"]
        if self.num_gpus is not None:
            cmd.append(f"--num-gpus={int(self.num_gpus)}")
        cmd += [f"--{k}={v}" for k, v in ports.items()]
        with open(self.log_file, "ab") as log:
            proc = subprocess.run(cmd, env=head_env(env, self.auth_mode), stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"`ray start --head` failed with code {proc.returncode}; see {self.log_file}")
        self.gcs_address = f"127.0.0.1:{gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{dport}"
        deadline = time.monotonic() + timeout_s
        while not self._dashboard_answers():
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray dashboard did not answer on {self.dashboard_url}; see {self.log_file}")
            time.sleep(0.5)
        self.state_file.write_text(json.dumps({
            "gcs_address": self.gcs_address, "dashboard_url": self.dashboard_url, "temp_dir": self.temp_dir,
            "auth_mode": self.auth_mode, "num_cpus": self.num_cpus}, indent=2))
        return self

    @staticmethod
    def _kill(pids: list[int], grace_s: float = 10.0) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in pids:
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def stop(self, remove_temp: bool = False) -> int:
        """End this head's processes (by pid; they name its temp dir). Returns how many were signalled.
        ``remove_temp`` also deletes the head's temp dir (its session logs).

        Order matters: workers/agents/dashboard first, then the raylet, then the GCS. SIGTERM to all at once
        leaves raylet and GCS waiting on each other until the SIGKILL fallback (10+ s instead of ~1 s)."""
        pids = self.pids()

        def rank(pid: int) -> int:
            c = cmdline(pid)
            return 2 if "gcs_server" in c else 1 if "/raylet/raylet" in c else 0

        for level in (0, 1, 2):
            self._kill([p for p in pids if rank(p) == level], grace_s=5.0)
        if remove_temp and not self.pids():
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        if self.state_file.exists():
            self.state_file.unlink()
        self.gcs_address = self.dashboard_url = None
        return len(pids)

    def status(self) -> dict:
        return {"running": self.running(), "gcs_address": self.gcs_address, "dashboard_url": self.dashboard_url,
                "auth_mode": self.auth_mode, "temp_dir": self.temp_dir}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.local_ray", description="local Ray head on 127.0.0.1")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--num-cpus", type=int, default=DEFAULT_NUM_CPUS)
    p.add_argument("--num-gpus", type=int, default=None)
    p.add_argument("--dashboard-port", type=int, default=8265, help="used when free, else a free port")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    a = p.parse_args(argv)
    r = LocalRay(a.state_dir, num_cpus=a.num_cpus, dashboard_port=a.dashboard_port, num_gpus=a.num_gpus)
    if a.action == "start":
        r.start()
        print(json.dumps(r.status()))
    elif a.action == "stop":
        print(json.dumps({"stopped_processes": r.stop()}))
    else:
        st = r.status()
        print(json.dumps(st))
        return 0 if st["running"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
