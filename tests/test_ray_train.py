"""Ray Train (V2) job on the local stack: real local Ray cluster (``ray_local``), real moto S3 over HTTP
(``s3_server``), tiny synthetic shards. Each TorchTrainer run costs ~20-40 s here (mostly start-up), so the tests are
few: (1) a 2-worker gloo run writes checkpoints to S3, an interrupted run resumes from them when re-run with the
same name, and the exported final folder is a plain checkpoint; (2) a worker killed with SIGKILL mid-epoch is
replaced and the run completes after resuming from the last step-level checkpoint (FailureConfig), repeating no
more than one checkpoint interval of steps; (3) the Ray Data ingest (decode + augmentation in map_batches, files
shuffled per epoch) gives every rank the same batches in a rerun with the same seed, and records a corrupt image as
a reject. Faults are injected and batches recorded by hooks from tests/train_hooks.py."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tests.train_hooks import fail_after_epoch, record_batches, record_steps

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


# ---- ingest: cluster.ingest readers, decode + augmentation in map_batches, reproducible batches per rank ----------

def _corrupt_one_image(uri: str) -> str:
    """Overwrite the image bytes of the second row of the first shard file with garbage; returns that row's id."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from wsss.data.shards import shard_files

    path = shard_files(uri)[0]
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    images[1] = b"this is not an image"
    table = table.set_column(table.schema.get_field_index("image"), "image",
                             pa.array(images, type=table.schema.field("image").type))
    pq.write_table(table, path)
    return table.column("id")[1].as_py()


def test_decode_augment_is_the_training_transform_and_marks_bad_images(synth_root):
    """The map_batches function applies wsss.data.transforms.TrainTransform (the single-process loop's augmentation)
    with the per-row seed, and turns an undecodable image into a reject row instead of failing the batch."""
    import dataclasses

    import numpy as np

    from cluster.ingest import DecodeAugment, TrainCollate, _row_seed, take_good
    from wsss.data import open_dataset
    from wsss.data.io import decode_image
    from wsss.data.transforms import TrainTransform

    cfg = tiny_cfg()
    ds = open_dataset(str(synth_root), "train")
    ids = ds.ids[:3]
    raw = [ds.image_bytes(i) for i in ids]
    batch = {"id": np.asarray(ids, dtype=object),
             "image": np.asarray([raw[0], b"garbage", raw[2]], dtype=object),
             "labels": np.asarray([ds.labels(i) for i in ids], dtype=object),
             "_aug": np.asarray([0.25, 0.5, 0.75])}
    out = DecodeAugment(dataclasses.asdict(cfg.data), seed=7, source="shards-x")(batch)
    assert out["image"].shape == (3, 3, 48, 48) and out["labels"].shape == (3, len(ds.class_names) - 1)
    assert out["ok"].tolist() == [True, False, True]
    assert ids[1] in out["reason"][1] and "shards-x" in out["reason"][1] and "\n" not in out["reason"][1]
    want = TrainTransform(cfg.data, seed=7)(decode_image(raw[2], "x"), np.random.default_rng(_row_seed(7, ids[2], 0.75)))
    assert np.array_equal(out["image"][2], want.numpy())
    other = DecodeAugment(dataclasses.asdict(cfg.data), seed=7)({**batch, "_aug": np.asarray([0.25, 0.5, 0.9])})
    assert np.array_equal(other["image"][0], out["image"][0])  # same draw -> same augmentation
    assert not np.array_equal(other["image"][2], out["image"][2])  # another epoch's draw -> another augmentation
    rejects: list = []
    good = take_good(TrainCollate()(out), rejects)
    assert good["id"] == [ids[0], ids[2]] and tuple(good["image"].shape) == (2, 3, 48, 48)
    assert [r[0] for r in rejects] == [ids[1]]


def test_readers_read_the_manifest_files_and_shuffle_per_epoch(ray_local, synth_root, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cluster.ingest import READERS, read_shards
    from wsss.data import open_dataset
    from wsss.data.shards import iter_shard_rows, write_shards

    _quiet_data()
    uri = str(tmp_path / "shards")
    write_shards(open_dataset(str(synth_root), "train"), uri, shard_size=4, progress=False)
    # a stray data-looking file that the manifest does not list must not be read
    pq.write_table(pa.table({"id": ["stray"], "image": [b"x"], "labels": [[1.0]]}), str(tmp_path / "shards" / "zz.parquet"))
    want = [r["id"] for r in iter_shard_rows(uri, columns=["id"])]
    for reader in READERS:
        ds = read_shards(uri, columns=["id", "labels"], reader=reader)
        rows = ds.take_all()
        assert sorted(r["id"] for r in rows) == sorted(want), reader
        assert set(rows[0]) == {"id", "labels"}, reader
    with pytest.raises(ValueError, match="unknown shard reader"):
        read_shards(uri, reader="nope")
    # seeded file shuffle: different per pass (epoch), the same for a new dataset with the same seed
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        def passes(seed):
            ds = read_shards(uri, columns=["id"], reader="parquet-v1", shuffle_seed=seed)
            return [[r["id"] for r in ds.iter_rows()] for _ in range(2)]

        a, b = passes(3), passes(3)
    finally:
        ctx.execution_options.preserve_order = saved
    assert a == b
    assert a[0] != a[1] and sorted(a[0]) == sorted(a[1]) == sorted(want)


def test_ingest_same_batches_per_rank_for_a_seed_and_rejects_recorded(ray_local, synth_root, tmp_path):
    from jobs.train import run_training
    from wsss.data import open_dataset
    from wsss.data.shards import write_shards

    _quiet_data()
    uri = str(tmp_path / "shards")
    write_shards(open_dataset(str(synth_root), "train"), uri, shard_size=4, progress=False)
    bad_id = _corrupt_one_image(uri)
    cfg = tiny_cfg(epochs=2)
    runs = []
    for k in range(2):
        logs = tmp_path / f"batches-{k}"
        logs.mkdir()
        res = run_training(cfg, uri, str(tmp_path / "runs"), f"repro-{k}", num_workers=2, max_failures=0,
                           dist_timeout_s=60, export=False, hooks={"on_step": record_batches(str(logs))})
        per_rank = {}
        for rank in (0, 1):
            rows = [ln.split(" ") for ln in (logs / f"rank{rank}.batches").read_text().splitlines()]
            per_rank[rank] = [(int(e), int(s), tuple(ids.split(","))) for e, s, ids in rows]
        runs.append((res, per_rank))
    (res_a, a), (res_b, b) = runs
    per_epoch = res_a["plan"]["steps_per_epoch"]
    assert res_a["plan"]["ingest"] == "data" and res_a["metrics"]["ingest"] == "data"
    for rank in (0, 1):
        assert len(a[rank]) == 2 * per_epoch
        assert a[rank][0] == b[rank][0], (rank, a[rank][0], b[rank][0])  # the first batch
        assert a[rank] == b[rank], rank  # and every later one
    assert a[0][0][2] != a[1][0][2]  # the ranks got different rows
    # files (and rows) come in another order in the second epoch
    order = {e: [i for rank in (0, 1) for ep, _, ids in a[rank] if ep == e for i in ids] for e in (0, 1)}
    assert order[0] != order[1]
    # the corrupt image was skipped and reported (gathered from whichever rank met it), in both runs
    seen = [i for rank in (0, 1) for _, _, ids in a[rank] for i in ids]
    assert bad_id not in seen
    for res in (res_a, res_b):
        assert res["metrics"]["n_rejects"] == 1, res["metrics"]
    import json

    with open(os.path.join(res_a["checkpoint"], "metrics.json")) as f:
        rejects = json.load(f)["rejects"]
    assert [r[0] for r in rejects] == [bad_id] and bad_id in rejects[0][1]
