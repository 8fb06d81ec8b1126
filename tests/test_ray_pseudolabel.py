"""Ray Data pseudo-labelling job (jobs/pseudolabel.py) on the local stack: real local Ray cluster (``ray_local``),
real moto S3 over HTTP (``s3_server``), 12 synthetic 64-px images sharded with wsss.data.shards, an untrained tiny
CAM network and an untrained tiny AffinityNet.

(1) end to end, shards and output on S3: exactly one label per input id, results/rejects tables, stage stats; a
    rerun processes nothing; (2) the driver of a run (a subprocess joined to the same cluster) is killed with
    SIGKILL after its first results were written; a rerun completes with the same set of outputs, no duplicate and
    no missing id; (3) corrupt images in a shard are rejected with reasons and the rest is labelled; (4) a pipeline
    whose actors can never be placed fails instead of hanging.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 12
# Tiny and fast: 2 CAM scales with flip, a short walk, a short CRF.
TINY = {"model": {"backbone": "tiny", "width": 8}, "infer": {"scales": [1.0, 0.5], "flip": True},
        "rw": {"logt": 4}, "crf": {"iters": 5}, "device": "cpu", "seed": 0}


def _quiet():
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


@pytest.fixture(scope="module")
def material(tmp_path_factory, s3_server):
    """Synthetic data (local), its shards (local and on S3), CAM + affinity checkpoints (CAM on S3)."""
    import torch

    from wsss.checkpoint import save_checkpoint
    from wsss.config import from_dict
    from wsss.data import open_dataset
    from wsss.data.shards import write_shards
    from wsss.data.synth import make_synthetic
    from wsss.models.affinity_net import AffinityNet
    from wsss.train import build_model

    root = tmp_path_factory.mktemp("plabel")
    make_synthetic(str(root / "data"), num_images=N_IMAGES, size=64, seed=0, val_fraction=0.0)
    ds = open_dataset(str(root / "data"), "train")
    assert len(ds.ids) == N_IMAGES
    base = s3_server.unique_uri("pseudolabel")
    shards_s3 = f"{base}/shards"
    write_shards(ds, shards_s3, shard_size=5, progress=False)
    shards_local = str(root / "shards")
    write_shards(ds, shards_local, shard_size=5, progress=False)
    cfg = from_dict(TINY)
    torch.manual_seed(0)
    cam_ckpt = f"{base}/cam_ckpt"
    save_checkpoint(cam_ckpt, build_model(cfg, ds.num_classes), cfg,
                    {"kind": "cam", "class_names": list(ds.class_names)})
    aff_ckpt = str(root / "aff_ckpt")
    save_checkpoint(aff_ckpt, AffinityNet(cfg.model, load_weights=False), cfg,
                    {"kind": "affinity", "class_names": list(ds.class_names)})
    return {"root": root, "ids": sorted(ds.ids), "class_names": list(ds.class_names), "base": base,
            "shards_s3": shards_s3, "shards_local": shards_local, "cam": cam_ckpt, "aff": aff_ckpt,
            "data": str(root / "data")}


def _pngs(uri: str) -> set[str]:
    from wsss.data import fs

    try:
        return {n[:-4] for n in fs.listdir(fs.join(uri, "_labels")) if n.endswith(".png")}
    except FileNotFoundError:
        return set()


def _table(uri: str) -> list[dict]:
    import pyarrow.parquet as pq

    from wsss.data import fs

    return pq.read_table(io.BytesIO(fs.read_bytes(uri))).to_pylist()


def _parts(uri: str) -> list[str]:
    from wsss.data import fs

    try:
        return [n for n in fs.listdir(fs.join(uri, "_parts")) if n.endswith(".parquet")]
    except FileNotFoundError:
        return []


def test_end_to_end_on_s3_one_label_per_id(ray_local, material):
    from jobs.pseudolabel import run_pseudolabel
    from wsss.data import fs
    from wsss.data.io import decode_image, decode_mask
    from wsss.data.shards import iter_shard_rows

    _quiet()
    out = f"{material['base']}/out-e2e"
    res = run_pseudolabel(material["cam"], material["shards_s3"], out, affinity=material["aff"],
                          stages="cam,rw,crf", batch_size=3, crf_tasks=2, progress=False)
    ids = material["ids"]
    assert res["n_ok"] == N_IMAGES and res["n_rejected"] == 0 and res["duplicates_in_run"] == 0
    assert _pngs(out) == set(ids)
    rows = _table(fs.join(out, "part-00000.parquet"))
    assert [r["id"] for r in rows] == ids  # one row per id, sorted
    assert all(r["status"] == "ok" for r in rows)
    assert all(r["sec_cam"] is not None and r["sec_rw"] is not None and r["sec_crf"] is not None for r in rows)
    assert _table(fs.join(out, "_rejects.parquet")) == []
    assert _parts(out) == []  # parts were compacted into part-00000.parquet
    # the output prefix is a Parquet dataset of exactly the result rows, for pyarrow and for Ray Data
    import pyarrow.dataset as pads
    import ray.data

    from cluster.storage import pyarrow_fs

    pfs, path = pyarrow_fs(out)
    assert sorted(pads.dataset(path, filesystem=pfs, format="parquet").to_table().column("id").to_pylist()) == ids
    assert sorted(r["id"] for r in ray.data.read_parquet(path, filesystem=pfs).take_all()) == ids

    # each label: the image's size, only background and the image's own classes
    names = material["class_names"]
    by_id = {r["id"]: r for r in rows}
    for rec in iter_shard_rows(material["shards_s3"], columns=["id", "image", "labels"]):
        lab = decode_mask(fs.read_bytes(fs.join(out, "_labels", f"{rec['id']}.png")), rec["id"])
        assert lab.shape == decode_image(rec["image"], rec["id"]).shape[:2]
        allowed = {0} | {k + 1 for k in np.flatnonzero(rec["labels"] > 0.5)}
        assert set(np.unique(lab).tolist()) <= allowed
        assert by_id[rec["id"]]["classes"] == [names[k] for k in sorted(allowed - {0})]

    # per-stage throughput from ds.stats(), returned and written
    stages = {r["stage"] for r in res["stage_stats"]}
    assert {"cam", "rw", "crf"} <= stages, stages
    for r in res["stage_stats"]:
        if r["stage"] in ("cam", "rw", "crf"):
            assert r["rows"] == N_IMAGES and r["rows_per_s"] > 0
    saved = json.loads(fs.read_bytes(fs.join(out, "_stage_stats.json")))
    assert saved["stage_stats"] == json.loads(json.dumps(res["stage_stats"]))

    # a rerun finds everything done and changes nothing
    before = {i: fs.read_bytes(fs.join(out, "_labels", f"{i}.png")) for i in ids}
    res2 = run_pseudolabel(material["cam"], material["shards_s3"], out, affinity=material["aff"],
                           stages="cam,rw,crf", batch_size=3, crf_tasks=2, progress=False, verbose=False)
    assert res2["n_done_before"] == N_IMAGES and res2["n_processed"] == 0
    assert [r["id"] for r in _table(fs.join(out, "part-00000.parquet"))] == ids
    assert {i: fs.read_bytes(fs.join(out, "_labels", f"{i}.png")) for i in ids} == before


def test_killed_driver_then_rerun_completes_without_duplicates(ray_local, material, tmp_path):
    """Kill the job's driver (SIGKILL) once it has written its first results, rerun: same set of outputs."""
    from jobs.pseudolabel import run_pseudolabel
    from wsss.data import fs

    _quiet()
    out = str(tmp_path / "out-kill")
    # Slow enough to be caught midway: one image per batch, one CRF task, a long CRF.
    slow = ["crf.iters=150"]
    cmd = [sys.executable, "-m", "jobs.pseudolabel", "--checkpoint", material["cam"], "--data",
           material["shards_s3"], "--out", out, "--stages", "cam,crf", "--batch-size", "1", "--crf-tasks", "1",
           "--address", ray_local.address, "--no-progress"] + [a for s in slow for a in ("--set", s)]
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "driver.log", "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 150
        while time.time() < deadline and proc.poll() is None:
            if _parts(out):
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"driver ended before it could be killed: {(tmp_path / 'driver.log').read_text()[-2000:]}"
        assert _parts(out), "no results part within 150 s"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        log.close()
    n_at_kill = len(_pngs(out))
    assert 1 <= n_at_kill < N_IMAGES, n_at_kill
    assert not fs.exists(fs.join(out, "part-00000.parquet"))  # the killed run never compacted

    res = run_pseudolabel(material["cam"], material["shards_s3"], out, stages="cam,crf", batch_size=2,
                          crf_tasks=2, cfg_overrides=slow, progress=False, verbose=False)
    assert 1 <= res["n_done_before"] < N_IMAGES
    assert res["n_processed"] == N_IMAGES - res["n_done_before"]
    ids = material["ids"]
    assert _pngs(out) == set(ids)
    rows = _table(fs.join(out, "part-00000.parquet"))
    assert [r["id"] for r in rows] == ids  # sorted, unique, complete
    assert all(r["status"] == "ok" and r["sec_rw"] is None and r["sec_crf"] is not None for r in rows)
    assert _table(fs.join(out, "_rejects.parquet")) == []


def _corrupt_shards(src: str, dst: str, bad: dict[str, bytes]) -> None:
    """Copy a local shard folder, replacing the image bytes of the ids in ``bad``; manifest checksums updated."""
    import pyarrow.parquet as pq

    from wsss.data.shards import SHARD_SCHEMA, read_manifest

    os.makedirs(dst)
    m = read_manifest(src)
    for s in m["shards"]:
        rows = pq.read_table(os.path.join(src, s["file"])).to_pylist()
        for r in rows:
            if r["id"] in bad:
                r["image"] = bad[r["id"]]
        path = os.path.join(dst, s["file"])
        import pyarrow as pa

        pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), path)
        data = Path(path).read_bytes()
        s["bytes"], s["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    Path(dst, "_manifest.json").write_text(json.dumps(m, indent=2))


def test_corrupt_images_are_rejected_rest_labelled(ray_local, material, tmp_path):
    from jobs.pseudolabel import run_pseudolabel
    from wsss.data import fs
    from wsss.data.shards import iter_shard_rows

    _quiet()
    ids = material["ids"]
    first = next(r for r in iter_shard_rows(material["shards_local"], columns=["id", "image"]) if r["id"] == ids[3])
    bad = {ids[1]: b"this is not an image at all", ids[7]: first["image"][:60]}  # garbage, truncated JPEG
    shards = str(tmp_path / "shards-bad")
    _corrupt_shards(material["shards_local"], shards, bad)
    out = str(tmp_path / "out-bad")
    res = run_pseudolabel(material["cam"], shards, out, stages="cam", batch_size=4, progress=False, verbose=False)
    assert res["n_ok"] == N_IMAGES - 2 and res["n_rejected"] == 2
    assert _pngs(out) == set(ids) - set(bad)
    rejects = _table(fs.join(out, "_rejects.parquet"))
    assert sorted(r["id"] for r in rejects) == sorted(bad)
    for r in rejects:
        assert r["reason"].startswith("decode: ") and r["id"] in r["reason"], r
    assert [r["id"] for r in _table(fs.join(out, "part-00000.parquet"))] == sorted(set(ids) - set(bad))


def test_unplaceable_actors_fail_instead_of_hanging(ray_local, material, tmp_path):
    """GPU actors on a CPU-only cluster: wait_for_min_actors_s turns the wait into an error."""
    import ray

    from jobs.pseudolabel import run_pseudolabel

    _quiet()
    assert ray.cluster_resources().get("GPU", 0) == 0
    t0 = time.time()
    with pytest.raises(Exception) as info:
        run_pseudolabel(material["cam"], material["shards_local"], str(tmp_path / "out-gpu"), stages="cam",
                        use_gpu=True, actor_wait_s=3, progress=False, verbose=False)
    assert time.time() - t0 < 120
    assert "actor" in str(info.value).lower() or "timeout" in type(info.value).__name__.lower(), repr(info.value)


def test_bad_arguments_are_one_line_errors(material, tmp_path, capsys):
    from jobs.pseudolabel import main

    rc = main(["--checkpoint", material["cam"], "--data", material["shards_local"], "--out", str(tmp_path / "o"),
               "--stages", "cam,rw"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "affinity" in err[-1]
    rc = main(["--checkpoint", str(tmp_path / "nope"), "--data", material["shards_local"], "--out",
               str(tmp_path / "o"), "--stages", "cam"])
    assert rc == 2
    assert "nope" in capsys.readouterr().err
