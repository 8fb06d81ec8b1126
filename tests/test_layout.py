"""Shard folders and pseudo-label output prefixes are Parquet datasets: pyarrow.dataset, pq.read_table and
ray.data.read_parquet on them yield exactly the data rows, locally and on the moto S3 server; side files start
with ``_``. Old layouts are still read (one LegacyLayoutWarning) and an old output prefix is migrated on write."""
from __future__ import annotations

import json
import warnings

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from tests.faulty_voc import make_faulty_voc
from wsss.data import fs, layout, shards


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    return make_faulty_voc(tmp_path_factory.mktemp("faulty") / "voc")


def _shard(faulty, dst):
    from jobs.shard import shard_dataset

    return shard_dataset(faulty["root"], dst, shard_size=4, split=faulty["split"], progress=False)


def _ids_pyarrow(uri: str) -> list[str]:
    from cluster.storage import pyarrow_fs

    pfs, path = pyarrow_fs(uri)
    return sorted(pads.dataset(path, filesystem=pfs, format="parquet").to_table(columns=["id"])
                  .column("id").to_pylist())


def test_shard_folder_is_a_parquet_dataset_local(faulty, tmp_path):
    dst = str(tmp_path / "shards")
    m = _shard(faulty, dst)
    good = sorted(faulty["good"])
    assert m["n_images"] == len(good) and m["n_images"] + m["n_rejects"] == len(faulty["listed"])
    names = fs.listdir(dst)
    assert [n for n in names if not n.startswith("_")] == [s["file"] for s in m["shards"]]
    assert {"_manifest.json", "_rejects.parquet"} <= set(names)
    assert _ids_pyarrow(dst) == good
    t = pq.read_table(dst)
    assert sorted(t.column("id").to_pylist()) == good and t.schema.equals(shards.SHARD_SCHEMA)
    assert pads.dataset(dst, format="parquet").count_rows() == len(good)


def test_shard_folder_is_a_parquet_dataset_s3_and_ray(faulty, s3_server, ray_local, tmp_path):
    import ray.data

    from cluster.storage import pyarrow_fs

    ray.data.DataContext.get_current().enable_progress_bars = False
    local = str(tmp_path / "shards")
    _shard(faulty, local)
    good = sorted(faulty["good"])
    assert sorted(r["id"] for r in ray.data.read_parquet(local).take_all()) == good
    dst = s3_server.unique_uri("layout-shards")
    _shard(faulty, dst)
    assert _ids_pyarrow(dst) == good
    pfs, path = pyarrow_fs(dst)
    rows = ray.data.read_parquet(path, filesystem=pfs).take_all()
    assert sorted(r["id"] for r in rows) == good
    assert set(rows[0]) == {f.name for f in shards.SHARD_SCHEMA}


def test_output_prefix_is_a_parquet_dataset(faulty, tmp_path, s3_server):
    """The local pseudo-label loop's output, locally and on S3: result rows only, labels under _labels/."""
    import torch

    from wsss.checkpoint import save_checkpoint
    from wsss.config import from_dict
    from wsss.pseudolabel import pseudolabel
    from wsss.train import build_model

    cfg = from_dict({"model": {"backbone": "tiny", "width": 8}, "infer": {"scales": [1.0], "flip": False},
                     "crf": {"iters": 2}, "device": "cpu"})
    torch.manual_seed(0)
    ckpt = str(tmp_path / "ck")
    save_checkpoint(ckpt, build_model(cfg, 4), cfg, meta={"kind": "cam", "class_names": faulty["class_names"]})
    good = sorted(faulty["good"])
    for out in (str(tmp_path / "pl"), s3_server.unique_uri("layout-out")):
        res = pseudolabel(cfg, ckpt, faulty["root"], out, stages=("cam", "crf"), split="train", progress=False)
        assert res["n_written"] == len(good) and res["n_written"] + res["n_rejected"] == res["n_listed"] == 14
        assert fs.listdir(out) == ["_labels", "_rejects.parquet", "part-00000.parquet"]
        assert sorted(n[:-4] for n in fs.listdir(fs.join(out, "_labels"))) == good
        assert _ids_pyarrow(out) == good
        if not fs.is_remote(out):
            t = pq.read_table(out)
            assert sorted(t.column("id").to_pylist()) == good
            assert t.column_names == ["id", "classes", "sec_cam", "sec_rw", "sec_crf", "status"]


def test_legacy_shard_folder_is_read_with_one_warning(faulty, tmp_path):
    dst = tmp_path / "old"
    _shard(faulty, str(dst))
    (dst / "_manifest.json").rename(dst / "manifest.json")
    (dst / "_rejects.parquet").rename(dst / "rejects.parquet")
    layout._warned.clear()
    with pytest.warns(layout.LegacyLayoutWarning, match="manifest.json") as rec:
        m = shards.read_manifest(str(dst))
        shards.read_manifest(str(dst))
        shards.read_rejects(str(dst))
    assert len(rec) == 1  # once per folder
    assert m["n_images"] == len(faulty["good"]) and len(shards.read_rejects(str(dst))) == 8
    assert sorted(r["id"] for r in shards.iter_shard_rows(str(dst), columns=["id"])) == sorted(faulty["good"])
    # re-sharding into it writes the new layout and removes the old side files
    with warnings.catch_warnings():
        warnings.simplefilter("error", layout.LegacyLayoutWarning)
        _shard(faulty, str(dst))
        assert sorted(p.name for p in dst.iterdir() if p.name.startswith(("_", "m", "r"))) == \
            ["_manifest.json", "_rejects.parquet"]
        assert shards.read_manifest(str(dst))["n_rejects"] == 8


def test_legacy_output_prefix_is_read_and_migrated(tmp_path):
    import numpy as np
    import pyarrow as pa

    from wsss.data.io import encode_label_png

    out = tmp_path / "old-out"
    out.mkdir()
    for i in ("a", "b"):
        (out / f"{i}.png").write_bytes(encode_label_png(np.zeros((4, 4), np.uint8)))
    pq.write_table(pa.table({"id": ["a", "b"], "classes": [["x"], ["x"]], "sec_cam": [0.1, 0.2],
                             "sec_rw": [None, None], "sec_crf": [None, None], "status": ["ok", "ok"]}),
                   out / "results.parquet")
    pq.write_table(pa.table({"id": ["c"], "reason": ["bad"]}), out / "rejects.parquet")
    (out / "stage_stats.json").write_text(json.dumps({"x": 1}))
    layout._warned.clear()
    with pytest.warns(layout.LegacyLayoutWarning):
        assert layout.label_dir(str(out)) == str(out)
        assert layout.read_rejects(str(out)) == {"c": "bad"}
        assert layout.result_files(str(out)) == [str(out / "results.parquet")]
    layout._warned.clear()
    with pytest.warns(layout.LegacyLayoutWarning, match="migrating"):
        assert layout.migrate_output(str(out)) == 5
    assert sorted(p.name for p in out.iterdir()) == ["_labels", "_rejects.parquet", "_stage_stats.json",
                                                      "part-00000.parquet"]
    assert sorted(p.name for p in (out / "_labels").iterdir()) == ["a.png", "b.png"]
    assert sorted(pq.read_table(str(out)).column("id").to_pylist()) == ["a", "b"]
    assert layout.migrate_output(str(out)) == 0  # idempotent
