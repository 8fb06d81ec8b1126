"""Submit a job to a Ray cluster (the local dev head or a real one) and optionally wait for it.

    from cluster.submit import submit_job
    status, logs = submit_job("python -m jobs.shard data/voc s3://bucket/shards --shard-size 500",
                              address="http://127.0.0.1:8265")

Equivalent to ``ray job submit --address ADDRESS --working-dir . -- ENTRYPOINT``. The working dir is uploaded
without the paths in ``.rayignore`` (Ray reads that file itself; the patterns are also passed as ``excludes``).
``stream=True`` (the CLI's default: ``python -m cluster.submit [--address A] -- ENTRYPOINT``) prints the job's log
lines, redacted, while it runs (``JobSubmissionClient.tail_job_logs``).

Environment of the job: the head's environment (on the local stack it holds the S3 endpoint and the local fake
credentials), plus the non-secret S3 settings of this process (endpoint, region, checksum mode), plus ``env``.
Credentials are shipped in the runtime_env only with ``ship_credentials=True``: Ray stores a job's runtime_env
in the job's metadata, readable with ``ray job list``; on real clusters use an instance profile / IRSA.
Auth: ``RAY_AUTH_MODE`` in this process's environment must match the cluster's (``disabled`` on the local stack,
``token`` on the shipped cluster configs, with the token in ``~/.ray/auth_token`` or ``RAY_AUTH_TOKEN``); it is
never put into the job's runtime_env (the nodes have their own). Logs returned are redacted
(``cluster.storage.redact``).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Callable

from cluster.storage import redact, s3_env_vars

__all__ = ["JobResult", "read_rayignore", "job_runtime_env", "default_address", "submit_job", "stream_logs", "main"]

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobResult(tuple):
    """``(status, logs)`` pair that also carries ``.job_id``; unpacks as ``status, logs = result``."""

    def __new__(cls, status: str, logs: str, job_id: str):
        self = super().__new__(cls, (status, logs))
        self.job_id = job_id
        return self

    @property
    def status(self) -> str:
        return self[0]

    @property
    def logs(self) -> str:
        return self[1]


def read_rayignore(working_dir: str | os.PathLike = ".") -> list[str]:
    """Patterns from ``<working_dir>/.rayignore`` (comments and blank lines dropped; [] when absent)."""
    f = Path(working_dir) / ".rayignore"
    if not f.exists():
        return []
    return [ln.strip() for ln in f.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]


def job_runtime_env(working_dir: str | os.PathLike | None = ".", env: dict[str, str] | None = None,
                    ship_credentials: bool = False, extra: dict | None = None) -> dict:
    """The runtime_env for a job: working_dir + excludes from .rayignore + env_vars (S3 settings, ``env``)."""
    rt: dict = {}
    if working_dir is not None:
        wd = Path(working_dir).resolve()
        if not wd.is_dir():
            raise FileNotFoundError(f"working_dir does not exist: {wd}")
        rt["working_dir"] = str(wd)
        excludes = read_rayignore(wd)
        if excludes:
            rt["excludes"] = excludes
    env_vars = s3_env_vars(include_credentials=ship_credentials)
    env_vars.update({k: str(v) for k, v in (env or {}).items()})
    if env_vars:
        rt["env_vars"] = env_vars
    if extra:
        rt.update(extra)
    return rt


def default_address() -> str:
    """The dashboard (job API) address: RAY_API_SERVER_ADDRESS (the local stack's env file sets it), else
    RAY_ADDRESS when it is an http(s) address, else ``http://127.0.0.1:8265``."""
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        addr = os.environ.get(var, "")
        if addr.startswith(("http://", "https://")):
            return addr
    return "http://127.0.0.1:8265"


def submit_job(entrypoint: str, address: str | None = None, working_dir: str | os.PathLike | None = ".",
               env: dict[str, str] | None = None, wait: bool = True, timeout_s: float = 3600.0,
               submission_id: str | None = None, ship_credentials: bool = False,
               entrypoint_num_cpus: float | None = None, entrypoint_num_gpus: float | None = None,
               poll_s: float = 1.0, stop_on_timeout: bool = True,
               stream: bool | Callable[[str], None] = False) -> JobResult:
    """Submit ``entrypoint`` as a Ray job. Returns ``(status, logs)`` (a :class:`JobResult`, with ``.job_id``).

    ``wait=False`` returns right after submission with the current status and empty logs. On timeout the job
    is stopped (``stop_on_timeout``) and the status is ``"TIMEOUT"`` with the logs so far. ``stream``: while
    waiting, pass each complete, redacted log line (with its newline) to this callable (``True``: write to stderr).
    """
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address or default_address())
    kwargs = {}
    if entrypoint_num_cpus is not None:
        kwargs["entrypoint_num_cpus"] = entrypoint_num_cpus
    if entrypoint_num_gpus is not None:
        kwargs["entrypoint_num_gpus"] = entrypoint_num_gpus
    job_id = client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                               runtime_env=job_runtime_env(working_dir, env, ship_credentials), **kwargs)
    if not wait:
        return JobResult(str(client.get_job_status(job_id).value), "", job_id)
    deadline = time.monotonic() + timeout_s
    if stream:
        sink = stream if callable(stream) else (lambda line: (sys.stderr.write(line), sys.stderr.flush()))
        asyncio.run(stream_logs(client, job_id, sink, timeout_s))  # returns when the job ends (or at the deadline)
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            break
        if time.monotonic() > deadline:
            if stop_on_timeout:
                client.stop_job(job_id)
            status = "TIMEOUT"
            break
        time.sleep(poll_s)
    return JobResult(status, redact(client.get_job_logs(job_id)), job_id)


async def stream_logs(client, job_id: str, sink: Callable[[str], None], timeout_s: float | None = None) -> bool:
    """Pass the job's log to ``sink`` line by line (redacted; a line is held until its newline so that a secret
    split across two chunks is still caught) until the job ends. Returns False when ``timeout_s`` ran out first."""
    buf = ""

    async def tail() -> None:
        nonlocal buf
        async for chunk in client.tail_job_logs(job_id):
            buf += chunk
            *lines, buf = buf.split("\n")
            for line in lines:
                sink(redact(line) + "\n")

    try:
        await asyncio.wait_for(tail(), timeout_s)
        done = True
    except asyncio.TimeoutError:
        done = False
    if buf:
        sink(redact(buf) + "\n")
    return done


def main(argv: list[str] | None = None) -> int:
    """``python -m cluster.submit [--address A] [--working-dir D] [--timeout S] [--no-stream] -- ENTRYPOINT...``:
    submit, stream the log while the job runs, exit 0 when it SUCCEEDED (1 otherwise)."""
    import shlex

    p = argparse.ArgumentParser(prog="python -m cluster.submit", description=main.__doc__.splitlines()[0])
    p.add_argument("--address", default=None, help="dashboard address (default: RAY_API_SERVER_ADDRESS / "
                                                   "RAY_ADDRESS if http(s), else http://127.0.0.1:8265)")
    p.add_argument("--working-dir", default=".")
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds before the job is stopped")
    p.add_argument("--no-stream", action="store_true", help="print the log only at the end")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- then the command to run on the cluster")
    args = p.parse_args(argv)
    cmd = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    if not cmd:
        p.error("no entrypoint (put it after --)")
    res = submit_job(shlex.join(cmd), address=args.address, working_dir=args.working_dir, timeout_s=args.timeout,
                     stream=not args.no_stream)
    if args.no_stream:
        sys.stderr.write(res.logs)
    print(f"job {res.job_id}: {res.status}", file=sys.stderr)
    return 0 if res.status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
