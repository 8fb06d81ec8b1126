"""Ray Train (V2) job on the local stack: real local Ray cluster (``ray_local``), real moto S3 over HTTP
(``s3_server``), tiny synthetic shards. Each TorchTrainer run costs ~20-40 s here (mostly start-up), so the tests are
few: (1) a 2-worker gloo run writes checkpoints to S3, an interrupted run resumes from them when re-run with the
same name, and the exported final folder is a plain checkpoint; (2) a worker killed with SIGKILL mid-epoch is
replaced and the run completes after resuming from the last step-level checkpoint (FailureConfig), repeating no
more than one checkpoint interval of steps. Faults are injected by hooks from tests/train_hooks.py."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tests.train_hooks import fail_after_epoch, record_steps

pytestmark = pytest.mark.ray

TINY = {
    "model": {"backbone": "tiny", "width": 8},
    "data": {"crop": 48, "resize_long": [48, 64]},
    "method": {"name": "daen", "scale": 0.5},
    "optim": {"batch_size": 2, "epochs": 2, "lr": 0.01},
    "seed": 0,
}


def tiny_cfg(**optim):
    from wsss.config import from_dict

    d = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    d["optim"].update(optim)
    return from_dict(d)


@pytest.fixture(scope="module")
def shards_s3(s3_server, synth_root):
    """Train and val shards of the session's synthetic set (18 train / 6 val images, 64 px) on the moto S3."""
    from wsss.data import open_dataset
    from wsss.data.shards import write_shards

    base = s3_server.unique_uri("train-shards")
    train_uri, val_uri = f"{base}/train", f"{base}/val"
    m = write_shards(open_dataset(str(synth_root), "train"), train_uri, shard_size=8, progress=False)
    write_shards(open_dataset(str(synth_root), "val"), val_uri, shard_size=8, progress=False)
    assert m["n_images"] >= 16
    return train_uri, val_uri


def _quiet_data():
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


def _objects(s3_server, uri: str) -> dict[str, bytes]:
    """All objects under an s3:// prefix: key -> bytes."""
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    client = s3_server.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def test_two_workers_s3_checkpoints_and_resume(ray_local, s3_server, shards_s3):
    import ray.train

    from jobs.train import run_training
    from wsss.checkpoint import load_cam_model

    _quiet_data()
    train_uri, val_uri = shards_s3
    storage = s3_server.unique_uri("runs")
    cfg = tiny_cfg(epochs=2)

    # Attempt 1: an injected failure right after epoch 1's checkpoint, no retries -> the run fails.
    with pytest.raises(ray.train.TrainingFailedError):
        run_training(cfg, train_uri, storage, "resume", num_workers=2, max_failures=0, val_uri=val_uri,
                     dist_timeout_s=60, hooks={"on_epoch": fail_after_epoch(1)})
    objs = _objects(s3_server, f"{storage}/resume")
    ckpt_models = [k for k in objs if k.endswith("/model.pt") and "/checkpoint_" in k]
    assert len(ckpt_models) == 1, sorted(objs)
    assert not any("/final/" in k for k in objs)

    # Attempt 2: same name and storage -> continues at epoch 2, step 4, instead of starting over.
    res = run_training(cfg, train_uri, storage, "resume", num_workers=2, max_failures=0, val_uri=val_uri,
                       dist_timeout_s=60)
    m = res["metrics"]
    per_epoch = res["plan"]["steps_per_epoch"]
    assert per_epoch == (18 // 2) // 2
    assert m["resumed"] is True and m["start_epoch"] == 1
    assert m["epoch"] == 2 and m["step"] == 2 * per_epoch
    assert [h["epoch"] for h in res["history"]] == [1, 2]
    assert res["history"][0]["resumed"] is False and res["history"][1]["resumed"] is True
    for key in ("loss", "cla", "eq", "ce", "lr", "samples_per_s", "val_cam_miou"):
        assert m.get(key) is not None, key
    assert 0.0 <= m["val_cam_miou"] <= 1.0 and m["samples_per_s"] > 0
    assert res["checkpoint"].startswith(f"{storage}/resume/checkpoint_")

    objs = _objects(s3_server, f"{storage}/resume")
    ckpt_dirs = {k.rsplit("/", 2)[-2] for k in objs if "/checkpoint_" in k and k.endswith("/model.pt")}
    assert len(ckpt_dirs) == 2  # CheckpointConfig(num_to_keep=2)
    assert any(k.endswith("/train_state.pt") for k in objs)
    # The exported final folder is a plain checkpoint that `wsss cams --checkpoint` loads.
    assert res["final"] == f"{storage}/resume/final"
    model, fcfg, meta = load_cam_model(res["final"], device="cpu")
    assert meta["epoch"] == 2 and meta["step"] == 2 * per_epoch and meta["kind"] == "cam"
    assert fcfg.model.width == 8
    # No credential in anything the run wrote.
    secret = s3_server.secret_key.encode()
    assert not [k for k, v in objs.items() if secret in v]


def test_killed_worker_mid_epoch_repeats_at_most_one_checkpoint_interval(ray_local, s3_server, shards_s3,
                                                                          tmp_path):
    from jobs.train import run_training

    _quiet_data()
    train_uri, _ = shards_s3
    storage = s3_server.unique_uri("runs")
    logs = tmp_path / "steps"
    logs.mkdir()
    every = 3
    cfg = tiny_cfg(epochs=2, batch_size=1)  # 9 steps per epoch per worker: checkpoints at 3, 6, 9, 12, 15, 18
    kill_after = 5  # mid-epoch, 2 steps after the step-3 checkpoint
    out: dict = {}

    def target():
        try:
            out["res"] = run_training(cfg, train_uri, storage, "killed", num_workers=2, max_failures=2,
                                      dist_timeout_s=60, checkpoint_every=every, export=False,
                                      hooks={"on_step": record_steps(str(logs), 1, kill_after, step_sleep=0.1)})
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            out["err"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    pid_file = logs / "rank1.pid"
    deadline = time.monotonic() + 240
    while not pid_file.exists() and th.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid_file.exists(), f"worker never wrote its pid: {out.get('err')!r}"
    pid = int(pid_file.read_text())
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)  # inside step 5 of epoch 1 (9 steps)
    th.join(timeout=300)
    assert not th.is_alive(), "training did not finish after the worker was killed"
    if "err" in out:
        raise out["err"]
    res = out["res"]
    m = res["metrics"]
    per_epoch, total = res["plan"]["steps_per_epoch"], res["plan"]["total_steps"]
    assert (per_epoch, total) == (9, 18)
    assert m["epoch"] == 2 and m["step"] == total and m["resumed"] is True
    assert [h["epoch"] for h in res["history"]] == [1, 2]
    for rank in (0, 1):
        rows = [tuple(int(x) for x in ln.split()) for ln in (logs / f"rank{rank}.steps").read_text().splitlines()]
        first = [s for s, resumed in rows if not resumed]
        again = [s for s, resumed in rows if resumed]
        assert again and again == list(range(again[0], total + 1)), rows  # the replacement ran to the end
        repeated = sorted(set(first) & set(again))
        # resumed from the step-3 checkpoint: steps 4..5 are done twice, not the whole epoch (1..5)
        assert again[0] == every + 1, rows
        assert len(repeated) <= every, (rank, repeated)
        assert set(first) | set(again) == set(range(1, total + 1))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
