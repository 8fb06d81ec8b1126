"""Every skipped id is a reject with its reason, on the planted-fault VOC set (tests/faulty_voc.py): 8 bad ids (a
truncated JPEG, garbage bytes, an empty file, a wrong-size mask, an empty label vector, a mask with class 77, a
listed-but-missing id, ``../../../../etc/passwd`` in the split list) and two good-but-unusual images (a grayscale
JPEG, an RGBA PNG under JPEGImages/). For shard, cams, pseudolabel (local and Ray), evaluate (local and Ray) and
the training dataset: the bad ids are rejected with reasons, the unusual images are processed, and the counts add
up to the ids listed."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from tests.faulty_voc import BAD, GOOD, check_rejects, make_faulty_voc
from wsss.data import fs, shards

N_LISTED = len(GOOD) + len(BAD)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    return make_faulty_voc(tmp_path_factory.mktemp("faulty") / "voc")


@pytest.fixture(scope="module")
def cam_ckpt(faulty, tmp_path_factory):
    import torch

    from wsss.checkpoint import save_checkpoint
    from wsss.config import from_dict
    from wsss.train import build_model

    cfg = from_dict({"model": {"backbone": "tiny", "width": 8}, "infer": {"scales": [1.0, 0.5], "flip": True},
                     "crf": {"iters": 2}, "device": "cpu", "seed": 0})
    torch.manual_seed(0)
    where = str(tmp_path_factory.mktemp("ck") / "cam")
    save_checkpoint(where, build_model(cfg, 4), cfg, meta={"kind": "cam", "class_names": faulty["class_names"]})
    return where


@pytest.fixture(scope="module")
def shard_dir(faulty, tmp_path_factory):
    from jobs.shard import shard_dataset

    dst = str(tmp_path_factory.mktemp("shards") / "s")
    shard_dataset(faulty["root"], dst, shard_size=4, split=faulty["split"], progress=False)
    return dst


def test_reader_finds_images_by_id_with_any_extension(faulty):
    from wsss.data import open_dataset

    ds = open_dataset(faulty["root"], faulty["split"])
    assert ds.image_uri("rgba").endswith("JPEGImages/rgba.png") and ds.image_uri("gray").endswith("gray.jpg")
    for i in ("rgba", "gray"):
        item = ds.load_item(i)
        assert item["image"].shape == (40, 48, 3) and item["image"].dtype == np.uint8
    assert [i for i, _ in ds.rejects] == ["../../../../etc/passwd"]
    assert len(ds.ids) + len(ds.rejects) == N_LISTED


def test_shard_cli_rejects_every_bad_id(faulty, tmp_path, capsys):
    from jobs import shard as shard_job

    dst = str(tmp_path / "s")
    assert shard_job.main([faulty["root"], dst, "--split", "train", "--shard-size", "4", "--no-progress"]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary["n_images"] == len(GOOD) and summary["n_rejects"] == len(BAD)
    check_rejects(shards.read_rejects(dst), where="shard")
    for bad in BAD:  # each reject is printed with its reason
        assert f"rejected {bad}: " in out.err
    rows = {r["id"]: r for r in shards.iter_shard_rows(dst)}
    assert sorted(rows) == sorted(GOOD)
    from wsss.data.io import decode_image

    assert rows["rgba"]["image"][:8] == b"\x89PNG\r\n\x1a\n"  # the original bytes, converted only on decode
    assert decode_image(rows["gray"]["image"], "gray").shape == (40, 48, 3)


def test_cams_reject_every_bad_id(faulty, cam_ckpt, tmp_path):
    from wsss.cam import infer_cams

    out = str(tmp_path / "cams")
    res = infer_cams(cam_ckpt, faulty["root"], out, split="train", progress=False)
    assert res["written"] == len(GOOD) and res["written"] + len(res["rejects"]) == N_LISTED
    check_rejects(res["rejects"], where="cams")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "cams" / "rejects.csv").read_text())))
    check_rejects(rows, where="cams rejects.csv")
    assert sorted(n[:-4] for n in fs.listdir(out) if n.endswith(".npz")) == sorted(GOOD)


def test_pseudolabel_local_and_evaluate_reject_every_bad_id(faulty, cam_ckpt, tmp_path):
    import pyarrow.parquet as pq

    from wsss.metrics import evaluate_folder
    from wsss.pseudolabel import pseudolabel

    out = str(tmp_path / "pl")
    res = pseudolabel(None, cam_ckpt, faulty["root"], out, stages=("cam", "crf"), split="train", progress=False)
    assert res["n_written"] == len(GOOD) and res["n_rejected"] == len(BAD) and res["n_listed"] == N_LISTED
    check_rejects(pq.read_table(f"{out}/_rejects.parquet").to_pylist(), where="pseudolabel")
    assert sorted(pq.read_table(out).column("id").to_pylist()) == sorted(GOOD)
    assert sorted(n[:-4] for n in fs.listdir(f"{out}/_labels")) == sorted(GOOD)

    ev = evaluate_folder(out, faulty["root"], split="train")
    assert ev["n_images"] == len(GOOD) and ev["missing"] == []
    assert ev["n_images"] + len(ev["rejects"]) == N_LISTED
    check_rejects(ev["rejects"], where="evaluate")


def test_training_dataset_rejects(faulty):
    from wsss.config import Config
    from wsss.data import open_dataset
    from wsss.data.transforms import TrainDataset

    ds = open_dataset(faulty["root"], faulty["split"])
    tds = TrainDataset(ds, Config().data)
    rejects = tds.check()
    # training reads images and image-level labels only: the wrong-size mask still gives valid labels
    bad = {k: v for k, v in BAD.items() if k != "wrongsize"}
    check_rejects(rejects, good=GOOD + ["wrongsize"], bad=bad, where="train")
    assert sorted(tds.ids) == sorted(GOOD + ["wrongsize"]) and len(tds.ids) + len(rejects) == N_LISTED


@pytest.mark.ray
def test_ray_pseudolabel_and_evaluate_reject_every_bad_id(faulty, cam_ckpt, shard_dir, ray_local, tmp_path):
    import pyarrow.parquet as pq
    import ray.data

    from jobs.evaluate import run_evaluate
    from jobs.pseudolabel import run_pseudolabel

    ray.data.DataContext.get_current().enable_progress_bars = False
    out = str(tmp_path / "ray-pl")
    res = run_pseudolabel(cam_ckpt, shard_dir, out, stages="cam", batch_size=4, progress=False, verbose=False)
    assert res["n_ok"] == len(GOOD) and res["n_rejected"] == 0  # the shards hold the good images only
    assert res["n_results"] + res["n_rejects_total"] == N_LISTED
    rejects = pq.read_table(f"{out}/_rejects.parquet").to_pylist()
    check_rejects(rejects, where="ray pseudolabel")
    assert all(r["reason"].startswith("shard: ") for r in rejects)
    assert sorted(pq.read_table(out).column("id").to_pylist()) == sorted(GOOD)

    ev = run_evaluate(out, shard_dir)
    assert ev["n_images"] == len(GOOD) and ev["missing"] == []
    assert ev["n_images"] + len(ev["rejects"]) == N_LISTED
    check_rejects(ev["rejects"], where="ray evaluate")
