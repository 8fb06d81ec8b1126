"""Distributed evaluation (jobs/evaluate.py) on the local stack: real local Ray (``ray_local``), real moto S3
(``s3_server``). Predictions (noisy copies of the ground truth, one missing, one of the wrong size) and shards
live on S3; the Ray Data result must equal ``wsss.metrics.evaluate_folder`` on the same dataset exactly."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.ray

N_IMAGES = 12


@pytest.fixture(scope="module")
def eval_material(tmp_path_factory, s3_server):
    from wsss.data import fs, open_dataset
    from wsss.data.io import encode_label_png
    from wsss.data.shards import write_shards
    from wsss.data.synth import make_synthetic

    root = tmp_path_factory.mktemp("evaluate")
    make_synthetic(str(root / "data"), num_images=N_IMAGES, size=64, seed=1, val_fraction=0.0)
    ds = open_dataset(str(root / "data"), "train")
    base = s3_server.unique_uri("evaluate")
    shards = f"{base}/shards"
    write_shards(ds, shards, shard_size=5, progress=False)
    pred = f"{base}/pred"
    rng = np.random.default_rng(0)
    ids = sorted(ds.ids)
    missing, wrong_size = ids[2], ids[5]
    for i in ids:
        if i == missing:
            continue
        gt = ds.load_mask(i).copy()
        gt[gt == 255] = 0
        noise = rng.random(gt.shape) < 0.2
        gt[noise] = rng.integers(0, ds.num_classes, size=int(noise.sum()))
        if i == wrong_size:
            gt = gt[:-3]
        fs.write_bytes(fs.join(pred, f"{i}.png"), encode_label_png(gt.astype(np.uint8)))
    return {"data": str(root / "data"), "shards": shards, "pred": pred, "missing": missing,
            "wrong_size": wrong_size, "root": root}


def test_distributed_evaluate_equals_evaluate_folder(ray_local, eval_material, tmp_path):
    import ray.data

    from jobs.evaluate import run_evaluate
    from wsss.metrics import evaluate_folder

    ray.data.DataContext.get_current().enable_progress_bars = False
    ref = evaluate_folder(eval_material["pred"], eval_material["data"], "train")
    res = run_evaluate(eval_material["pred"], eval_material["shards"], json_path=str(tmp_path / "eval.json"))
    assert res["n_images"] == ref["n_images"] == N_IMAGES - 2
    assert res["miou"] == ref["miou"] and 0 < res["miou"] < 1
    assert res["per_class"] == ref["per_class"]
    assert res["pixel_accuracy"] == ref["pixel_accuracy"]
    assert res["absent"] == ref["absent"]
    assert res["missing"] == sorted(ref["missing"]) == [eval_material["missing"]]
    assert [r[0] for r in res["rejects"]] == [r[0] for r in ref["rejects"]] == [eval_material["wrong_size"]]
    saved = json.loads((tmp_path / "eval.json").read_text())
    for key in ("miou", "per_class", "n_images", "missing", "rejects", "split"):
        assert saved[key] == res[key], key


def test_cli_writes_json_and_reports_missing_folder(ray_local, eval_material, tmp_path, capsys):
    from jobs.evaluate import main

    rc = main(["--pred", eval_material["pred"], "--data", eval_material["shards"], "--json",
               str(tmp_path / "e.json")])
    assert rc == 0
    # stdout ends with the result JSON (Ray may print worker log lines before it)
    text = capsys.readouterr().out
    out = json.loads(text[text.rindex("\n{\n") + 1:] if not text.startswith("{\n") else text)
    assert out["n_images"] == N_IMAGES - 2 and json.loads((tmp_path / "e.json").read_text())["miou"] == out["miou"]
    rc = main(["--pred", str(tmp_path / "no-such-preds"), "--data", eval_material["shards"]])
    assert rc == 2
    assert "no-such-preds" in capsys.readouterr().err
