"""The segmentation stage on the local stack: a real local Ray cluster (``ray_local``), the real moto S3 server
over HTTP (``s3_server``), the session's synthetic set sharded on S3, pseudo labels as a PNG prefix on S3.

(1) a 2-worker Ray Train run (tiny backbone, a few steps) with checkpoints on S3: a label missing from the prefix
    is a reject and the rest trains; an injected failure after the first checkpoint fails the run; re-running with
    the same name resumes from that checkpoint's step; the exported final folder is a plain seg checkpoint;
(2) Ray Data prediction over the val shards (actor + CRF tasks, PNGs on S3) equals single-process prediction.
"""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.ray


def _quiet():
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


@pytest.fixture(scope="module")
def seg_material(s3_server, synth_root):
    from wsss.data import fs, open_dataset
    from wsss.data.io import encode_label_png
    from wsss.data.shards import write_shards
    from wsss.seg.data import label_uri

    base = s3_server.unique_uri("seg")
    train_uri, val_uri, labels = f"{base}/shards/train", f"{base}/shards/val", f"{base}/pseudo"
    train = open_dataset(str(synth_root), "train")
    write_shards(train, train_uri, shard_size=8, progress=False)
    write_shards(open_dataset(str(synth_root), "val"), val_uri, shard_size=8, progress=False)
    for i in train.ids[1:]:  # the first id has no pseudo label: a reject
        fs.write_bytes(label_uri(labels, i), encode_label_png(train.load_mask(i)))
    return {"train": train_uri, "val": val_uri, "labels": labels, "missing": train.ids[0], "n_train": len(train.ids)}


def _cfg(**ov):
    from pathlib import Path

    from wsss.seg.config import load_seg_config

    cfg = Path(__file__).resolve().parents[1] / "configs/synth_seg.yaml"
    return load_seg_config(cfg, ["model.width=8", "model.head_channels=16", "data.crop=48", "optim.batch_size=2",
                                 "eval.scales=[1.0,1.25]", "crf.iters=5"] + [f"{k}={v}" for k, v in ov.items()])


@pytest.fixture(scope="module")
def trained_run(ray_local, s3_server, seg_material):
    import ray.train

    from jobs.train_seg import run_train_seg

    _quiet()
    storage = s3_server.unique_uri("seg-runs")
    cfg = _cfg(**{"optim.max_steps": 6})
    kw = dict(labels=seg_material["labels"], num_workers=2, max_failures=0, val_uri=seg_material["val"],
              checkpoint_every=2, dist_timeout_s=60)
    with pytest.raises(ray.train.TrainingFailedError):
        run_train_seg(cfg, seg_material["train"], storage, "seg", hooks={"fail_after_step": 2}, **kw)
    first = _keys(s3_server, f"{storage}/seg")
    res = run_train_seg(_cfg(**{"optim.max_steps": 6}), seg_material["train"], storage, "seg", **kw)
    return res, first, storage


def _keys(s3_server, uri: str) -> list[str]:
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    client = s3_server.client()
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def test_ray_train_s3_checkpoints_rejects_and_resume(trained_run, seg_material, s3_server):
    from wsss.seg.predict import load_seg_model

    res, first, storage = trained_run
    # attempt 1 left exactly one checkpoint (step 2) and no final folder
    assert len([k for k in first if "/checkpoint_" in k and k.endswith("/model.pt")]) == 1
    assert not any("/final/" in k for k in first)
    # attempt 2 resumed at step 2 and finished at 6
    m = res["metrics"]
    assert m["resumed"] is True and m["start_step"] == 2 and m["step"] == 6
    assert [h["step"] for h in res["history"]] == [2, 4, 6]
    assert res["history"][0]["resumed"] is False
    assert 0.0 <= m["val_miou"] <= 1.0 and m["images_per_s"] > 0 and np.isfinite(m["loss"])
    # the image without a pseudo label was rejected with its reason; the rest trained
    assert [i for i, _ in res["rejects"]] == [seg_material["missing"]]
    assert "label PNG missing" in res["rejects"][0][1]
    assert res["plan"]["n_train"] == seg_material["n_train"] - 1
    assert res["plan"]["steps_per_epoch"] == ((seg_material["n_train"] - 1) // 2) // 2
    keys = _keys(s3_server, f"{storage}/seg")
    assert len({k.rsplit("/", 2)[-2] for k in keys if "/checkpoint_" in k and k.endswith("/model.pt")}) == 2
    assert res["final"] == f"{storage}/seg/final"
    model, cfg, meta = load_seg_model(res["final"], device="cpu")
    assert meta["kind"] == "seg" and meta["step"] == 6 and meta["world_size"] == 2
    assert cfg.data.labels == seg_material["labels"] and cfg.model.width == 8


def test_ray_data_prediction_equals_single_process(trained_run, seg_material, s3_server, tmp_path):
    from jobs.predict_seg import run_predict_seg
    from wsss.data import fs
    from wsss.data.io import decode_mask
    from wsss.seg.predict import predict_folder

    _quiet()
    final = trained_run[0]["final"]
    out = s3_server.unique_uri("seg-pred")
    r = run_predict_seg(final, seg_material["val"], out, multi_scale=True, crf=True, batch_size=2)
    assert r["n_ok"] == 6 and r["n_rejected"] == 0
    local = tmp_path / "local"
    predict_folder(final, seg_material["val"], str(local), multi_scale=True, crf=True, progress=False)
    names = sorted(p.name for p in local.glob("*.png"))
    assert len(names) == 6 and sorted(n for n in fs.listdir(out) if n.endswith(".png")) == names
    for n in names:
        a = decode_mask(fs.read_bytes(fs.join(out, n)), n)
        b = decode_mask((local / n).read_bytes(), n)
        assert a.shape == b.shape and (a == b).mean() > 0.999, n
    assert {"results.parquet", "rejects.parquet"} <= set(fs.listdir(out))
    # a rerun has nothing left to do
    assert run_predict_seg(final, seg_material["val"], out, crf=True)["n_done_before"] == 6
