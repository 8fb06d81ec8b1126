"""Pseudo-label pipeline: stage helpers, resumable local loop with rejects, AffinityNet training, S3 output."""
import io
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from wsss.config import Config
from wsss.pseudolabel import (RandomWalkStage, cam_scores, check_stages, labels_from_scores, load_affinity_model,
                              pseudolabel)


def _cfg() -> Config:
    cfg = Config()
    cfg.model.backbone = "tiny"
    cfg.model.width = 8
    cfg.method.name = "daen"
    cfg.infer.scales = [1.0]
    cfg.infer.flip = False
    cfg.data.resize_long = [56, 72]
    cfg.data.crop = 64
    cfg.affinity.crop = 64
    cfg.affinity.batch_size = 4
    cfg.affinity.max_steps = 2
    cfg.crf.iters = 3
    cfg.rw.logt = 4
    cfg.device = "cpu"
    return cfg.validate()


@pytest.fixture(scope="module")
def cam_ckpt(synth_root, tmp_path_factory):
    from wsss.checkpoint import save_checkpoint
    from wsss.data import open_dataset
    from wsss.train import build_model

    cfg = _cfg()
    ds = open_dataset(str(synth_root))
    torch.manual_seed(0)
    net = build_model(cfg, ds.num_classes)
    where = str(tmp_path_factory.mktemp("ckpt") / "cam")
    save_checkpoint(where, net, cfg, meta={"kind": "cam", "class_names": list(ds.class_names)})
    return where


@pytest.fixture(scope="module")
def aff_ckpt(cam_ckpt, synth_root, tmp_path_factory):
    from wsss.affinity_train import train_affinity
    from wsss.cam import infer_cams

    base = tmp_path_factory.mktemp("aff")
    cams = str(base / "cams")
    infer_cams(cam_ckpt, str(synth_root), cams, split="train", progress=False)
    out = train_affinity(_cfg(), cams, str(synth_root), str(base / "affnet"), split="train", progress=False)
    return {"ckpt": out, "cams": cams, "base": base}


# ---- pure helpers ------------------------------------------------------------------------------------------

def test_cam_scores_and_labels_match_threshold_labels():
    from wsss.cam import cam_labels

    rng = np.random.default_rng(0)
    cam = rng.random((2, 9, 11)).astype(np.float32)
    keys = np.array([3, 5])
    probs, k = cam_scores(cam, keys, 0.4)
    assert probs.shape == (3, 9, 11) and k.tolist() == [0, 3, 5]
    assert np.all(probs[0] == np.float32(0.4))
    lab = labels_from_scores(probs, k)
    assert lab.dtype == np.uint8
    assert np.array_equal(lab, cam_labels(cam, keys, 0.4))
    assert set(np.unique(lab)) <= {0, 3, 5}


def test_check_stages():
    assert check_stages(("cam",), None) == ("cam",)
    assert check_stages("cam,rw,crf", "x") == ("cam", "rw", "crf")
    with pytest.raises(ValueError, match="affinity"):
        check_stages(("cam", "rw"), None)
    with pytest.raises(ValueError, match="order"):
        check_stages(("cam", "crf", "rw"), "x")
    with pytest.raises(ValueError, match="unknown stage"):
        check_stages(("cam", "dcrf"), None)
    with pytest.raises(ValueError):
        check_stages(("crf",), None)


# ---- local loop: resume and rejects -------------------------------------------------------------------------

def _read(path):
    return pq.read_table(path).to_pylist()


def test_pseudolabel_rejects_corrupt_image_and_resumes(cam_ckpt, synth_root, tmp_path):
    from wsss.data import open_dataset
    from wsss.data.io import decode_mask

    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    ids = open_dataset(str(data), "val").ids
    assert len(ids) >= 4
    bad = ids[1]
    (data / "JPEGImages" / f"{bad}.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    out = tmp_path / "pl"
    cfg = _cfg()

    res = pseudolabel(cfg, cam_ckpt, str(data), str(out), stages=("cam", "crf"), split="val", progress=False)
    good = [i for i in ids if i != bad]
    assert res["n_written"] == len(good) and res["n_rejected"] == 1 and res["n_skipped"] == 0
    assert sorted(p.stem for p in out.glob("_labels/*.png")) == sorted(good)
    assert sorted(p.name for p in out.iterdir()) == ["_labels", "_rejects.parquet", "part-00000.parquet"]
    rej = _read(out / "_rejects.parquet")
    assert [r["id"] for r in rej] == [bad] and f"{bad}.jpg" in rej[0]["reason"]
    rows = _read(out / "part-00000.parquet")
    assert _read(out) == rows  # the folder is a Parquet dataset of the result rows
    assert sorted(r["id"] for r in rows) == sorted(good)
    assert all(r["status"] == "ok" and r["sec_cam"] > 0 and r["sec_crf"] > 0 and r["sec_rw"] is None
               for r in rows)
    ds = open_dataset(str(data), "val")
    for i in good:
        lab = decode_mask((out / "_labels" / f"{i}.png").read_bytes(), i)
        assert lab.shape == ds.image_hw(i)
        allowed = {0} | {c + 1 for c in np.flatnonzero(ds.labels(i))}
        assert set(np.unique(lab)) <= allowed

    # damage the output: remove one PNG, truncate another; the rest must be left alone
    removed, torn = good[0], good[1]
    lab_dir = out / "_labels"
    (lab_dir / f"{removed}.png").unlink()
    (lab_dir / f"{torn}.png").write_bytes((lab_dir / f"{torn}.png").read_bytes()[:20])
    untouched = good[2]
    mtime = os.stat(lab_dir / f"{untouched}.png").st_mtime_ns
    res2 = pseudolabel(cfg, cam_ckpt, str(data), str(out), stages=("cam", "crf"), split="val", progress=False)
    assert res2["n_written"] == 2 and res2["n_skipped"] == len(good) - 2 and res2["n_rejected"] == 1
    assert os.stat(lab_dir / f"{untouched}.png").st_mtime_ns == mtime
    rows2 = _read(out / "part-00000.parquet")
    ids2 = [r["id"] for r in rows2]
    assert sorted(ids2) == sorted(good) and len(ids2) == len(set(ids2))       # nothing lost or duplicated
    assert {r["id"]: r["sec_cam"] for r in rows2}[untouched] == {r["id"]: r["sec_cam"] for r in rows}[untouched]
    assert [r["id"] for r in _read(out / "_rejects.parquet")] == [bad]
    decode_mask((lab_dir / f"{torn}.png").read_bytes(), torn)

    # the image is fixed: the next run picks it up and clears its reject
    shutil.copy(synth_root / "JPEGImages" / f"{bad}.jpg", data / "JPEGImages" / f"{bad}.jpg")
    res3 = pseudolabel(cfg, cam_ckpt, str(data), str(out), stages=("cam",), split="val", progress=False)
    assert res3["n_written"] == 1 and res3["n_rejected"] == 0
    assert _read(out / "_rejects.parquet") == []
    assert sorted(r["id"] for r in _read(out / "part-00000.parquet")) == sorted(ids)


def test_pseudolabel_without_config_uses_checkpoint_config(cam_ckpt, synth_root, tmp_path):
    res = pseudolabel(None, cam_ckpt, str(synth_root), str(tmp_path / "o"), stages=("cam",), split="val",
                      progress=False, max_images=2)
    assert res["n_written"] == 2


def test_cli_pseudolabel_set_applies_without_config(cam_ckpt, synth_root, tmp_path):
    """`wsss pseudolabel --set k=v` without --config overrides the checkpoint's config (it used to be ignored)."""
    from PIL import Image

    from wsss.cli import main
    from wsss.pseudolabel import checkpoint_config

    assert checkpoint_config(cam_ckpt, ["infer.bg_threshold=0.99"]).infer.bg_threshold == 0.99
    fg = {}
    for t in ("0.01", "0.99"):
        out = tmp_path / t
        assert main(["pseudolabel", "--checkpoint", cam_ckpt, "--data", str(synth_root), "--out", str(out),
                     "--split", "val", "--stages", "cam", "--set", f"infer.bg_threshold={t}"]) == 0
        labels = [np.asarray(Image.open(p)) for p in sorted(out.glob("_labels/*.png"))]
        fg[t] = np.mean([((a > 0) & (a < 255)).mean() for a in labels])
    assert fg["0.01"] > fg["0.99"]


def test_pseudolabel_class_mismatch_is_an_error(cam_ckpt, synth_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    names = (data / "classes.txt").read_text().split()
    (data / "classes.txt").write_text("\n".join(names[:-1] + ["zebra"]) + "\n")
    with pytest.raises(ValueError, match="classes"):
        pseudolabel(_cfg(), cam_ckpt, str(data), str(tmp_path / "o"), stages=("cam",), split="val",
                    progress=False)


# ---- AffinityNet training and the random-walk stage ----------------------------------------------------------

def test_train_affinity_writes_checkpoint_and_label_cache(aff_ckpt, synth_root):
    from wsss.affinity_train import LABEL_DIR, build_affinity_labels, load_label
    from wsss.checkpoint import load_checkpoint
    from wsss.data import open_dataset

    state, cfg, meta, metrics = load_checkpoint(aff_ckpt["ckpt"])
    assert meta["kind"] == "affinity" and meta["class_names"][0] == "background"
    assert metrics["steps"] == 2 and np.isfinite(metrics["loss_last"])
    assert any(k.startswith("embed.") for k in state)
    ds = open_dataset(str(synth_root), "train")
    cache = os.path.join(aff_ckpt["ckpt"], LABEL_DIR)
    files = sorted(f for f in os.listdir(cache) if f.endswith(".npz"))
    assert sorted(os.listdir(cache)) == sorted(files + ["settings.json"])
    assert files == sorted(f"{i}.npz" for i in ds.ids)
    lab = load_label(os.path.join(cache, files[0]))
    assert lab.dtype == np.uint8 and lab.shape == ds.image_hw(files[0][:-4])
    # cached labels are reused, not recomputed
    mtimes = {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in files}
    ok, rejects = build_affinity_labels(cfg, aff_ckpt["cams"], ds, cache, progress=False)
    assert sorted(ok) == sorted(ds.ids) and rejects == []
    assert {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in files} == mtimes
    # labels made with other background powers are recomputed, not silently reused
    cfg.affinity.low_alpha, cfg.affinity.high_alpha, cfg.infer.bg_threshold = None, None, 0.4
    from wsss.affinity_train import label_alphas
    from wsss.refine.random_walk import matched_bg_alpha
    assert label_alphas(cfg) == (pytest.approx(matched_bg_alpha(0.5)), pytest.approx(matched_bg_alpha(0.3)))
    ok, rejects = build_affinity_labels(cfg, aff_ckpt["cams"], ds, cache, ids=ds.ids[:2], progress=False)
    assert ok == ds.ids[:2] and rejects == []
    changed = {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in files[:2]}
    assert all(changed[f] != mtimes[f] for f in changed)
    # the labels of the other settings are gone, not left beside the new stamp
    assert sorted(f for f in os.listdir(cache) if f.endswith(".npz")) == sorted(f"{i}.npz" for i in ds.ids[:2])
    # a missing CAM file rejects that id only
    ok2, rejects2 = build_affinity_labels(cfg, aff_ckpt["cams"] + "-missing", ds, cache + "-new",
                                          ids=ds.ids[:2], progress=False)
    assert ok2 == [] and [r[0] for r in rejects2] == ds.ids[:2] and "CAM file missing" in rejects2[0][1]


def test_random_walk_stage_and_full_pipeline(aff_ckpt, cam_ckpt, synth_root, tmp_path):
    from wsss.cam import load_cam
    from wsss.data import open_dataset

    cfg = _cfg()
    net, acfg, meta = load_affinity_model(aff_ckpt["ckpt"], "cpu")
    assert not net.training
    stage = RandomWalkStage(aff_ckpt["ckpt"], cfg, device="cpu")
    ds = open_dataset(str(synth_root), "train")
    i = ds.ids[0]
    image = ds.load_image(i)
    cam, keys = load_cam(os.path.join(aff_ckpt["cams"], f"{i}.npz"))
    probs, k = stage(image, cam, keys)
    assert probs.shape == (len(keys) + 1,) + image.shape[:2]
    assert k[0] == 0 and list(k[1:]) == list(keys)
    assert np.allclose(probs.sum(0), 1, atol=1e-4)
    with pytest.raises(ValueError, match="does not match"):
        stage(image[:-8], cam, keys)

    out = tmp_path / "pl"
    res = pseudolabel(cfg, cam_ckpt, str(synth_root), str(out), affinity=aff_ckpt["ckpt"],
                      stages=("cam", "rw", "crf"), split="val", progress=False)
    assert res["n_written"] == len(open_dataset(str(synth_root), "val").ids) and res["n_rejected"] == 0
    rows = _read(out / "part-00000.parquet")
    assert all(r["sec_rw"] > 0 and r["sec_crf"] > 0 for r in rows)


def test_upscaled_affinity_walks_on_a_finer_grid(aff_ckpt, synth_root, tmp_path):
    """affinity.upscale 2: AffinityNet trains on 2x images and the walk runs on a grid of 4 input pixels."""
    from wsss.affinity_train import AffinityTrainDataset, train_affinity
    from wsss.cam import load_cam
    from wsss.checkpoint import load_checkpoint
    from wsss.data import open_dataset

    cfg = _cfg()
    cfg.affinity.upscale = 2
    cfg.affinity.crop = 128
    ds = open_dataset(str(synth_root), "train")
    lab_dir = os.path.join(aff_ckpt["ckpt"], "affinity_labels")
    tds = AffinityTrainDataset(ds, ds.ids[:2], lab_dir, cfg.data, 128, upscale=2)
    item = tds[0]
    h, w = ds.image_hw(item["id"])
    # the long side is resized into resize_long x 2 (the image is smaller than the 128 crop, so it sits inside it)
    lo, hi = (2 * v for v in cfg.data.resize_long)
    inside = (item["label"] != 255).nonzero()
    span = max(int(inside[:, 0].max() - inside[:, 0].min()), int(inside[:, 1].max() - inside[:, 1].min())) + 1
    assert lo - 2 <= span <= hi and item["image"].shape == (3, 128, 128)
    out = train_affinity(cfg, aff_ckpt["cams"], str(synth_root), str(tmp_path / "aff2"), split="train",
                         progress=False)
    assert load_checkpoint(out)[2]["upscale"] == 2
    stage = RandomWalkStage(out, _cfg(), device="cpu")  # the upscale comes from the affinity checkpoint
    assert (stage.upscale, stage.stride) == (2, 4) and stage.bg_alpha == _cfg().rw.bg_alpha
    matched = _cfg()
    matched.rw.bg_alpha, matched.infer.bg_threshold = None, 0.5
    assert RandomWalkStage(out, matched, device="cpu").bg_alpha == pytest.approx(1.0)
    i = ds.ids[0]
    image = ds.load_image(i)
    aff = stage.affinities(image)
    assert tuple(aff.shape[1:]) == (-(-image.shape[0] // 4), -(-image.shape[1] // 4))
    cam, keys = load_cam(os.path.join(aff_ckpt["cams"], f"{i}.npz"))
    probs, k = stage(image, cam, keys)
    assert probs.shape == (len(keys) + 1,) + image.shape[:2] and np.allclose(probs.sum(0), 1, atol=1e-4)
    with pytest.raises(Exception, match="affinity.upscale"):
        from wsss import config as _c
        _c.from_dict({"affinity": {"upscale": 3}})


def test_affinity_checkpoint_kind_is_checked(cam_ckpt):
    with pytest.raises(ValueError, match="affinity"):
        load_affinity_model(cam_ckpt, "cpu")


# ---- S3 output ----------------------------------------------------------------------------------------------

def test_pseudolabel_to_s3(cam_ckpt, synth_root, s3_server):
    from wsss.data import fs
    from wsss.data.io import decode_mask

    out = s3_server.unique_uri("pseudolabel")
    res = pseudolabel(_cfg(), cam_ckpt, str(synth_root), out, stages=("cam", "crf"), split="val",
                      progress=False, max_images=3)
    assert res["n_written"] == 3
    assert fs.listdir(out) == ["_labels", "_rejects.parquet", "part-00000.parquet"]
    pngs = fs.listdir(fs.join(out, "_labels"))
    assert len(pngs) == 3 and all(n.endswith(".png") for n in pngs)
    decode_mask(fs.read_bytes(fs.join(out, "_labels", pngs[0])), pngs[0])
    rows = pq.read_table(io.BytesIO(fs.read_bytes(fs.join(out, "part-00000.parquet")))).to_pylist()
    assert len(rows) == 3
    res2 = pseudolabel(_cfg(), cam_ckpt, str(synth_root), out, stages=("cam", "crf"), split="val",
                       progress=False, max_images=3)
    assert res2["n_written"] == 0 and res2["n_skipped"] == 3


def test_crf_only_path_does_not_import_torch():
    """CRF workers of the Ray pipeline import wsss.pseudolabel for crf_stage: they must not pay a torch import."""
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from wsss.config import Config\n"
            "from wsss.pseudolabel import cam_scores, crf_stage, labels_from_scores\n"
            "img = np.zeros((16, 16, 3), np.uint8)\n"
            "p, k = cam_scores(np.random.rand(1, 16, 16).astype('f4'), [3], 0.5)\n"
            "assert labels_from_scores(*crf_stage(img, p, k, Config().crf)).shape == (16, 16)\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
