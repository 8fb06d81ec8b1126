"""Fault-injection hooks for the Ray Train tests (``jobs.train`` calls ``on_step`` / ``on_epoch`` on every worker).

Each factory returns a nested function, which Ray pickles by value, so the workers need not import this module."""
from __future__ import annotations


def fail_after_epoch(n: int):
    """``on_epoch``: rank 0 raises after epoch ``n`` of a run that did not resume, once that epoch's checkpoint is
    registered (a report is registered asynchronously; a failure before that would lose it)."""

    def on_epoch(info: dict) -> None:
        if info["rank"] == 0 and not info["resumed"] and info["epoch"] == n:
            import ray.train

            ray.train.get_all_reported_checkpoints(timeout_s=120)
            raise RuntimeError(f"injected failure after epoch {n} (test hook)")

    return on_epoch


def record_steps(log_dir: str, kill_rank: int, kill_after_step: int, step_sleep: float = 0.0):
    """``on_step``: every rank appends ``step resumed`` to ``<log_dir>/rank<r>.steps``; in a run that did not
    resume, rank ``kill_rank`` writes its pid to ``<log_dir>/rank<r>.pid`` after step ``kill_after_step`` (once the
    checkpoints reported so far are registered) and waits there to be killed."""

    def on_step(info: dict) -> None:
        import os
        import time

        rank, step = info["rank"], info["step"]
        with open(os.path.join(log_dir, f"rank{rank}.steps"), "a") as f:
            f.write(f"{step} {int(bool(info['resumed']))}\n")
        if step_sleep:
            time.sleep(step_sleep)
        if rank == kill_rank and step == kill_after_step and not info["resumed"]:
            import ray.train

            ray.train.get_all_reported_checkpoints(timeout_s=120)
            tmp = os.path.join(log_dir, f".rank{rank}.tmp")
            with open(tmp, "w") as f:
                f.write(str(os.getpid()))
            os.replace(tmp, os.path.join(log_dir, f"rank{rank}.pid"))
            time.sleep(120)  # killed here by the test

    return on_step


def record_batches(log_dir: str):
    """``on_step``: every rank appends ``epoch step id,id,...`` (the ids of the batch it trained on) to
    ``<log_dir>/rank<r>.batches``."""

    def on_step(info: dict) -> None:
        import os

        with open(os.path.join(log_dir, f"rank{info['rank']}.batches"), "a") as f:
            f.write(f"{info['epoch']} {info['step']} {','.join(info['ids'])}\n")

    return on_step
